"""Audio files that break in the ways real corpora do, and the reason the check pass gives for each."""
from pathlib import Path

import numpy as np
import soundfile


def write_bad_audio(folder: Path) -> dict[str, str]:
    """-> {file name: reason}. damaged.flac has a good header: only decoding it fails."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.wav").write_bytes(b"RIFF" + np.random.default_rng(0).bytes(2000))
    soundfile.write(folder / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    soundfile.write(folder / "nan.wav", np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    write_damaged_flac(folder / "damaged.flac")
    return {"missing.wav": "missing", "corrupt.wav": "unreadable", "empty.wav": "empty",
            "nan.wav": "non-finite samples", "damaged.flac": "unreadable"}


def write_damaged_flac(path: Path):
    """A FLAC whose header (and so soundfile.info) is fine but whose frames are scrambled."""
    soundfile.write(path, (0.3 * np.sin(np.arange(32000) * 0.05)).astype(np.float32), 16000)
    data = bytearray(path.read_bytes())
    for i in range(200, len(data) - 10):
        data[i] = (data[i] * 7 + 13) % 256
    path.write_bytes(bytes(data))
