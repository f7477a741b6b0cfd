"""Whisper's own decoder on a jsonl test set: the baseline a SpeechLLM is compared with.

    python tools/whisper_baseline.py --data_path corpus/dev.jsonl --result_path exp/whisper_greedy.txt
    python tools/whisper_baseline.py --data_path corpus/dev.jsonl --result_path exp/whisper_beam5.txt --beam_size 5

Runs openai-whisper's `transcribe` (fp32, temperature 0, no fallback) one clip at a time, as a
user would, on the same audio loading as our model; writes `key<TAB>text` and prints utt/s, the
real-time factor and the WER, scored exactly as recognize.py scores.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compute_wer import format_report, score  # noqa: E402
from audio import SAMPLE_RATE, load_entry_audio  # noqa: E402
from data import read_jsonl  # noqa: E402
from model import load_whisper  # noqa: E402


def whisper_transcribe(whisper_model, samples, beam_size: int | None = None, language: str | None = "en") -> str:
    """Whisper's own decoding of one 16 kHz clip, as a user runs it: temperature 0 without fallback,
    fp32, in the given language (None: a multilingual model detects it); the text on one line."""
    result = whisper_model.transcribe(samples, language=language, temperature=0.0, fp16=False, beam_size=beam_size,
                                      condition_on_previous_text=False)
    return " ".join(result["text"].split())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True)
    p.add_argument("--result_path", required=True)
    p.add_argument("--whisper_model", default="bundled:whisper-tiny.en")
    p.add_argument("--beam_size", type=int, default=None, help="default: greedy")
    p.add_argument("--language", default="en", help="what a user of English speech sets; 'detect': a "
                   "multilingual model guesses it per clip (an .en model is English only)")
    args = p.parse_args(argv)

    model = load_whisper(args.whisper_model).eval()
    language = None if args.language == "detect" else args.language
    if language not in (None, "en") and not model.is_multilingual:
        raise SystemExit(f"{args.whisper_model} is English only: --language {args.language}")
    entries = read_jsonl(args.data_path)
    Path(args.result_path).parent.mkdir(parents=True, exist_ok=True)  # now, not after decoding them all
    hyps, audio_seconds = {}, 0.0
    start = time.perf_counter()
    for entry in entries:
        samples = load_entry_audio(entry)
        audio_seconds += len(samples) / SAMPLE_RATE
        hyps[entry["key"]] = whisper_transcribe(model, samples, args.beam_size, language)
    elapsed = time.perf_counter() - start

    Path(args.result_path).write_text("".join(f"{e['key']}\t{hyps[e['key']]}\n" for e in entries), encoding="utf-8")
    print(f"{len(entries)} utterances, {audio_seconds:.1f} s of audio in {elapsed:.1f} s: "
          f"{len(entries) / elapsed:.2f} utt/s, RTF {elapsed / max(audio_seconds, 1e-9):.4f}")
    print(format_report(score({e["key"]: e["txt"] for e in entries}, hyps)))


if __name__ == "__main__":
    main()
