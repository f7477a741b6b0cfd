"""An out-of-domain dev set that no training source feeds: other voices, other text, other channels.

    bash recipes/game_speech/install_tts.sh                              # espeak-ng, sox (and the training text, to exclude it)
    python recipes/game_speech/make_ood_dev.py --out corpus/ood          # corpus/ood/dev.jsonl, corpus/ood/wav/...
    python recipes/game_speech/make_ood_dev.py --out corpus/ood_text --voices piper-joe   # new text and channels only

What the training corpora (recipes/game_speech/make_corpus.py, make_real_speech.py, make_bass_speech.py) never hold:
- Voices: espeak-ng accents and variants make_corpus.py never uses (Lancaster, West Midlands and New
  York City English; the Klatt formant synthesizer variants; other speaker variants), each utterance
  at its own speed and pitch. Debian's mbrola voices would be another engine, but they are not in
  Debian main (the apt sources here): espeak-ng lists them and cannot speak them.
- Text: sentences of the English manual pages of a fixed set of Debian base packages (zcat, roff
  stripped), and generated telephone-menu, number, money, date, time and code phrases. A phrase is
  spoken in words ("press eight", "march third twenty twenty four") and its `txt` written as a
  transcriber writes it ("Press 8", "March 3rd, 2024"); both normalize to the same words under
  compute_wer.py's normalizer (pairs where they would not are dropped, so the reference never
  penalizes a correct digit/word choice). Any sentence whose normalized text is a training sentence
  (WordNet examples, fortunes, the two games' scripts, where installed), or that shares a run of
  NGRAM words with one, is left out.
- Channels: clean; telephone (band-limited to 300-3400 Hz at 8 kHz, through G.711 mu-law or A-law
  or GSM 06.10 with sox, back to 16 kHz); noisy and/or reverberant (white, pink or brown noise at
  5-20 dB SNR).

Writes OUT/wav/<key>.wav (16 kHz mono 16-bit) and OUT/dev.jsonl: {"key", "wav", "txt", "spoken" (what
the voice read), "source" (man:<page> or phrase:<kind>), "voice", "channel", "duration"}, the format
of the other corpus tools (data.read_jsonl). Everything is a function of --seed and the utterance
index: reruns are identical, and a killed run resumes (existing wavs are kept; each is written to a
temp name, then renamed; the jsonl is rewritten).
"""
import argparse
import gzip
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile

ROOT = Path(__file__).resolve().parents[2]  # the repository
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # this recipe: make_corpus

from compute_wer import tokenize  # noqa: E402

# espeak-ng voice+variant specs that recipes/game_speech/make_corpus.py never uses (its accents: en-us, en-gb,
# en-gb-x-rp, en-029, en-gb-scotland; its variants: m1, m3, m7, f2, f4)
VOICES = ["en-gb-x-gbclan+f3", "en-gb-x-gbcwmd+m2", "en-us-nyc+m5", "en-us+klatt2", "en-gb-x-gbclan+klatt4",
          "en-us-nyc+belinda", "en-gb-x-gbcwmd+Andy", "en-gb+klatt3"]
# make_corpus.py's voice names (flite-kal16, piper-joe, ...): --voices takes them for a slice whose only
# novelty is the text and the channel (what those alone cost a model, in a voice it trained on)
TRAINED_VOICES = ["flite-kal16", "flite-rms", "festival-kal", "festival-ked", "piper-joe"]
# Debian base packages whose English manual pages give the prose (a fixed set: the same pages wherever
# these packages are installed with their docs)
MAN_PACKAGES = ["coreutils", "util-linux", "procps", "passwd", "apt", "dpkg", "gzip", "man-db", "login", "bash",
                "less", "diffutils", "grep", "tar", "findutils", "sed"]
ALLOWED = re.compile(r"^[A-Za-z0-9 ,.;:'?!\"-]+$")
NGRAM = 6  # a sentence sharing this many consecutive (normalized) words with a training sentence is left out


# ----------------------------------------------------------------------------------------------
# Text: manual pages

def man_pages(packages=MAN_PACKAGES) -> list[str]:
    """The English man pages (/usr/share/man/manN/) the packages install, sorted."""
    pages = set()
    for package in packages:
        listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True).stdout
        pages.update(p for p in listing.split("\n") if re.fullmatch(r"/usr/share/man/man\d/[^/]+\.gz", p)
                     and os.path.isfile(p) and not os.path.islink(p))
    return sorted(pages)


