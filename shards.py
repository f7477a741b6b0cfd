"""Sharded data (docs/shards.md): WebDataset tar shards written from jsonl entries, the index
beside each shard, reading them locally or over HTTP(S) / S3 with retries, and the iterable dataset
that train.py and recognize.py stream them with.

A shard NAME.tar holds, per utterance, `NNNNNNNNN.json` ({"key", "txt", "instruction", "duration", ...})
and its audio `NNNNNNNNN.flac` (or .wav, or the original file's extension); NAME.index.json holds the
shard's keys, durations, transcripts and byte offsets, so that step counts, input order and the
token rate need no audio read.
"""
import functools
import glob
import http.client
import io
import json
import math
import os
import random
import re
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import braceexpand
import numpy as np
import soundfile
import torch
import webdataset

from audio import SAMPLE_RATE, BadAudio, audio_problem, load_audio, load_entry_audio
from data import InputError, default_batch_tokens, load_item, pack_batches, split_long

AUDIO_FORMATS = ("flac", "wav", "original")
RETRIES = 5  # tries in a row after a failed read, waiting 0.5, 1, 2, 4, 8 s
TIMEOUT = 60  # seconds without a byte before a network read counts as failed
# WebDataset's rule: a member's sample key is its path up to the first dot of its file name
MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


# ----------------------------------------------------------------------------------------
# Naming shards


def is_shard_spec(spec: str) -> bool:
    """--data_path names shards, not a jsonl, when each of its comma-separated parts ends in .tar."""
    return all(part.strip().endswith(".tar") for part in spec.split(","))


def expand_shards(spec: str) -> list[str]:
    """"a.tar,b-{000..009}.tar,dir/*.tar,https://host/c-{0..3}.tar" -> the shard paths and URLs, in
    that order (a local glob's matches sorted). URLs cannot be listed: name them or use braces."""
    shards = []
    for part in spec.split(","):
        for name in braceexpand.braceexpand(part.strip()):
            if "://" in name or not glob.has_magic(name):
                shards.append(name)
            elif matches := sorted(glob.glob(name)):
                shards += matches
            else:
                raise InputError(f"{name}: no shard matches")
    return shards


def index_name(shard: str) -> str:
    return shard[: -len(".tar")] + ".index.json"


# ----------------------------------------------------------------------------------------
# Writing shards


def encode_audio(entry: dict, audio_format: str) -> tuple[bytes, str]:
    """An entry's audio -> (the bytes a shard stores, their extension): the file's own bytes
    ("original"; a segment is cut and stored as FLAC), or 16 kHz mono 16-bit FLAC or WAV."""
    if audio_format == "original" and entry.get("start") is None and entry.get("end") is None:
        extension = Path(entry["wav"]).suffix.lstrip(".").lower()
        return Path(entry["wav"]).read_bytes(), extension if extension not in ("", "json", "txt") else "audio"
    container = "WAV" if audio_format == "wav" else "FLAC"
    out = io.BytesIO()
    soundfile.write(out, load_entry_audio(entry), SAMPLE_RATE, format=container, subtype="PCM_16")
    return out.getvalue(), container.lower()


