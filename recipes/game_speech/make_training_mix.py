"""Training data shaped like what users send, from one or more of our jsonl manifests.

    python recipes/game_speech/make_training_mix.py --sources corpus/train.jsonl --out corpus/mix_tts
    python recipes/game_speech/make_training_mix.py --sources corpus/train.jsonl corpus/real/train.jsonl --out corpus/mix

Writes OUT/train.jsonl, OUT/stats.json and OUT/wav/{long,short,silence,augmented}/ with:
- original: every usable source utterance, referenced by path (not copied; none with --no_originals);
- long: consecutive utterances of one speaker/scene/voice (source order without those fields) joined
  by 0.1-0.8 s pauses into 5-30 s clips, the transcripts joined with spaces (a model trained on
  2-5 s clips loops on long ones);
- short: single words, numbers, digit strings and spelled letters, synthesized by
  recipes/game_speech/make_corpus.py (its voices and augmentation);
- silence: digital silence and low-level white/pink/brown noise, mains hum and room tone, 0.5-30 s,
  with txt "" (a model that never heard nothing invents text for it);
- augmented: copies of some originals through a telephone channel (8 kHz, 300-3400 Hz, sometimes
  mu-law), noise at 5-20 dB SNR, reverb, or Kaldi's speed perturbation 0.9/1.1 (pitch changes too).
  Two more on request (--augmentations): "codec", a lossy speech codec (GSM 06.10, AMR-NB at 4.75-12.2
  kbit/s, G.711 A-law on the phone band; Ogg Vorbis at its lowest quality on the full band, in place of
  G.722, which sox cannot write), and "pitch", a bigger or smaller speaker: pitch and formants scaled
  together by 0.89-0.95 or 1.05-1.12 at the same length (sox pitch; not VTLP's formant-only warp).

Numbers are written the way Whisper's English normalizer (compute_wer.py) writes them: digits, "40",
"2005", "3.5", a digit string as one number "4719". That form is left unchanged by the normalizer on
the reference side, and any spoken form of it in a hypothesis ("two thousand and five") is mapped
to it. Spaced digits "4 7 1 9" would not do: the normalizer turns them into "4 7 one 9", which
matches neither. Every short transcript is checked against its spoken form with the normalizer.
Letters are written "A B C" (the normalizer lowercases both sides alike).

Everything is a function of --seed and the sources: reruns are identical, a killed run resumes
(existing wavs are kept; each is written to a temp name, then renamed), and the jsonl is rewritten.
Output audio is 16 kHz mono 16-bit; no clip is over 30 s. Needs sox; short items need the TTS voices
of recipes/game_speech/install_tts.sh.
"""
import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from itertools import islice
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the library
sys.path.insert(0, str(Path(__file__).resolve().parent))  # this recipe: make_corpus

import make_corpus  # noqa: E402
from compute_wer import tokenize  # noqa: E402
from audio import SAMPLE_RATE, load_audio  # noqa: E402
from data import InputError, check_entries, read_jsonl  # noqa: E402

MAX_SECONDS = 30.0  # Whisper's window; train.py skips anything longer
LONG_SECONDS = (5.0, 30.0)
PAUSE_SECONDS = (0.1, 0.8)
SILENCE_SECONDS = (0.5, 30.0)
GROUP_FIELDS = ("speaker", "scene", "voice")
SILENCES = ("silence", "white", "pink", "brown", "hum", "room")
NOISES = ("white", "pink", "brown", "hum", "room")
AUGMENTATIONS = {"telephone": 1.0, "noise": 1.0, "reverb": 1.0, "speed0.9": 1 / 0.9, "speed1.1": 1 / 1.1,
                 "codec": 1.0, "pitch": 1.0}  # -> length factor
DEFAULT_AUGMENTATIONS = ("telephone", "noise", "reverb", "speed0.9", "speed1.1")  # every shipped mix's
# (file type or WAV encoding, sample rate, sox options): what --augmentations codec draws from
CODECS = {"gsm": ("gsm", 8000, ()), "amr-nb": ("amr-nb", 8000, ("-C", "{mode}")), "a-law": ("a-law", 8000, ()),
          "vorbis": ("ogg", 16000, ("-C", "-1"))}
SHORT_KINDS = {"word": 0.4, "number": 0.3, "digits": 0.15, "letters": 0.15}
# what people say alone that a dictionary's frequent lemmas miss
COMMON_WORDS = "yes no okay hello hi hey thanks please sorry stop wait help right left up down next back".split()
ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


