"""Two CPU ranks (gloo) under torchrun: ZeRO-3, ZeRO-2 and plain DDP really train one model together
(the projector; + LoRA and encoder blocks; the whole LLM), resume bit-exactly after a crash;
recognize.py decodes one test set on two ranks into the single-process result."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, synth_audio, write_corpus
from helpers.bad_audio import write_damaged_flac
from safetensors.torch import load_file

from model import SpeechLLM

TRANSCRIPTS = [f"utterance number {word}" for word in "one two three four five six seven eight".split()]
PER_DEVICE_BATCH = 2


def traced_torchrun(tmp_path, tiny_llm_dir, tiny_whisper_path, jsonl, extra, name="", crash_at_step=None,
                    max_steps=3):
    trace = tmp_path / f"trace{name}"
    trace.mkdir(exist_ok=True)
    out = tmp_path / f"exp{name}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "helpers" / "traced_train.py"),
           "--llm_model_name_or_path", str(tiny_llm_dir), "--whisper_model_name_or_path", str(tiny_whisper_path),
           "--projector_hidden", "64", "--data_path", str(jsonl), "--output_dir", str(out),
           "--per_device_train_batch_size", str(PER_DEVICE_BATCH), "--max_steps", str(max_steps), "--save_steps", "3",
           "--learning_rate", "1e-3", "--report_to", "none", "--seed", "3", *extra]
    env = dict(os.environ, TRACE_DIR=str(trace), OMP_NUM_THREADS="1", CRASH_AT_STEP=str(crash_at_step or 0))
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if crash_at_step:
        assert result.returncode != 0, "the run was to crash"
        return out, trace, None
    assert result.returncode == 0, result.stderr[-4000:]
    records = {rank: [json.loads(line) for line in open(trace / f"rank{rank}.jsonl")] for rank in (0, 1)}
    return out, trace, records


TRAINS = {"projector": [], "lora+encoder": ["--lora_rank", "4", "--train_encoder_layers", "1"],
          "llm": ["--train_llm", "True"],
          # the CTC loss borrows the LLM's token embeddings, which ZeRO-3 partitions (the first GPU run crashed there)
          "ctc+lora+encoder": ["--ctc_weight", "1.0", "--lora_rank", "4", "--train_encoder_layers", "1"]}


def launch_args(mode, trains):
    return ([] if mode == "ddp" else ["--deepspeed", str(ROOT / f"ds_config_{mode}.json")]) + TRAINS[trains]


@pytest.mark.slow
@pytest.mark.parametrize("mode,trains", [("zero3", "projector"), ("zero2", "projector"), ("ddp", "projector"),
                                         ("zero3", "lora+encoder"), ("ddp", "lora+encoder"), ("zero3", "llm"),
                                         ("zero3", "ctc+lora+encoder")])
def test_two_ranks_train_one_model(mode, trains, tmp_path, tiny_llm_dir, tiny_whisper_path):
    jsonl = write_corpus(tmp_path / "data", TRANSCRIPTS, [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7])
    out, trace, records = traced_torchrun(tmp_path, tiny_llm_dir, tiny_whisper_path, jsonl, launch_args(mode, trains))

    # world size 2: each step, the ranks train on different samples; the global batch is 2x per device
    assert [r["world_size"] for r in records[0] + records[1] if "world_size" in r] == [2, 2]
    batches = {rank: [r["batch"] for r in records[rank] if "batch" in r][:3] for rank in (0, 1)}
    for step in range(3):
        b0, b1 = batches[0][step], batches[1][step]
        assert len(b0) == len(b1) == PER_DEVICE_BATCH
        assert not set(b0) & set(b1), (step, b0, b1)

    # one model: the trained weights are identical on both ranks
    t0, t1 = load_file(trace / "trained0.safetensors"), load_file(trace / "trained1.safetensors")
    assert any(".lora_B." in name for name in t0) == trains.endswith("lora+encoder")
    assert any(name.startswith("encoder.blocks.1.") for name in t0) == trains.endswith("lora+encoder")
    assert ("projector.ctc_blank" in t0) == trains.startswith("ctc")
    for name in t0:
        assert torch.equal(t0[name], t1[name]), name

    # only rank 0 writes the model files; they hold just what trained, equal to the trained weights
    savers = {rank: [r["save_pretrained"] for r in records[rank] if "save_pretrained" in r] for rank in (0, 1)}
    assert savers[0] == [str(out / "checkpoint-3"), str(out)] and savers[1] == []
    saved = load_file(out / "model.safetensors")
    if trains == "llm":  # the LLM is saved as an HF model dir of its own
        llm = load_file(out / "llm" / "model.safetensors")
        saved |= {f"llm.{name}": value for name, value in llm.items() if f"llm.{name}" in t0}
    assert set(saved) == set(t0)
    for name in t0:
        assert torch.equal(saved[name], t0[name]), name

    # checkpoints hold what trains and its Adam state, never the frozen encoder and LLM
    trained_bytes = sum(v.numel() * 4 for v in t0.values())
    if mode == "ddp":
        optim_bytes = (out / "checkpoint-3" / "optimizer.pt").stat().st_size
        assert 2 * trained_bytes < optim_bytes < 2.5 * trained_bytes, (optim_bytes, trained_bytes)
    else:
        step_dir = out / "checkpoint-3" / "global_step3"
        optim_bytes = sum(f.stat().st_size for f in step_dir.glob("*optim_states.pt"))
        model_bytes = sum(f.stat().st_size for f in step_dir.glob("*model_states.pt"))
        # fp32 master weights + two Adam moments, sharded over the ranks; the model states keep
        # only buffers (Whisper's positional table) besides the trainable parameters
        assert 2.5 * trained_bytes < optim_bytes < 5 * trained_bytes, (optim_bytes, trained_bytes)
        if trains != "llm":
            assert model_bytes < (tiny_llm_dir / "model.safetensors").stat().st_size / 10, model_bytes

    model = SpeechLLM.from_pretrained(out)
    trained = model.trainable_parameters()
    for name in t0:
        assert torch.equal(trained[name], t0[name]), name
    assert len(model.transcribe([synth_audio(0, 1.0)], num_beams=2)) == 1


@pytest.mark.slow
def test_zero3_warm_starts_the_whole_llm_from_lora_and_from_a_trained_llm(tmp_path, tiny_llm_dir, tiny_whisper_path):
    """ZeRO-3 builds the LLM partitioned over the ranks: --train_llm --init_from a LoRA run folds its
    adapters into the partitioned weights, and --init_from a --train_llm run loads its llm/ dir into
    them. At learning rate 0 each run ends holding exactly what it started from."""
    from model import SpeechLLMConfig

    jsonl = write_corpus(tmp_path / "data", TRANSCRIPTS, [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7])
    config = dict(whisper_model=str(tiny_whisper_path), llm_model=str(tiny_llm_dir), projector_hidden=64)
    torch.manual_seed(0)
    lora = SpeechLLM(SpeechLLMConfig(**config, lora_rank=4))
    with torch.no_grad():  # adapters that change the LLM (B starts at zero)
        for name, param in lora.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.05)
    lora.save_pretrained(tmp_path / "lora")
    expected = SpeechLLM(SpeechLLMConfig(**config, train_llm=True))
    expected.load_trained(tmp_path / "lora", warm_start=True)
    expected = {k: v.detach() for k, v in expected.trainable_parameters().items()}
    frozen = ["--deepspeed", str(ROOT / "ds_config_zero3.json"), "--train_llm", "True", "--learning_rate", "0"]
    for name, init in (("_from_lora", tmp_path / "lora"), ("_from_llm", tmp_path / "exp_from_lora")):
        _, trace, _ = traced_torchrun(tmp_path, tiny_llm_dir, tiny_whisper_path, jsonl,
                                      frozen + ["--init_from", str(init)], name=name, max_steps=1)
        trained = load_file(trace / "trained0.safetensors")
        assert trained.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(trained[key], expected[key], rtol=0, atol=1e-6, msg=key)


# --batch_seconds 5.2 on clips of 1.0-1.7 s: batches of 3, 3 and 2 clips, one split so both ranks get
# two per epoch
BATCHING = {"fixed": [], "seconds": ["--batch_seconds", "5.2"]}


@pytest.mark.slow
@pytest.mark.parametrize("mode,trains,batching", [
    ("zero3", "projector", "fixed"), ("ddp", "projector", "fixed"), ("zero3", "lora+encoder", "fixed"),
    ("ddp", "lora+encoder", "fixed"), ("ddp", "projector", "seconds")])
def test_resume_after_crash_is_bit_exact(mode, trains, batching, tmp_path, tiny_llm_dir, tiny_whisper_path):
    """Crash at step 5 (checkpoint at 3), rerun the same command: the final trained weights equal an
    uninterrupted run's bit for bit (same data order, RNG and optimizer state after resume)."""
    durations = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7]
    jsonl = write_corpus(tmp_path / "data", TRANSCRIPTS, durations)
    args = (tmp_path, tiny_llm_dir, tiny_whisper_path, jsonl, launch_args(mode, trains) + BATCHING[batching])
    straight, _, straight_records = traced_torchrun(*args, name="straight", max_steps=6)
    if batching == "seconds":  # 3 epochs of 2 batches per rank
        batches = {rank: [r["batch"] for r in straight_records[rank] if "batch" in r] for rank in (0, 1)}
        assert len(batches[0]) == len(batches[1]) == 6
        assert len({len(b) for b in batches[0] + batches[1]}) > 1  # sizes vary with the clips' lengths
        seconds = dict(zip(TRANSCRIPTS, durations))
        for epoch in range(3):
            epoch_batches = [b for rank in (0, 1) for b in batches[rank][2 * epoch:2 * epoch + 2]]
            assert sorted(t for b in epoch_batches for t in b) == sorted(TRANSCRIPTS)  # each clip once an epoch
            assert all(len(b) * max(seconds[t] for t in b) <= 5.2 for b in epoch_batches)
    traced_torchrun(*args, name="crashed", max_steps=6, crash_at_step=5)
    crashed_dir = tmp_path / "expcrashed"
    assert sorted(p.name for p in crashed_dir.iterdir()) == ["checkpoint-3"]  # step 4 was lost
    resumed, trace, records = traced_torchrun(*args, name="crashed", max_steps=6)
    # the rerun resumed (a run started over would also end bit-equal): it saw fewer batches than a full run
    after_crash = records[0][[i for i, r in enumerate(records[0]) if "crashed_at_step" in r][0] + 1:]
    full_run = [r for r in straight_records[0] if "batch" in r]
    assert 0 < len([r for r in after_crash if "batch" in r]) < len(full_run)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_two_ranks_decode_into_the_single_process_result(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "model")
    jsonl = write_corpus(tmp_path / "data", TRANSCRIPTS, [1.0, 1.6, 0.7, 1.3, 0.9, 1.1, 1.5, 1.2])
    write_damaged_flac(tmp_path / "data" / "damaged.flac")  # fails on whichever rank decodes it
    with open(jsonl, "a") as f:
        f.write(json.dumps({"key": "damaged", "wav": "damaged.flac"}) + "\n")
        f.write(json.dumps({"key": "gone", "wav": "gone.wav"}) + "\n")  # found by the check pass
    helper = str(ROOT / "tests" / "helpers" / "traced_recognize.py")

    def recognize(name, launcher):
        trace, result_path = tmp_path / f"trace_{name}", tmp_path / f"{name}.txt"
        trace.mkdir()
        cmd = [sys.executable, *launcher, helper, "--model_dir", str(tmp_path / "model"), "--data_path", str(jsonl),
               "--result_path", str(result_path), "--batch_size", "2", "--max_new_tokens", "6"]
        env = dict(os.environ, TRACE_DIR=str(trace), OMP_NUM_THREADS="1")
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        decoded = {int(p.stem.removeprefix("rank")): [k for line in open(p) for k in json.loads(line)["keys"]]
                   for p in trace.glob("rank*.jsonl")}
        return result_path, decoded

    single, single_decoded = recognize("single", [])
    merged, rank_decoded = recognize("two_ranks", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    assert merged.read_bytes() == single.read_bytes()
    errors = (tmp_path / "two_ranks.txt.errors").read_text()
    assert errors == (tmp_path / "single.txt.errors").read_text() == "damaged\tunreadable\ngone\tmissing\n"
    assert not list(tmp_path.glob("two_ranks.txt.partial*"))
    # each rank decoded its own share: disjoint, together everything the single process decoded
    assert set(rank_decoded) == {0, 1} and rank_decoded[0] and rank_decoded[1]
    assert not set(rank_decoded[0]) & set(rank_decoded[1])
    assert sorted(rank_decoded[0] + rank_decoded[1]) == sorted(single_decoded[0]) == sorted(
        [f"utt{i}" for i in range(8)] + ["damaged"])
