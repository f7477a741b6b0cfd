"""Which words a model misreads, by how often its training transcripts say them: each reference word
of a dev set is binned by its count in the training text (normalized as compute_wer.py scores), and a
bin's error rate is the share of its words substituted or deleted (insertions belong to no
reference word and are left out).

    python recipes/game_speech/word_hearings.py --train corpus/mix5/train.jsonl --refs corpus/ood_text/dev.jsonl \
        --results exp/sweep_stage12_int8/ood_text_dev.joint_0.5.txt exp/whisper_greedy_ood_text.txt

Prints one row per result file: the WER, then each bin's words and their error rate.
"""
import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from compute_wer import ScoreResult, read_hypotheses, read_references, score, tokenize  # noqa: E402

BIN_EDGES = (1, 10, 100)  # bins: never, 1-9, 10-99, 100+ times


def hearings(train_paths: list[str]) -> collections.Counter:
    """How often the training transcripts (jsonl "txt") say each normalized word."""
    return collections.Counter(w for path in train_paths for line in open(path, encoding="utf-8") if line.strip()
                               for w in tokenize(json.loads(line)["txt"]))


def bin_labels(edges=BIN_EDGES) -> list[str]:
    bounds = (0, *edges)
    return [f"{lo}-{hi - 1}" if hi - lo > 1 else str(lo) for lo, hi in zip(bounds, edges)] + [f"{edges[-1]}+"]


def errors_by_hearings(result: ScoreResult, heard: collections.Counter, edges=BIN_EDGES) -> list[tuple[int, int]]:
    """A scored result (compute_wer.score) -> [(reference words, of them substituted or deleted)] per
    bin of training count (bin_labels)."""
    bins = [[0, 0] for _ in range(len(edges) + 1)]
    for utt in result.utterances:
        for op, ref_word, _ in utt.alignment:
            if op == "I":
                continue
            b = bins[sum(heard[ref_word] >= edge for edge in edges)]
            b[0] += 1
            b[1] += op != "C"
    return [tuple(b) for b in bins]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", nargs="+", required=True, help="the training jsonl files")
    p.add_argument("--refs", required=True, help="the dev set (jsonl or Kaldi text)")
    p.add_argument("--results", nargs="+", required=True, help="key<TAB>text result files")
    args = p.parse_args(argv)
    heard, refs = hearings(args.train), read_references(args.refs)
    print("| result | WER | " + " | ".join(f"heard {label}: words, error %" for label in bin_labels()) + " |")
    print("|---|---|" + "---|" * (len(BIN_EDGES) + 1))
    for path in args.results:
        result = score(refs, read_hypotheses(path))
        cells = " | ".join(f"{words}, {100 * errors / max(words, 1):.1f}" for words, errors in errors_by_hearings(result, heard))
        print(f"| {path} | {result.error_rate:.2f} | {cells} |")


if __name__ == "__main__":
    main()
