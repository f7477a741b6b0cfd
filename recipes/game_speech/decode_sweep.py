"""Decoding settings side by side on dev sets: the LLM alone, joint CTC + LLM at several weights,
pure CTC; greedy and beam search; with and without the repetition guard; long clips in pieces (the
default) or in one prompt. One table row per setting and dev set: WER [insertions], utterances that
loop, prompt echoes, real-time factor.

    python recipes/game_speech/decode_sweep.py --model_dir pretrained/whisper-tiny.en_smollm2-135m --out exp/sweep \
        --data_paths corpus/dev.jsonl corpus/real/dev.jsonl --long_from corpus/real/dev.jsonl

--sample N decodes N clips of each set, drawn at random (seed 0): how well the model fits a training
set without decoding all of it. --long_from also makes a dev set of long clips (45-60 s: consecutive
clips of one scene joined by 0.3 s pauses, OUT/long/) beyond anything trained on. Settings:
--settings NAME ... of SETTINGS. The model is loaded once; each setting decodes with recognize.py's
own functions (results in OUT/, a finished one is read back, not decoded again).
"""
import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the library

from compute_wer import score  # noqa: E402
from audio import load_entry_audio  # noqa: E402
from data import check_entries, read_jsonl  # noqa: E402
from model import SpeechLLM  # noqa: E402
import recognize  # noqa: E402

# name -> recognize.py flags
SETTINGS = {
    "llm, no guard": dict(max_repeats=0, ctc_decode_weight=0.0),
    "llm": dict(ctc_decode_weight=0.0),
    "joint 0.1": dict(ctc_decode_weight=0.1),
    "joint 0.3": dict(ctc_decode_weight=0.3),
    "joint 0.5": dict(ctc_decode_weight=0.5),
    "joint 0.7": dict(ctc_decode_weight=0.7),
    "ctc": dict(decode="ctc"),
    "llm beam4": dict(ctc_decode_weight=0.0, num_beams=4),
    "joint 0.1 beam4": dict(ctc_decode_weight=0.1, num_beams=4),
    "joint 0.3 beam4": dict(ctc_decode_weight=0.3, num_beams=4),
    "joint 0.5 beam4": dict(ctc_decode_weight=0.5, num_beams=4),
    "ctc, one prompt": dict(decode="ctc", chunk_seconds=0),  # long clips: not cut into pieces
    "llm, one prompt": dict(ctc_decode_weight=0.0, chunk_seconds=0),
    "joint 0.5, one prompt": dict(ctc_decode_weight=0.5, chunk_seconds=0),
}
ECHOES = ("helpful ai assistant", "smollm", "transcribe the speech", "hugging face")


def looping(text: str, max_repeats: int = 3, max_ngram: int = 8) -> bool:
    """More than max_repeats copies in a row of any word n-gram: what the guard exists to stop."""
    words = re.findall(r"[\w']+", text.lower())
    for n in range(1, max_ngram + 1):
        for start in range(len(words) - n * (max_repeats + 1) + 1):
            chunk = words[start:start + n]
            if all(words[start + k * n:start + (k + 1) * n] == chunk for k in range(1, max_repeats + 1)):
                return True
    return False


def make_long_clips(dev_path: str, out: Path, min_seconds: float = 45.0, max_seconds: float = 60.0) -> Path:
    """Consecutive clips (key order) of one scene joined into 45-60 s clips -> their jsonl."""
    entries, _ = check_entries(read_jsonl(dev_path), None, for_training=False)  # durations (of segments too)
    (out / "long").mkdir(parents=True, exist_ok=True)
    groups, current, seconds, scene = [], [], 0.0, None
    for e in sorted(entries, key=lambda e: e["key"]):
        d = e["duration"]
        if current and (e.get("scene") != scene or seconds + d > max_seconds):
            if seconds >= min_seconds:
                groups.append(current)
            current, seconds = [], 0.0
        current.append(e)
        seconds, scene = seconds + d + 0.3, e.get("scene")
    if seconds >= min_seconds:
        groups.append(current)
    lines, pause = [], np.zeros(int(0.3 * 16000), np.float32)
    for i, group in enumerate(groups):
        audio = np.concatenate([np.concatenate([load_entry_audio(e), pause]) for e in group])
        soundfile.write(out / "long" / f"long{i:02d}.wav", audio, 16000, subtype="PCM_16")
        lines.append(dict(key=f"long{i:02d}", wav=f"long/long{i:02d}.wav", txt=" ".join(e["txt"] for e in group)))
    path = out / "long.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def run_setting(model, entries, flags: dict, result_path: Path, batch_size: int, device: str):
    """recognize.py's decode + write_results for one setting -> (hyps, decoding seconds)."""
    argv = ["--model_dir", "-", "--data_path", "-", "--result_path", str(result_path), "--batch_size", str(batch_size)]
    for name, value in flags.items():
        argv += [f"--{name}", str(value)]
    args = recognize.parse_args(argv)
    usable, problems = check_entries(entries, None, for_training=False)
    start = time.perf_counter()
    recognize.decode(model, usable, args, device, 0, 1, Path(f"{result_path}.partial0"))
    elapsed = time.perf_counter() - start
    hyps, _ = recognize.write_results(result_path, entries, problems)
    return hyps, elapsed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data_paths", nargs="+", default=[])
    p.add_argument("--long_from", default=None, help="a dev jsonl whose clips are joined into 45-60 s clips")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--sample", type=int, default=None, help="N: decode N random clips of each set (seed 0)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_paths = list(args.data_paths) + ([str(make_long_clips(args.long_from, out))] if args.long_from else [])
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = SpeechLLM.from_pretrained(args.model_dir, dtype).to(args.device)
    rows = []
    print("| setting | dev set | WER [ins] | looping | prompt echoes | RTF |\n|---|---|---|---|---|---|", flush=True)
    for data_path in data_paths:
        entries = read_jsonl(data_path)
        name = f"{Path(data_path).parent.name}_{Path(data_path).stem}"
        if args.sample and args.sample < len(entries):
            entries = random.Random(0).sample(entries, args.sample)
            name += f"_sample{args.sample}"
        audio_seconds = sum(e["duration"] for e in entries if "duration" in e) or None
        for setting in args.settings:
            result_path = out / f"{name}.{setting.replace(' ', '_').replace(',', '')}.txt"
            timing = Path(f"{result_path}.seconds")
            if result_path.is_file() and timing.is_file():  # finished earlier
                hyps = dict(line.rstrip("\n").split("\t", 1) for line in result_path.open(encoding="utf-8"))
                elapsed = float(timing.read_text())
            else:
                hyps, elapsed = run_setting(model, entries, SETTINGS[setting], result_path, args.batch_size, args.device)
                timing.write_text(f"{elapsed:.2f}\n")
            audio_seconds = audio_seconds or sum(e["duration"] for e in check_entries(entries, None, for_training=False)[0])
            result = score({e["key"]: e["txt"] for e in entries}, hyps)
            row = dict(setting=setting, dev=name, wer=round(result.error_rate, 2), ins=result.ins,
                       looping=sum(map(looping, hyps.values())),
                       echoes=sum(any(x in h.lower() for x in ECHOES) for h in hyps.values()),
                       rtf=round(elapsed / audio_seconds, 4))
            rows.append(row)
            print(f"| {setting} | {name} ({len(entries)}) | {row['wer']:.2f} [{row['ins']}] | {row['looping']} | "
                  f"{row['echoes']} | {row['rtf']:.3f} |", flush=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
