"""Expected counts are worked out by hand in the comments."""
import json

import pytest

from compute_wer import main, read_hypotheses, read_references, score, tokenize


def counts(result):
    return result.total("ins"), result.total("dele"), result.total("sub"), result.ref_words


def test_english_counts_with_normalization():
    # "mister smith went to the store" vs "mister smith went to a store today":
    # the -> a (1 sub), + today (1 ins); "Mr." normalizes to "mister", case and punctuation vanish
    r = score({"u": "Mr. Smith went to the store."}, {"u": "mister smith WENT to a store, today"})
    assert counts(r) == (1, 0, 1, 6)
    assert r.summary_line() == "WER 33.33 [ 2 / 6, 1 ins, 0 del, 1 sub ]"


def test_english_deletion_and_no_norm():
    # raw tokens: "Hello," != "hello" (1 sub) and "world" deleted
    r = score({"u": "Hello, big world"}, {"u": "hello big"}, normalize=False)
    assert counts(r) == (0, 1, 1, 3)
    # normalized: only the deletion remains
    assert counts(score({"u": "Hello, big world"}, {"u": "hello big"})) == (0, 1, 0, 3)


def test_chinese_characters_are_tokens():
    # 我们去北京 (5 chars) vs 我门去北京了: 们->门 (1 sub), +了 (1 ins)
    r = score({"u": "我们去北京。"}, {"u": "我门去北京了"}, lang="zh")
    assert counts(r) == (1, 0, 1, 5)
    assert r.summary_line() == "CER 40.00 [ 2 / 5, 1 ins, 0 del, 1 sub ]"


def test_mixed_chinese_english_and_full_width():
    assert tokenize("我爱 Python３ 和ＡＩ！", "zh") == ["我", "爱", "python3", "和", "ai"]
    # ref: 用 iphone 拍 照 (4); hyp: 用 iphone 照 好 -> 拍 deleted, 好 inserted... or two
    # substitutions: equal cost, so take cases with one answer: 拍 deleted; then 好 inserted at the end
    assert counts(score({"u": "用iPhone拍照"}, {"u": "用 IPHONE 照"}, lang="zh")) == (0, 1, 0, 4)
    assert counts(score({"u": "用iPhone拍照"}, {"u": "用 iphone 拍照 好"}, lang="zh")) == (1, 0, 0, 4)


def test_missing_and_extra_keys():
    r = score({"a": "red green blue", "b": "cyan magenta"}, {"a": "red green blue", "zz": "ignored words"})
    assert counts(r) == (0, 2, 0, 5)  # b missing -> 2 deletions; zz ignored
    assert r.missing_keys == ["b"] and r.extra_keys == ["zz"]
    assert r.sentence_line() == "SER 50.00 [ 1 / 2 ]"


def test_empty_references():
    r = score({"a": "", "b": "yes"}, {"a": "so what", "b": "yes"})
    assert counts(r) == (2, 0, 0, 1)
    assert r.error_rate == 200.0
    assert score({"a": ""}, {"a": ""}).summary_line() == "WER 0.00 [ 0 / 0, 0 ins, 0 del, 0 sub ]"
    assert score({"a": ""}, {"a": "x"}).error_rate == 100.0


def test_cli_jsonl_and_kaldi_references_details(tmp_path, capsys):
    (tmp_path / "ref.jsonl").write_text(json.dumps({"key": "k1", "wav": "a.wav", "txt": "the cat sat"}) + "\n"
                                        + json.dumps({"wav": "/x/k2.wav", "txt": "on the mat"}) + "\n")
    (tmp_path / "ref.txt").write_text("k1 the cat sat\nk2 on the mat\n")
    (tmp_path / "hyp.txt").write_text("k1\tthe bat sat\nk2\t\n")
    for ref in ("ref.jsonl", "ref.txt"):
        assert read_references(tmp_path / ref) == {"k1": "the cat sat", "k2": "on the mat"}
        main([str(tmp_path / ref), str(tmp_path / "hyp.txt"), "--details"])
        out = capsys.readouterr().out
        assert "WER 66.67 [ 4 / 6, 0 ins, 3 del, 1 sub ]" in out  # cat->bat, k2 all deleted
        assert "REF: the CAT sat" in out and "HYP: the BAT sat" in out
        assert "SER 100.00 [ 2 / 2 ]" in out


def test_malformed_lines_name_file_and_line(tmp_path):
    (tmp_path / "ref.jsonl").write_text('{"key": "a", "txt": "x"}\n{"key": "b"}\n')
    with pytest.raises(ValueError, match=r"ref.jsonl:2:"):
        read_references(tmp_path / "ref.jsonl")
    (tmp_path / "hyp.txt").write_text("a\tx\n\tno key\n")
    with pytest.raises(ValueError, match=r"hyp.txt:2:"):
        read_hypotheses(tmp_path / "hyp.txt")
