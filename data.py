"""Data: jsonl manifests, the check pass over a data set, long entries cut into pieces, the dataset
(and what it does with audio that fails to load) and collator, batching and length-grouped sampling (a
fixed number of utterances per batch, or as many as fit a budget of seconds). Audio itself (loading,
log-mel, where to cut long recordings) is audio.py's. What this needs of a model comes as values
(DataSpec, made by SpeechLLM.data_spec()): nothing here touches the model.
"""
import json
import math
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import whisper

from audio import (N_SAMPLES_30S, SAMPLE_RATE, BadAudio, audio_problem, load_entry_audio, log_mel, long_audio_pieces,
                   segment_problem)
from prompt import ChatPrompt

class InputError(ValueError):
    """Bad input the user has to fix: the CLIs print the message (it names file:line) and exit 1."""


def read_jsonl(path) -> list[dict]:
    """Lines {"key", "wav", "txt"} (+ optional "instruction", "start", "end"). `key` defaults to the wav
    file's stem; a relative `wav` is relative to the jsonl file; "start" / "end" (seconds) make the line
    that stretch of the file (a Kaldi segment). A bad line is an InputError naming file:line: a key must
    be one word (the results are `key<TAB>text` lines), an instruction a string."""
    path = Path(path)
    entries, seen = [], {}
    for where, entry in json_lines(path):
        if not isinstance(entry, dict) or not isinstance(entry.get("wav"), str) or not entry["wav"]:
            raise InputError(f'{where}: needs a "wav" path')
        key, instruction = entry.get("key"), entry.get("instruction")
        if isinstance(key, bool) or not isinstance(key, (str, int, type(None))):
            raise InputError(f'{where}: "key" must be a string')
        # NUL would collide with the markers the chat prompt is split at
        if not isinstance(instruction, (str, type(None))) or "\0" in (instruction or ""):
            raise InputError(f'{where}: "instruction" must be a string (without NUL)')
        if problem := segment_problem(entry.get("start"), entry.get("end")):
            raise InputError(f"{where}: {problem}")
        wav = Path(entry["wav"]).expanduser()
        entry["wav"] = str(wav if wav.is_absolute() else path.parent / wav)
        entry["key"] = str(wav.stem if key is None or key == "" else key)
        if entry["key"].split() != [entry["key"]]:
            raise InputError(f"{where}: key {entry['key']!r} is not one word (results are key<TAB>text lines; "
                             "without a \"key\" it is the wav file's name)")
        if entry["key"] in seen:
            raise InputError(f"{where}: duplicate key {entry['key']!r} (first at line {seen[entry['key']]})")
        seen[entry["key"]] = where.rsplit(":", 1)[1]
        entry["where"] = where
        entries.append(entry)
    return entries


def json_lines(path: Path):
    """-> ("file:line", the line's JSON value) for each non-blank line; an InputError naming file:line
    for a line that is not UTF-8, not JSON, or holds an unpaired \\ud800 escape."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8-sig").strip()  # -sig: the BOM some editors write is not JSON
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not UTF-8 ({e})") from None
            if not line:
                continue
            try:
                value = json.loads(line)
                # an unpaired \ud800-\udfff escape is valid JSON but no text a file can hold
                json.dumps(value, ensure_ascii=False).encode("utf-8")
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: malformed JSON ({e})") from None
            except UnicodeEncodeError as e:
                raise InputError(f"{where}: not valid Unicode ({e})") from None
            yield where, value


@dataclass(frozen=True)
class DataSpec:
    """What the data pipeline needs of a model, as values: the check pass, the datasets and the
    collator take this, never the model, so they do not change when the model's insides do."""
    prompt: ChatPrompt  # an utterance's token ids: (instruction, audio token count, transcript) -> ids, masks, labels
    num_audio_tokens: Callable[[int], int]  # log-mel frames -> the audio tokens the projector makes of them
    instruction: str  # the default; an entry's own "instruction" wins
    n_mels: int  # the encoder's input
    pad_to_30s: bool  # every clip padded to a multiple of 30 s before its log-mel (Whisper's native input)
    max_positions: int  # the LLM's context: a longer training sequence cannot be trained on


