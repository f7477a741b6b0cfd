"""tools/pseudo_label.py with the bundled Whisper tiny.en: a speech clip is kept, silence is not."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import require_bundled

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import pseudo_label  # noqa: E402

FOX = ROOT / "tests" / "data" / "quick_brown_fox_kal16.wav"


def test_speech_kept_silence_rejected_and_resumed(tmp_path, capsys):
    require_bundled("bundled:whisper-tiny.en")
    soundfile.write(tmp_path / "silence.wav", np.zeros(32000, dtype=np.float32), 16000)
    lines = [dict(key="fox", wav=str(FOX), speaker="kal"), dict(key="silence", wav="silence.wav"),
             dict(key="gone", wav="missing.wav")]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = ["--data_path", str(tmp_path / "in.jsonl"), "--out_path", str(tmp_path / "out.jsonl")]

    counts = pseudo_label.main(args)
    kept = [json.loads(x) for x in open(tmp_path / "out.jsonl")]
    rejected = {x["key"]: x for x in map(json.loads, open(tmp_path / "out.rejected.jsonl"))}
    assert [x["key"] for x in kept] == ["fox"]
    assert "quick brown fox" in kept[0]["txt"].lower()
    assert kept[0]["speaker"] == "kal" and kept[0]["avg_logprob"] > -1.0  # fields kept, confidences added
    assert rejected["silence"]["reason"] == "no_speech" and rejected["silence"]["wav"] == "silence.wav"
    assert rejected["gone"]["reason"] == "audio missing"
    assert counts == {"kept": 1, "no_speech": 1, "audio missing": 1}
    assert "kept 1 of 3" in capsys.readouterr().out

    with open(tmp_path / "out.jsonl", "a") as f:
        f.write('{"key": "cut off by a ki')  # a line a killed run left half-written
    pseudo_label.main(args)  # resumes: nothing left to label, the same counts
    assert "3 already done, 0 to label" in capsys.readouterr().out
    assert [json.loads(x)["key"] for x in open(tmp_path / "out.jsonl")] == ["fox"]


def test_malformed_jsonl_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(key="a", wav=str(FOX))) + "\n{not json\n")
    with pytest.raises(SystemExit):
        pseudo_label.main(["--data_path", str(bad), "--out_path", str(tmp_path / "out.jsonl")])
    assert f"{bad}:2: malformed JSON" in capsys.readouterr().err


def test_reject_reasons():
    good = dict(text="hello there", avg_logprob=-0.3, no_speech_prob=0.1, compression_ratio=1.1)
    assert pseudo_label.reject_reason(good) is None
    assert pseudo_label.reject_reason(dict(good, text="")) == "no_speech"
    assert pseudo_label.reject_reason(dict(good, no_speech_prob=0.9)) == "no_speech"
    # Whisper's long-form rule: a high no-speech probability rejects only with a low log-prob
    assert pseudo_label.reject_reason(dict(good, no_speech_prob=0.9), no_speech_with_logprob=True) is None
    assert pseudo_label.reject_reason(dict(good, compression_ratio=3.0)) == "repetitive"
    assert pseudo_label.reject_reason(dict(good, avg_logprob=-1.5)) == "low_logprob"
    assert pseudo_label.reject_reason(dict(error="audio unreadable")) == "audio unreadable"
