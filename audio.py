"""Audio: loading any file soundfile reads (or a stretch of it) as 16 kHz mono, the checks a header
allows, long recordings cut into pieces at pauses, Whisper's log-mel features, and SpecAugment and
vocal tract length perturbation on them.
The manifests, the check pass over a data set and batching are data.py's."""
import math
import os

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
MEL_FRAMES_PER_SECOND = SAMPLE_RATE // whisper.audio.HOP_LENGTH  # 100: a log-mel frame every 10 ms


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


def log_mel(samples: np.ndarray, n_mels: int, pad_to_30s: bool = False) -> torch.Tensor:
    """(n_samples,) -> (n_mels, n_samples // 160). With pad_to_30s, Whisper's native input:
    the audio is zero-padded to a multiple of 30 s before the features are computed."""
    if pad_to_30s:
        num_windows = max(1, math.ceil(len(samples) / N_SAMPLES_30S))
        samples = np.pad(samples, (0, num_windows * N_SAMPLES_30S - len(samples)))
    return whisper.log_mel_spectrogram(torch.from_numpy(samples), n_mels)


def spec_augment(mel: torch.Tensor, mel_lengths: torch.Tensor, freq_masks: int = 2, max_freq_width: float = 0.15,
                 max_time_width: int = 40, seconds_per_time_mask: float = 2.5) -> torch.Tensor:
    """SpecAugment (Park et al., 2019) on a batch of log-mels, training only: bands of mel bins and
    spans of frames set to the utterance's mean. Time masks scale with each utterance's length (one
    per 2.5 s, at most 0.4 s and a tenth of the utterance each), so a 1 s clip is not wiped out and a
    30 s one is masked as densely. mel: (B, n_mels, T) -> the same, masked."""
    mel = mel.clone()
    n_mels = mel.shape[1]
    for i, length in enumerate(mel_lengths.tolist()):
        fill = mel[i, :, :length].mean()
        for _ in range(freq_masks):
            width = int(torch.randint(0, int(max_freq_width * n_mels) + 1, (), device="cpu"))
            start = int(torch.randint(0, n_mels - width + 1, (), device="cpu"))
            mel[i, start:start + width, :length] = fill
        for _ in range(max(1, round(length / MEL_FRAMES_PER_SECOND / seconds_per_time_mask))):
            width = int(torch.randint(0, min(max_time_width, length // 10) + 1, (), device="cpu"))
            start = int(torch.randint(0, length - width + 1, (), device="cpu"))
            mel[i, :, start:start + width] = fill
    return mel


def slaney_mel(hz: torch.Tensor) -> torch.Tensor:
    """Hz -> the Slaney mel scale of Whisper's filterbank (librosa's default): linear to 1 kHz, log above."""
    return torch.where(hz < 1000, hz * 3 / 200, 15 + torch.log(hz.clamp(min=1000) / 1000) * 27 / math.log(6.4))


def slaney_hz(mel: torch.Tensor) -> torch.Tensor:
    return torch.where(mel < 15, mel * 200 / 3, 1000 * torch.exp((mel - 15) * math.log(6.4) / 27))


def vtlp(mel: torch.Tensor, factors: torch.Tensor, boundary_hz: float = 4800.0) -> torch.Tensor:
    """Vocal tract length perturbation (Jaitly & Hinton, 2013) on a batch of log-mels: utterance i's
    filterbank centres move from f to factors[i] * f below the boundary, and linearly from there to
    the Nyquist frequency, which stays put. A factor above 1 makes formants lower (a longer vocal
    tract), the length and the pitch's timing unchanged: sox's pitch shift moves pitch and formants
    together. Each warped centre is read from the log-mel by linear interpolation between the two
    nearest bins, as warping Whisper's filters would within their width.
    mel: (B, n_mels, T), factors: (B,) -> (B, n_mels, T)."""
    n_mels, nyquist = mel.shape[1], SAMPLE_RATE / 2
    # the filters' centres, evenly spaced in mel from 0 Hz to Nyquist (librosa.filters.mel's layout)
    # (on the CPU, in float64: at factor 1 the warp is the identity to within 1e-12 of a bin)
    step = slaney_mel(torch.tensor(nyquist, dtype=torch.float64, device="cpu")) / (n_mels + 1)
    centres = slaney_hz(step * torch.arange(1, n_mels + 1, dtype=torch.float64, device="cpu"))  # (n_mels,) Hz
    alpha = factors.cpu().double()[:, None]  # (B, 1)
    # the warp bends at knee (to bent Hz), so that its top stays below Nyquist whatever the factor
    bent = boundary_hz * alpha.clamp(max=1)
    knee = bent / alpha
    above = nyquist - (nyquist - bent) / (nyquist - knee) * (nyquist - centres)
    warped = torch.where(centres <= knee, alpha * centres, above)  # (B, n_mels) Hz
    position = (slaney_mel(warped) / step - 1).clamp(0, n_mels - 1)  # fractional bin index
    low = position.floor().long().clamp(max=n_mels - 2)
    weight = (position - low)[:, :, None].to(mel.device, mel.dtype)  # (B, n_mels, 1)
    low = low.to(mel.device)[:, :, None].expand(-1, -1, mel.shape[2])  # (B, n_mels, T)
    return torch.lerp(mel.gather(1, low), mel.gather(1, low + 1), weight)