# ---- sources -----------------------------------------------------------------------------------

def read_sources(paths: list[str]) -> tuple[list[dict], int]:
    """Usable utterances of all sources in order (duration from the header, a string txt, <= 30 s),
    and how many were left out."""
    entries, seen = [], set()
    for index, path in enumerate(paths):
        for entry in read_jsonl(path):
            if entry["key"] in seen:
                raise InputError(f"{entry['where']}: key {entry['key']!r} is also in an earlier source")
            seen.add(entry["key"])
            if "start" in entry or "end" in entry:  # the clips below are built from whole files
                raise InputError(f"{entry['where']}: segments (start/end) are not supported here: cut them into files first")
            entries.append(dict(entry, source=index))
    usable, _ = check_entries(entries, None, for_training=False)
    usable = [e for e in usable if isinstance(e.get("txt"), str) and e["duration"] <= MAX_SECONDS]
    return usable, len(entries) - len(usable)


def groups(entries: list[dict]) -> list[list[dict]]:
    """Utterances of one source and speaker/scene/voice, in source order (all of a source without those fields)."""
    by_group = {}
    for e in entries:
        by_group.setdefault((e["source"], *[str(e.get(f)) for f in GROUP_FIELDS]), []).append(e)
    return list(by_group.values())


def metadata(entry: dict) -> dict:
    return {f: entry[f] for f in GROUP_FIELDS if f in entry}


def file_name(key: str) -> str:
    return re.sub(r"[^\w.+-]", "_", key) + ".wav"


# ---- the plan: every output clip as a dict (its jsonl entry + "make", how to build it) ------------

def plan_originals(entries: list[dict], out: Path) -> list[dict]:
    items = []
    for e in entries:
        item = {k: v for k, v in e.items() if k not in ("where", "source")}
        item.update(wav=os.path.relpath(os.path.abspath(e["wav"]), os.path.abspath(out)),
                    duration=round(e["duration"], 3), kind="original")
        items.append(item)
    return items


def chain(group: list[dict], start: int, target: float, rng: random.Random) -> tuple[list[dict], list[float]]:
    """The utterances from group[start] on that fit into `target` seconds with a pause between each two."""
    parts, pauses, total = [group[start]], [], group[start]["duration"]
    for e in islice(group, start + 1, None):
        pause = round(rng.uniform(*PAUSE_SECONDS), 3)
        if total + pause + e["duration"] > target:
            break
        parts.append(e)
        pauses.append(pause)
        total += pause + e["duration"]
    return parts, pauses


def plan_long(entries: list[dict], fraction: float, seed: int) -> list[dict]:
    """Each group cut into consecutive chains, each with its own target length drawn from 5-30 s (so
    lengths spread); about `fraction` of the utterances end up in a long clip, each at most once."""
    rng, items = random.Random(f"{seed}/long"), []
    for group in groups([e for e in entries if e["txt"].strip()]):
        start = 0
        while start < len(group):
            parts, pauses = chain(group, start, rng.uniform(*LONG_SECONDS), rng)
            start += len(parts)
            duration = sum(p["duration"] for p in parts) + sum(pauses)
            if len(parts) < 2 or duration < LONG_SECONDS[0] or rng.random() >= fraction:
                continue
            digest = hashlib.sha1("\n".join(p["key"] for p in parts).encode()).hexdigest()[:8]
            key = f"long-{len(items):05d}-{digest}"  # the digest: a resumed run never keeps a clip of other parts
            items.append(dict(key=key, wav=f"wav/long/{key}.wav", txt=" ".join(p["txt"].strip() for p in parts),
                              kind="long", variant=length_bucket(duration), sources=[p["key"] for p in parts],
                              pauses=pauses, **metadata(parts[0]),
                              make=dict(parts=[p["wav"] for p in parts], pauses=pauses)))
    return items


def length_bucket(seconds: float) -> str:
    return next(f"<{edge} s" for edge in (10, 20, 30, float("inf")) if seconds < edge)


