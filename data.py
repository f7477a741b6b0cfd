"""Data: jsonl manifests, audio loading, the check pass over a data set, log-mel features, batching and
length-grouped sampling (a fixed number of utterances per batch, or as many as fit a budget of seconds)."""
import json
import math
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch
import whisper

SAMPLE_RATE = whisper.audio.SAMPLE_RATE  # 16 kHz
N_SAMPLES_30S = whisper.audio.N_SAMPLES
# Shorter audio is skipped as "too short": the log-mel's first analysis window (25 ms) needs this
# much, and a clip shorter than any phoneme holds no speech. Padded, it would only make recognition
# invent text and training learn a transcript for nothing.
MIN_SAMPLES = whisper.audio.N_FFT


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


class BadAudio(ValueError):
    """Audio that cannot be used; str(e) is the reason, e.g. "missing" or "non-finite samples"."""


def path_problem(path) -> str | None:
    if os.path.isfile(path):
        return None
    return "not a file" if os.path.exists(path) else "missing"  # e.g. a directory


def too_short(num_samples: int, sample_rate: int) -> bool:
    return num_samples * SAMPLE_RATE < MIN_SAMPLES * sample_rate  # in integers: the header and the loader agree


def segment_problem(start, end) -> str | None:
    """Why "start" / "end" (seconds, either may be left out) are no stretch of audio; None if they are."""
    for name, value in (("start", start), ("end", end)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value < float("inf")):
            return f'"{name}" must be a number of seconds >= 0, got {value!r}'
    if start is not None and end is not None and end <= start:
        return f'"end" ({end}) must be after "start" ({start})'
    return None


# A segment may end a little after its recording (rounding in the tool that cut it): up to this many
# seconds it is cut at the recording's end, as Kaldi's extract-segments (--max-overshoot) does.
MAX_SEGMENT_OVERSHOOT = 0.5


def segment_frames(start: float | None, end: float | None, sample_rate: int, num_frames: int) -> tuple[int, int]:
    """The frames [first, last) of the stretch start..end seconds of a file of num_frames frames
    (None: the file's start / end). BadAudio if the stretch lies outside the file."""
    first = round((start or 0) * sample_rate)
    last = num_frames if end is None else round(end * sample_rate)
    if first >= num_frames or last > num_frames + MAX_SEGMENT_OVERSHOOT * sample_rate:
        raise BadAudio(f"segment beyond the end of the audio ({num_frames / sample_rate:.2f} s)")
    return first, min(last, num_frames)


def load_entry_audio(entry: dict) -> np.ndarray:
    """An entry's audio: its whole file, or the segment its "start" / "end" give."""
    return load_audio(entry["wav"], entry.get("start"), entry.get("end"))


