"""Speed of training and decoding in one run: ours vs the West-v0 pipeline vs Whisper's own decoding.

    python tools/bench.py                 # real offline weights, the first 32 clips of corpus/dev.jsonl
    python tools/bench.py --levers        # + one row per speed lever switched off (or on) alone
    python tools/bench.py --trainable     # + training rows for what trains: LoRA, encoder blocks, the LLM
    python tools/bench.py --batching --data_path corpus/mix/train.jsonl --num_clips 256   # only: fixed batch
                                          # sizes vs --batch_seconds, on a random sample of clips of all lengths
    python tools/bench.py --smoke --whisper tiny.pt --llm tiny_llm_dir --data_path clips.jsonl   # CI

West v0 reproduced with our own flags: every clip padded to 30 s (pad_to_30s: 300 audio tokens),
every text padded to 512 tokens (Collator(pad_text_to=512)), random batches instead of
LengthGroupedSampler, and decoding one utterance at a time. Everything else is the same code.

Training: collate + forward + backward + AdamW step at batch 8 on the clips (features precomputed,
as DataLoader workers would), audio seconds per wall second. Each training setting runs in a process
of its own, which reports its own peak RSS. Decoding: from 16 kHz arrays in memory (log-mel,
collate, generate, detokenize), longest clips first as recognize.py batches them; RTF = wall time /
audio time. Whisper's own `transcribe` (greedy, fp32) on the same arrays is the speed anchor. Every
time is the median of --repeats runs (--west_repeats for the minutes-long West-v0 rows); every
setting gets the same token budget; WER is scored by compute_wer.score, like recognize.py.

--batching: training batches of a fixed number of utterances (length-grouped, as train.py's default)
against train.py --batch_seconds (DurationBatchSampler with its default token cap), each setting one
pass over every clip in a process of its own: audio seconds per wall second over the whole pass, the
padded share of the encoder's input (mel frames) and of the LLM's (tokens), and peak RSS. The clips are
a random sample (--seed) of --data_path, so a corpus of mixed lengths is covered whatever its order.
"""
import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from compute_wer import score  # noqa: E402
from audio import SAMPLE_RATE, load_entry_audio, log_mel  # noqa: E402
from data import Collator, DurationBatchSampler, LengthGroupedSampler, read_jsonl, sequence_length  # noqa: E402
from decoding import max_transcript_tokens  # noqa: E402
from model import CONFIG_NAME, SpeechLLM, SpeechLLMConfig, load_whisper  # noqa: E402
from whisper_baseline import whisper_transcribe  # noqa: E402  (tools/, this file's folder)


