"""Convert the data formats users already have into our jsonl (docs/data.md), and ours into FunASR's.

    python tools/prepare_data.py kaldi DATA_DIR OUT.jsonl      # wav.scp + text (+ segments, utt2spk)
    python tools/prepare_data.py funasr IN.jsonl OUT.jsonl     # FunASR's ChatML jsonl -> ours
    python tools/prepare_data.py to-funasr IN.jsonl OUT.jsonl  # ours -> FunASR's ChatML jsonl
    python tools/prepare_data.py shard IN.jsonl OUT_DIR        # -> WebDataset tar shards + their index
    python tools/prepare_data.py index 'DIR/*.tar'             # an index for shards another tool wrote

kaldi: a Kaldi data dir. `wav.scp` lines are `RECORDING_ID PATH`: the first field is the id, the rest
of the line the path, spaces and all. A piped command (`... |`) or an archive offset (`x.ark:123`) is
an error naming file:line: reading them would mean running a shell command or a Kaldi binary at every
load, so run the command once into audio files (e.g. Kaldi's `wav-copy scp:wav.scp ark,scp:...` or
sox) and list those. `text` (`UTT_ID transcript`; an id alone is an empty transcript) is optional:
without it the lines have no `txt` (for recognition). With `segments` (`UTT_ID RECORDING_ID START END`,
END -1: to the recording's end) each segment is a line with `start` and `end` seconds, which
train.py and recognize.py cut from the recording; without it each recording is one utterance.
`utt2spk` becomes a `speaker` field. Relative paths are taken from the current directory, as Kaldi
does, and written absolute.

funasr: FunASR's LLM fine-tuning lines, {"messages": [system, user, assistant]}: the user turn is a
prompt around `<|startofspeech|>!PATH<|endofspeech|>`; the prompt becomes our `instruction`, the
assistant turn our `txt` (no assistant turn: no `txt`). A URL instead of a path is skipped (counted):
download the audio first. The key is the line's `key` if it has one, else the file's name. Relative
paths are taken from the current directory, as FunASR does, and written absolute.

to-funasr: the other way, with FunASR's `speech_length` (fbank frames of 10 ms, from the audio's
header) and `--instruction` as the prompt of lines without one of their own. Segments and lines
without a transcript are skipped (counted): FunASR's lines have no start/end and train on a transcript.

shard: our jsonl (or with --from, a Kaldi data dir or FunASR's jsonl) -> OUT_DIR/shard-000000.tar, ...
of at most --max_count utterances and about --max_mb MB each, audio stored as 16 kHz 16-bit FLAC (or
--audio wav, or the file's original bytes), each with shard-NNNNNN.index.json (keys, durations,
transcripts). Unusable audio is skipped (counted). --shuffle writes the lines in a random order: the
reader's shuffle buffer mixes only what is near in a shard (docs/shards.md).

index: the index beside each local shard another tool wrote (WebDataset; WeNet's `.wav` + `.txt`
members): keys, durations (from `.json`, else the audio header), transcripts; each shard is read once.

Malformed lines are an error naming file:line; what is converted and what is skipped (by reason) is
printed. An existing OUT is never overwritten without --force.
"""
import argparse
import json
import math
import os
import random
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from audio import audio_problem  # noqa: E402
from data import InputError, count_reasons, json_lines, read_jsonl  # noqa: E402
from shards import AUDIO_FORMATS, expand_shards, index_name, index_shard, write_json, write_shards  # noqa: E402