def plan_short(n: int, out: Path, seed: int) -> list[dict]:
    names, weights = zip(*make_corpus.VOICES)
    items = []
    for index in range(n):
        rng = random.Random(f"{seed}/short/{index}")
        variant = rng.choices(list(SHORT_KINDS), list(SHORT_KINDS.values()))[0]
        spoken, written = short_text(variant, rng)
        voice = rng.choices(names, weights)[0]
        key = f"short-{index:05d}-{voice}"  # make_corpus.make_utterance's name for it
        items.append(dict(key=key, wav=f"wav/short/{key}.wav", txt=written, kind="short", variant=variant,
                          spoken=spoken, voice=voice, make=(str(out), "short", index, spoken, voice, seed)))
    return items


def plan_silence(n: int, seed: int) -> list[dict]:
    items = []
    for index in range(n):
        rng = random.Random(f"{seed}/silence/{index}")
        variant = rng.choice(SILENCES)
        seconds = round(np.exp(rng.uniform(*np.log(SILENCE_SECONDS))), 3)  # log-uniform: many short, some long
        level_db = round(rng.uniform(-75, -40), 1)  # RMS, dB full scale
        key = f"silence-{index:05d}-{variant}"
        items.append(dict(key=key, wav=f"wav/silence/{key}.wav", txt="", kind="silence", variant=variant,
                          level_db=level_db, make=dict(variant=variant, seconds=seconds, level_db=level_db,
                                                       seed=rng.randrange(2**32))))
    return items


def plan_augmented(entries: list[dict], fraction: float, seed: int,
                   names=DEFAULT_AUGMENTATIONS) -> list[dict]:
    """A copy of about `fraction` of the utterances, each through one of the augmentations `names` that
    keeps it <= 30 s. Drawn per source key, so adding sources changes no existing copy."""
    items = []
    for e in entries:
        rng = random.Random(f"{seed}/augment/{e['key']}")
        fitting = [name for name in names if e["duration"] * AUGMENTATIONS[name] <= MAX_SECONDS]
        if not e["txt"].strip() or rng.random() >= fraction or not fitting:
            continue
        variant = rng.choice(fitting)
        key = f"{e['key']}-{variant}"
        items.append(dict(key=key, wav=f"wav/augmented/{file_name(key)}", txt=e["txt"], kind="augmented",
                          variant=variant, sources=[e["key"]], **metadata(e),
                          make=dict(wav=e["wav"], variant=variant, **augmentation_params(variant, rng))))
    return items


def augmentation_params(variant: str, rng: random.Random) -> dict:
    if variant == "telephone":
        return dict(mu_law=rng.random() < 0.5)
    if variant == "noise":
        return dict(noise_kind=rng.choice(NOISES), snr_db=round(rng.uniform(5, 20), 1), seed=rng.randrange(2**32))
    if variant == "reverb":  # sox's reverberance %, HF damping %, room scale %
        return dict(reverb=[rng.randint(20, 80), rng.randint(20, 80), rng.randint(30, 100)])
    if variant == "codec":  # AMR-NB's 8 modes: 4.75 to 12.2 kbit/s
        return dict(codec=rng.choice(sorted(CODECS)), codec_mode=rng.randrange(8))
    if variant == "pitch":  # never within 5% of the speaker's own size
        return dict(pitch_factor=round(rng.choice([rng.uniform(0.89, 0.95), rng.uniform(1.05, 1.12)]), 3))
    return {}


# ---- short texts: (what the voice is given, the transcript) ---------------------------------------

def short_text(variant: str, rng: random.Random) -> tuple[str, str]:
    """Redrawn until the normalizer maps both to the same words (it mangles a few forms, e.g. "10.1")."""
    while True:
        spoken, written = {"word": word, "number": number, "digits": digits, "letters": letters}[variant](rng)
        if tokenize(spoken) == tokenize(written):
            return spoken, written


@lru_cache(maxsize=None)
def wordnet_words() -> list[str]:
    """WordNet lemmas seen in its sense-tagged corpus (tagsense_cnt > 0): ~16k common words."""
    words = set()
    for pos in ("noun", "verb", "adj", "adv"):
        for line in open(f"{make_corpus.WORDNET}/index.{pos}", encoding="latin-1"):
            fields = line.split()
            if line.startswith(" ") or not re.fullmatch(r"[a-z]{3,12}", fields[0]):
                continue  # the license header; phrases, names, numbers
            if int(fields[5 + int(fields[3])]) > 0:
                words.add(fields[0])
    return sorted(words)


