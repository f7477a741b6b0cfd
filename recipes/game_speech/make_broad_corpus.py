"""A TTS training corpus of broad text, to widen what the model can write beyond the two games' words.

    bash recipes/game_speech/install_tts.sh
    python recipes/game_speech/make_ood_dev.py --out corpus/ood && \
      python recipes/game_speech/make_ood_dev.py --out corpus/ood_text --voices piper-joe   # the texts to stay clear of
    python recipes/game_speech/make_broad_corpus.py --out corpus/broad --exclude corpus/ood/dev.jsonl corpus/ood_text/dev.jsonl

Issue 32 found stage 8's failure on new text in a voice it knows (48% WER where Whisper
tiny.en scores 13%): it writes the games' words and glues digits to words. This corpus adds text the
games never say, spoken by the training voices and by new espeak-ng speakers, through the same kinds
of channel the training mix already has:
- Prose from the English manual pages of installed packages *other than* make_ood_dev.py's (the man
  pages project's sections 2-7, git, gdb, vim, gpg, openssl, ...: the fixed list MAN_PACKAGES).
- WordNet glosses (definitions, not the usage examples make_corpus.py already speaks), as sentences.
- Everyday prose: the sentences of the multi-line fortunes (make_corpus.py speaks the one-liners):
  quotes, jokes, songs and definitions of the installed fortune files, without their attributions.
- Numbers as a transcriber writes them: counts, years, money, ordinals, decimals, percentages, room
  and route numbers, spoken in words and written in digits, in carrier sentences of their own (not
  make_ood_dev.py's templates); a pair is kept only when compute_wer.py's normalizer scores the written
  form equal to the spoken one.
Any sentence sharing make_ood_dev.NGRAM consecutive normalized words with a text of --exclude (the
out-of-domain dev sets) is left out, so those sets stay unseen.

Voices: make_ood_dev.TRAINED_VOICES (flite, festival, piper) and espeak-ng accents the training
already uses with speaker variants nobody else uses (never the OOD dev's accents or variants), each
utterance at its own speed and pitch; channels: clean, telephone codecs, noise/reverb
(make_ood_dev.channel_effects). Writes OUT/wav/<key>.wav and OUT/train.jsonl (the corpus format:
key, wav, txt, spoken, source, voice, channel, duration). Deterministic in --seed; a killed run
resumes (existing wavs are kept).
"""
import argparse
import json
import subprocess
import random
import re
import sys
import time
from pathlib import Path

import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this recipe: make_ood_dev, make_corpus

import make_corpus  # noqa: E402
import make_ood_dev as ood  # noqa: E402
from make_ood_dev import ONES, MONTHS, digit_words, normalized, ordinal_digits, ordinal_words, words, year_words  # noqa: E402

from compute_wer import tokenize  # noqa: E402 (make_ood_dev put the repository on the path)

# Packages whose man pages give the training prose: none of make_ood_dev.MAN_PACKAGES (the OOD dev's)
MAN_PACKAGES = ["manpages", "git-man", "gdb", "vim-common", "vim-runtime", "gpg", "gpg-agent", "gnupg-utils",
                "openssl", "tmux", "curl", "wget", "make", "sqlite3", "groff-base", "bc", "ed", "file", "strace",
                "valgrind", "systemd", "openssh-client", "fontconfig", "gettext", "binutils-x86-64-linux-gnu",
                "bsdextrautils", "e2fsprogs", "perl", "python3.11", "zip", "unzip", "xz-utils", "bzip2", "jq", "time"]
assert not set(MAN_PACKAGES) & set(ood.MAN_PACKAGES)
# espeak-ng: the training's accents (make_corpus.VOICES) with variants neither make_corpus.py nor the
# OOD dev (f3, m2, m5, klatt*, belinda, Andy) uses
ESPEAK_ACCENTS = ["en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-scotland"]
ESPEAK_VARIANTS = ["m4", "m6", "m8", "f1", "f5", "Alex", "Annie", "adam", "david", "ed", "edward", "iven",
                   "john", "linda", "max", "michel", "norbert", "paul", "quincy", "rob", "robert", "steph",
                   "travis", "victor", "zac", "aunty", "grandma", "grandpa", "shelby", "ian"]
