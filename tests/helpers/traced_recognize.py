"""recognize.py with a trace: per rank, the keys of every batch it put on disk.
    TRACE_DIR=dir [CRASH_AFTER_BATCHES=n] [torchrun ...] tests/helpers/traced_recognize.py <recognize.py arguments>
CRASH_AFTER_BATCHES=n kills the process (os._exit, no cleanup, like kill -9) right after its n-th batch."""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch.distributed as dist  # noqa: E402

import recognize  # noqa: E402

TRACE = Path(os.environ["TRACE_DIR"])
RANK = int(os.environ.get("RANK", "0"))
CRASH_AFTER_BATCHES = int(os.environ.get("CRASH_AFTER_BATCHES", "0"))
append_records = recognize.append_records
batches_done = 0


def traced_append_records(f, records):
    global batches_done
    append_records(f, records)
    with open(TRACE / f"rank{RANK}.jsonl", "a") as trace:
        trace.write(json.dumps({"keys": [r["key"] for r in records]}) + "\n")
    batches_done += 1
    if batches_done == CRASH_AFTER_BATCHES:
        os._exit(17)


recognize.append_records = traced_append_records
recognize.main(sys.argv[1:])
if dist.is_initialized():
    dist.destroy_process_group()
