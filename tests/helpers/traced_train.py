"""train.py with a trace for the distributed tests: per rank, the transcripts of every batch it
trained on, who called save_pretrained, and the rank's own copy of the final trained weights.
    TRACE_DIR=dir [CRASH_AT_STEP=n] torchrun ... tests/helpers/traced_train.py <train.py arguments>
CRASH_AT_STEP=n kills every rank as it starts optimizer step n (1-based), like a lost node."""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import data  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402

TRACE = Path(os.environ["TRACE_DIR"])
RANK = int(os.environ.get("RANK", "0"))


def log(record: dict):
    with open(TRACE / f"rank{RANK}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


collate = data.Collator.__call__


def traced_collate(self, batch):
    if not self.inference:
        log({"batch": [item["txt"] for item in batch]})
    return collate(self, batch)


save_pretrained = model.SpeechLLM.save_pretrained


def traced_save_pretrained(self, save_dir, *args, **kwargs):
    log({"save_pretrained": str(save_dir)})
    return save_pretrained(self, save_dir, *args, **kwargs)


training_step = train.SpeechLLMTrainer.training_step


def crashing_training_step(self, *args, **kwargs):
    if self.state.global_step + 1 == int(os.environ.get("CRASH_AT_STEP", 0)):
        log({"crashed_at_step": self.state.global_step + 1})
        os._exit(17)
    return training_step(self, *args, **kwargs)


data.Collator.__call__ = traced_collate
model.SpeechLLM.save_pretrained = traced_save_pretrained
train.SpeechLLMTrainer.training_step = crashing_training_step

trainer = train.main(sys.argv[1:])
trained = trainer.accelerator.unwrap_model(trainer.model).trainable_parameters()
with model.gathered_if_partitioned(list(trained.values())):
    save_file({k: v.detach().clone() for k, v in trained.items()}, TRACE / f"trained{RANK}.safetensors")
log({"world_size": dist.get_world_size() if dist.is_initialized() else 1})
if dist.is_initialized():
    dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # as train.py: skip C++ teardown, which now and then aborts after a gloo run