def word(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(COMMON_WORDS) if rng.random() < 0.2 else rng.choice(wordnet_words())
    return w, w


def number_words(n: int, british: bool) -> str:
    """0 <= n < 1,000,000 in words: "two thousand and five" (british) or "two thousand five"."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    head, rest = (ONES[n // 100] + " hundred", n % 100) if n < 1000 else \
        (number_words(n // 1000, british) + " thousand", n % 1000)
    if rest == 0:
        return head
    return head + (" and " if british and rest < 100 else " ") + number_words(rest, british)


def number(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["small", "large", "year", "decimal"])
    if kind == "small":
        n = rng.randint(0, 100)
        return number_words(n, True), str(n)
    if kind == "large":
        n = int(np.exp(rng.uniform(np.log(100), np.log(999_999))))
        return number_words(n, rng.random() < 0.5), str(n)
    if kind == "year":
        n = rng.randint(1900, 2035)
        if 2000 <= n < 2010:
            return number_words(n, rng.random() < 0.5), str(n)
        hi, lo = divmod(n, 100)  # "nineteen eighty four", "nineteen oh five", "nineteen hundred"
        tail = "hundred" if lo == 0 else ("oh " + ONES[lo] if lo < 10 else number_words(lo, False))
        return f"{number_words(hi, False)} {tail}", str(n)
    whole, places = rng.randint(0, 99), rng.choice([1, 1, 2])
    fraction = str(rng.randint(1, 10**places - 1)).zfill(places)
    return f"{number_words(whole, False)} point {' '.join(ONES[int(d)] for d in fraction)}", f"{whole}.{fraction}"


def digits(rng: random.Random) -> tuple[str, str]:
    """3-8 digits read one by one (zero as "zero" or "oh"); no leading zero: the normalizer drops it
    from "047" but not from "zero four seven"."""
    ds = [rng.randint(1, 9)] + [rng.randint(0, 9) for _ in range(rng.randint(2, 7))]
    zero = rng.choice(["zero", "oh"])
    return " ".join(zero if d == 0 else ONES[d] for d in ds), "".join(map(str, ds))


def letters(rng: random.Random) -> tuple[str, str]:
    """2-5 letters. The voices say "A-B-C" as letter names; "A B C" makes espeak read an article "a"."""
    ls = [chr(rng.randint(ord("A"), ord("Z"))) for _ in range(rng.randint(2, 5))]
    return "-".join(ls), " ".join(ls)


# ---- building the audio ---------------------------------------------------------------------------

def concatenate(parts: list[str], pauses: list[float]) -> np.ndarray:
    pieces = [load_audio(parts[0])]
    for wav, pause in zip(parts[1:], pauses):
        pieces += [np.zeros(round(pause * SAMPLE_RATE), np.float32), load_audio(wav)]
    return np.concatenate(pieces)


def noise(variant: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n samples of unit-RMS noise: white, pink, brown (power ~ 1/f^0, 1/f, 1/f^2 above 20 Hz),
    mains hum (50 or 60 Hz and harmonics over a little hiss) or room tone (ventilation rumble)."""
    if variant == "hum":
        t, f0 = np.arange(n) / SAMPLE_RATE, rng.choice([50, 60])
        x = sum(rng.uniform(0.2, 1) / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi))
                for k in range(1, 7)) + 0.02 * rng.standard_normal(n)
    else:
        f = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 20.0)
        gain = f ** (-{"white": 0, "pink": 1, "brown": 2, "room": 1}[variant] / 2)
        if variant == "room":
            gain /= 1 + (f / 300) ** 2  # little above a few hundred Hz
        x = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * gain, n)
    return (x / np.sqrt(np.mean(x**2))).astype(np.float32)


def silence(variant: str, seconds: float, level_db: float, seed: int) -> np.ndarray:
    n = round(seconds * SAMPLE_RATE)
    if variant == "silence":
        return np.zeros(n, np.float32)
    return noise(variant, n, np.random.default_rng(seed)) * np.float32(10 ** (level_db / 20))


def sox(audio: np.ndarray, *effects: str, output=("-e", "floating-point")) -> np.ndarray:
    """16 kHz audio through sox effects into a file of format `output`, read back at 16 kHz. A float
    file has no dither; -R makes any dither sox adds (e.g. for mu-law) the same on every run."""
    with tempfile.TemporaryDirectory() as tmp:
        soundfile.write(f"{tmp}/in.wav", audio, SAMPLE_RATE, subtype="FLOAT")
        subprocess.run(["sox", "-R", f"{tmp}/in.wav", *output, f"{tmp}/out.wav", *effects], check=True,
                       stderr=subprocess.DEVNULL)
        return load_audio(f"{tmp}/out.wav")


