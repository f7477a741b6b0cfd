"""recipes/game_speech/word_hearings.py: dev-set errors binned by how often training said each word."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this recipe

import word_hearings  # noqa: E402
from compute_wer import score  # noqa: E402 (word_hearings put the repository on the path)


def test_errors_are_binned_by_the_training_count_of_the_reference_word(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    lines = [{"txt": "The cat sat."}] * 12 + [{"txt": "A heron, twice."}] * 2
    train.write_text("".join(json.dumps(x) + "\n" for x in lines))
    heard = word_hearings.hearings([str(train)])
    assert heard["cat"] == 12 and heard["heron"] == 2 and heard["egret"] == 0  # normalized: no case, no commas

    refs = {"u1": "the cat sat on a heron", "u2": "an egret"}
    hyps = {"u1": "the cat sad on heron", "u2": "an egret indeed"}  # sat -> sad, a deleted, one insertion
    bins = word_hearings.errors_by_hearings(score(refs, hyps), heard)
    assert word_hearings.bin_labels() == ["0", "1-9", "10-99", "100+"]
    # never heard: on, an, egret (all right); 1-9: a (deleted), heron; 10-99: the, cat, sat (substituted)
    assert bins == [(3, 0), (2, 1), (3, 1), (0, 0)]

    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(dict(key=k, txt=t)) + "\n" for k, t in refs.items()))
    (tmp_path / "hyp.txt").write_text("".join(f"{k}\t{t}\n" for k, t in hyps.items()))
    word_hearings.main(["--train", str(train), "--refs", str(tmp_path / "dev.jsonl"), "--results", str(tmp_path / "hyp.txt")])
    row = capsys.readouterr().out.splitlines()[-1]
    assert "| 37.50 | 3, 0.0 | 2, 50.0 | 3, 33.3 | 0, 0.0 |" in row  # 3 errors / 8 words