# (voice, weight): the neural voice is the most natural; espeak-ng gets many speakers
VOICES = [("flite-kal16", 1), ("flite-rms", 1), ("festival-kal", 1), ("festival-ked", 1), ("piper-joe", 3),
          ("espeak", 4)]


# ----------------------------------------------------------------------------------------------
# Text

def glosses() -> list[str]:
    """WordNet definitions (the text before the first ';' or usage example), as sentences."""
    found = []
    for path in sorted(Path(make_corpus.WORDNET).glob("data.*")):
        for line in open(path, encoding="latin-1"):
            if line.startswith(" ") or "|" not in line:  # the license header
                continue
            gloss = line.split("|", 1)[1].split(";")[0].split('"')[0].strip(" ;:,")
            if gloss:
                found.append(gloss[0].upper() + gloss[1:] + ".")
    return found


def fortune_sentences() -> list[tuple[str, str]]:
    """-> [(sentence, fortune file)]: the sentences of the multi-line fortunes, attribution lines
    ("-- Mark Twain") left out; a sentence with quotes, colons, dashes or a line-broken word is dropped
    (dialogue and dictionary-style entries do not read as one sentence)."""
    found = []
    for path in sorted(Path(make_corpus.FORTUNES).glob("*")):
        if path.is_dir() or path.suffix in (".dat", ".u8"):  # off/ (the offensive ones) is a directory
            continue
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            lines = [line for line in entry.split("\n") if line.strip() and not line.strip().startswith("--")]
            if len(lines) < 2:  # one-liners: make_corpus.py's
                continue
            text = " ".join(" ".join(lines).split())
            for sentence in re.split(r"(?<=[.?!])\s+(?=[A-Z])", text):
                if (5 <= len(sentence.split()) <= 25 and sentence[0].isupper() and sentence[-1] in ".?!"
                        and ood.ALLOWED.match(sentence) and not re.search(r"[\":]|- |\.\.", sentence)):
                    found.append((sentence, path.name))
    return found


NOUNS = ["people", "tickets", "books", "chairs", "emails", "photos", "trees", "cars", "students", "boxes",
         "pages", "votes", "bottles", "apples", "steps", "files", "songs", "houses", "players", "miles"]
PLACES = ["the library", "the museum", "the station", "the hospital", "the hotel", "the stadium", "the school",
          "the market", "the airport", "the bank"]
STREETS = ["Oak Street", "Main Street", "Park Avenue", "Elm Road", "Hill Lane", "Lake Drive", "River Road"]