def through_codec(audio: np.ndarray, codec: str, mode: int) -> np.ndarray:
    """16 kHz audio encoded by `codec` (CODECS), then decoded back to 16 kHz; narrowband codecs get the
    phone band first, as a phone would."""
    file_type, rate, options = CODECS[codec]
    band = ("sinc", "300-3400") if rate == 8000 else ()
    with tempfile.TemporaryDirectory() as tmp:
        soundfile.write(f"{tmp}/in.wav", audio, SAMPLE_RATE, subtype="FLOAT")
        coded = f"{tmp}/coded.wav" if file_type == "a-law" else f"{tmp}/coded.{file_type}"
        encoding = ("-e", "a-law") if file_type == "a-law" else ()
        subprocess.run(["sox", "-R", f"{tmp}/in.wav", "-r", str(rate), *encoding,
                        *(o.format(mode=mode) for o in options), coded, *band], check=True, stderr=subprocess.DEVNULL)
        subprocess.run(["sox", "-R", coded, "-e", "floating-point", f"{tmp}/out.wav"], check=True,
                       stderr=subprocess.DEVNULL)
        return load_audio(f"{tmp}/out.wav")


def augment(wav: str, variant: str, mu_law=False, noise_kind=None, snr_db=None, seed=None, reverb=None,
            codec=None, codec_mode=0, pitch_factor=None) -> np.ndarray:
    audio = load_audio(wav)
    if variant == "codec":
        return through_codec(audio, codec, codec_mode)
    if variant == "pitch":  # in cents; -h: headroom, as the shift can raise the peak; rate: pitch's own resampling
        return sox(audio, "gain", "-h", "pitch", f"{1200 * np.log2(pitch_factor):.1f}", "rate", "16000", "gain", "-r")
    if variant == "telephone":  # a phone line's band at its 8 kHz rate (load_audio brings it back to 16 kHz)
        codec = ("-e", "u-law") if mu_law else ("-b", "16")
        return sox(audio, "sinc", "300-3400", "rate", "8000", output=("-r", "8000", *codec))
    if variant == "noise":
        scale = np.sqrt(np.mean(audio**2)) * 10 ** (-snr_db / 20)  # SNR against the whole clip's RMS
        return audio + noise(noise_kind, len(audio), np.random.default_rng(seed)) * np.float32(scale)
    if variant == "reverb":  # -h/-r: headroom for the reverb's gain, so sox clips nothing
        return sox(audio, "gain", "-h", "reverb", *map(str, reverb), "gain", "-r")
    return sox(audio, "speed", variant.removeprefix("speed"), "rate", "16000")  # tempo and pitch, as Kaldi's recipe


def write_wav(path: Path, audio: np.ndarray):
    """16 kHz mono 16-bit, scaled down rather than clipped; a temp name first, so a killed run leaves
    no half file under the final name."""
    peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
    if peak > 1.0:
        audio = audio / peak
    partial = path.with_suffix(".tmp.wav")
    soundfile.write(partial, audio, SAMPLE_RATE, subtype="PCM_16")
    os.replace(partial, path)


def make_clip(item: dict) -> str:
    """-> status. Builds item's wav unless it exists."""
    if item["kind"] == "short":
        return make_corpus.make_utterance(item["make"])[0]
    path = Path(item["out"]) / item["wav"]
    if path.exists():
        return "kept"
    build = {"long": concatenate, "silence": silence, "augmented": augment}[item["kind"]]
    try:
        audio = build(**item["make"])
    except subprocess.CalledProcessError:
        return "failed (sox)"
    if len(audio) > MAX_SECONDS * SAMPLE_RATE:
        return "skipped (over 30 s)"
    write_wav(path, audio)
    return "made"


# ---- output --------------------------------------------------------------------------------------

def write_manifest(out: Path, items: list[dict]) -> list[dict]:
    """OUT/train.jsonl with every item whose wav exists (temp name, then renamed) -> the written entries."""
    written = []
    for item in items:
        path = out / item["wav"]
        if not path.exists():
            continue
        entry = {k: v for k, v in item.items() if k not in ("make", "out")}
        if item["kind"] != "original":
            entry["duration"] = round(soundfile.info(path).duration, 3)
        written.append(entry)
    partial = out / "train.jsonl.tmp"
    partial.write_text("".join(json.dumps(e) + "\n" for e in written))
    os.replace(partial, out / "train.jsonl")
    return written