DEFAULT_THREADS = torch.get_num_threads()  # torch's default (physical cores), before a setting changes it


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=str(ROOT / "corpus" / "dev.jsonl"), help="jsonl with key/wav/txt")
    p.add_argument("--num_clips", type=int, default=32, help="the first N clips of --data_path")
    p.add_argument("--model_dir", default=None, help="a trained projector; default: a fresh one from --seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--whisper", default=None, help="default: the model dir's, else bundled:whisper-tiny.en")
    p.add_argument("--llm", default=None, help="default: the model dir's, else bundled:smollm2-135m-instruct")
    p.add_argument("--anchor_whisper", default="bundled:whisper-tiny.en", help="the Whisper whose transcribe is the anchor")
    p.add_argument("--train_batch_size", type=int, default=8)
    p.add_argument("--train_steps", type=int, default=3, help="timed steps per training setting, after one warm-up step")
    p.add_argument("--decode_batch_sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=3, help="decoding passes per setting; the median is reported")
    p.add_argument("--west_repeats", type=int, default=1,
                   help="decoding passes of the West-v0 rows: each takes minutes, so one keeps the run short")
    p.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's own default")
    p.add_argument("--levers", action="store_true", help="also measure each speed lever alone")
    p.add_argument("--trainable", action="store_true", help="also train LoRA, encoder blocks, the whole LLM")
    p.add_argument("--batching", action="store_true",
                   help="only the batching table: fixed batch sizes vs --batch_seconds, one training pass each")
    p.add_argument("--batching_sizes", type=int, nargs="+", default=[4, 8, 16], help="fixed utterances per batch")
    p.add_argument("--batching_seconds", type=float, nargs="+", default=[60.0, 120.0], help="--batch_seconds values")
    p.add_argument("--smoke", action="store_true", help="4 clips, one timed step, one pass: for the tiny test models (CI)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one job in a child process
    args = p.parse_args(argv)
    if args.smoke:
        args.num_clips, args.train_steps, args.repeats, args.west_repeats = min(args.num_clips, 4), 1, 1, 1
    if args.model_dir is None:
        args.whisper = args.whisper or "bundled:whisper-tiny.en"
        args.llm = args.llm or "bundled:smollm2-135m-instruct"
    return args


# ----------------------------------------------------------------------------------------
# Settings: ours, West v0, and ours with one lever changed


@dataclass(frozen=True)
class Setting:
    name: str
    pad_to_30s: bool = False  # Whisper's native 30 s input: 300 audio tokens per clip
    pad_text_to: int | None = None  # training: tokens padded to at least this length
    length_grouped: bool = True  # training: LengthGroupedSampler, else random batches
    label_logits_only: bool = True  # training: the LM head only where a label is predicted
    prefix_cache: bool = True  # training and decoding: KV cache of the prompt's shared prefix
    attention: str = "sdpa"  # the LLM's attn_implementation
    bf16_autocast: bool = False
    threads: int | None = None  # None: --threads
    batch_size: int = 8
    batch_seconds: float | None = None  # training: DurationBatchSampler batches instead of batch_size
    num_beams: int = 1
    trains: str = "projector"  # a key of TRAINS


OURS = Setting("ours")
# What trains besides the projector: SpeechLLMConfig fields (train.py's flags of the same names)
TRAINS = {"projector": {}, "+ LoRA r8": dict(lora_rank=8), "+ LoRA r32": dict(lora_rank=32),
          "+ encoder top 2": dict(train_encoder_layers=2), "+ LoRA r8 + encoder top 2": dict(lora_rank=8, train_encoder_layers=2),
          "full LLM": dict(train_llm=True)}
WEST = Setting("West-v0", pad_to_30s=True, pad_text_to=512, length_grouped=False)


def other_threads(args) -> int:
    """The thread count the threads lever compares with: 1, or torch's default when --threads 1."""
    return DEFAULT_THREADS if args.threads == 1 else 1


def training_settings(args) -> list[tuple[Setting, str | None]]:
    """(setting, the lever it isolates or None)."""
    ours, west = replace(OURS, batch_size=args.train_batch_size), replace(WEST, batch_size=args.train_batch_size)
    settings = [(ours, None), (west, None)]
    if args.levers:
        settings += [(replace(ours, name="ours, LM head on every position", label_logits_only=False),
                      "LM head only on label positions"),
                     (replace(ours, name="ours, no prefix KV cache", prefix_cache=False), "prefix KV cache"),
                     (replace(ours, name="ours, random batches", length_grouped=False), "length-grouped batches"),
                     (replace(ours, name="ours, text padded to 512", pad_text_to=512), "text padded to the batch max"),
                     (replace(ours, name="ours, audio padded to 30 s", pad_to_30s=True), "trimmed audio"),
                     (replace(ours, name="ours + bf16 autocast", bf16_autocast=True), "bf16 autocast (off by default)"),
                     (replace(ours, name=f"ours, {other_threads(args)} threads", threads=other_threads(args)),
                      f"torch threads ({args.threads or DEFAULT_THREADS} instead of {other_threads(args)})")]
    if args.trainable:
        settings += [(replace(ours, name=f"ours, {trains}", trains=trains), "trains") for trains in TRAINS if trains != "projector"]
    if args.levers and args.trainable:  # while LoRA trains, the opening runs once per batch, with gradients
        settings += [(replace(ours, name="ours, + LoRA r8, no prefix KV cache", trains="+ LoRA r8", prefix_cache=False),
                      "prefix KV cache, + LoRA r8")]
    return settings


def lever_batch_size(args) -> int:
    return sorted(args.decode_batch_sizes)[len(args.decode_batch_sizes) // 2]


def decoding_settings(args) -> list[tuple[Setting, str | None]]:
    settings = [(replace(OURS, batch_size=b, num_beams=k), None) for k in (1, 4) for b in args.decode_batch_sizes]
    settings += [(replace(WEST, batch_size=1, num_beams=k), None) for k in (1, 4)]
    if args.levers:  # each against ours, greedy, at the middle batch size
        ours = replace(OURS, batch_size=lever_batch_size(args))
        settings += [(replace(ours, name="ours, no prefix KV cache", prefix_cache=False), "prefix KV cache"),
                     (replace(ours, name="ours, eager attention", attention="eager"), "SDPA attention"),
                     (replace(ours, name="ours, audio padded to 30 s", pad_to_30s=True), "trimmed audio"),
                     (replace(ours, name="ours + bf16 autocast", bf16_autocast=True), "bf16 autocast (off by default)"),
                     (replace(ours, name=f"ours, {other_threads(args)} threads", threads=other_threads(args)),
                      f"torch threads ({args.threads or DEFAULT_THREADS} instead of {other_threads(args)})")]
    return settings


# ----------------------------------------------------------------------------------------
# The measurements (each runs inside a worker process)


def chosen_entries(args) -> list[dict]:
    """The first --num_clips of --data_path; with --batching a random sample, to span its lengths."""
    entries = read_jsonl(args.data_path)
    if args.batching:
        return random.Random(args.seed).sample(entries, min(args.num_clips, len(entries)))
    return entries[: args.num_clips]


def load_clips(args) -> list[dict]:
    clips = []
    for entry in chosen_entries(args):
        audio = load_entry_audio(entry)
        clips.append(dict(key=entry["key"], txt=entry["txt"], audio=audio, seconds=len(audio) / SAMPLE_RATE))
    return clips


def build_model(args, trains: str = "projector") -> SpeechLLM:
    torch.manual_seed(args.seed)  # a fresh projector (and LoRA), the same in every worker
    if not args.model_dir:
        return SpeechLLM(SpeechLLMConfig(whisper_model=args.whisper, llm_model=args.llm, **TRAINS[trains]))
    if trains == "projector":
        return SpeechLLM.from_pretrained(args.model_dir, whisper_model=args.whisper, llm_model=args.llm)
    config = SpeechLLMConfig.from_json(Path(args.model_dir) / CONFIG_NAME)
    config = replace(config, whisper_model=args.whisper or config.whisper_model, llm_model=args.llm or config.llm_model,
                     **TRAINS[trains])
    model = SpeechLLM(config)
    model.load_trained(args.model_dir, warm_start=True)  # as train.py --init_from
    return model


def apply(setting: Setting, model: SpeechLLM, args):
    """Switch the per-process knobs of a setting; returns the autocast context to run it under."""
    torch.set_num_threads(setting.threads or args.threads or DEFAULT_THREADS)
    model.config.pad_to_30s = setting.pad_to_30s  # read where log-mel features are made
    model.config.ctc_weight = 0.0  # train.py's default, whatever the model dir was trained with
    model.llm.set_attn_implementation(setting.attention)
    return torch.autocast("cpu", dtype=torch.bfloat16) if setting.bf16_autocast else nullcontext()


def training_loss(model: SpeechLLM, batch: dict, setting: Setting) -> torch.Tensor:
    if setting.label_logits_only:
        return model(**batch, prefix_cache=setting.prefix_cache).loss
    # The LLM's own loss: logits over the whole sequence (what SpeechLLM.forward computed before)
    embeds = model.embed(batch["mel"], batch["mel_lengths"], batch["input_ids"], batch["audio_mask"])
    prefix_length = model.training_prefix_length(batch["input_ids"], batch["attention_mask"], batch["audio_mask"])
    prefix_length = prefix_length if setting.prefix_cache else 0
    cache = model.prefix_kv_cache(batch["input_ids"][0, :prefix_length], len(embeds)) if prefix_length else None
    return model.llm(inputs_embeds=embeds[:, prefix_length:], attention_mask=batch["attention_mask"],
                     labels=batch["labels"][:, prefix_length:], past_key_values=cache, use_cache=cache is not None).loss


def measure_training(args, setting: Setting) -> dict:
    clips, model = load_clips(args), build_model(args, setting.trains)
    autocast = apply(setting, model, args)
    model.train()
    items = [dict(mel=log_mel(c["audio"], model.n_mels, setting.pad_to_30s), txt=c["txt"],
                  instruction=model.config.instruction) for c in clips]
    seconds = [c["seconds"] for c in clips]
    if setting.length_grouped:
        order = list(LengthGroupedSampler(seconds, setting.batch_size, seed=args.seed))
    else:  # the Trainer's default: a random permutation
        order = random.Random(args.seed).sample(range(len(clips)), len(clips))
    batches = [order[i:i + setting.batch_size] for i in range(0, len(order), setting.batch_size)]
    collate = Collator(model.data_spec(), pad_text_to=setting.pad_text_to)
    trainable = model.trainable_parameters()
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-4)

    def step(indices) -> float:
        return train_step(model, optimizer, collate([items[i] for i in indices]), setting, autocast)

    step(batches[0])  # warm-up: first-touch allocations
    timed = [batches[i % len(batches)] for i in range(args.train_steps)]
    speeds = [sum(seconds[i] for i in b) / step(b) for b in timed]  # audio seconds per wall second
    with tempfile.TemporaryDirectory() as model_dir:  # what a checkpoint's / the model dir's weights take
        model.save_pretrained(model_dir)
        model_dir_mb = sum(f.stat().st_size for f in Path(model_dir).rglob("*.safetensors")) / 2**20
    return dict(audio_per_s=statistics.median(speeds), trainable_params=sum(p.numel() for p in trainable.values()),
                model_dir_mb=model_dir_mb, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def train_step(model: SpeechLLM, optimizer, batch: dict, setting: Setting, autocast) -> float:
    """forward + backward + optimizer step on a collated batch -> wall seconds (collating is the caller's)."""
    start = time.perf_counter()
    with autocast:
        loss = training_loss(model, batch, setting)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def batching_settings(args) -> list[Setting]:
    return [Setting(f"{b} utterances per batch", batch_size=b) for b in args.batching_sizes] + [
        Setting(f"--batch_seconds {s:g}", batch_seconds=s) for s in args.batching_seconds]


def measure_batching(args, setting: Setting) -> dict:
    """One training pass over every clip in the setting's batches: speed over the whole pass (batches
    differ in size, so no per-step median), the padded share of the mel frames and of the LLM tokens."""
    clips, model = load_clips(args), build_model(args)
    autocast = apply(setting, model, args)
    model.train()
    items = [dict(mel=log_mel(c["audio"], model.n_mels), txt=c["txt"], instruction=model.config.instruction)
             for c in clips]
    seconds, spec = [c["seconds"] for c in clips], model.data_spec()
    if setting.batch_seconds:
        tokens = [sequence_length(dict(duration=c["seconds"]), spec, c["txt"]) for c in clips]
        batches = list(DurationBatchSampler(seconds, tokens, setting.batch_seconds, seed=args.seed))
    else:
        order = list(LengthGroupedSampler(seconds, setting.batch_size, seed=args.seed))
        batches = [order[i:i + setting.batch_size] for i in range(0, len(order), setting.batch_size)]
    collate = Collator(spec)
    optimizer = torch.optim.AdamW(model.trainable_parameters().values(), lr=1e-4)
    train_step(model, optimizer, collate([items[i] for i in batches[0]]), setting, autocast)  # warm-up
    elapsed, frames, tokens_used = 0.0, [0, 0], [0, 0]  # [real, padded]
    for indices in batches:
        start = time.perf_counter()
        batch = collate([items[i] for i in indices])
        elapsed += time.perf_counter() - start + train_step(model, optimizer, batch, setting, autocast)
        frames = [frames[0] + int(batch["mel_lengths"].sum()), frames[1] + batch["mel"].shape[0] * batch["mel"].shape[-1]]
        tokens_used = [tokens_used[0] + int(batch["attention_mask"].sum()), tokens_used[1] + batch["attention_mask"].numel()]
    sizes = [len(b) for b in batches]
    return dict(batches=len(batches), min_size=min(sizes), max_size=max(sizes), audio_per_s=sum(seconds) / elapsed,
                audio_padding=1 - frames[0] / frames[1], token_padding=1 - tokens_used[0] / tokens_used[1],
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def measure_decoding(args, settings: list[Setting]) -> list[dict]:
    clips, model = load_clips(args), build_model(args)
    model.eval()
    order = sorted(range(len(clips)), key=lambda i: -clips[i]["seconds"])  # longest first, as recognize.py
    audio = [clips[i]["audio"] for i in order]
    refs = {c["key"]: c["txt"] for c in clips}
    audio_seconds = sum(c["seconds"] for c in clips)
    # One token budget for every setting, from the real duration of the longest clip: a projector
    # given input it was not trained on (30 s padding) may not stop, and would then be timed on how
    # far it rambles rather than on what its pipeline costs.
    max_new_tokens = max_transcript_tokens(max(c["seconds"] for c in clips))
    results = []
    for setting in settings:
        autocast = apply(setting, model, args)
        times = []
        for _ in range(args.west_repeats if setting.name == WEST.name else args.repeats):
            start = time.perf_counter()
            with autocast:
                texts = model.transcribe(audio, num_beams=setting.num_beams, batch_size=setting.batch_size,
                                         prefix_cache=setting.prefix_cache, max_new_tokens=max_new_tokens)
            times.append(time.perf_counter() - start)
        hyps = {clips[i]["key"]: " ".join(text.split()) for i, text in zip(order, texts)}
        elapsed = statistics.median(times)
        results.append(dict(rtf=elapsed / audio_seconds, utt_per_s=len(clips) / elapsed, **wer(refs, hyps)))
        print(f"{setting}: {results[-1]}", file=sys.stderr, flush=True)
    return results


def measure_whisper(args) -> dict:
    """openai-whisper's own transcribe, one clip at a time: greedy (temperature 0, no fallback), fp32."""
    torch.set_num_threads(args.threads or DEFAULT_THREADS)
    clips, whisper_model = load_clips(args), load_whisper(args.anchor_whisper).eval()
    times = []
    for _ in range(args.repeats):
        start, hyps = time.perf_counter(), {}
        for clip in clips:
            hyps[clip["key"]] = whisper_transcribe(whisper_model, clip["audio"])
        times.append(time.perf_counter() - start)
    elapsed = statistics.median(times)
    refs = {c["key"]: c["txt"] for c in clips}
    return dict(rtf=elapsed / sum(c["seconds"] for c in clips), utt_per_s=len(clips) / elapsed, **wer(refs, hyps))


def wer(refs: dict, hyps: dict) -> dict:
    result = score(refs, hyps)  # the same scoring as recognize.py and compute_wer.py
    return dict(wer=result.error_rate, errors=result.errors, ref_words=result.ref_words)


# ----------------------------------------------------------------------------------------
# Worker processes


def run_worker(args) -> None:
    job = json.loads(args.worker)
    if job["kind"] == "train":
        result = measure_training(args, Setting(**job["setting"]))
    elif job["kind"] == "batching":
        result = measure_batching(args, Setting(**job["setting"]))
    elif job["kind"] == "decode":
        result = measure_decoding(args, [Setting(**s) for s in job["settings"]])
    else:
        result = measure_whisper(args)
    print("RESULT " + json.dumps(result), flush=True)


def in_worker(argv: list[str], job: dict):
    """Run one job in a fresh process with the same options; its peak RSS is its own."""
    out = subprocess.run([sys.executable, __file__, *argv, "--worker", json.dumps(job)], capture_output=True,
                         text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        sys.exit(f"worker {job['kind']} failed:\n{out.stderr[-4000:]}")
    print(f"{job}: {out.stdout.splitlines()[-1]}", file=sys.stderr, flush=True)  # progress
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])


# ----------------------------------------------------------------------------------------
# The report


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def describe(setting: Setting) -> str:
    if setting.name == "ours":
        return "ours: trimmed audio, length-grouped, text to batch max"
    if setting.name == "West-v0":
        return "West-v0: 30 s padding, text to 512, random batches"
    return setting.name


def training_table(rows, west) -> list[str]:
    lines = [f"| training (batch {west[0].batch_size}: collate + fwd + bwd + AdamW step) | audio s / wall s "
             "| peak RSS MB | vs West-v0 |", "|---|---|---|---|"]
    for setting, _, r in rows:
        lines.append(f"| {describe(setting)} | {r['audio_per_s']:.2f} | {r['peak_rss_mb']:.0f} "
                     f"| {ratio(r['audio_per_s'], west[2]['audio_per_s'])} |")
    return lines


def decoding_table(rows, whisper_row) -> list[str]:
    west_rtf = {s.num_beams: r["rtf"] for s, _, r in rows if s.name == "West-v0"}
    lines = ["| decoding | batch | beams | RTF | utt/s | WER % [errors / words] | vs West-v0 (same beams) |",
             "|---|---|---|---|---|---|---|"]
    for setting, _, r in rows + [whisper_row]:
        name = "West-v0: 30 s padding, one utterance at a time" if setting.name == "West-v0" else setting.name
        lines.append(f"| {name} | {setting.batch_size} | {setting.num_beams} | {r['rtf']:.4f} | "
                     f"{r['utt_per_s']:.2f} | {r['wer']:.2f} [{r['errors']} / {r['ref_words']}] | "
                     f"{ratio(west_rtf[setting.num_beams], r['rtf'])} |")
    return lines


def trainable_table(train_rows) -> list[str]:
    """What training more than the projector costs: parameters, model dir size, speed, memory."""
    ours = train_rows[0][2]
    lines = ["| what trains | trainable params | model dir MB (fp32) | audio s / wall s | peak RSS MB | vs projector only |",
             "|---|---|---|---|---|---|"]
    for setting, lever, r in [train_rows[0]] + [row for row in train_rows if row[1] == "trains"]:
        lines.append(f"| {setting.trains} | {r['trainable_params'] / 1e6:.2f} M | {r['model_dir_mb']:.1f} "
                     f"| {r['audio_per_s']:.2f} | {r['peak_rss_mb']:.0f} | {ratio(r['audio_per_s'], ours['audio_per_s'])} |")
    return lines


def levers_table(args, train_rows, decode_rows) -> list[str]:
    """What each lever buys: ours' speed / the speed with that lever alone changed (in training,
    against ours with the same parts training)."""
    ours_decode = next(r for s, _, r in decode_rows if s == replace(OURS, batch_size=lever_batch_size(args)))
    lines = ["| lever | part | ours | with the lever changed | ours / changed |", "|---|---|---|---|---|"]
    for setting, lever, r in train_rows:
        if lever and lever != "trains":
            ours_train = next(row["audio_per_s"] for same, kind, row in train_rows
                              if same.trains == setting.trains and kind in (None, "trains"))
            lines.append(f"| {lever} | training, audio s / s | {ours_train:.2f} | {r['audio_per_s']:.2f} "
                         f"| {ratio(ours_train, r['audio_per_s'])} |")
    for setting, lever, r in decode_rows:
        if lever:
            lines.append(f"| {lever} | decoding batch {setting.batch_size} greedy, RTF | {ours_decode['rtf']:.4f} | {r['rtf']:.4f} "
                         f"| {ratio(r['rtf'], ours_decode['rtf'])} |")
    return lines


def batching_table(rows, num_clips: int) -> list[str]:
    lines = [f"| training batches (one pass over {num_clips} clips) | batches | utterances per batch | audio padding % "
             "| token padding % | audio s / wall s | peak RSS MB |", "|---|---|---|---|---|---|---|"]
    for setting, r in rows:
        lines.append(f"| {setting.name} | {r['batches']} | {r['min_size']}-{r['max_size']} | {100 * r['audio_padding']:.1f} "
                     f"| {100 * r['token_padding']:.1f} | {r['audio_per_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    return lines


def goals(train_rows, decode_rows, whisper_row) -> list[str]:
    ours_train, west_train = train_rows[0][2], train_rows[1][2]
    ours = {(s.batch_size, s.num_beams): r for s, lever, r in decode_rows if s.name == "ours"}
    west = {s.num_beams: r for s, lever, r in decode_rows if s.name == "West-v0"}
    largest = max(b for b, _ in ours)
    greedy = {b: r["rtf"] for (b, k), r in ours.items() if k == 1}
    best_batch = min(greedy, key=greedy.get)
    wer_gap = max(r["wer"] for r in ours.values()) - min(r["wer"] for r in west.values())

    def check(ok: bool) -> str:
        return "met" if ok else "NOT met"

    train_speedup = ours_train["audio_per_s"] / west_train["audio_per_s"]
    decode_speedups = {k: west[k]["rtf"] / ours[(largest, k)]["rtf"] for k in west}
    return [
        f"- training >= 8x West-v0: {train_speedup:.2f}x, {check(train_speedup >= 8)}",
        *[f"- decoding >= 10x West-v0, beams {k} (ours at batch {largest}): {v:.2f}x, {check(v >= 10)}"
          for k, v in decode_speedups.items()],
        f"- greedy RTF <= Whisper's own greedy transcribe: ours {greedy[best_batch]:.4f} at batch {best_batch}, "
        f"{greedy[min(greedy)]:.4f} at batch {min(greedy)}; Whisper {whisper_row[2]['rtf']:.4f}: "
        f"{check(greedy[best_batch] <= whisper_row[2]['rtf'])}",
        f"- training peak RSS at batch {train_rows[0][0].batch_size} <= 3 GB: {ours_train['peak_rss_mb'] / 1024:.2f} GB, "
        f"{check(ours_train['peak_rss_mb'] <= 3 * 1024)}",
        f"- accuracy: worst WER of ours {max(r['wer'] for r in ours.values()):.2f} vs best of West-v0 "
        f"{min(r['wer'] for r in west.values()):.2f} ({wer_gap:+.2f} points), {check(wer_gap <= 0)}",
    ]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    import transformers

    clips_seconds = [len(load_entry_audio(e)) / SAMPLE_RATE for e in chosen_entries(args)]
    start = time.perf_counter()
    if args.batching:
        rows = [(s, in_worker(argv, dict(kind="batching", setting=asdict(s)))) for s in batching_settings(args)]
        print(f"## tools/bench.py --batching: {len(clips_seconds)} clips sampled from {args.data_path} "
              f"({sum(clips_seconds):.1f} s of audio, {min(clips_seconds):.1f}-{max(clips_seconds):.1f} s), "
              f"torch threads {args.threads or DEFAULT_THREADS}, load average at the end {os.getloadavg()[0]:.1f}; "
              f"total {time.perf_counter() - start:.0f} s")
        print()
        print("\n".join(batching_table(rows, len(clips_seconds))))
        return
    train_rows = [(s, lever, in_worker(argv, dict(kind="train", setting=asdict(s)))) for s, lever in training_settings(args)]
    decode_settings = decoding_settings(args)
    decode_results = in_worker(argv, dict(kind="decode", settings=[asdict(s) for s, _ in decode_settings]))
    decode_rows = [(s, lever, r) for (s, lever), r in zip(decode_settings, decode_results)]
    whisper_row = (Setting("Whisper tiny.en transcribe (greedy, fp32)" if "tiny.en" in args.anchor_whisper else
                           f"Whisper {args.anchor_whisper} transcribe (greedy, fp32)", batch_size=1),
                   None, in_worker(argv, dict(kind="whisper")))
    elapsed = time.perf_counter() - start

    projector = args.model_dir or f"a fresh projector (seed {args.seed})"
    print(f"## tools/bench.py: {len(clips_seconds)} clips of {args.data_path} ({sum(clips_seconds):.1f} s of audio, "
          f"{min(clips_seconds):.1f}-{max(clips_seconds):.1f} s), {projector}")
    print(f"whisper {args.whisper or 'from the model dir'}, llm {args.llm or 'from the model dir'}; "
          f"torch threads {args.threads or DEFAULT_THREADS} (torch.get_num_threads() {DEFAULT_THREADS}, "
          f"os.cpu_count() {os.cpu_count()}); torch {torch.__version__}, transformers {transformers.__version__}; "
          f"medians of {args.train_steps} training steps / {args.repeats} decoding passes "
          f"({args.west_repeats} for West-v0); "
          f"load average at the end {os.getloadavg()[0]:.1f}; total {elapsed:.0f} s")
    print()
    print("\n".join(training_table([r for r in train_rows if r[0].trains == "projector"], train_rows[1])))
    if args.trainable:
        print()
        print("\n".join(trainable_table(train_rows)))
    print()
    print("\n".join(decoding_table(decode_rows, whisper_row)))
    if args.levers:
        print()
        print("\n".join(levers_table(args, train_rows, decode_rows)))
    print()
    print("\n".join(goals(train_rows, decode_rows, whisper_row)))


if __name__ == "__main__":
    main()