def number_sentence(rng: random.Random) -> tuple[str, str, str]:
    """-> (kind, written, spoken): a number in a carrier sentence, in digits and in words."""
    kind = rng.choice(["count", "count", "year", "money", "ordinal", "room", "address", "decimal", "percent",
                       "hours", "date", "phone"])
    if kind == "count":
        n = rng.choice([rng.randint(2, 99), rng.randint(100, 999), rng.randint(1000, 99999)])
        noun, place = rng.choice(NOUNS), rng.choice(PLACES)
        lead = rng.choice([f"We counted {{n}} {noun} at {place}.", f"About {{n}} {noun} were left near {place}.",
                           f"She sent {{n}} {noun} last week.", f"Only {{n}} {noun} arrived on time."])
        return kind, lead.format(n=f"{n:,}"), lead.format(n=words(n))
    if kind == "year":
        y = rng.choice([rng.randint(1950, 1999), rng.randint(2010, 2039)])
        lead = rng.choice(["The bridge was built in {y}.", "He moved to the city in {y}.",
                           "The law changed in {y}, after a long debate.", "By {y} the company had grown."])
        return kind, lead.format(y=y), lead.format(y=year_words(y))
    if kind == "money":
        dollars, cents = rng.randint(1, 499), rng.choice([0, rng.randint(1, 99)])
        thing = rng.choice(["a coffee", "the ticket", "the book", "a new lamp", "the taxi", "lunch"])
        written = f"${dollars}" + (f".{cents:02d}" if cents else "")
        spoken = f"{words(dollars)} dollar{'s' * (dollars != 1)}" + (f" and {words(cents)} cents" if cents else "")
        lead = rng.choice(["I paid {m} for {t}.", "{T} cost {m}.", "They charged {m} for {t}."])
        return (kind, lead.format(m=written, t=thing, T=thing[0].upper() + thing[1:]),
                lead.format(m=spoken, t=thing, T=thing[0].upper() + thing[1:]))
    if kind == "ordinal":
        n = rng.randint(1, 31)
        what = rng.choice(["floor", "row", "place", "chapter", "day"])
        lead = rng.choice(["They finished in {o} {w}.", "Meet me on the {o} {w}.", "It was her {o} {w} in a row."])
        lead = lead.replace("in {o}", "in {o}" if what == "place" else "the {o}")
        return kind, lead.format(o=ordinal_digits(n), w=what), lead.format(o=ordinal_words(n), w=what)
    if kind == "room":
        n = rng.randint(100, 999)
        lead = rng.choice(["The meeting moved to room {n}.", "Take bus {n} to the end of the line.",
                           "Route {n} is closed for repairs."])
        return kind, lead.format(n=n), lead.format(n=words(n))
    if kind == "address":
        n = rng.randint(2, 999)
        street = rng.choice(STREETS)
        return kind, f"She lives at {n} {street}.", f"She lives at {words(n)} {street}."
    if kind == "decimal":
        a, b = rng.randint(0, 20), rng.randint(1, 9)
        unit = rng.choice(["miles", "meters", "pounds", "liters", "degrees"])
        return kind, f"The reading was {a}.{b} {unit}.", f"The reading was {words(a)} point {ONES[b]} {unit}."
    if kind == "percent":
        n = rng.randint(2, 99)
        lead = rng.choice(["Prices rose by {p} this year.", "About {p} of the votes were counted.",
                           "The battery is at {p}."])
        return kind, lead.format(p=f"{n}%"), lead.format(p=f"{words(n)} percent")
    if kind == "hours":
        n = rng.randint(2, 12)
        what = rng.choice(["hours", "days", "weeks", "years"])
        lead = rng.choice(["The trip took {n} {w}.", "We waited {n} {w} for an answer.", "It lasts {n} {w}."])
        return kind, lead.format(n=n, w=what), lead.format(n=words(n), w=what)
    if kind == "date":
        month, day = rng.randrange(12), rng.randint(1, 28)
        lead = rng.choice(["The concert is on {d}.", "School starts on {d}.", "They met on {d}."])
        return (kind, lead.format(d=f"{MONTHS[month]} {ordinal_digits(day)}"),
                lead.format(d=f"{MONTHS[month]} {ordinal_words(day)}"))
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 7)))
    lead = rng.choice(["The code on the door is {d}.", "Write down {d} and keep it safe.", "His badge reads {d}."])
    return "phone", lead.format(d=digits), lead.format(d=digit_words(digits))


class Exclude:
    """The texts of --exclude (the OOD dev sets): whole sentences and NGRAM-word runs to stay clear of."""

    def __init__(self, paths: list[str]):
        entries = [json.loads(line) for path in paths for line in open(path) if line.strip()]
        self.inner = ood.TrainingText([t for e in entries for t in (e["txt"], e.get("spoken")) if t])

    def overlaps(self, text: str) -> bool:
        return self.inner.overlaps(text)


