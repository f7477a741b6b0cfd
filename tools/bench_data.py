"""The data pipeline alone (docs/shards.md): jsonl + wav files against shards, local and over a
real HTTP server on 127.0.0.1, with 1 and 2 DataLoader workers, on synthetic clips; and the memory an
index of 10^6 utterances costs against a jsonl of 10^6 lines.

    python tools/bench_data.py                     # 3000 clips of 1-6 s, --batch_seconds 60
    python tools/bench_data.py --smoke             # a few clips (tests/test_bench_data.py)

A pass is what a training run's DataLoader does for one epoch: for jsonl, read_jsonl + the header
check pass + DurationBatchSampler, then SpeechDataset (read the wav, log-mel) in the workers; for
shards, the index + ShardDataset (stream the tar, decode FLAC, log-mel). Batches end as lists of
log-mels (the Collator's tokenizing is the same for both and left out). Time to first batch counts
from the start of the setup (index or check pass included) to the first batch out of the loader.
"""
import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402

from data import DurationBatchSampler, SpeechDataset, check_entries, read_jsonl  # noqa: E402
from helpers.range_server import serve  # noqa: E402
from shards import ShardDataset, expand_shards, index_summary, write_shards  # noqa: E402


def synth_clip(seed: int, seconds: float) -> np.ndarray:
    """A few tones and a little noise (tests/conftest.py's synth_audio)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    audio = sum(rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) for _ in range(3))
    return (audio + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def make_corpus(folder: Path, num_clips: int, seed: int = 0) -> Path:
    """num_clips wav files of 1-6 s (16 kHz, 16-bit) and their jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    durations = np.random.default_rng(seed).uniform(1.0, 6.0, num_clips).round(2)
    with open(folder / "data.jsonl", "w") as f:
        for i, seconds in enumerate(durations):
            soundfile.write(folder / f"c{i}.wav", synth_clip(i, seconds), 16000, subtype="PCM_16")
            f.write(json.dumps({"key": f"c{i}", "wav": f"c{i}.wav", "txt": f"clip {i}"}) + "\n")
    return folder / "data.jsonl"


def mels_only(batch):
    return batch


def jsonl_loader(jsonl: Path, workers: int, batch_seconds: float):
    """train.py's pipeline for a jsonl: the check pass, duration batches, SpeechDataset in the workers."""
    entries, _ = check_entries(read_jsonl(jsonl), None, for_training=False)
    sampler = DurationBatchSampler([e["duration"] for e in entries], [0] * len(entries), batch_seconds,
                                   max_tokens=10**9)
    dataset = SpeechDataset(entries, 80, "Transcribe.")
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=mels_only, num_workers=workers)


def shard_loader(pattern: str, workers: int, batch_seconds: float):
    """train.py's pipeline for shards: the index (durations, steps), ShardDataset in the workers, one epoch."""
    shards = expand_shards(pattern)
    index_summary(shards)
    dataset = ShardDataset(shards, 80, "Transcribe.", batch_seconds=batch_seconds, epochs=1)
    return torch.utils.data.DataLoader(dataset, batch_size=None, collate_fn=mels_only, num_workers=workers)


def one_pass(make_loader) -> dict:
    """-> utterances, audio seconds, wall seconds and the seconds to the first batch of one pass."""
    start = time.perf_counter()
    first, utterances, audio_seconds = None, 0, 0.0
    for batch in make_loader():
        items = batch[0] if isinstance(batch, tuple) else batch  # a ShardDataset's batches carry their position
        first = first or time.perf_counter() - start
        utterances += len(items)
        audio_seconds += sum(item["mel"].shape[-1] for item in items) / 100  # 100 log-mel frames per second
    return dict(utterances=utterances, audio_seconds=audio_seconds, wall=time.perf_counter() - start, first=first)


