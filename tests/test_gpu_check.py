"""tools/gpu_check.py: its FLOP count against torch's own counter, the GPU-busy union, and a dry run of
the whole check on the CPU at tiny dims (the code path a GPU run takes)."""
import json
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, fetched_tokenizer
from test_model import make_batch
from torch.utils.flop_counter import FlopCounterMode

from model import SpeechLLM

sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402


@pytest.mark.parametrize("trains", [{}, dict(train_encoder_layers=1), dict(train_llm=True), dict(lora_rank=4)])
def test_training_flops_match_what_torch_counts(tiny_config, trains):
    """The estimate counts causal attention as half of the full matrix torch computes (and counts), and
    no LoRA matmuls: it stays within 10% of torch's count of a real forward + backward."""
    torch.manual_seed(0)
    model = SpeechLLM(replace(tiny_config, **trains)).train()
    batch = make_batch(model, [2.0, 2.0], ["one two three", "four five six"])  # equal lengths: no padding
    with FlopCounterMode(display=False) as counter:
        model(**batch, prefix_cache=False).loss.backward()
    estimate = gpu_check.training_flops(model, batch["mel_lengths"], batch["attention_mask"], batch["labels"])
    assert estimate == pytest.approx(counter.get_total_flops(), rel=0.10)


def test_gpu_busy_counts_overlapping_kernels_once():
    cuda = torch.autograd.DeviceType.CUDA
    kernel = lambda a, b, device=cuda: SimpleNamespace(device_type=device, time_range=SimpleNamespace(start=a, end=b))  # noqa: E731
    profiler = SimpleNamespace(events=lambda: [kernel(0, 10), kernel(5, 15), kernel(20, 30), kernel(22, 25),
                                               kernel(0, 100, torch.autograd.DeviceType.CPU)])
    assert gpu_check.kernel_busy_seconds(profiler) == pytest.approx(25e-6)  # [0, 15] and [20, 30], in µs


@pytest.mark.slow
def test_dry_run_trains_resumes_and_decodes(tmp_path):
    fetched_tokenizer("qwen3")
    out = tmp_path / "check"
    code = gpu_check.main(["--out", str(out), "--tiny", "--num_clips", "8", "--steps", "4",
                           "--settings", "zero3:ctc:qwen2-1.5b", "zero3:resume:qwen2-1.5b",
                           "--decoding", "long recordings in pieces"])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert code == 0, [r.get("error") for r in rows]
    assert [(r["setting"], r["status"]) for r in rows] == [
        ("zero3:ctc:qwen2-1.5b", "ok"), ("zero3:resume:qwen2-1.5b", "ok"), ("long recordings in pieces", "ok"),
        ("two ranks", rows[-1]["status"])]
    train = {r["setting"]: r for r in rows[:2]}
    assert train["zero3:resume:qwen2-1.5b"]["start_step"] == 2 and train["zero3:ctc:qwen2-1.5b"]["start_step"] == 0
    for r in train.values():
        assert r["timed_steps"] >= 1 and r["samples_per_s"] > 0 and r["tflops"] > 0
    assert "| train zero3:ctc:qwen2-1.5b | ok |" in (out / "table.md").read_text()