def text_problem(entry: dict, spec: DataSpec, max_audio_seconds: float) -> str | None:
    """Why an entry cannot be trained on, besides its audio; None if it can."""
    if entry["duration"] > max_audio_seconds:
        return f"longer than {max_audio_seconds:g} s"
    txt = entry.get("txt")
    # "" is a transcript: silence and noise clips teach the model to say nothing. A missing or
    # non-string txt is a mistake in the manifest.
    if not isinstance(txt, str):
        return "no transcript"
    entry["num_tokens"] = sequence_length(entry, spec, txt)  # for --batch_seconds' token cap
    if entry["num_tokens"] > spec.max_positions:
        return f"longer than the LLM's context ({spec.max_positions} tokens)"
    return None


def sequence_length(entry: dict, spec: DataSpec, txt: str | None) -> int:
    """The LLM positions an entry takes: its chat prompt with its audio tokens, and txt (None: no transcript)."""
    instruction = entry.get("instruction") or spec.instruction
    num_audio_tokens = spec.num_audio_tokens(num_mel_frames(entry["duration"], spec.pad_to_30s))
    return len(spec.prompt(instruction, num_audio_tokens, txt)["input_ids"])


def num_mel_frames(seconds: float, pad_to_30s: bool) -> int:
    """The log-mel length of `seconds` of audio (within a frame of load_audio + log_mel)."""
    num_samples = round(seconds * SAMPLE_RATE)
    if pad_to_30s:
        return max(1, math.ceil(num_samples / N_SAMPLES_30S)) * whisper.audio.N_FRAMES
    return num_samples // whisper.audio.HOP_LENGTH


def check_entries(entries: list[dict], spec: DataSpec | None, for_training: bool, max_audio_seconds: float = 30.0):
    """The one check pass before any work starts (train.py and recognize.py): every audio header is
    read once (in threads: on network storage a header read is a round trip), and for training the
    length and the transcript are checked too (against spec; recognition needs none: None).
    -> (usable entries, problems: entries with a "reason"). Decoding errors a header cannot show are
    caught again where the audio is loaded (load_item)."""
    with ThreadPoolExecutor(16) as pool:
        reasons = list(pool.map(audio_problem, entries))
    if for_training:
        reasons = [reason or text_problem(e, spec, max_audio_seconds) for e, reason in zip(entries, reasons)]
    usable = [e for e, reason in zip(entries, reasons) if reason is None]
    problems = [dict(e, reason=reason) for e, reason in zip(entries, reasons) if reason is not None]
    return usable, problems


def count_reasons(reasons) -> str:
    """"2 missing, 1 empty" (most frequent first)."""
    return ", ".join(f"{n} {reason}" for reason, n in Counter(reasons).most_common())


def split_long(entry: dict, chunk_seconds: float, load: Callable[[dict], np.ndarray] = load_entry_audio,
               keep_samples: bool = False) -> list[dict]:
    """An entry longer than chunk_seconds -> an entry per piece of at most chunk_seconds, cut at a pause
    (audio.long_audio_pieces), keyed "KEY i/n": keys are one word, so no user key looks like that
    (recognize.join_pieces joins the pieces' texts). A piece is a segment of the entry's file ("start",
    "end"; read again when it is decoded), or with keep_samples its samples ("samples"): a shard's audio
    is bytes in memory, decoded once here rather than once per piece. load: the entry's audio (a
    shard's: shards.shard_audio). An entry whose audio fails to load stays whole: its error is
    reported where it is loaded."""
    if not chunk_seconds or entry["duration"] <= chunk_seconds:
        return [entry]
    try:
        samples = load(entry)
    except BadAudio:
        return [entry]
    spans = long_audio_pieces(samples, chunk_seconds)
    offset = entry.get("start") or 0.0
    pieces = []
    for i, (a, b) in enumerate(spans):
        piece = entry | dict(key=f"{entry['key']} {i}/{len(spans)}", duration=(b - a) / SAMPLE_RATE)
        if keep_samples:
            piece["samples"] = samples[a:b]
        else:
            piece |= dict(start=offset + a / SAMPLE_RATE, end=offset + b / SAMPLE_RATE)
        pieces.append(piece)
    return pieces


# ----------------------------------------------------------------------------------------
# Loading, and audio that fails to load: the check pass reads headers only, so a file can still
# fail here (corrupt data behind a good header). Both datasets (SpeechDataset; shards.ShardDataset)
# turn it into an item {key, error}, and then follow their on_error:
#   None (recognition): the item goes on to CollatorKeepingErrors, and the utterance gets its result
#     line, empty, with its reason in the errors file: nothing is dropped silently.
#   a function (training: train.report_skip logs and counts it, or stops the run with --strict): it is
#     called with the entry and its "reason", and the clip is not trained on.


