"""tools/bench_data.py --smoke: every row of both tables is there and every number parses (speed is
measured by the tool, never asserted here)."""
import subprocess
import sys

from conftest import ROOT


def test_bench_data_smoke():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_data.py"), "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.stdout.splitlines()
            if line.startswith("| ") and not line.startswith(("| pipeline", "| data set"))]
    pipelines = ["jsonl + wav files, local", "shards (FLAC), local", "shards (WAV), local", "shards (FLAC), HTTP 127.0.0.1"]
    assert [(r[0], r[1]) for r in rows[:8]] == [(name, w) for name in pipelines for w in "12"]
    assert all(float(cell) > 0 for r in rows[:8] for cell in r[2:])
    assert len(rows) == 10 and all(float(r[1]) >= 0 and float(r[2]) > 0 and float(r[3]) > 0 for r in rows[8:])
