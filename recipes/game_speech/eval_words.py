"""Measures issue 34's word-level features on a real model: word timestamps at clip boundaries, word
confidence, hotword biasing and the CTC fallback (README "Word timestamps, confidence, hotwords, fallback").

    M=pretrained/whisper-tiny.en_smollm2-135m
    python recipes/game_speech/eval_words.py boundaries --model_dir $M --data_path examples/examples.jsonl
    python recipes/game_speech/eval_words.py confidence --model_dir $M --data_path DEV --out exp/words/real
    python recipes/game_speech/eval_words.py subset --data_path DEV --hotwords LIST --out NAMES.jsonl
    python recipes/game_speech/eval_words.py hotwords --data_path NAMES.jsonl --hotwords LIST --results A.txt B.txt
    python recipes/game_speech/eval_words.py fallback --data_path DEV --out exp/words/real --ctc CTC.txt \
        --thresholds 0.5 0.8 1.2 [--check 0.8=FALLBACK.txt]

boundaries: the clips joined by --gap seconds of silence into one recording, decoded as transcribe()
does (pieces of at most 30 s); per clip, the first word's start against its speech onset and the last
word's end against its offset (frames of 10 ms above --threshold_db below the clip's loudest), the ends
with timestamps.END_EXTENSION and with each of --end_extensions (one decoding).
confidence: decodes DEV with recognize.py's own decoding (--confidence --timestamps; writes OUT.txt,
OUT.txt.ctm, OUT.txt.confidence.jsonl and OUT.words.jsonl, the words with CTC and LLM confidence) and
reports the AUC of each confidence for correct against substituted/inserted words.
hotwords: recall of the listed words (their reference occurrences aligned to the same hypothesis word),
WER and insertions of each result file. fallback: recognize.py --ctc_fallback T replaces a hypothesis
whose ctc_disagreement is > T by CTC's best path (`--decode ctc`), so every threshold follows from one
decoding with --confidence and one CTC decoding; --check T=FILE compares with a real --ctc_fallback run.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import recognize  # noqa: E402
import timestamps  # noqa: E402
from audio import long_audio_pieces  # noqa: E402
from compute_wer import Utterance, align, read_hypotheses, score, tokenize  # noqa: E402
from data import SAMPLE_RATE, check_entries, load_entry_audio, read_jsonl  # noqa: E402
from model import SpeechLLM  # noqa: E402

FRAME = SAMPLE_RATE // 100  # 10 ms


def load_model(model_dir):
    return SpeechLLM.from_pretrained(model_dir, torch.float32, merge_lora=True).eval()


def references(data_path) -> dict[str, str]:
    return {e["key"]: e["txt"] for e in read_jsonl(data_path)}


def speech_span(samples: np.ndarray, threshold_db: float) -> tuple[float, float]:
    """(onset, offset) in seconds: the first and last 10 ms frame within threshold_db of the loudest."""
    frames = samples[: len(samples) // FRAME * FRAME].reshape(-1, FRAME)
    level = 10 * np.log10((frames.astype(np.float64) ** 2).mean(1) + 1e-12)
    loud = np.flatnonzero(level >= level.max() - threshold_db)
    return loud[0] * FRAME / SAMPLE_RATE, (loud[-1] + 1) * FRAME / SAMPLE_RATE


def boundaries(args):
    entries = read_jsonl(args.data_path)[: args.limit]
    gap = np.zeros(round(args.gap * SAMPLE_RATE), dtype=np.float32)
    parts, clips, t = [], [], 0.0  # clips: (key, start, end, onset, offset) in recording time
    for e in entries:
        samples = load_entry_audio(e)
        onset, offset = speech_span(samples, args.threshold_db)
        end = t + len(samples) / SAMPLE_RATE
        clips.append((e["key"], t, end, t + onset, t + offset))
        parts += [samples, gap]
        t = end + args.gap
    recording = np.concatenate(parts[:-1])
    # decoded once with each word ending at its last token's CTC spike; every end extension from that
    shipped, timestamps.END_EXTENSION = timestamps.END_EXTENSION, 0.0
    try:
        spikes = load_model(args.model_dir).transcribe(recording, word_timestamps=True)[0]["words"]
    finally:
        timestamps.END_EXTENSION = shipped
    pieces = [(a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b in long_audio_pieces(recording, 30.0)]  # as transcribe cuts

    def extended(extension):  # as words_from_tokens extends them, within each piece
        return [w for a, b in pieces for w in timestamps.extend_ends([w for w in spikes if a <= w.start < b], extension, b)]

    for extension in sorted(set(args.end_extensions) - {shipped}):
        starts, ends, _ = clip_errors(clips, extended(extension), args.gap)
        print(f"end extension {extension:.2f} s: " + summary("last word end - offset", ends))
    words = extended(shipped)
    starts, ends, in_gaps = clip_errors(clips, words, args.gap, verbose=True)
    print(f"\n{len(clips)} clips, {len(recording) / SAMPLE_RATE:.1f} s, {len(words)} words; "
          f"{len(clips) - len(starts)} clips without a word; end extension {shipped} s (timestamps.END_EXTENSION)")
    print(summary("first word start - onset", starts))
    print(summary("last word end - offset", ends))
    print(f"words in the silences between clips: {len(in_gaps)} {[(w.text, w.start, w.end) for w in in_gaps]}")


def clip_errors(clips, words, gap, verbose=False):
    """-> per clip with a word, its first word's start - its onset and its last word's end - its offset;
    the words within the inserted silences, touching no clip."""
    starts, ends = [], []
    for key, start, end, onset, offset in clips:
        # a clip's words: those whose middle lies within it or within half the silence on either side
        lo, hi = start - gap / 2, end + gap / 2
        mine = [w for w in words if lo <= (w.start + w.end) / 2 < hi]
        if mine:
            starts.append(mine[0].start - onset)
            ends.append(mine[-1].end - offset)
        if verbose:
            print(f"{key}: onset {onset:.2f} first word {mine[0].start if mine else float('nan'):.2f}, offset {offset:.2f} "
                  f"last word {mine[-1].end if mine else float('nan'):.2f}: {' '.join(w.text for w in mine)}")
    in_gaps = [w for w in words if not any(w.end > start and w.start < end for _, start, end, _, _ in clips)]
    return starts, ends, in_gaps


def summary(name, errors) -> str:
    e = np.array(errors)
    return (f"{name}: median {np.median(e):+.3f} s, mean {e.mean():+.3f} s, mean |error| {np.abs(e).mean():.3f} s, "
            f"within 0.1 s {np.mean(np.abs(e) <= 0.1 + 1e-9):.0%}, within 0.2 s {np.mean(np.abs(e) <= 0.2 + 1e-9):.0%}")


def decode_with_words(args) -> dict[str, dict]:
    """recognize.py --confidence --timestamps on DEV, keeping what its CTM leaves out: each word's CTC
    and LLM confidence (OUT.words.jsonl); the result, CTM and confidence files as recognize.py writes them."""
    words_path = Path(f"{args.out}.words.jsonl")
    if words_path.exists():
        return {r["key"]: r for r in map(json.loads, words_path.read_text().splitlines())}
    result = f"{args.out}.txt"
    rargs = recognize.parse_args(["--model_dir", args.model_dir, "--data_path", args.data_path, "--result_path",
                                  result, "--confidence", "--timestamps", "--device", "cpu"])
    model = load_model(args.model_dir)
    entries = read_jsonl(args.data_path)
    usable, problems = check_entries(entries, None, for_training=False)
    done = recognize.read_partials(Path(result))
    recognize.decode(model, [e for e in usable if e["key"] not in done], rargs, "cpu", 0, 1, Path(f"{result}.partial0"))
    records = recognize.read_partials(Path(result))
    words_path.write_text("".join(json.dumps(records[e["key"]]) + "\n" for e in entries if e["key"] in records))
    recognize.write_results(Path(result), entries, problems, confidence=True, timestamps=True)
    return records


def word_labels(ref: str, words: list[str]) -> list[bool | None]:
    """Per hypothesis word: True when all its normalized tokens align to equal reference words, False
    when any is substituted or inserted, None when it normalizes to nothing."""
    owner = [i for i, w in enumerate(words) for _ in tokenize(w)]  # the word each normalized token came from
    utt = align(Utterance("", tokenize(ref), [t for w in words for t in tokenize(w)]))
    ops = [op for op, _, _ in utt.alignment if op != "D"]  # one per hypothesis token, in order
    labels = [None] * len(words)
    for i, op in zip(owner, ops):
        labels[i] = (labels[i] is not False) and op == "C"
    return labels


def auc(scores, positive) -> float:
    """Mann-Whitney: the chance that a positive scores above a negative (ties count half)."""
    scores, positive = np.asarray(scores), np.asarray(positive, dtype=bool)
    ranks = rankdata(scores)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def confidence(args):
    records, refs = decode_with_words(args), references(args.data_path)
    print(score(refs, {k: r.get("text", "") for k, r in records.items()}).summary_line())
    rows = []  # (correct, ctc, llm)
    for key, r in records.items():
        words = r.get("words", [])
        for (text, _, _, ctc, llm), ok in zip(words, word_labels(refs[key], [w[0] for w in words])):
            if ok is not None:
                rows.append((ok, ctc, llm))
    ok, ctc, llm = map(np.array, zip(*rows))
    print(f"{len(rows)} hypothesis words: {ok.sum()} correct, {(~ok).sum()} substituted or inserted")
    for name, values in (("confidence (CTC x LLM)", ctc * llm), ("CTC only", ctc), ("LLM only", llm)):
        print(f"AUC {name}: {auc(values, ok):.3f}  (mean correct {values[ok].mean():.3f}, wrong {values[~ok].mean():.3f})")


def report(name, refs, hyps, hotwords=None):
    result = score(refs, hyps)
    line = f"{name}: {result.summary_line()}"
    if hotwords:
        said = [(op, r, h) for u in result.utterances for op, r, h in u.alignment if r in hotwords]
        heard = sum(op == "C" for op, _, _ in said)
        false = sum(h in hotwords and op != "C" for u in result.utterances for op, _, h in u.alignment)
        line += (f"; listed words said {len(said)}, recognized {heard} (recall {heard / max(len(said), 1):.1%}), "
                 f"written where not said {false}")
    print(line)


def hotwords(args):
    refs = references(args.data_path)
    listed = {t for line in Path(args.hotwords).read_text().splitlines() if line.strip() for t in tokenize(line)}
    for path in args.results:
        report(path, refs, read_hypotheses(path), listed)


def fallback(args):
    refs, decoded = references(args.data_path), decode_with_words(args)
    ctc, checks = read_hypotheses(args.ctc), dict(c.split("=", 1) for c in args.check)
    report("off", refs, {k: r.get("text", "") for k, r in decoded.items()})
    report("CTC alone", refs, ctc)
    for t in args.thresholds:
        far = {k for k, r in decoded.items() if r.get("confidence", {}).get("ctc_disagreement", 0) > t}
        hyps = {k: ctc[k] if k in far else r.get("text", "") for k, r in decoded.items()}
        report(f"--ctc_fallback {t}: {len(far)} of {len(decoded)} utterances to CTC", refs, hyps)
        if str(t) in checks:
            real = read_hypotheses(checks[str(t)])
            same = sum(" ".join(hyps[k].split()) == text for k, text in real.items())
            print(f"  {checks[str(t)]}: {same} of its {len(real)} lines equal")


def subset(args):
    entries = read_jsonl(args.data_path)[:: args.every]
    if args.hotwords:
        listed = {t for line in Path(args.hotwords).read_text().splitlines() for t in tokenize(line)}
        entries = [e for e in entries if listed & set(tokenize(e["txt"]))]
    Path(args.out).write_text("".join(json.dumps({k: e[k] for k in ("key", "wav", "txt", "duration")}) + "\n"
                                      for e in entries))
    print(f"{args.out}: {len(entries)} clips, {sum(e['duration'] for e in entries):.0f} s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("boundaries")
    b.add_argument("--model_dir", required=True)
    b.add_argument("--data_path", required=True)
    b.add_argument("--limit", type=int, default=None, help="the first N clips")
    b.add_argument("--gap", type=float, default=1.0, help="seconds of silence between clips")
    b.add_argument("--threshold_db", type=float, default=35.0, help="speech: 10 ms frames within this of the loudest")
    b.add_argument("--end_extensions", type=float, nargs="*", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                   help="seconds past the last CTC spike: word ends measured with each (and the shipped one)")
    for name in ("confidence", "fallback"):
        c = sub.add_parser(name)
        c.add_argument("--model_dir", default="pretrained/whisper-tiny.en_smollm2-135m")
        c.add_argument("--data_path", required=True)
        c.add_argument("--out", required=True, help="decoded once: OUT.txt, OUT.words.jsonl, ...")
    f = sub.choices["fallback"]
    f.add_argument("--ctc", required=True, help="recognize.py --decode ctc's result on DATA_PATH")
    f.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.8, 1.2])
    f.add_argument("--check", nargs="*", default=[], help="T=FILE: recognize.py --ctc_fallback T's result")
    h = sub.add_parser("hotwords")
    h.add_argument("--data_path", required=True)
    h.add_argument("--hotwords", required=True, help="the list whose recall is measured")
    h.add_argument("--results", nargs="+", default=[])
    s = sub.add_parser("subset", help="a jsonl of some clips of DATA_PATH (absolute wav paths)")
    s.add_argument("--data_path", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--every", type=int, default=1, help="every Nth clip")
    s.add_argument("--hotwords", help="only the clips whose reference holds a word of this list")
    args = p.parse_args(argv)
    {"boundaries": boundaries, "confidence": confidence, "hotwords": hotwords, "fallback": fallback,
     "subset": subset}[args.command](args)


if __name__ == "__main__":
    main()