def load_item(entry: dict, n_mels: int, default_instruction: str, pad_to_30s: bool = False,
              load: Callable[[dict], np.ndarray] = load_entry_audio) -> dict:
    """An entry -> {key, mel, txt, instruction}, or {key, error} when its audio (load(entry)) fails to load."""
    try:
        samples = load(entry)
    except BadAudio as e:
        return dict(key=entry["key"], error=str(e))
    return dict(key=entry["key"], mel=log_mel(samples, n_mels, pad_to_30s), txt=entry.get("txt"),
                instruction=entry.get("instruction") or default_instruction)


class SpeechDataset(torch.utils.data.Dataset):
    """Items (load_item) of a list of entries. With on_error, a clip that fails to load is reported and
    the next one takes its place, so every batch stays full (a DDP rank short of a batch would hang
    the others). Reading every file up front instead would cost a full pass over the audio before the
    first step."""

    def __init__(self, entries: list[dict], n_mels: int, default_instruction: str, pad_to_30s: bool = False,
                 on_error: Callable[[dict], None] | None = None):
        self.entries, self.n_mels, self.pad_to_30s = entries, n_mels, pad_to_30s
        self.default_instruction, self.on_error = default_instruction, on_error

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i) -> dict:
        for j in range(i, i + len(self)):
            entry = self.entries[j % len(self)]
            item = load_item(entry, self.n_mels, self.default_instruction, self.pad_to_30s)
            if "error" not in item or self.on_error is None:
                return item
            self.on_error(dict(entry, reason=item["error"]))
        raise InputError("no audio file of the data set could be read")


class Collator:
    """Pads features to the batch's longest utterance and tokens to the batch's longest prompt.
    Training: right padding, labels. Inference: left padding (generation appends on the right)."""

    def __init__(self, spec: DataSpec, inference: bool = False, pad_text_to: int | None = None):
        self.prompt, self.num_audio_tokens = spec.prompt, spec.num_audio_tokens
        self.inference = inference
        self.pad_text_to = pad_text_to  # West v0 pads every sample to 512 tokens; kept to measure what that costs

    def __call__(self, batch: list[dict]) -> dict:
        mel_lengths = torch.tensor([item["mel"].shape[-1] for item in batch])
        mel = torch.zeros(len(batch), batch[0]["mel"].shape[0], int(mel_lengths.max()))  # (B, n_mels, T)
        for i, item in enumerate(batch):
            mel[i, :, : mel_lengths[i]] = item["mel"]
        samples = [self.prompt(item["instruction"], self.num_audio_tokens(item["mel"].shape[-1]),
                               None if self.inference else item["txt"]) for item in batch]
        max_len = max([len(s["input_ids"]) for s in samples] + [self.pad_text_to or 0])
        out = dict(mel=mel, mel_lengths=mel_lengths)
        for name, pad_value in [("input_ids", self.prompt.placeholder_id), ("attention_mask", 0),
                                ("audio_mask", False), ("labels", -100)]:
            if name == "labels" and self.inference:
                continue
            rows = []
            for s in samples:
                values = [1] * len(s["input_ids"]) if name == "attention_mask" else s[name]
                padding = [pad_value] * (max_len - len(values))
                rows.append(padding + values if self.inference else values + padding)
            out[name] = torch.tensor(rows, dtype=torch.bool if name == "audio_mask" else torch.long)
        return out