ROFF_ESCAPES = [(r"\\f(\[[^]]*\]|\(..|.)", ""), (r"\\s[-+]?\d", ""), (r"\\\(aq|\\'", "'"), (r"\\\((lq|rq|dq)", '"'),
                (r"\\\((em|en|hy)", " - "), (r"\\\(..", " "), (r"\\\[[^]]*\]", " "), (r"\\[-]", "-"),
                (r"\\&", ""), (r"\\e", "\\\\"), (r"\\[ ~0|^]", " "), (r"\\\*(\(..|\[[^]]*\]|.)", " "),
                (r"\\c", ""), (r"\\.", " ")]


def roff_paragraphs(source: str) -> list[str]:
    """Plain text lines of a roff page joined into paragraphs; request lines (.B, .TP, ...) end one
    and are dropped (they hold option names, headings and the like)."""
    paragraphs, current = [], []
    for line in source.split("\n"):
        if line.startswith((".", "'")) or not line.strip():
            if current:
                paragraphs.append(" ".join(current))
            current = []
            continue
        for pattern, replacement in ROFF_ESCAPES:
            line = re.sub(pattern, replacement, line)
        current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def awkward(word: str) -> bool:
    """An option name (-x), a path or version (a/b, 1.2), a digit, an all-capital word (FILE, PID) or
    a lone letter other than a and I: what a voice spells out or a reader says another way."""
    bare = word.strip(".,;:'\"?!")
    return (word.lstrip("'\"").startswith("-") or "--" in word or bool(re.search(r"\d|\w[.:/]\w", word))
            or sum(c.isupper() for c in word) > 1 or (len(bare) == 1 and bare.lower() not in ("a", "i")))


def man_sentences(pages: list[str]) -> list[tuple[str, str]]:
    """(sentence, page name) of plain prose: 6-18 words, plain ASCII, no option names (-x), paths,
    all-capital words or lone letters a voice would spell out."""
    found = []
    for page in pages:
        source = gzip.open(page, "rt", encoding="utf-8", errors="replace").read()
        name = Path(page).name.removesuffix(".gz")
        for paragraph in roff_paragraphs(source):
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(paragraph.split())):
                words = sentence.split()
                if not (6 <= len(words) <= 18 and ALLOWED.match(sentence) and sentence.endswith(".")
                        and sentence[0].isupper()):
                    continue
                if any(map(awkward, words)):
                    continue
                found.append((sentence, name))
    return found


# ----------------------------------------------------------------------------------------------
# Text: phrases in words (spoken) and as written

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
       "seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ORDINALS = {1: "first", 2: "second", 3: "third", 5: "fifth", 8: "eighth", 9: "ninth", 12: "twelfth"}
MONTHS = "January February March April May June July August September October November December".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()