FUNASR_SYSTEM = "You are a helpful assistant."  # FunASR's fixed system turn
FUNASR_SPEECH = re.compile(r"<\|startofspeech\|>!(.*?)<\|endofspeech\|>", re.DOTALL)
FUNASR_PROMPT = "Speech transcription:"  # FunASR's default English prompt


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, source in [("kaldi", "a Kaldi data dir"), ("funasr", "FunASR's ChatML jsonl"), ("to-funasr", "our jsonl")]:
        command = sub.add_parser(name)
        command.add_argument("source", help=source)
        command.add_argument("out", help="the jsonl to write")
        command.add_argument("--force", action="store_true", help="overwrite an existing OUT")
        if name == "to-funasr":
            command.add_argument("--instruction", default=FUNASR_PROMPT,
                                 help="the prompt of lines without an instruction of their own")
    shard = sub.add_parser("shard")
    shard.add_argument("source", help="our jsonl (or with --from: a Kaldi data dir, FunASR's jsonl)")
    shard.add_argument("out", help="the folder to write shard-000000.tar, ... into")
    shard.add_argument("--from", dest="source_format", choices=["jsonl", "kaldi", "funasr"], default="jsonl")
    shard.add_argument("--max_count", type=int, default=1000, help="utterances per shard at most")
    shard.add_argument("--max_mb", type=float, default=256, help="a shard is closed once it holds this many MB")
    shard.add_argument("--audio", choices=AUDIO_FORMATS, default="flac",
                       help="flac / wav: 16 kHz mono 16-bit; original: the file's own bytes (a segment: FLAC)")
    shard.add_argument("--shuffle", action="store_true", help="write the utterances in a random order (training sets)")
    shard.add_argument("--seed", type=int, default=0)
    shard.add_argument("--force", action="store_true", help="replace the shards already in OUT")
    index = sub.add_parser("index")
    index.add_argument("source", help="local shards: a list, glob or brace pattern of .tar files")
    index.add_argument("--force", action="store_true", help="replace indexes already there")
    args = p.parse_args(argv)
    if args.command == "shard" and not (args.max_count >= 1 and args.max_mb > 0):
        p.error("--max_count must be >= 1 and --max_mb > 0")
    return args


# ----------------------------------------------------------------------------------------
# Kaldi


