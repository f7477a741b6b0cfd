"""Check a GPU setup and measure it: random-weight models of real size built from configs alone (no
model hub), trained and decoded through train.py and recognize.py as a user runs them, into one table.

    bash tools/fetch_test_tokenizers.sh                    # once: Qwen's tokenizer into .cache/tokenizers/
    python tools/gpu_check.py --out exp/gpu_check          # on a GPU machine: every setting, ~10 min on one H200
    python tools/gpu_check.py --out exp/gpu_check --settings zero3:ctc:qwen2-1.5b none:projector:qwen2-1.5b
    python tools/gpu_check.py --out /tmp/dry --tiny        # the same code path at tiny dims: a CPU dry run

Models: Whisper large-v3's encoder dims (128 mel bins, 32 blocks of 1280; its decoder is never used, so
it is built tiny) and Qwen2-1.5B- / Qwen2-7B-shaped LLMs with Qwen's tokenizer and Qwen2.5's chat
template. Data: --num_clips synthetic clips of 2-20 s, transcripts of random words. Training: each
setting --steps steps under torchrun (one rank per GPU), through train.main with a callback that times
the steps after --warmup_steps and profiles --profile_steps of them. Decoding: recognize.py in every
mode on the CTC-trained model. Written as it goes: OUT/results.jsonl (a line per run), OUT/table.md.

Columns. samples/s, audio s/s (seconds of speech trained on per wall second), LLM tokens/s (unpadded);
TFLOP/s and MFU: the model FLOPs of the timed steps (training_flops below: useful work only, no
padding, no recomputation) per second, against --peak_tflops (the GPU's dense bf16 peak); peak memory
(torch.cuda.max_memory_allocated); GPU busy: the share of the profiled steps' wall time in which a GPU
kernel ran (torch.profiler, the union of kernel intervals). `west-v0` is West v0's data pipeline
reproduced by our flags (every clip padded to 30 s, text to 512 tokens, random batches), the same
model and GPU: the ratio to it is what the length-grouped, trimmed pipeline buys.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from audio import MEL_FRAMES_PER_SECOND  # noqa: E402

# Whisper large-v3's encoder; the text-decoder dims only make a valid checkpoint (never used)
WHISPER_DIMS = dict(n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20, n_audio_layer=32,
                    n_vocab=51866, n_text_ctx=8, n_text_state=64, n_text_head=1, n_text_layer=1)
LLM_CONFIGS = {  # the published configs' shapes
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, tie_word_embeddings=False),
}
TINY_WHISPER = dict(WHISPER_DIMS, n_audio_state=64, n_audio_head=2, n_audio_layer=2)
TINY_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True)
TRAINS = {  # what trains: train.py flags
    "projector": [], "ctc": ["--ctc_weight", "1.0"],
    "lora+encoder": ["--ctc_weight", "1.0", "--lora_rank", "8", "--train_encoder_layers", "2"],
    "llm": ["--train_llm", "True"],
    "west-v0": ["--pad_to_30s", "True", "--pad_text_to", "512", "--length_grouped", "False"],
}
# mode:trains:llm, in the order they run; lora+encoder warm-starts from ctc, "resume" re-runs ctc from its
# mid-run checkpoint as a killed run would be
DEFAULT_SETTINGS = ["zero3:ctc:qwen2-1.5b", "zero3:resume:qwen2-1.5b", "zero3:projector:qwen2-1.5b",
                    "zero3:lora+encoder:qwen2-1.5b", "zero3:llm:qwen2-1.5b", "zero3:west-v0:qwen2-1.5b",
                    "zero2:ctc:qwen2-1.5b", "none:ctc:qwen2-1.5b", "none:lora+encoder:qwen2-1.5b",
                    "zero3:projector:qwen2-7b"]
DECODING = {  # recognize.py flags
    "greedy, LLM alone": ["--ctc_decode_weight", "0"], "beam 4, LLM alone": ["--num_beams", "4", "--ctc_decode_weight", "0"],
    "greedy, joint CTC 0.5": ["--ctc_decode_weight", "0.5"],
    "beam 4, joint CTC 0.3": ["--num_beams", "4", "--ctc_decode_weight", "0.3"],
    "CTC alone": ["--decode", "ctc"], "long recordings in pieces": ["--ctc_decode_weight", "0.5"],
}
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more").split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # the worker passes train.py's arguments through
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="tiny dims, few clips and steps: the code path on a CPU")
    p.add_argument("--settings", nargs="+", default=None, help="mode:trains:llm (default: DEFAULT_SETTINGS)")
    p.add_argument("--decoding", nargs="*", default=list(DECODING), help="decoding modes (default: all; none: none)")
    p.add_argument("--num_clips", type=int, default=None, help="default 512 (tiny: 16)")
    p.add_argument("--steps", type=int, default=None, help="training steps per setting (default 30, tiny 4)")
    p.add_argument("--warmup_steps", type=int, default=None, help="steps not timed (default 5, tiny 1)")
    p.add_argument("--profile_steps", type=int, default=3, help="steps of the timed ones under torch.profiler")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_workers", type=int, default=4, help="DataLoader workers per rank")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak (default: 989 for an H100/H200, else asked for)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one training run, under torchrun
    args, rest = p.parse_known_args(argv)
    tiny = args.tiny
    args.num_clips = args.num_clips or (16 if tiny else 512)
    args.steps = args.steps or (4 if tiny else 30)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (1 if tiny else 5)
    args.settings = args.settings or (["zero3:ctc:qwen2-1.5b", "zero3:resume:qwen2-1.5b", "zero2:lora+encoder:qwen2-1.5b",
                                       "none:west-v0:qwen2-1.5b"] if tiny else DEFAULT_SETTINGS)
    return args, rest


# ----------------------------------------------------------------------------------------
# Models and clips, from configs alone


def build_whisper(out: Path, tiny: bool) -> Path:
    import whisper

    path = out / ("whisper-tiny-dims.pt" if tiny else "whisper-large-v3-dims.pt")
    if not path.exists():
        dims = whisper.model.ModelDimensions(**(TINY_WHISPER if tiny else WHISPER_DIMS))
        torch.manual_seed(0)
        model = whisper.model.Whisper(dims)
        torch.save({"dims": asdict(dims), "model_state_dict": model.half().state_dict()}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
    return path


def build_llm(out: Path, name: str, tiny: bool) -> Path:
    """A random LLM of the named shape (tiny dims with --tiny) with Qwen's tokenizer and Qwen2.5's template."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    path = out / (f"{name}-tiny" if tiny else name)
    if not (path / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(ROOT / ".cache" / "tokenizers" / "qwen3")
        tokenizer.chat_template = (ROOT / "tests" / "data" / "chat_templates" / "qwen2.5.jinja").read_text()
        config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=32768, rope_theta=1e6,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             **(TINY_LLM if tiny else LLM_CONFIGS[name]))
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # 7.6B params: ~40 s on a GPU
            model = Qwen2ForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        del model
    return path


