"""Recognize a jsonl test set with a trained SpeechLLM into `key<TAB>text` lines (input order).

    python recognize.py --model_dir exp/x --data_path test.jsonl --result_path result.txt \
        --batch_size 16 --num_beams 1
"""
import argparse
import time

import torch
from tqdm import tqdm

from compute_wer import format_report, score
from data import Collator, SpeechDataset, audio_duration, read_jsonl
from model import SpeechLLM


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="a directory written by train.py / save_pretrained")
    p.add_argument("--data_path", required=True, help='jsonl lines {"key", "wav"[, "txt"]}')
    p.add_argument("--result_path", required=True)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: bounded by the audio length")
    p.add_argument("--instruction", default=None, help="default: the one the model was trained with")
    p.add_argument("--whisper_model_name_or_path", default=None, help="override the path in the model config")
    p.add_argument("--llm_model_name_or_path", default=None, help="override the path in the model config")
    p.add_argument("--lang", default="en", help="text normalization for scoring (compute_wer.py --lang)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def one_line(text: str) -> str:
    """The result file is one line per key: a model may emit newlines or tabs."""
    return " ".join(text.split())


def main(argv=None):
    args = parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = SpeechLLM.from_pretrained(args.model_dir, dtype, whisper_model=args.whisper_model_name_or_path,
                                      llm_model=args.llm_model_name_or_path).to(args.device)
    if args.instruction:
        model.config.instruction = args.instruction
    entries = read_jsonl(args.data_path)
    dataset = SpeechDataset(entries, model.n_mels, model.config.instruction, model.config.pad_to_30s)
    durations = [audio_duration(e) for e in entries]
    # Longest first: batches of similar length waste little padding, and memory peaks at once.
    order = sorted(range(len(entries)), key=lambda i: -durations[i])
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=Collator(model, inference=True),
                                         num_workers=1)

    hyps = {}
    start = time.perf_counter()
    with tqdm(total=len(entries), unit="utt") as progress:
        for indices, batch in zip(batches, loader):
            batch = {k: v.to(args.device) for k, v in batch.items()}
            texts = model.generate(**batch, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
            for i, text in zip(indices, texts):
                hyps[entries[i]["key"]] = one_line(text)
            progress.update(len(indices))
    elapsed = time.perf_counter() - start

    with open(args.result_path, "w", encoding="utf-8") as f:
        for entry in entries:
            f.write(f"{entry['key']}\t{hyps[entry['key']]}\n")
    audio_seconds = sum(durations)
    print(f"{len(entries)} utterances, {audio_seconds:.1f} s of audio in {elapsed:.1f} s: "
          f"{len(entries) / elapsed:.2f} utt/s, RTF {elapsed / max(audio_seconds, 1e-9):.4f}")
    refs = {e["key"]: e["txt"] for e in entries if isinstance(e.get("txt"), str)}
    if refs:  # the same scoring as compute_wer.py
        print(format_report(score(refs, hyps, args.lang)))
    return hyps


if __name__ == "__main__":
    main()