def write_shards(entries: list[dict], out_dir: Path, max_count: int, max_mb: float,
                 audio_format: str = "flac") -> tuple[list[Path], Counter]:
    """Entries (read_jsonl's) -> out_dir/shard-000000.tar, ... of at most max_count utterances and about
    max_mb MB each (a shard closes once it reaches either), each with its index. Unusable audio
    (audio_problem) is skipped and counted, so the index's durations are the loader's. Written with a
    fixed mtime: the same input makes the same bytes. -> (the shards, skipped reasons)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, skipped, writer, index, written = [], Counter(), None, None, 0

    def close():
        writer.close()
        os.replace(tmp, shards[-1])  # a crash never leaves a shard that looks complete
        write_json(Path(index_name(str(shards[-1]))), index)

    for entry in entries:
        try:
            if problem := audio_problem(entry):  # also sets entry["duration"]
                raise BadAudio(problem)
            audio, extension = encode_audio(entry, audio_format)
        except BadAudio as e:
            skipped[str(e)] += 1
            continue
        if writer is None or len(index["keys"]) >= max_count or writer.tarstream.offset >= max_mb * 2**20:
            if writer is not None:
                close()
            shards.append(out_dir / f"shard-{len(shards):06d}.tar")
            tmp = shards[-1].with_name(shards[-1].name + ".tmp")
            writer = webdataset.TarWriter(str(tmp), encoder=False, mtime=0)
            index = dict(keys=[], durations=[], txts=[], offsets=[])
        meta = {k: entry[k] for k in ("key", "txt", "instruction", "speaker") if k in entry}
        meta["duration"] = round(entry["duration"], 4)
        for field, value in [("keys", entry["key"]), ("durations", meta["duration"]), ("txts", entry.get("txt")),
                             ("offsets", writer.tarstream.offset)]:
            index[field].append(value)
        # numbered names: WebDataset cuts a member's key at its first dot, and user keys may hold dots
        writer.write({"__key__": f"{written:09d}", extension: audio, "json": json.dumps(meta, ensure_ascii=False).encode()})
        written += 1
    if writer is not None:
        close()
    return shards, skipped


def index_shard(shard: str) -> dict:
    """The index of a shard another tool wrote (WeNet's wav + txt members, any WebDataset shard):
    every sample read once. A sample that cannot be used is listed too (duration 0): recognition
    then reports its error in its line."""
    index = dict(keys=[], durations=[], txts=[], offsets=[])
    for offset, sample in read_samples(shard):
        entry = sample_entry(sample, shard)
        for field, value in [("keys", entry["key"]), ("durations", round(entry.get("duration", 0.0), 4)),
                             ("txts", entry.get("txt")), ("offsets", offset)]:
            index[field].append(value)
    return index


def write_json(path: Path, value):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# Reading bytes: local files, HTTP(S), S3, or any fsspec URL


@functools.cache
def s3_client(pid: int):
    """One client per process (a forked worker must not share its parent's connections). boto3 reads
    credentials and AWS_ENDPOINT_URL (a MinIO, Ceph or moto server) from the environment as usual."""
    import boto3
    return boto3.client("s3")


def open_at(url: str, offset: int):
    """`url` opened at byte `offset` -> (a stream with .read(n), the byte its data ends at, or None when
    the stream's own end is to be trusted)."""
    scheme = url.split("://")[0] if "://" in url else "file"
    if scheme in ("http", "https"):
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
        if offset and response.status != 206:
            raise InputError(f"{url}: the server ignores HTTP Range requests (needed to resume reading)")
        length = response.headers.get("Content-Length")
        return response, offset + int(length) if length is not None else None
    if scheme == "s3":
        bucket, key = url[len("s3://"):].split("/", 1)
        response = s3_client(os.getpid()).get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-")
        return response["Body"], offset + response["ContentLength"]
    if scheme == "file":
        stream = open(url[len("file://"):] if url.startswith("file://") else url, "rb")
    else:
        import fsspec  # gs://, az://, hf://, ...: whatever fsspec backend is installed
        stream = fsspec.open(url, "rb").open()
    stream.seek(offset)
    return stream, None


def retryable(error: Exception) -> bool:
    """A dropped connection, a timeout, a server error: worth another try. A missing file or a refusal is not."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code == 429
    if type(error).__module__.startswith("botocore"):
        from botocore.exceptions import ClientError  # NoSuchKey, AccessDenied (boto3 retries 5xx itself)
        return not isinstance(error, ClientError)
    return (isinstance(error, (OSError, http.client.HTTPException))
            and not isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)))


class RetryingReader(io.RawIOBase):
    """A read-only stream of `url` from byte `offset` that outlives dropped connections: after a failed
    or short read it opens the URL again at the byte it had reached (an HTTP / S3 Range request) and
    carries on, up to `retries` times in a row."""

    def __init__(self, url: str, offset: int = 0, retries: int = RETRIES):
        self.url, self.position, self.retries = url, offset, retries
        self.stream, self.end = None, None

    def readable(self):
        return True

    def readinto(self, buffer) -> int:
        for attempt in range(self.retries + 1):
            try:
                if self.stream is None:
                    self.stream, self.end = open_at(self.url, self.position)
                data = self.stream.read(len(buffer))
                # http.client returns b"" when the connection drops early: only the length tells
                if not data and self.end is not None and self.position < self.end:
                    raise ConnectionError(f"connection closed at byte {self.position} of {self.end}")
                buffer[: len(data)] = data
                self.position += len(data)
                return len(data)
            except Exception as e:
                self.close_stream()
                if not retryable(e) or attempt == self.retries:
                    raise
                print(f"warning: {self.url}: {e}; reading again from byte {self.position}", file=sys.stderr, flush=True)
                time.sleep(0.5 * 2**attempt)

    def close_stream(self):
        if self.stream is not None:
            try:
                self.stream.close()
            except Exception:  # closing a broken connection may fail as well: it is dropped anyway
                pass
            self.stream = None

    def close(self):
        self.close_stream()
        super().close()


def read_url(url: str) -> bytes:
    with RetryingReader(url) as f:
        return f.read()


def read_samples(shard: str, offset: int = 0):
    """A shard's samples from byte `offset` (where a sample's first member starts; 0: the first) ->
    (offset of the sample, {"__key__", extension: bytes, ...}), read as a stream: a sample's members
    are consecutive in the tar (WebDataset's rule)."""
    with RetryingReader(shard, offset) as raw, tarfile.open(fileobj=io.BufferedReader(raw, 2**20), mode="r|") as tar:
        sample = None
        for member in tar:
            name = MEMBER_NAME.match(member.name)
            if not member.isfile() or not name:
                continue
            if sample is None or name[1] != sample["__key__"]:
                if sample is not None:
                    yield sample_offset, sample
                sample, sample_offset = {"__key__": name[1]}, offset + member.offset
            sample[name[2].lower()] = tar.extractfile(member).read()
        if sample is not None:
            yield sample_offset, sample


def read_indexes(shards: list[str], keep=lambda index: index) -> list:
    """keep(index) of every shard's index, read in threads (over a network each is a round trip); keep
    runs as each arrives, so only what it keeps stays in memory. A shard without an index is an
    InputError: `tools/prepare_data.py shard` writes them."""
    def read(shard):
        try:
            index = json.loads(read_url(index_name(shard)))
        except (OSError, ValueError) as e:
            raise InputError(f"{index_name(shard)}: cannot read the shard's index ({e}); "
                             "tools/prepare_data.py shard writes one beside each shard") from None
        return keep(index)
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(read, shards))


def index_summary(shards: list[str], max_sample: int = 20000) -> tuple[np.ndarray, list[dict]]:
    """What training needs of the index: every duration (a float32 each: 4 MB for 10^6 utterances),
    and {"duration", "txt"} of about max_sample utterances spread over the shards (the token rate)."""
    per_shard = max(1, max_sample // max(1, len(shards)))

    def keep(index):
        step = max(1, len(index["durations"]) // per_shard)
        sample = [dict(duration=d, txt=t) for d, t in zip(index["durations"][::step], index["txts"][::step])
                  if isinstance(t, str)]
        return np.asarray(index["durations"], dtype=np.float32), sample
    kept = read_indexes(shards, keep)
    return np.concatenate([d for d, _ in kept] or [np.zeros(0, np.float32)]), [e for _, sample in kept for e in sample]


def index_entries(shards: list[str], indexes: list[dict]) -> list[dict]:
    """The utterances of the shards in input order: {"key", "duration", "txt", "where"}. A key twice
    is an InputError (the results are one line per key)."""
    entries, seen = [], {}
    for shard, index in zip(shards, indexes):
        for i, (key, duration, txt) in enumerate(zip(index["keys"], index["durations"], index["txts"])):
            if key in seen:
                raise InputError(f"{shard}: duplicate key {key!r} (first in {seen[key]})")
            if key.split() != [key]:
                raise InputError(f"{shard}: key {key!r} is not one word (results are key<TAB>text lines)")
            seen[key] = shard
            entries.append(dict(key=key, duration=duration, txt=txt, where=f"{shard}:{i}"))
    return entries


# ----------------------------------------------------------------------------------------
# Samples -> entries -> batches


def sample_entry(sample: dict, shard: str) -> dict:
    """A shard's sample -> an entry {"key", "audio" (bytes), "duration", "txt", "instruction", "wav",
    "where"}, with a "reason" when it is unusable. Shards from other tools work too: a `.txt` member
    is the transcript, and without a duration in `.json` the audio header gives it."""
    where = f"{shard}:{sample['__key__']}"
    entry = dict(key=sample["__key__"], wav=shard, where=where)
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
        if "txt" in sample and isinstance(meta, dict):
            meta.setdefault("txt", sample["txt"].decode("utf-8").strip())
    except ValueError:  # also UnicodeDecodeError
        meta = None
    if not isinstance(meta, dict):
        return dict(entry, reason="malformed json")
    entry |= {k: v for k, v in meta.items() if k in ("key", "txt", "instruction", "duration")}
    entry["key"] = str(entry["key"])
    if not isinstance(entry.get("instruction"), (str, type(None))):
        return dict(entry, reason="instruction not a string")
    audio = [value for extension, value in sample.items() if extension not in ("__key__", "json", "txt")]
    if len(audio) != 1:
        return dict(entry, reason="no audio" if not audio else "more than one audio member")
    entry["audio"] = audio[0]
    if not isinstance(entry.get("duration"), (int, float)):
        try:
            info = soundfile.info(io.BytesIO(entry["audio"]))
            entry["duration"] = info.frames / info.samplerate
        except (soundfile.SoundFileError, OSError, ZeroDivisionError):
            return dict(entry, reason="unreadable")
    return entry


def shard_audio(entry: dict) -> np.ndarray:
    """A shard entry's audio: its samples once split_long has cut it into pieces, else its audio bytes."""
    return entry["samples"] if "samples" in entry else load_audio(io.BytesIO(entry["audio"]))


def make_batches(entries: list[dict], rng: random.Random | None, batch_size: int, batch_seconds: float | None,
                 batch_tokens: int | None, length_grouped: bool = True) -> list[list[dict]]:
    """One buffer's entries -> batches: shuffled (rng; None keeps their order), grouped by duration
    (longest first), then --batch_size at a time or as many as fit --batch_seconds and --batch_tokens
    (pack_batches, on each entry's "num_tokens"; the default token cap is the buffer's own)."""
    order = list(range(len(entries)))
    if rng is not None:
        rng.shuffle(order)
    seconds = [e["duration"] for e in entries]
    if length_grouped or batch_seconds:
        order.sort(key=lambda i: -seconds[i])  # stable: equal durations stay in shuffled order
    if batch_seconds:
        tokens = [e.get("num_tokens", 0) for e in entries]
        cap = batch_tokens or (default_batch_tokens(seconds, tokens, batch_seconds) if max(tokens) else math.inf)
        groups = pack_batches(order, seconds, tokens, batch_seconds, cap)
    else:
        groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [[entries[i] for i in group] for group in groups]


# ----------------------------------------------------------------------------------------
# The iterable dataset


class ShardDataset(torch.utils.data.IterableDataset):
    """Batches of items (data.load_item's {key, mel, txt, instruction}; {key, error} too when on_error is
    None) streamed from shards, each with the position to resume after it (a dict, see below).

    Every (rank, DataLoader worker) pair is a slot; each epoch the shards are shuffled (from seed and
    epoch) and slot s reads shards s, s + slots, ... in turn, `buffer_size` samples at a time. A buffer
    is shuffled, cut into batches of similar duration (make_batches), and its batches go out in shuffled
    order. epochs=None: one epoch after another, forever (the Trainer counts steps).

    Unusable samples (no audio, unreadable, `check(entry)` says why) follow data.py's rule for audio
    that fails to load, as SpeechDataset's do: they go to on_error(entry with "reason") and are left out
    (a batch left empty is not sent), or with on_error=None go out as {key, error} items.

    Resume is exact: a batch's position is (epoch, shard, byte where its buffer starts, buffer number,
    batches of that buffer sent); each buffer's randomness comes from (seed, epoch, slot, buffer number).
    Started from the positions of the last batches trained (`resume`), a slot reads that buffer again
    and goes on with the next batch: the same batches in the same order as without the interruption.
    What it costs: reading one buffer of samples again per slot."""

    def __init__(self, shards: list[str], n_mels: int, default_instruction: str, pad_to_30s: bool = False, *,
                 batch_size: int = 8, batch_seconds: float | None = None, batch_tokens: int | None = None,
                 length_grouped: bool = True, buffer_size: int = 1000, shuffle: bool = True, seed: int = 0,
                 epochs: int | None = None, rank: int = 0, world_size: int = 1, check=None, on_error=None,
                 keys: set | None = None, chunk_seconds: float = 0.0, resume: dict | None = None):
        self.shards, self.n_mels, self.default_instruction, self.pad_to_30s = shards, n_mels, default_instruction, pad_to_30s
        self.batching = dict(batch_size=batch_size, batch_seconds=batch_seconds, batch_tokens=batch_tokens,
                             length_grouped=length_grouped)
        self.buffer_size, self.shuffle, self.seed, self.epochs = buffer_size, shuffle, seed, epochs
        self.rank, self.world_size = rank, world_size
        self.check, self.on_error, self.keys, self.chunk_seconds = check, on_error, keys, chunk_seconds
        self.resume = resume or {}

    def slot_shards(self, epoch: int, slot: int, num_slots: int) -> list[str]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}").shuffle(order)  # a string seed is hashed: epochs decorrelate
        return [self.shards[i] for i in order[slot::num_slots]]

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        num_slots = self.world_size * workers
        if self.epochs is None and len(self.shards) < num_slots:
            raise InputError(f"{len(self.shards)} shards for {num_slots} readers (ranks x dataloader workers): "
                             "write smaller shards (tools/prepare_data.py shard --max_count) or use fewer workers")
        # The DataLoader takes batches from its workers in turn; a resumed loader starts again at worker
        # 0, so worker 0 plays the slot that was due next.
        rotation = self.resume.get("batches", 0) % workers if self.resume.get("num_slots") == num_slots else 0
        slot = self.rank * workers + (worker_id + rotation) % workers
        position = self.resume.get("positions", {}).get(str(slot)) if self.resume.get("num_slots") == num_slots else None
        return self.slot_batches(slot, num_slots, position)

    def slot_batches(self, slot: int, num_slots: int, position: dict | None):
        """-> (items, position) for one slot, from `position` (None: the start)."""
        at = position or dict(epoch=0, shard=0, offset=0, buffer=0, batches=0)
        epoch = at["epoch"]
        while self.epochs is None or epoch < self.epochs:
            shards, sent = self.slot_shards(epoch, slot, num_slots), False
            whole_epoch = (at["shard"], at["offset"], at["buffer"]) == (0, 0, 0)
            buffer_no, buffer, start = at["buffer"], [], None
            for shard_no in range(at["shard"], len(shards)):
                for offset, sample in read_samples(shards[shard_no], at["offset"] if shard_no == at["shard"] else 0):
                    if not buffer:
                        start = dict(epoch=epoch, shard=shard_no, offset=offset, buffer=buffer_no)
                    buffer.append(sample_entry(sample, shards[shard_no]))
                    if len(buffer) == self.buffer_size:
                        for batch in self.buffer_batches(buffer, start, slot, at["batches"]):
                            sent = True
                            yield batch
                        buffer, buffer_no, at = [], buffer_no + 1, dict(at, batches=0)
            if buffer:
                for batch in self.buffer_batches(buffer, start, slot, at["batches"]):
                    sent = True
                    yield batch
            if not sent and whole_epoch and self.epochs is None:  # else the loop would spin without end
                raise InputError(f"no usable utterance in the shards of reader {slot} (epoch {epoch})")
            epoch, at = epoch + 1, dict(epoch=epoch + 1, shard=0, offset=0, buffer=0, batches=0)

    def buffer_batches(self, buffer: list[dict], start: dict, slot: int, skip: int):
        """A full buffer -> (items, position) per batch, leaving out the first `skip` batches (sent
        before a resume)."""
        rng = random.Random(f"{self.seed}/{start['epoch']}/{slot}/{start['buffer']}") if self.shuffle else None
        good, errors = [], []
        for entry in buffer:
            if self.keys is not None and entry["key"] not in self.keys:  # e.g. decoded by an earlier run
                continue
            pieces = [entry] if "reason" in entry else split_long(entry, self.chunk_seconds, shard_audio, keep_samples=True)
            for piece in pieces:
                if "reason" not in piece and self.check is not None and (reason := self.check(piece)):
                    piece["reason"] = reason
                (errors if "reason" in piece else good).append(piece)
        batches = make_batches(good, rng, **self.batching) if good else []
        if rng is not None:
            rng.shuffle(batches)  # else every buffer would start with its longest clips
        if errors and self.on_error is None:  # recognition: every utterance gets its line
            batches.insert(0, errors)
        elif errors and skip == 0:  # logged once, not again after a resume
            for entry in errors:
                self.on_error(entry)
        for n, batch in enumerate(batches[skip:], skip + 1):
            items = [dict(key=e["key"], error=e["reason"]) if "reason" in e
                     else load_item(e, self.n_mels, self.default_instruction, self.pad_to_30s, shard_audio) for e in batch]
            if self.on_error is not None:
                for entry, item in zip(batch, items):
                    if "error" in item:
                        self.on_error(dict(entry, reason=item["error"]))
                items = [item for item in items if "error" not in item]
            if items:
                yield items, dict(start, slot=slot, batches=n)


class TrackedLoader:
    """A DataLoader over a ShardDataset as the Trainer sees it: its batches without their positions.
    It keeps, per slot, the position after the last batch handed out: what a checkpoint saves."""

    def __init__(self, loader: torch.utils.data.DataLoader, num_slots: int, resume: dict | None = None):
        self.loader, self.num_slots = loader, num_slots
        same = bool(resume) and resume.get("num_slots") == num_slots
        self.positions = dict(resume["positions"]) if same else {}
        self.batches = resume["batches"] if same else 0

    def __iter__(self):
        for batch, position in self.loader:
            self.positions[str(position["slot"])] = position
            self.batches += 1
            yield batch

    def state(self) -> dict:
        return dict(num_slots=self.num_slots, batches=self.batches, positions=self.positions)


def estimate_batches(durations: np.ndarray, buffer_size: int, batch_size: int, batch_seconds: float | None) -> int:
    """About how many batches an epoch of these utterances makes (make_batches per buffer, no token cap)."""
    total = 0
    for start in range(0, len(durations), buffer_size):
        buffer = np.sort(durations[start:start + buffer_size])[::-1]
        if not batch_seconds:
            total += math.ceil(len(buffer) / batch_size)
            continue
        total += len(pack_batches(list(range(len(buffer))), buffer.tolist(), [0] * len(buffer), batch_seconds, math.inf))
    return total


def collate_with_position(collate, batch: tuple[list[dict], dict]) -> tuple[dict, dict]:
    """The DataLoader's collate_fn over a ShardDataset: (items, position) -> (collate(items), position)."""
    items, position = batch
    return collate(items), position