def make_clips(folder: Path, num_clips: int, min_seconds: float, max_seconds: float, seed: int = 0) -> Path:
    """Synthetic clips (a few tones + noise) with transcripts of random words, about 2.5 words a second."""
    jsonl = folder / "clips.jsonl"
    if jsonl.exists():
        return jsonl
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(num_clips):
        seconds = float(rng.uniform(min_seconds, max_seconds))
        t = np.arange(int(seconds * 16000)) / 16000
        audio = sum(rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) for _ in range(3))
        soundfile.write(folder / f"c{i}.wav", (audio + 0.01 * rng.standard_normal(len(t))).astype(np.float32), 16000)
        text = " ".join(rng.choice(WORDS, size=max(1, round(2.5 * seconds))))
        lines.append(json.dumps({"key": f"c{i}", "wav": f"c{i}.wav", "txt": text}))
    jsonl.write_text("\n".join(lines) + "\n")
    return jsonl


def long_recording(folder: Path, clips_jsonl: Path, seconds: float = 70.0) -> Path:
    """One recording of consecutive clips, for decoding in pieces (--chunk_seconds)."""
    jsonl = folder / "long.jsonl"
    if not jsonl.exists():
        entries = [json.loads(line) for line in clips_jsonl.read_text().splitlines()]
        audio, texts = [], []
        for e in entries:
            audio.append(soundfile.read(clips_jsonl.parent / e["wav"], dtype="float32")[0])
            audio.append(np.zeros(4800, dtype=np.float32))  # a 0.3 s pause between clips
            texts.append(e["txt"])
            if sum(map(len, audio)) > seconds * 16000:
                break
        soundfile.write(folder / "long.wav", np.concatenate(audio), 16000)
        jsonl.write_text(json.dumps({"key": "long", "wav": "long.wav", "txt": " ".join(texts)}) + "\n")
    return jsonl


