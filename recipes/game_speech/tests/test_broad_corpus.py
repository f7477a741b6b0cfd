"""recipes/game_speech/make_broad_corpus.py: broad training text that keeps the OOD dev sets unseen,
in voices the OOD dev never uses, made the same twice."""
import json
import random
import re
import shutil
import sys
from pathlib import Path

import pytest
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this recipe

import make_broad_corpus as broad  # noqa: E402
import make_ood_dev as ood  # noqa: E402
from compute_wer import tokenize  # noqa: E402

needs_tts = pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("sox")),
                               reason="espeak-ng or sox missing: bash recipes/game_speech/install_tts.sh")
OOD_TEXT = "Your call may be recorded for quality and training purposes."


def small_sources(monkeypatch):
    """A few man-page sentences (one sharing 6 words with OOD_TEXT) and glosses, instead of the
    installed ones (fast)."""
    man = [(f"Sentence {w} of this page is plain prose.", f"page{w}.1") for w in ("one", "two", "three", "four")]
    man.append(("Every call may be recorded for quality and training purposes here.", "leak.1"))
    monkeypatch.setattr(ood, "man_sentences", lambda pages: man)
    monkeypatch.setattr(broad, "glosses", lambda: ["A small round fruit with a hard stone.",
                                                   "Of or relating to the sea."])


def exclude_file(tmp_path) -> str:
    path = tmp_path / "ood.jsonl"
    path.write_text(json.dumps(dict(key="k", txt=OOD_TEXT, spoken=OOD_TEXT)) + "\n")
    return str(path)


def test_numbers_are_written_in_digits_and_score_as_spoken():
    rng, kept, kinds = random.Random(0), 0, set()
    for _ in range(500):
        kind, written, spoken = broad.number_sentence(rng)
        kinds.add(kind)
        assert re.search(r"\d", written) and not re.search(r"\d", spoken)
        kept += tokenize(written) == tokenize(spoken)
    assert kept >= 450 and len(kinds) == 11


def test_fortune_sentences_are_the_multi_line_fortunes_without_attributions(tmp_path, monkeypatch):
    (tmp_path / "off").mkdir()  # the offensive fortunes: a directory, never read
    (tmp_path / "off" / "jokes").write_text("One more offensive joke is here\nand here.\n%\n")
    (tmp_path / "wisdom").write_text(
        "A one-liner make_corpus.py already speaks, five words.\n%\n"
        "The early bird catches the worm. But the second\nmouse gets the cheese, they say.\n"
        "\t\t-- Someone Famous\n%\n"
        'He said: "no way, not today." A dash - broken word ends here.\nShort one.\n%\n')
    (tmp_path / "wisdom.dat").write_bytes(b"\x00\x01binary index")
    monkeypatch.setattr(broad.make_corpus, "FORTUNES", str(tmp_path))
    assert broad.fortune_sentences() == [("The early bird catches the worm.", "wisdom"),
                                         ("But the second mouse gets the cheese, they say.", "wisdom")]


def test_fortunes_come_after_the_other_sources(tmp_path, monkeypatch):
    """--num_fortunes 0 (the default) plans what corpus/broad and broad2 were made from."""
    small_sources(monkeypatch)
    monkeypatch.setattr(broad, "fortune_sentences", lambda: [
        (f"Fortune number {w} is a plain sentence.", "wisdom") for w in ("one", "two", "three")])
    exclude = broad.Exclude([exclude_file(tmp_path)])
    without, with_fortunes = broad.plan(2, 10, 10, 20, exclude), broad.plan(2, 10, 10, 20, exclude, 2)
    assert len(with_fortunes) == len(without) + 2
    assert len([e for e in with_fortunes if e["source"] == "fortune:wisdom"]) == 2
    assert {e["txt"] for e in without} < {e["txt"] for e in with_fortunes}


def test_plan_leaves_out_the_ood_text_and_voices(tmp_path, monkeypatch):
    small_sources(monkeypatch)
    exclude = broad.Exclude([exclude_file(tmp_path)])
    items = broad.plan(0, 10, 10, 20, exclude)
    texts = [e["txt"] for e in items]
    assert not any("recorded for quality" in t for t in texts)  # shares 6 words with the OOD text
    assert len([t for t in texts if t.startswith("Sentence")]) == 4 and len(items) == 4 + 2 + 20
    assert items == broad.plan(0, 10, 10, 20, exclude)  # deterministic
    ood_variants = {v.split("+")[1] for v in ood.VOICES}
    ood_accents = {v.split("+")[0] for v in ood.VOICES} - set(broad.ESPEAK_ACCENTS)
    for e in items:
        assert e["voice"] in ood.TRAINED_VOICES or "+" in e["voice"]
        if "+" in e["voice"]:
            accent, variant = e["voice"].split("+")
            assert accent in broad.ESPEAK_ACCENTS and variant not in ood_variants and accent not in ood_accents
    assert not set(broad.ESPEAK_VARIANTS) & ood_variants


def test_a_second_seed_excluding_the_first_repeats_no_key_or_text(tmp_path, monkeypatch):
    """Stage 11 trains corpus/broad (seed 0) and corpus/broad2 (seed 1, --exclude corpus/broad) together."""
    small_sources(monkeypatch)
    first = broad.plan(0, 10, 10, 20, broad.Exclude([exclude_file(tmp_path)]))
    (tmp_path / "first.jsonl").write_text("".join(json.dumps(e) + "\n" for e in first))
    second = broad.plan(1, 10, 10, 200, broad.Exclude([exclude_file(tmp_path), str(tmp_path / "first.jsonl")]))
    assert second and not {e["key"] for e in first} & {e["key"] for e in second}
    assert not {e["txt"] for e in first} & {e["txt"] for e in second}


@needs_tts
def test_small_corpus_is_deterministic_and_resumes(tmp_path, monkeypatch):
    small_sources(monkeypatch)
    # espeak-ng only: fast and always installed with sox
    monkeypatch.setattr(broad, "VOICES", [("espeak", 1)])
    args = ["--exclude", exclude_file(tmp_path), "--num_man", "2", "--num_glosses", "1", "--num_numbers", "2"]
    broad.main(["--out", str(tmp_path / "a"), *args, "--jobs", "1"])
    broad.main(["--out", str(tmp_path / "b"), *args, "--jobs", "1"])
    lines = (tmp_path / "a" / "train.jsonl").read_text()
    assert lines == (tmp_path / "b" / "train.jsonl").read_text()
    entries = [json.loads(x) for x in lines.splitlines()]
    assert len(entries) == 5 and {e["source"].split(":")[0] for e in entries} == {"man", "gloss", "number"}
    for e in entries:
        a, b = (soundfile.read(tmp_path / d / e["wav"])[0] for d in "ab")
        assert (a == b).all() and len(a) > 8000 and tokenize(e["txt"]) == tokenize(e["spoken"])
    (tmp_path / "a" / entries[0]["wav"]).unlink()  # resumes: made again, identical
    broad.main(["--out", str(tmp_path / "a"), *args, "--jobs", "1"])
    assert (tmp_path / "a" / "train.jsonl").read_text() == lines
