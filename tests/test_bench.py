"""tools/bench.py --smoke on the tiny random models: the table is complete and every number parses.
(Speed is measured by the bench itself, never asserted here.)"""
import re
import subprocess
import sys

import pytest
from conftest import ROOT, write_corpus

DECODE_BATCH_SIZES = ["1", "4"]


def table(output: str, header_start: str) -> list[list[str]]:
    """The rows (cells) of the markdown table whose header starts with header_start."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| " + header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def number(cell: str) -> float:
    return float(re.fullmatch(r"(-?[\d.]+)x?( \[\d+ / \d+\])?", cell).group(1))


def run_bench(tmp_path, tiny_llm_dir, tiny_whisper_path, *extra) -> str:
    data = write_corpus(tmp_path / "clips", ["hello world", "a test", "three words here", "one", "two more"],
                        [1.0, 2.2, 1.6, 0.7, 1.3])
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--smoke", "--data_path", str(data),
                          "--whisper", str(tiny_whisper_path), "--llm", str(tiny_llm_dir),
                          "--decode_batch_sizes", *DECODE_BATCH_SIZES, "--threads", "1", *extra],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def check_common_rows(out: str, levers: bool):
    assert "os.cpu_count()" in out and "torch.get_num_threads()" in out

    training = table(out, "training")
    names = [row[0] for row in training]
    assert names[:2] == ["ours: trimmed audio, length-grouped, text to batch max",
                         "West-v0: 30 s padding, text to 512, random batches"]
    assert len(names) == 2 + 7 * levers
    for row in training:
        assert len(row) == 4 and all(number(cell) > 0 for cell in row[1:])
    assert training[1][3] == "1.00x"  # West against itself

    decoding = table(out, "decoding")
    settings = [tuple(row[:3]) for row in decoding]
    for beams in ("1", "4"):
        for batch in DECODE_BATCH_SIZES:
            assert ("ours", batch, beams) in settings
        assert ("West-v0: 30 s padding, one utterance at a time", "1", beams) in settings
    assert decoding[-1][0].startswith("Whisper tiny.en transcribe")
    assert len(decoding) == 2 * len(DECODE_BATCH_SIZES) + 2 + 5 * levers + 1
    for row in decoding:
        assert len(row) == 7 and all(number(cell) >= 0 for cell in row[1:])
        assert number(row[6]) > 0  # the ratio to West-v0 was computed

    goals = [line for line in out.splitlines() if line.startswith("- ")]
    assert len(goals) == 6 and all(line.endswith(("met", "NOT met")) for line in goals)
    return out


@pytest.mark.slow
def test_smoke_levers_and_trainable_tables_are_complete(tmp_path, tiny_llm_dir, tiny_whisper_path):
    """One run for both: each flag adds its rows and its table to the same base tables."""
    out = run_bench(tmp_path, tiny_llm_dir, tiny_whisper_path, "--levers", "--trainable")
    check_common_rows(out, levers=True)  # the trainable settings add no rows to the training table
    levers = table(out, "lever")
    assert len(levers) == 7 + 5 + 1  # + the prefix KV cache while LoRA trains, against LoRA with it
    assert [row[0] for row in levers].count("prefix KV cache, + LoRA r8") == 1
    for row in levers:
        assert len(row) == 5 and all(number(cell) > 0 for cell in row[2:])

    rows = table(out, "what trains")
    assert [row[0] for row in rows] == ["projector", "+ LoRA r8", "+ LoRA r32", "+ encoder top 2",
                                        "+ LoRA r8 + encoder top 2", "full LLM"]
    params = {row[0]: number(row[1].removesuffix(" M")) for row in rows}
    assert params["projector"] < params["+ LoRA r8"] < params["+ LoRA r32"] < params["full LLM"]
    assert params["+ LoRA r8 + encoder top 2"] > max(params["+ LoRA r8"], params["+ encoder top 2"])
    for row in rows:
        assert len(row) == 6 and all(number(cell.removesuffix(" M")) > 0 for cell in row[1:])
    assert rows[0][5] == "1.00x"


@pytest.mark.slow
def test_smoke_batching_table_is_complete(tmp_path, tiny_llm_dir, tiny_whisper_path):
    """--batching: one row per fixed batch size and per --batch_seconds, every number in range."""
    out = run_bench(tmp_path, tiny_llm_dir, tiny_whisper_path, "--batching", "--batching_sizes", "1", "2",
                    "--batching_seconds", "3", "5")
    rows = table(out, "training batches")
    assert [row[0] for row in rows] == ["1 utterances per batch", "2 utterances per batch", "--batch_seconds 3",
                                        "--batch_seconds 5"]
    for row in rows:
        assert len(row) == 7 and number(row[1]) >= 1
        low, high = map(int, row[2].split("-"))
        assert 1 <= low <= high
        assert all(0 <= number(cell) < 100 for cell in row[3:5]) and all(number(cell) > 0 for cell in row[5:])
    assert rows[0][2] == "1-1" and number(rows[0][3]) == 0  # one clip per batch pads nothing
    with pytest.raises(StopIteration):
        table(out, "decoding")  # --batching runs only its own table