def plan(seed: int, num_man: int, num_glosses: int, num_numbers: int, exclude: Exclude,
         num_fortunes: int = 0) -> list[dict]:
    """The utterances (text, voice, channel), a function of the seed (and the installed text)."""
    seen, items = set(), []

    def take(candidates: list[dict], n: int, per_source: int | None = None):
        random.Random(f"{seed}/{candidates[0]['source'].split(':')[0] if candidates else ''}").shuffle(candidates)
        count, taken = {}, 0
        for item in candidates:
            norm = normalized(item["txt"])
            if taken == n or norm in seen or (per_source and count.get(item["source"], 0) >= per_source):
                continue
            if exclude.overlaps(item["txt"]) or exclude.overlaps(item["spoken"]):
                continue
            seen.add(norm)
            count[item["source"]] = count.get(item["source"], 0) + 1
            items.append(item)
            taken += 1

    man = sorted(set(ood.man_sentences(ood.man_pages(MAN_PACKAGES))))
    take([dict(txt=s, spoken=s, source=f"man:{page}") for s, page in man], num_man, per_source=6)
    gloss = sorted({g for g in glosses() if 5 <= len(g.split()) <= 20 and ood.ALLOWED.match(g)})
    take([dict(txt=g, spoken=g, source="gloss") for g in gloss], num_glosses)
    rng, numbers = random.Random(f"{seed}/numbers"), []
    for _ in range(num_numbers * 4):  # draws repeat; pairs the normalizer would score apart are dropped
        kind, written, spoken = number_sentence(rng)
        if tokenize(written) == tokenize(spoken):
            numbers.append(dict(txt=written, spoken=spoken, source=f"number:{kind}"))
    take(numbers, num_numbers)
    if num_fortunes:  # after the others: corpora made before this source are unchanged
        fortunes = sorted(set(fortune_sentences()))
        take([dict(txt=s, spoken=s, source=f"fortune:{name}") for s, name in fortunes], num_fortunes)

    random.Random(f"{seed}/order").shuffle(items)
    prefix = "broad" if seed == 0 else f"broad{seed}"  # corpora of other seeds train together: keys must differ
    names, weights = zip(*VOICES)
    for index, item in enumerate(items):
        r = random.Random(f"{seed}/utt/{index}")
        voice = r.choices(names, weights)[0]
        item["voice"] = (f"{r.choice(ESPEAK_ACCENTS)}+{r.choice(ESPEAK_VARIANTS)}" if voice == "espeak" else voice)
        item["channel"] = r.choice(["clean", "clean", "telephone", "noisy"])
        item["speed"], item["pitch"] = r.randint(130, 200), r.randint(25, 75)  # espeak-ng words/min, 0-99
        item["key"] = f"{prefix}-{index:05d}-{item['source'].split(':')[0]}-{item['channel']}"
        item["index"] = index
    return items


def make_utterance(task) -> tuple[str, str]:
    """make_ood_dev.make_utterance, with a synthesizer crash (festival fails on a few sentences)
    counted instead of ending the run."""
    try:
        return ood.make_utterance(task)
    except subprocess.CalledProcessError:
        return f"failed ({task[1]['voice']})", task[1]["key"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--exclude", nargs="+", required=True, help="jsonl files whose texts must stay unseen")
    p.add_argument("--num_man", type=int, default=3000)
    p.add_argument("--num_glosses", type=int, default=1500)
    p.add_argument("--num_numbers", type=int, default=2500)
    p.add_argument("--num_fortunes", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)

    start = time.time()
    items = plan(args.seed, args.num_man, args.num_glosses, args.num_numbers, Exclude(args.exclude), args.num_fortunes)
    sources = {}
    for item in items:
        sources[item["source"].split(":")[0]] = sources.get(item["source"].split(":")[0], 0) + 1
    print(f"{len(items)} utterances planned: {sources}", flush=True)
    counts = ood.synthesize(args.out, items, args.seed, args.jobs, make_utterance, report_every=500)
    total = 0.0
    with open(Path(args.out) / "train.jsonl", "w") as f:
        for item in items:
            wav = Path("wav") / f"{item['key']}.wav"
            if not (Path(args.out) / wav).exists():
                continue  # a synthesizer failure, counted above
            duration = soundfile.info(Path(args.out) / wav).duration
            if not 0.1 <= duration <= 30:  # outside Whisper's window
                counts["too long or short"] = counts.get("too long or short", 0) + 1
                continue
            total += duration
            f.write(json.dumps(dict(key=item["key"], wav=str(wav), txt=item["txt"], spoken=item["spoken"],
                                    source=item["source"], voice=item["voice"], channel=item["channel"],
                                    duration=round(duration, 3))) + "\n")
    print(f"{len(items)} utterances, {total / 3600:.2f} h of audio, in {time.time() - start:.0f} s: {counts}")


if __name__ == "__main__":
    main()