# ----------------------------------------------------------------------------------------
# The FLOP count and the measuring callback


def training_flops(model, mel_lengths: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> float:
    """Model FLOPs of one training forward + backward on a batch: useful work only (no padding, no
    activation recomputation), a multiply-add = 2 FLOPs, matmuls only. A frozen part costs its forward,
    plus one more of it for the gradients of its inputs if something below it trains (the LLM always,
    for the projector's sake); a trained part costs 3 forwards (PaLM's MFU, nanoGPT's estimate_mfu)."""
    from model import num_encoder_frames

    enc, llm_config = model.encoder, model.llm.config
    d, blocks = enc.ln_post.normalized_shape[0], len(enc.blocks)
    trained_blocks = blocks if model.config.train_encoder_layers < 0 else min(model.config.train_encoder_layers, blocks)
    frames = num_encoder_frames(mel_lengths).float()  # (B,) per 30 s window at most: close enough for clips <= 30 s
    per_block = (24 * d * d * frames + 4 * d * frames ** 2).sum().item()  # 12 d^2 weights; QK^T and AV
    stem = (6 * model.n_mels * d * mel_lengths.float() + 6 * d * d * frames).sum().item()
    encoder = stem + per_block * (blocks - trained_blocks) + 3 * per_block * trained_blocks
    audio_tokens = (frames / model.config.projector_kernel).ceil().sum().item()
    projector = 6 * sum(map(numel, model.projector.parameters())) * audio_tokens
    L, h = llm_config.num_hidden_layers, llm_config.hidden_size
    embedding = numel(model.llm.get_input_embeddings().weight)
    llm_weights = sum(numel(p) for n, p in model.llm.named_parameters() if "lora_" not in n) - embedding
    if not llm_config.tie_word_embeddings:
        llm_weights -= numel(model.llm.get_output_embeddings().weight)
    lengths = attention_mask.sum(1).float()  # (B,) unpadded tokens per row
    tokens, label_tokens = lengths.sum().item(), (labels != -100).sum().item()
    forward = 2 * llm_weights * tokens + 2 * L * h * (lengths ** 2).sum().item() + 2 * embedding * label_tokens
    llm = forward * (3 if model.config.train_llm else 2)  # LoRA's own FLOPs are < 1% at rank 8: not counted
    return encoder + projector + llm


def numel(param) -> int:
    return getattr(param, "ds_numel", param.numel())  # ZeRO-3 leaves a rank only its partition


class StepMeter(TrainerCallback):
    """Times the training steps after warmup (synchronizing the GPU), counts their samples, audio, tokens
    and FLOPs (a forward pre-hook sees each batch), and profiles a few of them for the GPU's busy share."""

    def __init__(self, warmup_steps: int, profile_steps: int):
        self.warmup_steps, self.profile_steps = warmup_steps, profile_steps
        self.timed = dict(steps=0, seconds=0.0, samples=0, audio_seconds=0.0, tokens=0, flops=0.0)
        self.batches, self.profiler, self.busy = [], None, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start_step = state.global_step  # > 0: resumed from a checkpoint
        def count(module, _, inputs):
            if module.training:
                self.batches.append((len(inputs["mel_lengths"]), inputs["mel_lengths"].sum().item() / MEL_FRAMES_PER_SECOND,
                                     int(inputs["attention_mask"].sum()),
                                     training_flops(module, inputs["mel_lengths"], inputs["attention_mask"], inputs["labels"])))
        model.register_forward_pre_hook(count, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize()
        self.batches, self.start = [], time.perf_counter()
        if state.global_step == self.warmup_steps and self.profile_steps and torch.cuda.is_available():
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                               torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()
            self.profile_start, self.profiled = time.perf_counter(), 0

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        if state.global_step <= self.warmup_steps:
            return
        t = self.timed
        t["steps"] += 1
        t["seconds"] += time.perf_counter() - self.start
        for samples, audio_seconds, tokens, flops in self.batches:
            t["samples"], t["audio_seconds"], t["tokens"], t["flops"] = (
                t["samples"] + samples, t["audio_seconds"] + audio_seconds, t["tokens"] + tokens, t["flops"] + flops)
        if self.profiler is not None:
            self.profiled += 1
            if self.profiled == self.profile_steps:
                wall = time.perf_counter() - self.profile_start
                self.profiler.__exit__(None, None, None)
                self.busy = kernel_busy_seconds(self.profiler) / wall
                self.profiler = None


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kernel_busy_seconds(profiler) -> float:
    """The union of the GPU kernels' time intervals, in seconds (overlapping streams counted once)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in profiler.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / 1e6  # microseconds


def run_worker(args, train_argv: list[str]) -> None:
    """One training run (a rank under torchrun): train.main with the StepMeter; rank 0 appends its row."""
    import train

    meter = StepMeter(args.warmup_steps, args.profile_steps)
    trainer = train.main(train_argv, callbacks=[meter])
    if trainer.args.process_index != 0:
        return
    t, world = meter.timed, trainer.args.world_size
    per_second = lambda x: world * x / t["seconds"] if t["seconds"] else None  # noqa: E731  (every rank alike)
    row = dict(samples_per_s=per_second(t["samples"]), audio_s_per_s=per_second(t["audio_seconds"]),
               tokens_per_s=per_second(t["tokens"]), tflops=(per_second(t["flops"]) or 0) / 1e12,
               timed_steps=t["steps"], gpu_busy=meter.busy, start_step=meter.start_step,
               peak_gb=(torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30)
    with open(os.environ["GPU_CHECK_ROW"], "w") as f:
        json.dump(row, f)


# ----------------------------------------------------------------------------------------
# The runs


def train_command(args, out: Path, mode: str, trains: str, llm_dir: Path, whisper_path: Path, clips: Path,
                  output_dir: Path) -> list[str]:
    gpus = max(torch.cuda.device_count(), 1)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               str(Path(__file__).resolve()), "--worker", "--out", str(out),
               "--warmup_steps", str(args.warmup_steps), "--profile_steps", str(args.profile_steps),
               "--llm_model_name_or_path", str(llm_dir), "--whisper_model_name_or_path", str(whisper_path),
               "--data_path", str(clips), "--output_dir", str(output_dir), "--max_steps", str(args.steps),
               "--save_steps", str(max(1, args.steps // 2)), "--per_device_train_batch_size", str(args.batch_size),
               "--learning_rate", "1e-4", "--logging_steps", "10", "--report_to", "none",
               "--dataloader_num_workers", str(args.num_workers), "--seed", "0"]
    if torch.cuda.is_available():
        command += ["--bf16", "True"]
    if mode != "none":
        command += ["--deepspeed", str(ROOT / f"ds_config_{mode}.json")]
    if args.tiny:
        command += ["--projector_hidden", "64"]
    if trains == "lora+encoder":  # a warm start from a CTC run's projector, then LoRA and encoder blocks too
        warm = [d for d in sorted((out / "runs").glob(f"*-ctc-{llm_dir.name}")) if (d / "model.safetensors").exists()]
        command += ["--init_from", str(warm[0])] if warm else []
    return command + TRAINS["ctc" if trains == "resume" else trains]


def run_training(args, out: Path, setting: str, whisper_path: Path, clips: Path) -> dict:
    mode, trains, llm = setting.split(":")
    llm_dir = build_llm(out, llm, args.tiny)
    output_dir = out / "runs" / f"{mode}-{'ctc' if trains == 'resume' else trains}-{llm_dir.name}"
    if trains == "resume":  # a run killed after its mid-run checkpoint: the final save and later checkpoints gone
        checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        for path in [output_dir / "model.safetensors", output_dir / "speechllm_config.json", *checkpoints[1:]]:
            subprocess.run(["rm", "-rf", str(path)], check=True)
    row_file = out / "row.json"
    row_file.unlink(missing_ok=True)
    command = train_command(args, out, mode, trains, llm_dir, whisper_path, clips, output_dir)
    start = time.perf_counter()
    with open(out / "logs" / f"{setting.replace(':', '-')}.log", "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, GPU_CHECK_ROW=str(row_file)))
    row = dict(kind="train", setting=setting, wall_s=round(time.perf_counter() - start, 1))
    if result.returncode != 0 or not row_file.exists():
        log_tail = (out / "logs" / f"{setting.replace(':', '-')}.log").read_text()[-1500:]
        return row | dict(status=f"FAILED (exit {result.returncode})", error=log_tail)
    row |= json.loads(row_file.read_text())
    saved = (output_dir / "model.safetensors").exists()
    resumed = trains != "resume" or row["start_step"] > 0
    return row | dict(status="ok" if saved and resumed else "FAILED (no final save)" if not saved else "FAILED (did not resume)")


def run_decoding(args, out: Path, name: str, flags: list[str], model_dir: Path, clips: Path, long: Path) -> dict:
    data = long if name.startswith("long") else clips
    result = out / "decode" / f"{name.replace(' ', '_').replace(',', '')}.txt"
    result.parent.mkdir(exist_ok=True)
    command = [sys.executable, str(ROOT / "recognize.py"), "--model_dir", str(model_dir), "--data_path", str(data),
               "--result_path", str(result), "--batch_size", "16", *flags]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    row = dict(kind="decode", setting=name, wall_s=round(time.perf_counter() - start, 1))
    lines = result.read_text().splitlines() if result.exists() else []
    expected = len(data.read_text().splitlines())
    if proc.returncode != 0 or len(lines) != expected:
        return row | dict(status=f"FAILED (exit {proc.returncode}, {len(lines)} of {expected} lines)",
                          error=proc.stderr[-1500:])
    rtf = next((line.split("RTF ")[1] for line in proc.stdout.splitlines() if "RTF " in line), None)
    return row | dict(status="ok", rtf=float(rtf) if rtf else None)


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(rows: list[dict], peak_tflops: float | None) -> str:
    lines = ["| run | status | samples/s | audio s/s | LLM tokens/s | TFLOP/s | MFU | peak GB | GPU busy | RTF | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = r.get("tflops") / peak_tflops if peak_tflops and r.get("tflops") is not None else None
        lines.append(f"| {r['kind']} {r['setting']} | {r['status']} | {fmt(r.get('samples_per_s'), '.2f')} | "
                     f"{fmt(r.get('audio_s_per_s'), '.1f')} | {fmt(r.get('tokens_per_s'), '.0f')} | "
                     f"{fmt(r.get('tflops'), '.1f')} | {fmt(mfu, '.1%')} | {fmt(r.get('peak_gb'), '.1f')} | "
                     f"{fmt(r.get('gpu_busy'), '.0%')} | {fmt(r.get('rtf'), '.4f')} | {r['wall_s']} |")
    west = {r["setting"].split(":")[2]: r for r in rows if ":west-v0:" in r["setting"] and r["status"] == "ok"}
    for r in rows:
        mode, trains, llm = (r["setting"].split(":") + ["", "", ""])[:3]
        if r["kind"] == "train" and trains == "projector" and llm in west and r["status"] == "ok":
            lines.append(f"\n{r['setting']}: {r['audio_s_per_s'] / west[llm]['audio_s_per_s']:.1f}x West v0's audio s/s")
    return "\n".join(lines) + "\n"


def default_peak_tflops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return 989.0 if ("H100" in name or "H200" in name) else None


def main(argv=None):
    args, rest = parse_args(argv)
    out = Path(args.out)
    if args.worker:
        return run_worker(args, rest)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    peak = args.peak_tflops or default_peak_tflops()
    whisper_path = build_whisper(out, args.tiny)
    clips = make_clips(out / "clips", args.num_clips, 2.0, 20.0)
    rows = []

    def record(row):
        rows.append(row)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        (out / "table.md").write_text(table(rows, peak))
        print(f"{row['kind']} {row['setting']}: {row['status']} ({row['wall_s']} s)", flush=True)

    for setting in args.settings:
        try:
            record(run_training(args, out, setting, whisper_path, clips))
        except Exception:  # a failed setting is a row of the table, not the end of the check
            record(dict(kind="train", setting=setting, wall_s=0, status="FAILED", error=traceback.format_exc()[-1500:]))
    ctc_runs = sorted((out / "runs").glob("*-ctc-*"))
    if args.decoding and ctc_runs and (ctc_runs[0] / "model.safetensors").exists():
        dev = make_clips(out / "dev", 16 if args.tiny else 64, 2.0, 20.0, seed=1)
        long = long_recording(out / "dev", dev, 40.0 if args.tiny else 70.0)
        for name in args.decoding:
            record(run_decoding(args, out, name, DECODING[name], ctc_runs[0], dev, long))
        if torch.cuda.device_count() < 2:
            record(dict(kind="decode", setting="two ranks", wall_s=0, status="not run: one GPU (tests/test_distributed.py runs it on CPU)"))
    print((out / "table.md").read_text())
    failed = [r for r in rows if r["status"].startswith("FAILED")]
    for r in failed:
        print(f"--- {r['kind']} {r['setting']}:\n{r.get('error', '')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