def kaldi_table(path: Path) -> dict[str, tuple[str, str]]:
    """A Kaldi table file -> {first field: (the rest of the line, "file:line")}. The first field is the
    id; the rest keeps its inner spaces (a path with spaces, a transcript)."""
    table = {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not UTF-8 ({e})") from None
            if not line:
                continue
            uid, rest = (line.split(maxsplit=1) + [""])[:2]
            if uid in table:
                raise InputError(f"{where}: duplicate id {uid!r} (first at {table[uid][1]})")
            table[uid] = (rest, where)
    return table


def kaldi_wav_path(rest: str, where: str) -> str:
    if not rest:
        raise InputError(f"{where}: no path after the recording id")
    if rest.endswith("|"):
        raise InputError(f"{where}: a piped command ({rest!r}) is not supported: run it once into an audio "
                         "file and list that file")
    if re.search(r"\.ark:\d+$", rest):
        raise InputError(f"{where}: an archive offset ({rest!r}) is not supported: write the audio to files "
                         "(wav-copy scp:wav.scp ark,scp:...) and list those")
    return os.path.abspath(os.path.expanduser(rest))


def kaldi_segment(rest: str, where: str) -> tuple[str, float, float | None]:
    """`RECORDING_ID START END` -> (recording, start, end or None: to the recording's end)."""
    fields = rest.split()
    if len(fields) == 4:
        raise InputError(f"{where}: a channel field is not supported (audio is mixed down to mono)")
    if len(fields) != 3:
        raise InputError(f"{where}: needs UTT_ID RECORDING_ID START END")
    try:
        start, end = float(fields[1]), float(fields[2])
    except ValueError:
        raise InputError(f"{where}: START and END must be numbers of seconds") from None
    end = None if end == -1 else end  # Kaldi: -1 is the recording's end
    if not (math.isfinite(start) and 0 <= start) or (end is not None and not (math.isfinite(end) and end > start)):
        raise InputError(f"{where}: needs 0 <= START < END (or END -1), got {fields[1]} {fields[2]}")
    return fields[0], start, end


def from_kaldi(data_dir: Path) -> tuple[list[dict], Counter]:
    """A Kaldi data dir -> (our entries, skipped reasons)."""
    if not (data_dir / "wav.scp").is_file():
        raise InputError(f"{data_dir}: no wav.scp (a Kaldi data dir holds wav.scp, text, [segments, utt2spk])")
    recordings = {rec: kaldi_wav_path(rest, where) for rec, (rest, where) in kaldi_table(data_dir / "wav.scp").items()}
    texts = kaldi_table(data_dir / "text") if (data_dir / "text").is_file() else None
    speakers = {}
    if (data_dir / "utt2spk").is_file():
        for utt, (rest, where) in kaldi_table(data_dir / "utt2spk").items():
            if len(rest.split()) != 1:
                raise InputError(f"{where}: needs UTT_ID SPEAKER_ID")
            speakers[utt] = rest
    skipped = Counter()
    if (data_dir / "segments").is_file():
        utterances = {}
        for utt, (rest, where) in kaldi_table(data_dir / "segments").items():
            rec, start, end = kaldi_segment(rest, where)
            if rec not in recordings:
                skipped["recording not in wav.scp"] += 1
                continue
            utterances[utt] = dict(wav=recordings[rec], start=start) | ({} if end is None else dict(end=end))
    else:
        utterances = {rec: dict(wav=wav) for rec, wav in recordings.items()}

    entries = []
    for utt, audio in utterances.items():
        entry = dict(key=utt, **audio)
        if texts is not None:
            if utt not in texts:
                skipped["no transcript in text"] += 1
                continue
            entry["txt"] = texts[utt][0]
        if utt in speakers:
            entry["speaker"] = speakers[utt]
        entries.append(entry)
    if texts is not None:
        skipped["transcript without audio"] += len(texts.keys() - utterances.keys())
    return entries, +skipped  # +: drops the zero counts


# ----------------------------------------------------------------------------------------
# FunASR's ChatML jsonl


def funasr_turns(messages, where: str) -> dict[str, str]:
    """{role: content} of one line's messages: one user turn, at most one system and assistant turn."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        raise InputError(f'{where}: needs "messages": a list of {{"role", "content"}} with string contents')
    turns = {}
    for m in messages:
        if m["role"] in turns:
            raise InputError(f"{where}: more than one {m['role']} turn (only single-turn transcription lines convert)")
        turns[m["role"]] = m["content"]
    if "user" not in turns:
        raise InputError(f"{where}: no user turn")
    return turns


def from_funasr(path: Path) -> tuple[list[dict], Counter]:
    """FunASR's jsonl -> (our entries, skipped reasons)."""
    entries, skipped, seen = [], Counter(), {}
    for where, line in json_lines(path):
        turns = funasr_turns(line.get("messages") if isinstance(line, dict) else None, where)
        speech = FUNASR_SPEECH.findall(turns["user"])
        if len(speech) != 1 or not speech[0].strip():
            raise InputError(f"{where}: the user turn needs exactly one <|startofspeech|>!PATH<|endofspeech|>")
        wav = speech[0].strip()
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", wav):
            skipped["a URL (download the audio first)"] += 1
            continue
        key = line.get("key")
        if key is not None and (not isinstance(key, str) or key.split() != [key]):
            raise InputError(f'{where}: "key" must be one word, got {key!r}')
        key = key or "_".join(Path(wav).stem.split())  # the file's name, spaces made underscores
        if key in seen:
            raise InputError(f"{where}: duplicate key {key!r} (first at {seen[key]}); give the lines a \"key\"")
        seen[key] = where
        entry = dict(key=key, wav=os.path.abspath(os.path.expanduser(wav)))
        if instruction := FUNASR_SPEECH.sub("", turns["user"]).strip():
            entry["instruction"] = instruction
        if "assistant" in turns:
            entry["txt"] = turns["assistant"]
        entries.append(entry)
    return entries, skipped


def to_funasr(path: Path, default_instruction: str) -> tuple[list[dict], Counter]:
    """Our jsonl -> (FunASR's lines, skipped reasons)."""
    lines, skipped = [], Counter()
    for entry in read_jsonl(path):
        if "start" in entry or "end" in entry:
            skipped["a segment (FunASR's lines have no start/end: cut it into a file)"] += 1
        elif not isinstance(entry.get("txt"), str):
            skipped["no transcript"] += 1
        elif problem := audio_problem(entry):  # also reads the duration from the header
            skipped[f"audio {problem}"] += 1
        else:
            user = f"{entry.get('instruction') or default_instruction}<|startofspeech|>!{entry['wav']}<|endofspeech|>"
            lines.append(dict(key=entry["key"], messages=[
                dict(role="system", content=FUNASR_SYSTEM), dict(role="user", content=user),
                dict(role="assistant", content=entry["txt"])], speech_length=round(entry["duration"] * 100)))
    return lines, skipped


# ----------------------------------------------------------------------------------------


def write_jsonl(out: Path, lines: list[dict]):
    """Written to a temporary name, then renamed: a crash never leaves half a file."""
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    os.replace(tmp, out)


def shard(args):
    """tools/prepare_data.py shard: entries -> shards + their indexes."""
    source, out = Path(args.source), Path(args.out)
    old = sorted(out.glob("shard-*.tar")) + sorted(out.glob("shard-*.index.json"))
    if old and not args.force:
        raise InputError(f"{out} already holds shards: pass --force to replace them")
    for path in old:
        path.unlink()
    entries = {"jsonl": lambda: (read_jsonl(source), Counter()), "kaldi": lambda: from_kaldi(source),
               "funasr": lambda: from_funasr(source)}[args.source_format]()[0]
    if args.shuffle:
        random.Random(args.seed).shuffle(entries)
    shards, skipped = write_shards(entries, out, args.max_count, args.max_mb, args.audio)
    if not shards:
        raise InputError(f"{source}: no usable utterance (skipped {count_reasons(skipped.elements())})")
    print(f"{source}: wrote {len(entries) - sum(skipped.values())} "
          f"utterances to {len(shards)} shards in {out} ({out}/shard-{{000000..{len(shards) - 1:06d}}}.tar)")
    if skipped:
        print(f"skipped {sum(skipped.values())}: {count_reasons(skipped.elements())}")


def index(args):
    """tools/prepare_data.py index: an index beside each shard that has none (or --force)."""
    for path in expand_shards(args.source):
        if os.path.exists(index_name(path)) and not args.force:
            print(f"{index_name(path)} exists (--force replaces it)")
            continue
        written = index_shard(path)
        write_json(Path(index_name(path)), written)
        print(f"{path}: {len(written['keys'])} utterances, {sum(written['durations']):.1f} s")


def main(argv=None):
    args = parse_args(argv)
    if args.command in ("shard", "index"):
        return shard(args) if args.command == "shard" else index(args)
    source, out = Path(args.source), Path(args.out)
    if out.exists() and not args.force:
        raise InputError(f"{out} exists: pass --force to overwrite it")
    if args.command == "kaldi":
        lines, skipped = from_kaldi(source)
    elif args.command == "funasr":
        lines, skipped = from_funasr(source)
    else:
        lines, skipped = to_funasr(source, args.instruction)
    if not lines:
        raise InputError(f"{source}: nothing to convert" + (f" (skipped {count_reasons(skipped.elements())})"
                                                            if skipped else ""))
    write_jsonl(out, lines)
    segments = sum("start" in line for line in lines)
    print(f"{source}: wrote {len(lines)} lines to {out}" + (f" ({segments} segments)" if segments else ""))
    if skipped:
        print(f"skipped {sum(skipped.values())}: {count_reasons(skipped.elements())}")


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"error: {e}")
