"""recipes/game_speech/make_ood_dev.py: a small out-of-domain set made twice is the same, resumes, and holds no
training text."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this recipe

import make_ood_dev as ood  # noqa: E402
from compute_wer import tokenize  # noqa: E402

needs_tts = pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("sox")),
                               reason="espeak-ng or sox missing: bash recipes/game_speech/install_tts.sh")


def test_numbers_in_words():
    assert ood.words(0) == "zero" and ood.words(40) == "forty" and ood.words(597) == "five hundred ninety seven"
    assert ood.words(2265) == "two thousand two hundred sixty five"
    assert [ood.ordinal_words(n) for n in (1, 3, 8, 12, 20, 21, 28)] == [
        "first", "third", "eighth", "twelfth", "twentieth", "twenty first", "twenty eighth"]
    assert [ood.ordinal_digits(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd"]
    assert ood.year_words(1968) == "nineteen sixty eight" and ood.year_words(2021) == "twenty twenty one"


def test_phrases_read_as_written_score_as_written():
    """What a voice reads and what the reference says normalize to the same words (most pairs are kept)."""
    import random
    rng, kept = random.Random(0), 0
    for _ in range(400):
        kind, written, spoken = ood.phrase(rng)
        kept += tokenize(written) == tokenize(spoken)
    assert kept >= 380


def test_roff_prose():
    page = ".TH LS 1\n.SH NAME\nls \\- list\n.SH DESCRIPTION\nIf you\\(aqre \\fBsure\\fR, it\\'s\nfine.\n.TP\n\\fB\\-a\\fR\n"
    assert ood.roff_paragraphs(page) == ["ls - list", "If you're sure, it's fine.", "-a"]  # -a: man_sentences drops it
    assert ood.awkward("-a") and ood.awkward("/usr/bin") and ood.awkward("FILE") and ood.awkward("2.5")
    assert not ood.awkward("files,") and not ood.awkward("I") and not ood.awkward("it's")


def test_training_text_overlap():
    seen = ood.TrainingText(["The quick brown fox jumps over the lazy dog.", "Press 8 to continue."])
    assert seen.overlaps("the quick brown fox jumps over the lazy dog")  # the same sentence
    assert seen.overlaps("Yesterday the quick brown fox jumps over the fence.")  # 6 words in a row
    assert seen.overlaps("press 8 to continue")
    assert not seen.overlaps("The quick brown cat sleeps on the lazy dog.")


@needs_tts
def test_small_set_is_deterministic_resumable_and_off_the_training_text(tmp_path, monkeypatch):
    monkeypatch.setattr(ood, "training_texts", lambda: ["This is free software."])  # fast; the real ones below
    args = ["--num_man", "4", "--num_phrases", "4", "--seed", "3"]
    ood.main(["--out", str(tmp_path / "a"), *args])
    ood.main(["--out", str(tmp_path / "b"), *args])
    lines = (tmp_path / "a" / "dev.jsonl").read_text()
    assert lines == (tmp_path / "b" / "dev.jsonl").read_text()
    entries = [json.loads(x) for x in lines.splitlines()]
    assert len(entries) == 8 and {e["source"].split(":")[0] for e in entries} == {"man", "phrase"}
    for e in entries:
        assert e["voice"] in ood.VOICES and e["channel"] in ("clean", "telephone", "noisy")
        a, b = (soundfile.read(tmp_path / d / e["wav"])[0] for d in "ab")
        assert (a == b).all() and len(a) > 8000
        assert soundfile.info(tmp_path / "a" / e["wav"]).samplerate == 16000
        assert tokenize(e["txt"]) == tokenize(e["spoken"]) and not ood.TrainingText(["This is free software."]).overlaps(e["txt"])
    # resumes: a removed wav is made again, the others kept
    (tmp_path / "a" / entries[0]["wav"]).unlink()
    ood.main(["--out", str(tmp_path / "a"), *args])
    assert (tmp_path / "a" / "dev.jsonl").read_text() == lines
    assert (soundfile.read(tmp_path / "a" / entries[0]["wav"])[0] == soundfile.read(tmp_path / "b" / entries[0]["wav"])[0]).all()
    # another seed, another set
    ood.main(["--out", str(tmp_path / "c"), "--num_man", "4", "--num_phrases", "4", "--seed", "4"])
    assert (tmp_path / "c" / "dev.jsonl").read_text() != lines


def test_default_texts_avoid_every_training_source():
    """The texts of the default set (no audio made) share no sentence and no 6-word run with the
    training text that is installed here (WordNet, fortunes, the games' scripts)."""
    training = ood.training_texts()
    if len(training) < 1000:
        pytest.skip("training text sources not installed: bash recipes/game_speech/install_tts.sh (and install_real_speech.sh)")
    items = ood.plan(0, 170, 130, ood.TrainingText(training))
    assert len(items) == 300 and len({e["key"] for e in items}) == 300
    seen = ood.TrainingText(training)
    assert not any(seen.overlaps(e["txt"]) or seen.overlaps(e["spoken"]) for e in items)
    import make_corpus
    trained = {name.split("-", 1)[1] for name, _ in make_corpus.VOICES if name.startswith("espeak-")}
    assert trained and not set(ood.VOICES) & trained


def test_a_trained_voice_makes_a_text_and_channel_slice(monkeypatch):
    monkeypatch.setattr(ood, "man_sentences", lambda pages: [(f"Sentence number {w} is plain prose here.", "x.1")
                                                            for w in ("one", "two", "three")])
    items = ood.plan(0, 3, 3, ood.TrainingText([]), voices=["piper-joe"])
    assert {e["voice"] for e in items} == {"piper-joe"} and "piper-joe" in ood.TRAINED_VOICES
    assert [e["txt"] for e in items] == [e["txt"] for e in ood.plan(0, 3, 3, ood.TrainingText([]))]