def summarize(entries: list[dict]) -> dict:
    """{kind: {"clips", "hours", "variants": {variant: {"clips", "hours"}}}} plus "total"."""
    stats = {}
    for e in entries:
        kind = stats.setdefault(e["kind"], dict(clips=0, hours=0.0, variants={}))
        variant = kind["variants"].setdefault(e.get("variant", ""), dict(clips=0, hours=0.0))
        for row in (kind, variant):
            row["clips"] += 1
            row["hours"] += e["duration"] / 3600
    stats["total"] = dict(clips=len(entries), hours=sum(e["duration"] for e in entries) / 3600)
    return stats


def print_summary(stats: dict):
    print(f"{'kind':<12}{'variant':<12}{'clips':>8}{'hours':>9}{'% clips':>9}{'% hours':>9}")
    total = stats["total"]
    for kind, row in stats.items():
        if kind == "total":
            continue
        rows = [(kind, "", row)] + [("", variant, r) for variant, r in sorted(row["variants"].items()) if variant]
        for name, variant, r in rows:
            print(f"{name:<12}{variant:<12}{r['clips']:>8}{r['hours']:>9.2f}"
                  f"{100 * r['clips'] / total['clips']:>9.1f}{100 * r['hours'] / max(total['hours'], 1e-9):>9.1f}")
    print(f"{'total':<24}{total['clips']:>8}{total['hours']:>9.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", nargs="+", required=True, help="jsonl manifests in our format")
    p.add_argument("--out", required=True)
    p.add_argument("--long_fraction", type=float, default=0.5, help="share of source utterances also in a long clip")
    p.add_argument("--short_fraction", type=float, default=0.1, help="short items per source utterance")
    p.add_argument("--silence_fraction", type=float, default=0.03, help="share of all clips that are silence/noise")
    p.add_argument("--augment_fraction", type=float, default=0.3, help="share of source utterances with an augmented copy")
    p.add_argument("--augmentations", nargs="+", choices=list(AUGMENTATIONS), default=list(DEFAULT_AUGMENTATIONS),
                   help="what an augmented copy is drawn from (default: all but codec and pitch)")
    p.add_argument("--no_originals", action="store_true",
                   help="write the made clips alone: copies to add to an existing mix (upweight_mix.py --add)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)

    out = Path(args.out)
    for folder in ("long", "short", "silence", "augmented"):
        (out / "wav" / folder).mkdir(parents=True, exist_ok=True)
    try:
        entries, left_out = read_sources(args.sources)
    except InputError as e:
        sys.exit(f"error: {e}")
    print(f"{len(entries)} source utterances ({left_out} left out: bad audio, no txt or over 30 s)", flush=True)

    originals = plan_originals(entries, out)
    long = plan_long(entries, args.long_fraction, args.seed)
    short = plan_short(round(args.short_fraction * len(entries)), out, args.seed)
    augmented = plan_augmented(entries, args.augment_fraction, args.seed, args.augmentations)
    others = len(originals) + len(long) + len(short) + len(augmented)
    silences = plan_silence(round(args.silence_fraction / (1 - args.silence_fraction) * others), args.seed)
    items = ([] if args.no_originals else originals) + long + short + silences + augmented
    if len({item["key"] for item in items}) < len(items):
        sys.exit("error: a generated key equals a source key; rename the source's keys")
    tasks = [dict(item, out=str(out)) for item in items if item["kind"] != "original"]

    start, statuses = time.time(), {}
    with Pool(args.jobs) as pool:
        for n, status in enumerate(pool.imap(make_clip, tasks, chunksize=4), 1):
            statuses[status] = statuses.get(status, 0) + 1
            if n % 500 == 0 or n == len(tasks):
                print(f"{n}/{len(tasks)} {statuses} {time.time() - start:.0f} s", flush=True)

    stats = summarize(write_manifest(out, items))
    print_summary(stats)
    (out / "stats.json").write_text(json.dumps(dict(stats, statuses=statuses, sources=args.sources,
                                                    left_out=left_out, args=vars(args)), indent=1) + "\n")
    print(f"done in {time.time() - start:.0f} s: {statuses}")


if __name__ == "__main__":
    main()
