"""timestamps.py: CTC forced alignment, tokens joined into words, CTM and subtitle files."""
import itertools
import math
import re

import pytest
import torch

from timestamps import Word, aligned_log_probs, ctc_forced_align, ctm_lines, srt, subtitle_cues, vtt, words_from_tokens

BLANK = 5


def posteriors(frame_labels: list[int], confident: float = 0.9) -> torch.Tensor:
    """(T, 6) log-posteriors: each frame's label at `confident`, the rest spread evenly."""
    probs = torch.full((len(frame_labels), BLANK + 1), (1 - confident) / BLANK)
    probs[torch.arange(len(frame_labels)), frame_labels] = confident
    return probs.log()


def test_alignment_of_a_constructed_posterior_returns_its_token_positions():
    b = BLANK  # a repeated token (2, 2) needs a blank between its copies
    log_probs = posteriors([b, 1, 1, b, 2, b, 2, 2, b, 3, b, b])
    assert ctc_forced_align(log_probs, [1, 2, 2, 3], BLANK) == [(1, 2), (4, 4), (6, 7), (9, 9)]
    # no blank before the first token or after the last
    assert ctc_forced_align(posteriors([4, 4, 0, 0]), [4, 0], BLANK) == [(0, 1), (2, 3)]


def collapse(path):
    return tuple(v for i, v in enumerate(path) if v != BLANK and (i == 0 or v != path[i - 1]))


@pytest.mark.parametrize("ids", [[1], [2, 2], [0, 3, 1], [4, 4, 4]])
def test_alignment_is_the_best_path_of_all(ids):
    torch.manual_seed(len(ids))
    log_probs = torch.randn(6, BLANK + 1, dtype=torch.float64).log_softmax(-1)
    best = max((float(log_probs[torch.arange(6), list(p)].sum()), p)
               for p in itertools.product(range(BLANK + 1), repeat=6) if collapse(p) == tuple(ids))
    spans = ctc_forced_align(log_probs, ids, BLANK)
    # the best path's token spans: each token's run of frames in it
    runs, t = [], 0
    best_path = best[1]
    for token in ids:
        while best_path[t] != token or (runs and t <= runs[-1][1]):
            t += 1
        start = t
        while t + 1 < len(best_path) and best_path[t + 1] == token:
            t += 1
        runs.append((start, t))
    assert spans == runs


def test_tokens_that_cannot_fit_the_audio_are_an_error():
    with pytest.raises(ValueError, match="cannot be aligned"):
        ctc_forced_align(posteriors([1, 1]), [1, 1], BLANK)  # a repeat needs 3 frames


def test_words_join_tokens_and_take_their_times_and_confidences():
    texts = [" Hel", "lo", ",", " wor", "ld", " !", " 42"]
    spans = [(0, 1), (2, 2), (4, 4), (5, 6), (7, 7), (9, 9), (10, 11)]
    ctc, llm = [math.log(0.5)] * 7, [math.log(0.8)] * 7
    words = words_from_tokens(texts, spans, ctc, llm, seconds_per_frame=0.1, num_frames=20, offset=30.0, end_extension=0.0)
    # trailing punctuation joins the word's text, not its time: CTC places it late
    assert [(w.text, w.start, w.end) for w in words] == [("Hello,", 30.0, 30.3), ("world", 30.5, 30.8), ("!", 30.9, 31.0),
                                                         ("42", 31.0, 31.2)]
    # each end moved 0.3 s past its last spike, but not past the next word's start nor the audio's end
    for num_frames, last_end in ((20, 31.5), (13, 31.3)):
        words = words_from_tokens(texts, spans, ctc, llm, seconds_per_frame=0.1, num_frames=num_frames, offset=30.0)
        assert [(w.start, w.end) for w in words] == [(30.0, 30.5), (30.5, 30.9), (30.9, 31.0), (31.0, last_end)]
    far = words_from_tokens([" a", " b"], [(0, 0), (9, 9)], [0.0] * 2, [0.0] * 2, seconds_per_frame=0.1, num_frames=10)
    assert [(w.start, w.end) for w in far] == [(0.0, 0.4), (0.9, 1.0)]  # a pause after "a": 0.3 s of it
    assert words[0].confidence == pytest.approx(0.4)
    log_probs = posteriors([1, 1, 5, 2])
    assert aligned_log_probs(log_probs, [1, 2], [(0, 1), (3, 3)]) == pytest.approx([math.log(0.9)] * 2)


def test_ctm_and_subtitles_parse_back():
    words = [Word("one", 0.0, 0.4, 0.9, 0.9), Word("two", 0.5, 0.9, 0.8, 0.9), Word("three", 2.0, 2.5, 0.7, 0.9),
             Word("x" * 40, 2.6, 3.0, 0.9, 0.9)]
    ctm = [line.split() for line in ctm_lines("utt1", words)]
    assert [(k, c, float(s), float(d), w) for k, c, s, d, w, _ in ctm] == [
        ("utt1", "1", w.start, round(w.end - w.start, 2), w.text) for w in words]
    cues = subtitle_cues(words)  # a 1.1 s pause, then a line that would pass 42 characters
    assert [c[2] for c in cues] == ["one two", "three", "x" * 40]
    blocks = srt(cues).strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == ["1", "2", "3"]
    assert blocks[1].splitlines()[1] == "00:00:02,000 --> 00:00:02,500"
    text = vtt(cues)
    assert text.startswith("WEBVTT\n\n") and re.findall(r"(\S+) --> (\S+)", text)[2] == ("00:00:02.600", "00:00:03.000")
