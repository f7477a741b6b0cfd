"""Data: jsonl manifests, audio loading, log-mel features, batching and length-grouped sampling."""
import json
import math
import random
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch
import whisper

SAMPLE_RATE = whisper.audio.SAMPLE_RATE  # 16 kHz
N_SAMPLES_30S = whisper.audio.N_SAMPLES


def read_jsonl(path) -> list[dict]:
    """Lines {"key", "wav", "txt"} (+ optional "duration", "instruction"). `key` defaults to the
    wav file's stem; a relative `wav` is relative to the jsonl file."""
    path = Path(path)
    entries, seen = [], {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 ({e})") from None
            if not line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("wav"), str):
                raise ValueError(f'{where}: needs a "wav" path')
            wav = Path(entry["wav"]).expanduser()
            entry["wav"] = str(wav if wav.is_absolute() else path.parent / wav)
            entry["key"] = str(entry.get("key") or wav.stem)
            if entry["key"] in seen:
                raise ValueError(f"{where}: duplicate key {entry['key']!r} (first at line {seen[entry['key']]})")
            seen[entry["key"]] = line_no
            entry["where"] = where
            entries.append(entry)
    return entries


def load_audio(path) -> np.ndarray:
    """Any soundfile-readable file -> mono float32 at 16 kHz."""
    samples, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)  # (n, channels)
    samples = samples.mean(axis=1)
    if sample_rate != SAMPLE_RATE:
        samples = soxr.resample(samples, sample_rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(samples, dtype=np.float32)


def audio_duration(entry: dict) -> float:
    if "duration" in entry:
        return float(entry["duration"])
    info = soundfile.info(entry["wav"])
    return info.frames / info.samplerate


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
        entry = self.entries[i]
        return dict(mel=log_mel(load_audio(entry["wav"]), self.n_mels, self.pad_to_30s),
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