def words(n: int) -> str:
    """0 <= n < 1,000,000 in words (American: no 'and')."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    if n < 1000:
        return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + words(n % 100))
    return words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + words(n % 1000))


def ordinal_words(n: int) -> str:
    if n in ORDINALS:
        return ORDINALS[n]
    if n > 20 and n % 10:
        return TENS[n // 10] + " " + ordinal_words(n % 10)
    w = words(n)
    return w[:-1] + "ieth" if w.endswith("y") else w + "th"


def ordinal_digits(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def year_words(y: int) -> str:
    return words(y // 100) + " " + words(y % 100)  # 1950-1999, 2010-2039: "nineteen eighty four"


def digit_words(digits: str) -> str:
    return " ".join(ONES[int(d)] for d in digits)


DEPARTMENTS = ["billing", "sales", "technical support", "new accounts", "the pharmacy", "customer service",
               "appointments", "lost or stolen cards", "parts and service", "the front desk"]
ACTIONS = ["repeat this menu", "speak to an operator", "hear your balance", "pay your bill", "change your address",
           "return to the main menu", "leave a message", "check an order", "report an outage", "cancel an appointment"]
THINGS = ["account number", "member number", "order number", "confirmation code", "zip code", "policy number"]
CITIES = ["Denver", "Toronto", "Lisbon", "Nairobi", "Osaka", "Santiago", "Oslo", "Phoenix", "Dublin", "Manila"]
FIXED = ["Please hold while we transfer your call.", "Your call may be recorded for quality and training purposes.",
         "We are sorry, that is not a valid selection.", "Please stay on the line.",
         "All of our representatives are busy helping other customers.", "To go back, press the star key.",
         "Please say or enter your account number now.", "Sorry, I did not get that.",
         "Thank you for calling, goodbye.", "If you know your party's extension, you may dial it at any time."]


def phrase(rng: random.Random) -> tuple[str, str, str]:
    """-> (kind, written, spoken)."""
    kind = rng.choice(["menu", "menu", "digits", "money", "count", "date", "time", "percent", "flight", "fixed"])
    if kind == "menu":
        d = rng.randint(0, 9)
        if rng.random() < 0.5:
            target = rng.choice(DEPARTMENTS)
            return kind, f"For {target}, press {d}.", f"For {target}, press {ONES[d]}."
        action = rng.choice(ACTIONS)
        return kind, f"To {action}, press {d}.", f"To {action}, press {ONES[d]}."
    if kind == "digits":
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(4, 8)))
        thing = rng.choice(THINGS + ["phone number", "extension"])
        return kind, f"Your {thing} is {digits}.", f"Your {thing} is {digit_words(digits)}."
    if kind == "money":
        dollars, cents = rng.randint(2, 2999), rng.randint(1, 99)
        lead = rng.choice(["Your current balance is", "The amount due is", "Your payment of"])
        tail = "" if lead != "Your payment of" else " has been received"
        return (kind, f"{lead} ${dollars:,}.{cents:02d}{tail}.",
                f"{lead} {words(dollars)} dollars and {words(cents)} cents{tail}.")
    if kind == "count":
        n = rng.randint(2, 60)
        noun = rng.choice(["new messages", "saved messages", "minutes", "callers ahead of you", "items in your cart"])
        lead = {"minutes": "The estimated wait time is", "callers ahead of you": "There are"}.get(noun, "You have")
        return kind, f"{lead} {n} {noun}.", f"{lead} {words(n)} {noun}."
    if kind == "date":
        month, day = rng.randrange(12), rng.randint(1, 28)
        year = rng.choice([rng.randint(1950, 1999), rng.randint(2010, 2039)])
        weekday = rng.choice(DAYS)
        lead = rng.choice(["Your appointment is on", "The payment is due on", "The office will be closed on"])
        return (kind, f"{lead} {weekday}, {MONTHS[month]} {ordinal_digits(day)}, {year}.",
                f"{lead} {weekday}, {MONTHS[month]} {ordinal_words(day)}, {year_words(year)}.")
    if kind == "time":
        hour, part = rng.randint(1, 11), rng.choice(["in the morning", "in the evening", "at night"])
        lead = rng.choice(["Our office opens at", "The store closes at", "Please call back after"])
        return kind, f"{lead} {hour} {part}.", f"{lead} {words(hour)} {part}."
    if kind == "percent":
        n = rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 75])
        return kind, f"Save {n} percent on your next order.", f"Save {words(n)} percent on your next order."
    if kind == "flight":
        n, gate = rng.randint(100, 999), rng.randint(2, 40)
        city = rng.choice(CITIES)
        return (kind, f"Flight {n} to {city} is now boarding at gate {gate}.",
                f"Flight {words(n)} to {city} is now boarding at gate {words(gate)}.")
    text = rng.choice(FIXED)
    return kind, text, text


# ----------------------------------------------------------------------------------------------
# Training text, to stay clear of

def normalized(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def training_texts() -> list[str]:
    """Every sentence a training corpus can speak: WordNet usage examples and fortunes (all of them,
    not only make_corpus.py's filtered ones) and both games' scripts, where installed."""
    import make_corpus

    texts = make_corpus.wordnet_examples() + make_corpus.fortune_one_liners()
    import make_real_speech as queen
    if Path(queen.GAME).is_file():
        blob = Path(queen.GAME).read_bytes()
        texts += [line["script_txt"] for line in queen.script_lines(blob, queen.read_table(blob)).values()]
    import make_bass_speech as bass
    if (bass.DEFAULT_GAME / "sky.dnr").is_file():
        disk = bass.Disk(bass.DEFAULT_GAME)
        for s in range(len(bass.SPEECH_CONVERT)):
            section = disk.load(bass.TEXT_BASE + s)
            texts += [bass.clean(bass.decode_text(section, line)) for line in range(bass.line_count(section))]
    return texts


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    w = normalized(text).split()
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


class TrainingText:
    def __init__(self, texts: list[str]):
        self.sentences = {normalized(t) for t in texts}
        self.grams = set().union(*(ngrams(t) for t in texts)) if texts else set()

    def overlaps(self, text: str) -> bool:
        return normalized(text) in self.sentences or not ngrams(text).isdisjoint(self.grams)


# ----------------------------------------------------------------------------------------------
# The set

def plan(seed: int, num_man: int, num_phrases: int, exclude: TrainingText, voices: list[str] = VOICES) -> list[dict]:
    """The utterances (text, voice, channel), a function of the seed (and the installed text)."""
    seen, man = set(), []
    for sentence, page in man_sentences(man_pages()):
        norm = normalized(sentence)
        if norm not in seen and not exclude.overlaps(sentence):
            seen.add(norm)
            man.append((sentence, page))
    man.sort()
    random.Random(f"{seed}/man").shuffle(man)
    # at most 3 sentences of one page: many pages, not the few longest
    per_page, chosen = {}, []
    for sentence, page in man:
        if per_page.get(page, 0) < 3 and len(chosen) < num_man:
            per_page[page] = per_page.get(page, 0) + 1
            chosen.append(dict(txt=sentence, spoken=sentence, source=f"man:{page}"))
    rng, phrases = random.Random(f"{seed}/phrases"), []
    while len(phrases) < num_phrases:
        kind, written, spoken = phrase(rng)
        if tokenize(written) != tokenize(spoken) or exclude.overlaps(written):
            continue  # the normalizer would score a correct reading as an error
        if normalized(written) in seen:  # a fixed prompt or a repeated draw
            continue
        seen.add(normalized(written))
        phrases.append(dict(txt=written, spoken=spoken, source=f"phrase:{kind}"))
    items = chosen + phrases
    random.Random(f"{seed}/order").shuffle(items)
    for index, item in enumerate(items):
        r = random.Random(f"{seed}/utt/{index}")
        item["voice"] = voices[index % len(voices)] if index < len(voices) else r.choice(voices)
        item["channel"] = r.choice(["clean", "telephone", "telephone", "noisy"])
        item["speed"], item["pitch"] = r.randint(140, 190), r.randint(30, 70)  # espeak-ng words/min, 0-99
        item["key"] = f"ood-{index:04d}-{item['source'].split(':')[0]}-{item['channel']}"
        item["index"] = index
    return items


def channel_effects(channel: str, rng: random.Random) -> tuple[list[str], str | None, float | None, str]:
    """-> (sox effects at 16 kHz, telephone codec or None, noise SNR dB or None, noise colour)."""
    effects = ["tempo", f"{rng.uniform(0.92, 1.08):.3f}"]
    if rng.random() < 0.5:
        effects += ["pitch", str(rng.randint(-200, 200))]
    codec, snr, colour = None, None, "white"
    if channel == "telephone":
        codec = rng.choice(["ul", "al", "gsm"])
        if rng.random() < 0.3:
            snr = rng.uniform(15, 30)
    elif channel == "noisy":
        if rng.random() < 0.6:
            effects += ["reverb", str(rng.randint(30, 70))]
        if rng.random() < 0.8:
            snr = rng.uniform(5, 20)
            colour = rng.choice(["white", "pink", "brown"])
    effects += ["norm", f"{rng.uniform(-8, -1):.1f}"]
    return effects, codec, snr, colour


def coloured_noise(n: int, colour: str, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    if colour == "white":
        return white
    spectrum = np.fft.rfft(white)
    f = np.arange(len(spectrum), dtype=np.float64)
    f[0] = 1.0
    spectrum /= np.sqrt(f) if colour == "pink" else f
    return np.fft.irfft(spectrum, n)


def make_utterance(task) -> tuple[str, str]:
    """-> (status, key). Writes out/wav/<key>.wav unless it exists."""
    out, item, seed = task
    final = Path(out) / "wav" / f"{item['key']}.wav"
    if final.exists():
        return "kept", item["key"]
    rng = random.Random(f"{seed}/audio/{item['index']}")
    effects, codec, snr, colour = channel_effects(item["channel"], rng)
    with tempfile.TemporaryDirectory() as tmp:
        raw, audio_path = f"{tmp}/raw.wav", f"{tmp}/out.wav"
        if item["voice"] in TRAINED_VOICES:  # the --voices of a text-and-channel-only slice
            import make_corpus
            make_corpus.synthesize(item["voice"], item["spoken"], raw)
        else:
            subprocess.run(["espeak-ng", "-v", item["voice"], "-s", str(item["speed"]), "-p", str(item["pitch"]), "-w",
                            raw, item["spoken"]], check=True, stderr=subprocess.DEVNULL)
        # -R: sox's dither is random unless told to repeat
        subprocess.run(["sox", "-R", raw, "-r", "16000", "-c", "1", "-b", "16", audio_path, *effects], check=True,
                       stderr=subprocess.DEVNULL)
        if codec:  # 8 kHz telephone band through the codec and back
            coded = f"{tmp}/tel.{codec}"
            subprocess.run(["sox", "-R", audio_path, "-r", "8000", "-c", "1", coded, "sinc", "300-3400"], check=True,
                           stderr=subprocess.DEVNULL)
            subprocess.run(["sox", "-R", "-r", "8000", "-c", "1", coded, "-r", "16000", "-b", "16", audio_path],
                           check=True, stderr=subprocess.DEVNULL)
        audio, _ = soundfile.read(audio_path, dtype="float64")
        if snr is not None:
            noise = coloured_noise(len(audio), colour, np.random.default_rng(rng.randrange(2**32)))
            audio = audio + noise * np.sqrt(np.mean(audio**2) / np.mean(noise**2) / 10 ** (snr / 10))
        partial = final.with_suffix(".tmp.wav")
        soundfile.write(partial, np.clip(audio, -1, 1).astype(np.float32), 16000, subtype="PCM_16")
        os.replace(partial, final)
    return "made", item["key"]


def synthesize(out: str, items: list[dict], seed: int, jobs: int, make, report_every: int) -> dict[str, int]:
    """make((out, item, seed)) -> (status, key) for every item on `jobs` processes, writing OUT/wav/<key>.wav,
    with progress every report_every items -> how many items ended in each status."""
    start, counts = time.time(), {}
    (Path(out) / "wav").mkdir(parents=True, exist_ok=True)
    with Pool(jobs) as pool:
        for n, (status, _) in enumerate(pool.imap(make, [(out, item, seed) for item in items], chunksize=4), 1):
            counts[status] = counts.get(status, 0) + 1
            if n % report_every == 0 or n == len(items):
                print(f"{n}/{len(items)} {counts} {time.time() - start:.0f} s", flush=True)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--num_man", type=int, default=170, help="manual page sentences")
    p.add_argument("--num_phrases", type=int, default=130, help="telephone / number / date / time phrases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--voices", nargs="+", default=VOICES, choices=VOICES + TRAINED_VOICES,
                   help="default: the espeak-ng voices no training corpus uses; one of make_corpus.py's voices "
                        "(e.g. piper-joe, a trained voice) makes a slice new in text and channel only")
    args = p.parse_args(argv)

    start = time.time()
    items = plan(args.seed, args.num_man, args.num_phrases, TrainingText(training_texts()), args.voices)
    counts = synthesize(args.out, items, args.seed, args.jobs, make_utterance, report_every=50)
    total = 0.0
    with open(Path(args.out) / "dev.jsonl", "w") as f:
        for item in items:
            wav = Path("wav") / f"{item['key']}.wav"
            duration = soundfile.info(Path(args.out) / wav).duration
            total += duration
            f.write(json.dumps(dict(key=item["key"], wav=str(wav), txt=item["txt"], spoken=item["spoken"],
                                    source=item["source"], voice=item["voice"], speed=item["speed"],
                                    pitch=item["pitch"], channel=item["channel"],
                                    duration=round(duration, 3))) + "\n")
    print(f"{len(items)} utterances, {total / 60:.1f} min of audio, in {time.time() - start:.0f} s: {counts}")


if __name__ == "__main__":
    main()
