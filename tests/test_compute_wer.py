"""compute_wer.py: expected counts are worked out by hand in the comments (no models needed)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from compute_wer import ScoreResult, Utterance, format_report, main, read_hypotheses, read_references, score, tokenize

ROOT = Path(__file__).resolve().parents[1]


def counts(result):
    return result.ins, result.dele, result.sub, result.ref_words


def test_summary_and_sentence_line_format():
    # the published-table numbers: 33422 / 409974 = 8.152%; sentence errors 1 of 8 = 12.50%
    utts = [Utterance("big", ["w"] * (409974 - 7), [], ins=8260, dele=8070, sub=17092)]
    utts += [Utterance(f"ok{i}", ["w"], ["w"]) for i in range(7)]  # 7 right, one word each
    r = ScoreResult("WER", utts, [], [])
    assert r.errors == 33422 and r.sentences == 8 and r.sentence_errors == 1
    assert r.summary_line() == "WER 8.15 [ 33422 / 409974, 8260 ins, 8070 del, 17092 sub ]"
    assert r.sentence_line() == "SER 12.50 [ 1 / 8 ]"


def test_english_normalization():
    # ref -> mister smith went to the store (6); hyp -> mister smith went to a store today:
    # the->a (1 sub), +today (1 ins); "Mr." = "mister", case and punctuation do not count
    r = score({"u": "Mr. Smith went to the store."}, {"u": "mister smith WENT to a store, today"})
    assert counts(r) == (1, 0, 1, 6)
    assert r.summary_line() == "WER 33.33 [ 2 / 6, 1 ins, 0 del, 1 sub ]"
    assert r.sentence_line() == "SER 100.00 [ 1 / 1 ]"
    # spelling and numbers: colour = color, twenty-five dollars = $25
    assert counts(score({"u": "The colour costs twenty-five dollars"}, {"u": "the color costs $25"})) == (0, 0, 0, 4)


def test_punctuation_left_by_the_normalizer_is_no_word():
    # Whisper's normalizer turns a final ellipsis into a "." token; it must count as nothing:
    # "my name is" is 3 words, all right, whether or not either side trails off
    assert tokenize("My name is...") == ["my", "name", "is"]
    assert counts(score({"u": "My name is..."}, {"u": "My name is"})) == (0, 0, 0, 3)
    assert counts(score({"u": "My name is"}, {"u": "my name is.."})) == (0, 0, 0, 3)
    assert tokenize("It costs 3.5 dollars, 50% off.") == ["it", "costs", "$3.5", "50%", "off"]


def test_no_norm_scores_raw_tokens():
    # raw: "Hello," != "hello" (1 sub), "world" deleted; normalized, only the deletion remains
    assert counts(score({"u": "Hello, big world"}, {"u": "hello big"}, normalize=False)) == (0, 1, 1, 3)
    assert counts(score({"u": "Hello, big world"}, {"u": "hello big"})) == (0, 1, 0, 3)


def test_other_languages_use_the_basic_normalizer():
    # fr: punctuation and case go, accents and "Mr." stay -> mr/mister is 1 sub of 4;
    # the English normalizer would have made it mister (0 errors)
    assert counts(score({"u": "Mr. Dupont, ÇA VA?"}, {"u": "mister dupont ça va"}, lang="fr")) == (0, 0, 1, 4)
    assert counts(score({"u": "Mr. Dupont, ÇA VA?"}, {"u": "mister dupont ça va"}, lang="en")) == (0, 0, 0, 4)
    assert counts(score({"u": "Ça va"}, {"u": "ca va"}, lang="fr")) == (0, 0, 1, 2)


def test_chinese_character_error_rate():
    # 我们去北京 (5 chars, 。 dropped) vs 我门去北京了: 们->门 (1 sub), +了 (1 ins)
    r = score({"u": "我们去北京。"}, {"u": "我门去北京了"}, lang="zh")
    assert counts(r) == (1, 0, 1, 5)
    assert r.summary_line() == "CER 40.00 [ 2 / 5, 1 ins, 0 del, 1 sub ]"
    # 今天天气很好 (6) vs 今天气很好: one 天 deleted
    assert counts(score({"u": "今天天气很好"}, {"u": "今天气很好"}, lang="zh")) == (0, 1, 0, 6)


def test_mixed_chinese_english_latin_word_is_one_token():
    assert tokenize("我爱 Python3 和AI！", "zh") == ["我", "爱", "python3", "和", "ai"]
    # 我 用 iphone (3 tokens) vs 我 用 ipad: one substitution, not several letters
    assert counts(score({"u": "我用iPhone"}, {"u": "我用iPad"}, lang="zh")) == (0, 0, 1, 3)
    # 用 iphone 拍 照 (4): case folded, 拍 deleted / 好 inserted
    assert counts(score({"u": "用iPhone拍照"}, {"u": "用 IPHONE 照"}, lang="zh")) == (0, 1, 0, 4)
    assert counts(score({"u": "用iPhone拍照"}, {"u": "用 iphone 拍照 好"}, lang="zh")) == (1, 0, 0, 4)


def test_full_width_folding():
    assert tokenize("ＡＢＣ１２３，你好！", "zh") == ["abc123", "你", "好"]
    # full-width letters/digits/punctuation in the reference, half-width in the hypothesis: no error
    assert counts(score({"u": "ＡＢＣ１２３，你好！"}, {"u": "abc123 你好"}, lang="zh")) == (0, 0, 0, 3)


def test_missing_and_extra_keys():
    r = score({"a": "red green blue", "b": "cyan magenta"}, {"a": "red green blue", "zz": "ignored words"})
    assert counts(r) == (0, 2, 0, 5)  # b missing -> 2 deletions; zz ignored
    assert r.missing_keys == ["b"] and r.extra_keys == ["zz"]
    assert r.sentence_line() == "SER 50.00 [ 1 / 2 ]"
    report = format_report(r)
    assert "missing hypotheses (scored as deletions): 1: b" in report
    assert "hypotheses without reference (ignored): 1: zz" in report
    assert report.endswith("WER 40.00 [ 2 / 5, 0 ins, 2 del, 0 sub ]\nSER 50.00 [ 1 / 2 ]")


def test_empty_references():
    # "a" has N=0 and two insertions; "b" is right
    r = score({"a": "", "b": "yes"}, {"a": "so what", "b": "yes"})
    assert counts(r) == (2, 0, 0, 1)
    assert r.summary_line() == "WER 200.00 [ 2 / 1, 2 ins, 0 del, 0 sub ]"
    # N=0 overall: 0.00 when nothing is inserted, else 100 * errors / max(N, 1)
    assert score({"a": ""}, {"a": ""}).summary_line() == "WER 0.00 [ 0 / 0, 0 ins, 0 del, 0 sub ]"
    assert score({"a": "?!"}, {"a": "so what"}).summary_line() == "WER 200.00 [ 2 / 0, 2 ins, 0 del, 0 sub ]"
    assert score({"a": ""}, {}, lang="zh").summary_line() == "CER 0.00 [ 0 / 0, 0 ins, 0 del, 0 sub ]"


def test_details_kaldi_style_alignment():
    refs = {"s": "red cat sat down", "d": "red big cat", "z": "我们去", "e": ""}
    hyps = {"s": "red bat sat down now", "d": "red cat", "z": "我去", "e": "so"}
    out = format_report(score(refs, hyps, lang="en"), details=True).splitlines()
    # substitution upper-cased on both sides, insertion with a *** filler in the REF
    i = out.index("utt: s")
    assert out[i + 1:i + 4] == ["wer: 50.00 % N=4 C=3 S=1 D=0 I=1",
                                "REF: red CAT sat down ***",
                                "HYP: red BAT sat down NOW"]
    i = out.index("utt: d")
    assert out[i + 1:i + 4] == ["wer: 33.33 % N=3 C=2 S=0 D=1 I=0", "REF: red BIG cat", "HYP: red *** cat"]
    i = out.index("utt: e")
    assert out[i + 1:i + 4] == ["wer: 100.00 % N=0 C=0 S=0 D=0 I=1", "REF: **", "HYP: SO"]
    # CJK characters are two columns wide: the filler under 们 is two stars
    zh = format_report(score({"z": "我们去"}, {"z": "我去"}, lang="zh"), details=True).splitlines()
    assert zh[:4] == ["utt: z", "cer: 33.33 % N=3 C=2 S=0 D=1 I=0", "REF: 我 们 去", "HYP: 我 ** 去"]
    assert "utt: s" not in format_report(score(refs, hyps))  # details only when asked


def write_inputs(tmp_path):
    (tmp_path / "ref.jsonl").write_text(json.dumps({"key": "k1", "wav": "a.wav", "txt": "the cat sat"}) + "\n\n"
                                        + json.dumps({"wav": "/x/k2.wav", "txt": "on the mat"}) + "\n")
    # space or tab after the key; k3 empty; a BOM (Windows editors) must not stick to the first key
    (tmp_path / "ref.txt").write_text("\ufeffk1 the cat sat\nk2\ton the mat\nk3\n", encoding="utf-8")
    (tmp_path / "hyp.txt").write_text("k1\tthe bat sat\nk2\t\nk3\nk9\textra\n")


def test_readers(tmp_path):
    write_inputs(tmp_path)
    assert read_references(tmp_path / "ref.jsonl") == {"k1": "the cat sat", "k2": "on the mat"}
    assert read_references(tmp_path / "ref.txt") == {"k1": "the cat sat", "k2": "on the mat", "k3": ""}
    assert read_hypotheses(tmp_path / "hyp.txt") == {"k1": "the bat sat", "k2": "", "k3": "", "k9": "extra"}


def test_cli_main_jsonl_and_kaldi(tmp_path, capsys):
    write_inputs(tmp_path)
    # the jsonl has no k3; the Kaldi file has it with an empty text, which the empty hypothesis gets right
    for ref, extra, ser in (("ref.jsonl", "2: k3 k9", "SER 100.00 [ 2 / 2 ]"),
                            ("ref.txt", "1: k9", "SER 66.67 [ 2 / 3 ]")):
        main([str(tmp_path / ref), str(tmp_path / "hyp.txt"), "--details"])
        out = capsys.readouterr().out
        assert "WER 66.67 [ 4 / 6, 0 ins, 3 del, 1 sub ]" in out  # cat->bat, k2 all deleted
        assert "REF: the CAT sat" in out and "HYP: the BAT sat" in out
        assert "REF: ON THE MAT" in out and "HYP: ** *** ***" in out
        assert f"hypotheses without reference (ignored): {extra}\n" in out
        assert out.splitlines()[-1] == ser
    (tmp_path / "hyp2.txt").write_text("k1\tThe cat sat.\nk2\ton the mat\n")
    assert main([str(tmp_path / "ref.jsonl"), str(tmp_path / "hyp2.txt")]).errors == 0
    assert counts(main([str(tmp_path / "ref.jsonl"), str(tmp_path / "hyp2.txt"), "--no_norm"])) == (0, 0, 2, 6)


def test_cli_subprocess_zh_and_error_exit(tmp_path):
    (tmp_path / "ref.txt").write_text("a 我们去北京\nb 你好\n")
    (tmp_path / "hyp.txt").write_text("a\t我们去北京了\n")
    run = subprocess.run([sys.executable, str(ROOT / "compute_wer.py"), str(tmp_path / "ref.txt"),
                          str(tmp_path / "hyp.txt"), "--lang", "zh"], capture_output=True, text=True, check=True)
    lines = run.stdout.splitlines()
    # a: +了 (1 ins); b missing: 2 deletions; N = 5 + 2
    assert lines[-3:] == ["missing hypotheses (scored as deletions): 1: b",
                          "CER 42.86 [ 3 / 7, 1 ins, 2 del, 0 sub ]", "SER 100.00 [ 2 / 2 ]"]
    (tmp_path / "bad.txt").write_text("a\tok\nb 你好\n")  # space instead of tab
    run = subprocess.run([sys.executable, str(ROOT / "compute_wer.py"), str(tmp_path / "ref.txt"),
                          str(tmp_path / "bad.txt")], capture_output=True, text=True)
    assert run.returncode == 2 and "bad.txt:2:" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("name, text, reader", [
    ("ref.jsonl", '{"key": "a", "txt": "x"}\n\n{"key": "b"}\n', read_references),  # no txt (line 3)
    ("ref.jsonl", '{"key": "a", "txt": "x"}\n{"key": "b", "txt": null}\n', read_references),
    ("ref.jsonl", '{"key": "a", "txt": "x"}\nb some text\n', read_references),  # not json
    ("ref.jsonl", '{"key": "a", "txt": "x"}\n{"txt": "no key and no wav"}\n', read_references),
    ("ref.txt", "a x\na y\n", read_references),  # duplicate key
    ("hyp.txt", "a\tx\n\tno key\n", read_hypotheses),
    ("hyp.txt", "a\tx\nb some words\n", read_hypotheses),  # a space where the tab should be
    ("hyp.txt", "a\tx\na\ty\n", read_hypotheses),
])
def test_malformed_lines_name_file_and_line(tmp_path, name, text, reader):
    (tmp_path / name).write_text(text)
    bad_line = len(text.rstrip("\n").split("\n"))
    with pytest.raises(ValueError, match=rf"{name}:{bad_line}:"):
        reader(tmp_path / name)