class CollatorKeepingErrors:
    """Recognition's collator: -> (keys, inference batch or None, {key: reason}). An item whose audio
    failed to load ({key, error}) is left out of the batch and comes back as an error."""

    def __init__(self, spec: DataSpec):
        self.collate = Collator(spec, inference=True)

    def __call__(self, items: list[dict]):
        good = [item for item in items if "error" not in item]
        errors = {item["key"]: item["error"] for item in items if "error" in item}
        return [item["key"] for item in good], self.collate(good) if good else None, errors


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Indices in batches of similar duration (less padding), batch order shuffled. Deterministic
    given seed and epoch. Each run of `batch_size` consecutive indices is one batch. The ranks take
    the batches in turn (accelerate deals batch i to rank i % num_replicas), so runs of num_replicas
    neighbouring batches of one length group are shuffled as units: the ranks of a step get batches
    of about the same length and none waits long for another at the gradient all-reduce."""

    def __init__(self, durations: list[float], batch_size: int, seed: int = 0, group_batches: int = 64,
                 num_replicas: int = 1):
        self.durations, self.batch_size, self.seed = durations, batch_size, seed
        self.group_size = batch_size * group_batches
        self.num_replicas = num_replicas
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.durations)

    def __iter__(self):
        rng = random.Random(f"{self.seed}/{self.epoch}")  # a string seed is hashed: epochs decorrelate
        order = list(range(len(self.durations)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), self.group_size):
            group = sorted(order[start:start + self.group_size], key=lambda i: -self.durations[i])
            batches += [group[i:i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        # a round: the batches the ranks run side by side, one each
        rounds = [full[i:i + self.num_replicas] for i in range(0, len(full), self.num_replicas)]
        rng.shuffle(rounds)  # a short batch (only the last group can have one) goes last
        return iter([i for round_ in rounds for batch in round_ for i in batch] +
                    [i for batch in batches if len(batch) < self.batch_size for i in batch])


def pack_batches(order: list[int], seconds: list[float], tokens: list[int], max_seconds: float,
                 max_tokens: int) -> list[list[int]]:
    """`order` (longest first) cut into consecutive batches whose padded size fits both budgets: a
    batch's utterance count x its longest clip <= max_seconds (what the encoder's input holds), and x
    its longest LLM sequence <= max_tokens. An utterance over a budget on its own is a batch of one."""
    batches, batch, longest, most_tokens = [], [], 0.0, 0
    for i in order:
        longest_with, tokens_with = max(longest, seconds[i]), max(most_tokens, tokens[i])
        if batch and ((len(batch) + 1) * longest_with > max_seconds or (len(batch) + 1) * tokens_with > max_tokens):
            batches.append(batch)
            batch, longest_with, tokens_with = [], seconds[i], tokens[i]
        batch.append(i)
        longest, most_tokens = longest_with, tokens_with
    return batches + [batch] if batch else batches


def default_batch_tokens(seconds: list[float], tokens: list[int], max_seconds: float) -> int:
    """The token cap when none is given: the LLM tokens max_seconds of the longest clips take (their
    rate x max_seconds). Every clip brings its own chat prompt (~30 tokens), so by seconds alone a batch
    of 0.5 s clips would hold ~5x the LLM tokens of a batch of 30 s clips; capped, a batch of short
    clips needs no more LLM memory than the same seconds of long clips."""
    return math.ceil(max_seconds * max(tokens) / max(seconds))


class DurationBatchSampler(torch.utils.data.Sampler):
    """Batches (lists of indices) of similar-length utterances, each as many as fit `max_seconds` of
    padded audio and `max_tokens` of padded LLM sequence (pack_batches), in an order shuffled every
    epoch. As ESPnet's and fairseq's batch samplers do, the batches are made once (from the seed:
    equal durations fall in random order) and only their order changes between epochs: every epoch
    then has the same number of batches, which the Trainer fixes its steps per epoch from.
    Their count is a multiple of num_replicas (the largest batches split in two), so the ranks, which
    take the batches in turn, all get as many: a rank short of one would hang the others."""

    def __init__(self, seconds: list[float], tokens: list[int], max_seconds: float, max_tokens: int | None = None,
                 num_replicas: int = 1, seed: int = 0):
        self.seed, self.epoch = seed, 0
        order = list(range(len(seconds)))
        random.Random(seed).shuffle(order)
        order.sort(key=lambda i: -seconds[i])  # stable: equal durations stay in shuffled order
        self.max_tokens = max_tokens or default_batch_tokens(seconds, tokens, max_seconds)
        self.batches = split_to_multiple(pack_batches(order, seconds, tokens, max_seconds, self.max_tokens),
                                         num_replicas)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        batches = list(self.batches)
        random.Random(f"{self.seed}/{self.epoch}").shuffle(batches)  # a string seed is hashed: epochs decorrelate
        return iter(batches)


def split_to_multiple(batches: list[list[int]], n: int) -> list[list[int]]:
    """Split the largest batches in two until their count is a multiple of n. Only when every batch is
    a single utterance and they still do not divide (fewer long clips than ranks, say) are the first
    batches repeated, as torch's DistributedSampler repeats samples."""
    batches = list(batches)
    while len(batches) % n:
        largest = max(range(len(batches)), key=lambda b: len(batches[b]))
        if len(batches[largest]) == 1:
            return batches + (batches * n)[: n - len(batches) % n]
        batch = batches.pop(largest)
        batches[largest:largest] = [batch[: len(batch) // 2], batch[len(batch) // 2:]]
    return batches
