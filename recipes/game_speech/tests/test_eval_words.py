"""recipes/game_speech/eval_words.py's measures on constructed inputs (no model)."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this recipe

import eval_words  # noqa: E402


def test_auc_is_mann_whitney():
    assert eval_words.auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert eval_words.auc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert eval_words.auc([0.5, 0.5], [True, False]) == 0.5  # a tie counts half
    assert eval_words.auc([0.9, 0.3, 0.5], [True, True, False]) == 0.5


def test_word_labels_follow_the_normalized_alignment():
    # "Lola's" normalizes to two tokens, both correct; "cat" substituted; "big" inserted; "Hmm" (a filler) is no word
    labels = eval_words.word_labels("Lola's dog sat.", ["Lola's", "big", "cat", "sat.", "Hmm"])
    assert labels == [True, False, False, True, None]
    assert eval_words.word_labels("", ["hello"]) == [False]


def test_speech_span_finds_the_loud_part():
    sr = eval_words.SAMPLE_RATE
    samples = np.zeros(sr, dtype=np.float32)
    samples[sr // 4: sr // 2] = 0.5 * np.sin(np.arange(sr // 4) * 0.3)
    onset, offset = eval_words.speech_span(samples, 35.0)
    assert abs(onset - 0.25) <= 0.01 and abs(offset - 0.5) <= 0.01
