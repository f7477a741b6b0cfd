"""A training mix with the clips of one source repeated: more weight on a domain without new audio;
optionally with whole corpora added, to bring new text in without remaking the mix.

    python recipes/game_speech/upweight_mix.py --mix corpus/mix5/train.jsonl --source corpus/real/train.jsonl \
        --times 3 --out corpus/mix5/train_real3x.jsonl
    python recipes/game_speech/upweight_mix.py --mix corpus/mix5/train.jsonl --source corpus/real/train.jsonl \
        --times 3 --add corpus/broad4/train.jsonl --out corpus/mix5/train_real3x_broad4.jsonl

A line of MIX comes from SOURCE when its key, or one of the keys it was made from ("sources", as
make_training_mix.py writes for long clips and augmented copies), is a key of SOURCE. Those lines are
written TIMES times in all, the rest once, in MIX's order (the trainer shuffles); copy n (2..TIMES)
has the key "KEY#n", as keys must be unique. OUT must sit in MIX's folder: the wav paths are relative
to it and are not rewritten. The lines of each ADD corpus follow, once each, their wav paths rewritten
relative to OUT's folder; a key already in the mix is an error. An existing OUT is not overwritten.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from data import InputError, read_jsonl  # noqa: E402


def upweight(mix_lines: list[str], source_keys: set[str], times: int) -> tuple[list[str], int]:
    """(MIX's lines, each line made from the source `times` times, how many lines were made from it)."""
    out, matched = [], 0
    for line in mix_lines:
        item = json.loads(line)
        from_source = bool({item["key"], *item.get("sources", [])} & source_keys)
        matched += from_source
        out.append(line)
        for copy in range(2, times + 1 if from_source else 1):
            out.append(json.dumps({**item, "key": f"{item['key']}#{copy}"}, ensure_ascii=False) + "\n")
    return out, matched


def added_lines(corpus: str, out_dir: str, taken: set[str]) -> list[str]:
    """CORPUS's lines (as data.read_jsonl checks them) with wav paths relative to OUT_DIR; a key in TAKEN is an error."""
    lines = []
    for entry in read_jsonl(corpus):
        if entry["key"] in taken:
            raise InputError(f"{entry['where']}: key {entry['key']!r} is already in the mix")
        taken.add(entry["key"])
        item = {k: v for k, v in entry.items() if k != "where"}
        item["wav"] = os.path.relpath(entry["wav"], out_dir)
        lines.append(json.dumps(item, ensure_ascii=False) + "\n")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mix", required=True, help="a jsonl of make_training_mix.py")
    parser.add_argument("--source", required=True, help="the jsonl whose clips weigh more")
    parser.add_argument("--times", type=int, required=True, help="how many times each of its lines appears")
    parser.add_argument("--add", nargs="*", default=[], help="corpora (jsonl) whose lines are added once each")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.times < 1:
        sys.exit(f"--times must be at least 1, got {args.times}")
    if os.path.abspath(os.path.dirname(args.out)) != os.path.abspath(os.path.dirname(args.mix)):
        sys.exit(f"--out {args.out} must be in the folder of --mix {args.mix}: its wav paths are relative to it")
    if os.path.exists(args.out):
        sys.exit(f"{args.out} exists: remove it to rebuild it")
    try:
        source_keys = {entry["key"] for entry in read_jsonl(args.source)}  # the keys as train.py reads them
    except InputError as e:
        sys.exit(f"error: {e}")
    with open(args.mix) as f:
        mix_lines = [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]
    lines, matched = upweight(mix_lines, source_keys, args.times)
    if not matched:
        sys.exit(f"no line of {args.mix} comes from {args.source}: is it a source of this mix?")
    taken, added = {json.loads(line)["key"] for line in lines}, 0
    for corpus in args.add:
        try:
            new = added_lines(corpus, os.path.dirname(os.path.abspath(args.out)), taken)
        except InputError as e:
            sys.exit(f"error: {e}")
        lines += new
        added += len(new)
    with open(args.out + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(args.out + ".tmp", args.out)
    print(f"{args.out}: {len(lines)} lines; {matched} of {len(mix_lines)} from {args.source}, each {args.times} times "
          f"({matched * args.times / len(lines):.0%} of the lines)" + (f"; {added} added from {', '.join(args.add)}" if args.add else ""))


if __name__ == "__main__":
    main()