def index_memory(folder: Path, num_entries: int, per_shard: int = 1000) -> list[tuple[str, float, float, float]]:
    """(what, MB held after, peak MB while building, seconds to build) for num_entries utterances: a jsonl's entries
    (what SpeechDataset holds) against what train.py keeps of the shards' index (the durations, for
    the step count) and the ShardDataset; the peak includes reading every index file. The index files
    are simulated (no tar is read)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(folder / "big.jsonl", "w") as f:
        for i in range(num_entries):
            f.write(json.dumps({"key": f"utt{i:08d}", "wav": f"/data/corpus/wav/utt{i:08d}.wav",
                                "txt": "a transcript of some eight words here"}) + "\n")
    shards = []
    for s in range(0, num_entries, per_shard):
        n = min(per_shard, num_entries - s)
        shards.append(str(folder / f"shard-{s // per_shard:06d}.tar"))
        Path(shards[-1][:-4] + ".index.json").write_text(json.dumps(dict(
            keys=[f"utt{i:08d}" for i in range(s, s + n)], durations=rng.uniform(1, 20, n).round(2).tolist(),
            txts=["a transcript of some eight words here"] * n, offsets=list(range(0, n * 100_000, 100_000)))))
    rows = []
    for what, build in [(f"jsonl: read_jsonl, {num_entries} entries", lambda: read_jsonl(folder / "big.jsonl")),
                        (f"shards: {num_entries} durations + ShardDataset (index read as train.py does)",
                         lambda: (index_summary(shards)[0], ShardDataset(shards, 80, "T")))]:
        start = time.perf_counter()
        build()  # timed alone: tracemalloc slows allocation down
        seconds = time.perf_counter() - start
        tracemalloc.start()
        kept = build()
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del kept
        rows.append((what, held / 2**20, peak / 2**20, seconds))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_clips", type=int, default=3000)
    p.add_argument("--batch_seconds", type=float, default=60.0)
    p.add_argument("--index_entries", type=int, default=10**6)
    p.add_argument("--work_dir", default=None, help="default: a temporary folder, removed at the end")
    p.add_argument("--smoke", action="store_true", help="40 clips, an index of 10^4: checks the table, not speed")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_clips, args.index_entries = 40, 10**4
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        start = time.perf_counter()
        jsonl = make_corpus(work / "clips", args.num_clips)
        entries = read_jsonl(jsonl)
        shards, _ = write_shards(entries, work / "shards", max_count=500, max_mb=256, audio_format="flac")
        write_shards(entries, work / "wav_shards", max_count=500, max_mb=256, audio_format="wav")
        braces = f"shard-{{000000..{len(shards) - 1:06d}}}.tar"
        pattern, wav_pattern = f"{work}/shards/{braces}", f"{work}/wav_shards/{braces}"
        print(f"{args.num_clips} clips, {len(shards)} FLAC and {len(shards)} WAV shards written in "
              f"{time.perf_counter() - start:.1f} s; torch threads {torch.get_num_threads()}, os.cpu_count() {os.cpu_count()}")
        server, url = serve(work / "shards")
        http_pattern = f"{url}/{braces}"
        print("\n| pipeline (one pass, --batch_seconds %g) | workers | utterances/s | audio s/s | first batch s |"
              % args.batch_seconds)
        print("|---|---|---|---|---|")
        for name, make in [("jsonl + wav files, local", lambda w: jsonl_loader(jsonl, w, args.batch_seconds)),
                           ("shards (FLAC), local", lambda w: shard_loader(pattern, w, args.batch_seconds)),
                           ("shards (WAV), local", lambda w: shard_loader(wav_pattern, w, args.batch_seconds)),
                           ("shards (FLAC), HTTP 127.0.0.1", lambda w: shard_loader(http_pattern, w, args.batch_seconds))]:
            for workers in [1, 2]:
                r = one_pass(lambda: make(workers))
                assert r["utterances"] == args.num_clips, r
                print(f"| {name} | {workers} | {r['utterances'] / r['wall']:.1f} | {r['audio_seconds'] / r['wall']:.1f} "
                      f"| {r['first']:.2f} |", flush=True)
        server.shutdown()
        print("\n| data set object | MB held | peak MB while building | s to build |")
        print("|---|---|---|---|")
        for what, held, peak, seconds in index_memory(work / "index", args.index_entries):
            print(f"| {what} | {held:.1f} | {peak:.1f} | {seconds:.2f} |", flush=True)
        print(f"\nload average at the end {os.getloadavg()[0]:.1f}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