def load_audio(path, start: float | None = None, end: float | None = None) -> np.ndarray:
    """Any soundfile-readable file (or its stretch start..end seconds) -> mono float32 at 16 kHz in [-1, 1].
    `path` may also be an open binary file (a shard's audio bytes in a BytesIO)."""
    if isinstance(path, (str, os.PathLike)) and (problem := path_problem(path)):
        raise BadAudio(problem)
    try:  # a header that reads fine can still hide bad data
        with soundfile.SoundFile(path) as f:
            frames_left = float("inf")  # the whole file: read to its end, whatever its header claims
            if start is not None or end is not None:
                first, last = segment_frames(start, end, f.samplerate, f.frames)
                f.seek(first)
                frames_left = last - first
            # Block by block: soundfile.read would allocate the frames the header claims, which a
            # damaged MP3 header puts at 35 GB.
            blocks, block_frames = [], max(1, 2**20 // f.channels)
            while frames_left > 0 and len(block := f.read(int(min(block_frames, frames_left)), dtype="float32",
                                                          always_2d=True)):
                blocks.append(block)
                frames_left -= len(block)
            samples, sample_rate = np.concatenate(blocks or [np.zeros((0, f.channels), np.float32)]), f.samplerate
    except (soundfile.SoundFileError, OSError) as e:
        raise BadAudio("unreadable") from e
    if len(samples) == 0:
        raise BadAudio("empty")
    if too_short(len(samples), sample_rate):
        raise BadAudio("too short")
    if not np.isfinite(samples).all():  # NaN/inf would poison the loss (training) or the encoder (decoding)
        raise BadAudio("non-finite samples")
    samples = samples.mean(axis=1)
    if sample_rate != SAMPLE_RATE:
        samples = soxr.resample(samples, sample_rate, SAMPLE_RATE, quality="HQ")
    # Whisper hears audio through 16-bit PCM (ffmpeg), never beyond full scale; a float file can hold
    # any finite value, and a large one overflows the log-mel into NaN.
    return np.clip(samples, -1.0, 1.0, dtype=np.float32)


def long_audio_pieces(samples: np.ndarray, max_seconds: float, window_seconds: float = 0.1) -> list[tuple[int, int]]:
    """(start, end) sample spans of at most max_seconds that cover `samples` end to end. Each cut is at
    the quietest 100 ms in the last 40% of its piece, a pause if there is one: the model was trained
    on clips of up to 30 s, and one prompt holding several 30 s windows is beyond anything it saw."""
    max_len, window = round(max_seconds * SAMPLE_RATE), round(window_seconds * SAMPLE_RATE)
    energy = np.concatenate([[0.0], np.cumsum(samples.astype(np.float64) ** 2)])
    pieces, start = [], 0
    while len(samples) - start > max_len:
        lo, hi = start + round(0.6 * max_len), start + max_len - window  # window starts to search
        window_energy = energy[lo + window:hi + window + 1] - energy[lo:hi + 1]  # (hi - lo + 1,)
        cut = lo + int(np.argmin(window_energy)) + window // 2  # the middle of the quietest window
        pieces.append((start, cut))
        start = cut
    return pieces + [(start, len(samples))]


def audio_problem(entry: dict) -> str | None:
    """Why an entry's audio (its file, or its segment) cannot be used, from its header; None if it looks
    fine. Sets entry["duration"] from the header. Only float files (WAV FLOAT/DOUBLE) can hold NaN or
    inf, so only those are read (the segment); integer PCM, FLAC and the like cost a header read (~40 us
    on a local disk)."""
    path = entry["wav"]
    if problem := path_problem(path):
        return problem
    try:
        info = soundfile.info(path)
    except (soundfile.SoundFileError, OSError):
        return "unreadable"
    if info.frames <= 0:
        return "empty"
    try:
        first, last = segment_frames(entry.get("start"), entry.get("end"), info.samplerate, info.frames)
    except BadAudio as e:
        return str(e)
    if too_short(last - first, info.samplerate):
        return "too short"
    if info.subtype in ("FLOAT", "DOUBLE"):
        try:
            load_entry_audio(entry)
        except BadAudio as e:
            return str(e)
    entry["duration"] = (last - first) / info.samplerate
    return None


def text_problem(entry: dict, model, max_audio_seconds: float) -> str | None:
    """Why an entry cannot be trained on, besides its audio; None if it can."""
    if entry["duration"] > max_audio_seconds:
        return f"longer than {max_audio_seconds:g} s"
    txt = entry.get("txt")
    # "" is a transcript: silence and noise clips teach the model to say nothing. A missing or
    # non-string txt is a mistake in the manifest.
    if not isinstance(txt, str):
        return "no transcript"
    entry["num_tokens"] = sequence_length(entry, model, txt)  # for --batch_seconds' token cap
    if entry["num_tokens"] > model.llm.config.max_position_embeddings:
        return f"longer than the LLM's context ({model.llm.config.max_position_embeddings} tokens)"
    return None


def sequence_length(entry: dict, model, txt: str | None) -> int:
    """The LLM positions an entry takes: its chat prompt with its audio tokens, and txt (None: no transcript)."""
    instruction = entry.get("instruction") or model.config.instruction
    return len(model.prompt(instruction, model.num_audio_tokens(num_mel_frames(entry, model)), txt)["input_ids"])


def num_mel_frames(entry: dict, model) -> int:
    """The log-mel length of an entry from its duration (within a frame of load_audio + log_mel)."""
    num_samples = round(entry["duration"] * SAMPLE_RATE)
    if model.config.pad_to_30s:
        return max(1, math.ceil(num_samples / N_SAMPLES_30S)) * whisper.audio.N_FRAMES
    return num_samples // whisper.audio.HOP_LENGTH


def check_entries(entries: list[dict], model, for_training: bool, max_audio_seconds: float = 30.0):
    """The one check pass before any work starts (train.py and recognize.py): every audio header is
    read once (in threads: on network storage a header read is a round trip), and for training the
    length and the transcript are checked too. -> (usable entries, problems: entries with a "reason").
    Decoding errors a header cannot show are caught again where the audio is loaded (SpeechDataset)."""
    with ThreadPoolExecutor(16) as pool:
        reasons = list(pool.map(audio_problem, entries))
    if for_training:
        reasons = [reason or text_problem(e, model, max_audio_seconds) for e, reason in zip(entries, reasons)]
    usable = [e for e, reason in zip(entries, reasons) if reason is None]
    problems = [dict(e, reason=reason) for e, reason in zip(entries, reasons) if reason is not None]
    return usable, problems


def count_reasons(reasons) -> str:
    """"2 missing, 1 empty" (most frequent first)."""
    return ", ".join(f"{n} {reason}" for reason, n in Counter(reasons).most_common())


def log_mel(samples: np.ndarray, n_mels: int, pad_to_30s: bool = False) -> torch.Tensor:
    """(n_samples,) -> (n_mels, n_samples // 160). With pad_to_30s, Whisper's native input:
    the audio is zero-padded to a multiple of 30 s before the features are computed."""
    if pad_to_30s:
        num_windows = max(1, math.ceil(len(samples) / N_SAMPLES_30S))
        samples = np.pad(samples, (0, num_windows * N_SAMPLES_30S - len(samples)))
    return whisper.log_mel_spectrogram(torch.from_numpy(samples), n_mels)


class SpeechDataset(torch.utils.data.Dataset):
    def __init__(self, entries: list[dict], n_mels: int, default_instruction: str, pad_to_30s: bool = False):
        self.entries, self.n_mels, self.pad_to_30s = entries, n_mels, pad_to_30s
        self.default_instruction = default_instruction

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i) -> dict:
        """-> {key, mel, txt, instruction}, or {key, error} when the audio fails to load."""
        entry = self.entries[i]
        try:
            samples = load_entry_audio(entry)
        except BadAudio as e:
            return dict(key=entry["key"], error=str(e))
        return dict(key=entry["key"], mel=log_mel(samples, self.n_mels, self.pad_to_30s),
                    txt=entry.get("txt"), instruction=entry.get("instruction") or self.default_instruction)


class Collator:
    """Pads features to the batch's longest utterance and tokens to the batch's longest prompt.
    Training: right padding, labels. Inference: left padding (generation appends on the right)."""

    def __init__(self, model, inference: bool = False, pad_text_to: int | None = None):
        self.prompt, self.num_audio_tokens = model.prompt, model.num_audio_tokens
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


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Indices in batches of similar duration (less padding), batch order shuffled. Deterministic
    given seed and epoch. Each run of `batch_size` consecutive indices is one batch."""

    def __init__(self, durations: list[float], batch_size: int, seed: int = 0, group_batches: int = 64):
        self.durations, self.batch_size, self.seed = durations, batch_size, seed
        self.group_size = batch_size * group_batches
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
        rng.shuffle(full)  # a short batch (only the last group can have one) goes last
        return iter([i for batch in full + [b for b in batches if len(b) < self.batch_size] for i in batch])


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
