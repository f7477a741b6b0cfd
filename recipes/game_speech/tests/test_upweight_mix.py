"""recipes/game_speech/upweight_mix.py: a mix with one source's clips repeated, still a valid training jsonl."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this recipe

import upweight_mix  # noqa: E402
from data import read_jsonl  # noqa: E402 (upweight_mix put the repository on the path)


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(x) + "\n" for x in items))


def test_lines_made_from_the_source_are_repeated_with_unique_keys(tmp_path):
    write_jsonl(tmp_path / "real.jsonl", [{"key": "r1", "wav": "r1.wav", "txt": "a"}, {"key": "r2", "wav": "r2.wav", "txt": "b"}])
    (tmp_path / "mix").mkdir()
    mix = [
        {"key": "r1", "wav": "../r1.wav", "txt": "a", "kind": "original"},
        {"key": "tts1", "wav": "../t1.wav", "txt": "c", "kind": "original"},
        {"key": "r1-noise", "wav": "wav/augmented/r1-noise.wav", "txt": "a", "kind": "augmented", "sources": ["r1"]},
        {"key": "long-1", "wav": "wav/long/1.wav", "txt": "b c", "kind": "long", "sources": ["r2", "x"]},
        {"key": "long-2", "wav": "wav/long/2.wav", "txt": "c d", "kind": "long", "sources": ["tts1", "tts2"]},
    ]
    write_jsonl(tmp_path / "mix" / "train.jsonl", mix)
    out = tmp_path / "mix" / "train_real3x.jsonl"
    upweight_mix.main(["--mix", str(tmp_path / "mix" / "train.jsonl"), "--source", str(tmp_path / "real.jsonl"),
                       "--times", "3", "--out", str(out)])
    keys = [x["key"] for x in map(json.loads, out.read_text().splitlines())]
    assert keys == ["r1", "r1#2", "r1#3", "tts1", "r1-noise", "r1-noise#2", "r1-noise#3",
                    "long-1", "long-1#2", "long-1#3", "long-2"]
    entries = read_jsonl(out)  # what train.py reads: unique keys, wav paths resolved against the mix's folder
    assert entries[1]["wav"] == str(tmp_path / "mix" / "../r1.wav") and entries[1]["txt"] == "a"
    assert entries[6]["wav"] == str(tmp_path / "mix" / "wav/augmented/r1-noise.wav")

    with pytest.raises(SystemExit, match="exists"):  # nothing written is overwritten
        upweight_mix.main(["--mix", str(tmp_path / "mix" / "train.jsonl"), "--source", str(tmp_path / "real.jsonl"),
                           "--times", "2", "--out", str(out)])
    with pytest.raises(SystemExit, match="must be in the folder"):  # its relative wav paths would break
        upweight_mix.main(["--mix", str(tmp_path / "mix" / "train.jsonl"), "--source", str(tmp_path / "real.jsonl"),
                           "--times", "2", "--out", str(tmp_path / "elsewhere.jsonl")])
    write_jsonl(tmp_path / "other.jsonl", [{"key": "b1", "wav": "b1.wav", "txt": "e"}])
    with pytest.raises(SystemExit, match="no line"):  # the wrong source is an error, not a copy of the mix
        upweight_mix.main(["--mix", str(tmp_path / "mix" / "train.jsonl"), "--source", str(tmp_path / "other.jsonl"),
                           "--times", "2", "--out", str(tmp_path / "mix" / "none.jsonl")])
    assert not (tmp_path / "mix" / "none.jsonl").exists()


def test_added_corpora_come_once_with_paths_that_still_find_their_audio(tmp_path):
    write_jsonl(tmp_path / "real.jsonl", [{"key": "r1", "wav": "r1.wav", "txt": "a"}])
    (tmp_path / "mix").mkdir()
    write_jsonl(tmp_path / "mix" / "train.jsonl", [{"key": "r1", "wav": "../r1.wav", "txt": "a"},
                                                   {"key": "t1", "wav": "../t1.wav", "txt": "c"}])
    (tmp_path / "broad").mkdir()
    write_jsonl(tmp_path / "broad" / "train.jsonl", [{"key": "b1", "wav": "wav/b1.wav", "txt": "new text", "voice": "v"}])
    out = tmp_path / "mix" / "train_more.jsonl"
    upweight_mix.main(["--mix", str(tmp_path / "mix" / "train.jsonl"), "--source", str(tmp_path / "real.jsonl"),
                       "--times", "2", "--add", str(tmp_path / "broad" / "train.jsonl"), "--out", str(out)])
    entries = read_jsonl(out)
    assert [e["key"] for e in entries] == ["r1", "r1#2", "t1", "b1"]
    assert Path(entries[3]["wav"]).resolve() == (tmp_path / "broad" / "wav" / "b1.wav").resolve()
    assert entries[3]["txt"] == "new text" and entries[3]["voice"] == "v"

    write_jsonl(tmp_path / "clash.jsonl", [{"key": "t1", "wav": "x.wav", "txt": "d"}])
    with pytest.raises(SystemExit, match=r"clash.jsonl:1: key 't1' is already in the mix"):
        upweight_mix.main(["--mix", str(tmp_path / "mix" / "train.jsonl"), "--source", str(tmp_path / "real.jsonl"),
                           "--times", "2", "--add", str(tmp_path / "clash.jsonl"), "--out", str(tmp_path / "mix" / "c.jsonl")])
    assert not (tmp_path / "mix" / "c.jsonl").exists()
