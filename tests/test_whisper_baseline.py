"""tools/whisper_baseline.py: Whisper tiny.en's own decoder on a jsonl, one line per utterance."""
import json

import pytest

from conftest import ROOT, require_bundled
from tools.whisper_baseline import main as whisper_baseline


def test_every_utterance_gets_a_line_and_a_score(tmp_path, capsys):
    require_bundled("bundled:whisper-tiny.en")
    entries = [json.loads(line) for line in (ROOT / "examples" / "examples.jsonl").read_text().splitlines()[:2]]
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(e | {"wav": str(ROOT / "examples" / e["wav"])}) + "\n" for e in entries))
    whisper_baseline(["--data_path", str(data), "--result_path", str(tmp_path / "new" / "hyp.txt")])  # a new folder
    lines = (tmp_path / "new" / "hyp.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == [e["key"] for e in entries]
    assert all(line.split("\t")[1].strip() for line in lines)  # real speech: Whisper writes something
    assert "WER" in capsys.readouterr().out


def test_an_english_only_model_refuses_another_language(tmp_path):
    require_bundled("bundled:whisper-tiny.en")
    with pytest.raises(SystemExit, match="English only"):
        whisper_baseline(["--data_path", str(ROOT / "examples" / "examples.jsonl"), "--result_path",
                          str(tmp_path / "hyp.txt"), "--language", "de"])
    assert not (tmp_path / "hyp.txt").exists()
