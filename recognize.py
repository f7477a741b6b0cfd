"""Recognize a jsonl test set (or shards: docs/shards.md) with a trained SpeechLLM into
`key<TAB>text` lines (input order).

    python recognize.py --model_dir exp/x --data_path test.jsonl --result_path result.txt \
        --batch_size 16 --num_beams 1
    torchrun --nproc_per_node=8 recognize.py ...   # each rank decodes a share; rank 0 writes the one result

Finished batches are appended to `<result_path>.partial<rank>` (flushed and fsynced), so the same
command run again after a kill decodes only the rest. The result file is written last, to a temporary
name renamed over the old file. An utterance whose audio cannot be read gets an empty line in the
result and its reason in `<result_path>.errors`. With --confidence, `<result_path>.confidence.jsonl`
holds a line per decoded utterance: {"key", "llm_logprob", "ctc_logprob", "ctc_disagreement"}.

Batches hold --batch_size utterances, or with --batch_seconds as many as fit that many seconds of
padded audio (and --batch_tokens). Decoding (decoding.decode): the LLM's greedy or beam search
under a repetition guard and a token budget from each utterance's duration; joint CTC + LLM scoring
with --ctc_decode_weight (default: the model's); --decode ctc for the CTC head alone.
"""
import argparse
import glob
import itertools
import json
import os
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from compute_wer import format_report, score
from data import (CollatorKeepingErrors, DataSpec, InputError, SpeechDataset, check_entries, count_reasons,
                  default_batch_tokens, pack_batches, read_jsonl, sequence_length, split_long)
from decoding import DecodingOptions, token_budget, transcripts
from decoding import decode as decode_batch
from hotwords import Hotwords
from model import CONFIG_NAME, SpeechLLM, SpeechLLMConfig
from shards import ShardDataset, collate_with_position, expand_shards, index_entries, is_shard_spec, read_indexes
from timestamps import Word, ctm_lines, srt, subtitle_cues, vtt


def positive_int(text: str) -> int:
    """argparse type: a count out of range stops the run here, not as a traceback once the model is loaded."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="a directory written by train.py / save_pretrained")
    p.add_argument("--data_path", required=True, help='jsonl lines {"key", "wav"[, "txt"]}, or shards: .tar files, '
                   'a comma-separated list, glob or {000..009} pattern, local or URLs')
    p.add_argument("--result_path", required=True)
    p.add_argument("--batch_size", type=positive_int, default=16)
    p.add_argument("--batch_seconds", type=positive_float, default=None,
                   help="instead of --batch_size utterances: as many as fit this many seconds of padded audio per "
                        "batch (utterances x the longest), and --batch_tokens")
    p.add_argument("--batch_tokens", type=positive_int, default=None,
                   help="with --batch_seconds: at most this many padded LLM tokens per batch (utterances x the "
                        "longest prompt + audio + token budget); default: what --batch_seconds of the longest clips take")
    p.add_argument("--num_beams", type=positive_int, default=1)
    p.add_argument("--max_new_tokens", type=positive_int, default=None,
                   help="default: each utterance's budget from its duration (the model's measured token rate)")
    p.add_argument("--decode", choices=["llm", "ctc"], default="llm",
                   help="llm: the LLM's greedy / beam search (joint with CTC if --ctc_decode_weight > 0); "
                        "ctc: the CTC head's greedy path alone")
    p.add_argument("--ctc_decode_weight", type=float, default=None,
                   help="joint CTC + LLM scoring weight in [0, 1) (default: the model's ctc_decode_weight)")
    p.add_argument("--max_repeats", type=int, default=3,
                   help="the repetition guard: at most this many copies in a row of any n-gram of tokens, or of "
                        "words compared without case and punctuation (0: off)")
    p.add_argument("--confidence", action="store_true",
                   help="also write <result_path>.confidence.jsonl: per utterance the LLM's mean token "
                        "log-prob and, with a CTC head, CTC's log-prob and disagreement (one more LLM pass)")
    p.add_argument("--timestamps", action="store_true",
                   help="also write <result_path>.ctm: every word's start, duration and confidence (Kaldi CTM), "
                        "from the CTC head's alignment of the hypothesis")
    p.add_argument("--subtitles", choices=["srt", "vtt"], default=None,
                   help="also write a subtitle file per utterance into <result_path>.subtitles/")
    p.add_argument("--hotwords", default=None,
                   help='a file of phrases to favour, one a line ("phrase" or "phrase weight"; default weight 1.5)')
    p.add_argument("--ctc_fallback", type=float, default=None,
                   help="where the LLM's hypothesis is further than this from CTC's best path (token edit distance "
                        "over that path's length), write CTC's instead (off by default)")
    p.add_argument("--chunk_seconds", type=float, default=30.0,
                   help="audio longer than this is decoded in pieces of at most this many seconds, cut at pauses, "
                        "and their texts joined (0: one prompt whatever the length)")
    p.add_argument("--instruction", default=None, help="default: the one the model was trained with")
    p.add_argument("--whisper_model_name_or_path", default=None, help="override the path in the model config")
    p.add_argument("--llm_model_name_or_path", default=None, help="override the path in the model config")
    p.add_argument("--trust_remote_code", action="store_true", help="let the LLM's repo run its own Python code")
    p.add_argument("--keep_lora_unmerged", action="store_true",
                   help="decode with the LoRA adapters beside the LLM's weights (by default they are folded into "
                        "them once at load: the same model without an extra low-rank matmul per layer and token)")
    p.add_argument("--lang", default="en", help="text normalization for scoring (compute_wer.py --lang)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        args.decoding = decoding_options(args)
    except ValueError as e:  # DecodingOptions names the field: the flag of the same name
        p.error(f"--{e}")
    if not 0 <= args.chunk_seconds < float("inf") or 0 < args.chunk_seconds < 1:
        p.error(f"--chunk_seconds must be 0 (off) or >= 1, got {args.chunk_seconds}")
    if args.batch_tokens and not args.batch_seconds:
        p.error("--batch_tokens caps --batch_seconds batches: give --batch_seconds too")
    if args.decoding.word_timestamps and is_shard_spec(args.data_path):
        p.error("--timestamps and --subtitles read jsonl input (not yet shards)")
    return args


def decoding_options(args) -> DecodingOptions:
    """The decoding flags, checked by DecodingOptions."""
    return DecodingOptions(num_beams=args.num_beams, decode=args.decode, ctc_decode_weight=args.ctc_decode_weight,
                           max_repeats=args.max_repeats, max_new_tokens=args.max_new_tokens,
                           return_confidence=args.confidence, word_timestamps=args.timestamps or bool(args.subtitles),
                           ctc_fallback=args.ctc_fallback)


def read_hotwords(path: str, tokenizer) -> Hotwords:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the hotwords file ({e})")
    try:
        return Hotwords.from_lines(lines, tokenizer, where=path)
    except ValueError as e:
        raise InputError(str(e))


def setup_distributed(device: str) -> tuple[int, int, str]:
    """-> rank, world size, this rank's device. A process group only under torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    # Ranks meet only before and after decoding: a rank may wait a long time for the slowest one.
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=24))
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    return dist.get_rank(), world_size, device


def barrier(world_size: int):
    if world_size > 1:
        dist.barrier()


def one_line(text: str) -> str:
    """The result file is one line per key: a model may emit newlines or tabs."""
    return " ".join(text.split())


def partial_paths(result_path: Path) -> list[Path]:
    """The partial files of every rank of earlier runs, whatever their world size."""
    return sorted(Path(p) for p in glob.glob(glob.escape(str(result_path)) + ".partial*"))


def read_partials(result_path: Path) -> dict[str, dict]:
    """{key: {"key", "text"[, "confidence"]} or {"key", "error"}} of what earlier runs finished. A line torn by a kill
    is not valid JSON: skipped, its utterance is decoded again."""
    records = {}
    for path in partial_paths(result_path):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            kept = records.get(record["key"], {})
            if len(record) >= len(kept):  # a re-decode that also wrote confidence or words wins
                records[record["key"]] = record
    return join_pieces(records)


def join_pieces(records: dict[str, dict]) -> dict[str, dict]:
    """The records of an entry's pieces ("KEY i/n") -> one record for KEY once all n are there: their
    texts joined, the first error if any failed, confidences averaged. Pieces of an entry not yet
    complete (a killed run) are dropped: the entry is decoded again."""
    pieces = {}  # (key, n) -> {i: record}
    joined = {}
    for key, record in records.items():
        if " " in key:
            parent, position = key.split(" ")
            i, n = map(int, position.split("/"))
            pieces.setdefault((parent, n), {})[i] = record
        else:
            joined[key] = record
    for (key, n), parts in pieces.items():
        if len(parts) < n:
            continue
        parts = [parts[i] for i in range(n)]
        if errors := [p["error"] for p in parts if "error" in p]:
            joined[key] = dict(key=key, error=errors[0])
            continue
        joined[key] = dict(key=key, text=" ".join(p["text"] for p in parts if p["text"]))
        if all("confidence" in p for p in parts):
            joined[key]["confidence"] = {name: sum(p["confidence"][name] for p in parts) / n
                                         for name in parts[0]["confidence"]}
        if all("words" in p for p in parts):  # each piece's word times from its own start: from the entry's
            offsets = itertools.accumulate([0.0] + [p["seconds"] for p in parts])
            joined[key]["words"] = [[text, round(start + offset, 3), round(end + offset, 3), *confidences]
                                    for p, offset in zip(parts, offsets) for text, start, end, *confidences in p["words"]]
    return joined


def open_partial(path: Path):
    """Append mode; a line torn by a kill is ended first, else the next record would be glued to it."""
    torn = path.exists() and path.stat().st_size > 0 and path.read_bytes()[-1:] != b"\n"
    f = open(path, "a", encoding="utf-8")
    if torn:
        f.write("\n")
    return f


def append_records(f, records: list[dict]):
    """A batch is on disk before the next one starts: a kill loses at most the batch in flight."""
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())


def write_atomically(path: Path, lines: list[str]):
    """Written under a temporary name, then renamed over `path`: a crash leaves the old file or the new
    one in place, never half of one."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def decode(model, entries: list[dict], args, device: str, rank: int, world_size: int, partial: Path,
           shards: list[str] | None = None):
    """Decode this rank's share of `entries` (longest first), appending each batch's records to `partial`."""
    spec = model.data_spec()
    if shards:
        loader, total = shard_batches(spec, model.config, shards, {e["key"] for e in entries}, args, rank, world_size), None
    else:
        # Longest first: batches of similar length waste little padding, and memory peaks at once. Whole
        # batches go round-robin to the ranks: a batch is the same whatever the world size, and so is its text.
        entries = sorted([piece for e in entries for piece in split_long(e, args.chunk_seconds)],
                         key=lambda e: -e["duration"])
        seconds = {e["key"]: e["duration"] for e in entries}
        dataset = SpeechDataset(entries, spec.n_mels, spec.instruction, spec.pad_to_30s)  # on_error None: keep errors
        batches = decoding_batches(spec, model.config, entries, args)[rank::world_size]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=CollatorKeepingErrors(spec),
                                             num_workers=1)
        total = sum(map(len, batches))
    with open_partial(partial) as f, tqdm(total=total, unit="utt", disable=rank != 0) as progress:
        for keys, batch, errors in loader:
            records = []
            if batch is not None:
                batch = {k: v.to(device) for k, v in batch.items()}
                out = decode_batch(model, batch, args.decoding)
                ids, details = out if isinstance(out, tuple) else (out, [{} for _ in keys])
                records = [dict(key=k, text=one_line(t)) for k, t in zip(keys, transcripts(model, ids))]
                for record, detail in zip(records, details):
                    if words := detail.pop("words", None):
                        record["words"] = [[w.text, w.start, w.end, round(w.ctc_confidence, 4), round(w.llm_confidence, 4)]
                                           for w in words]
                        record["seconds"] = seconds[record["key"]]  # where the next piece starts
                    if detail:
                        record["confidence"] = detail
            append_records(f, records + [dict(key=k, error=reason) for k, reason in errors.items()])
            progress.update(len(keys) + len(errors))


def shard_batches(spec: DataSpec, config: SpeechLLMConfig, shards: list[str], todo: set[str], args, rank: int, world_size: int):
    """(keys, batch, errors) of this rank's shards (shards rank, rank + world_size, ...), streamed in
    their order, grouped by duration within each buffer; only the utterances in `todo`."""
    def count_tokens(entry):  # for --batch_tokens; never a reason to skip
        entry["num_tokens"] = decoding_tokens(spec, config, entry, args)

    dataset = ShardDataset(shards, spec.n_mels, spec.instruction, spec.pad_to_30s,
                           batch_size=args.batch_size, batch_seconds=args.batch_seconds, batch_tokens=args.batch_tokens,
                           shuffle=False, epochs=1, rank=rank, world_size=world_size, keys=todo,
                           chunk_seconds=args.chunk_seconds, check=count_tokens)
    collate = CollatorKeepingErrors(spec)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1,
                                         collate_fn=lambda batch: collate_with_position(collate, batch))
    return (batch for batch, _ in loader)


def decoding_tokens(spec: DataSpec, config: SpeechLLMConfig, entry: dict, args) -> int:
    """The LLM sequence an utterance may grow to: its prompt with its audio tokens and its token budget
    (from the model's config)."""
    return sequence_length(entry, spec, None) + token_budget(config, args.decoding, entry["duration"])


def decoding_batches(spec: DataSpec, config: SpeechLLMConfig, entries: list[dict], args) -> list[list[int]]:
    """Consecutive indices of `entries` (longest first): --batch_size at a time, or with --batch_seconds
    as many as fit its padded seconds and --batch_tokens (the LLM sequence being the prompt with its
    audio tokens and the utterance's token budget: what the KV cache grows to)."""
    if not entries:
        return []
    if not args.batch_seconds:
        return [list(range(i, min(i + args.batch_size, len(entries)))) for i in range(0, len(entries), args.batch_size)]
    seconds = [e["duration"] for e in entries]
    tokens = [decoding_tokens(spec, config, e, args) for e in entries]
    max_tokens = args.batch_tokens or default_batch_tokens(seconds, tokens, args.batch_seconds)
    return pack_batches(list(range(len(entries))), seconds, tokens, args.batch_seconds, max_tokens)


def write_results(result_path: Path, entries: list[dict], problems: list[dict], confidence: bool = False,
                  timestamps: bool = False, subtitles: str | None = None) -> tuple[dict, dict]:
    """Merge every partial file and the check pass's problems into the result and errors files (input
    order), and with `confidence` the confidence file (a line per decoded utterance), with `timestamps`
    the CTM file (a line per word), with `subtitles` a subtitle file per decoded utterance, then delete
    the partials. -> hyps, errors (keys -> text / reason)."""
    records = read_partials(result_path)
    hyps = {key: r["text"] for key, r in records.items() if "text" in r}
    errors = {p["key"]: p["reason"] for p in problems} | {key: r["error"] for key, r in records.items() if "error" in r}
    missing = [e["key"] for e in entries if e["key"] not in hyps and e["key"] not in errors]
    if missing:  # a bug, not bad input: never write an incomplete result
        raise RuntimeError(f"no result for {len(missing)} keys, e.g. {missing[:5]}")
    write_atomically(result_path, [f"{e['key']}\t{hyps.get(e['key'], '')}\n" for e in entries])
    write_atomically(Path(f"{result_path}.errors"), [f"{e['key']}\t{errors[e['key']]}\n" for e in entries
                                                     if e["key"] in errors])
    if confidence:
        write_atomically(Path(f"{result_path}.confidence.jsonl"), [
            json.dumps(dict(key=e["key"]) | records[e["key"]]["confidence"], ensure_ascii=False) + "\n"
            for e in entries if e["key"] in hyps])
    words = {key: [Word(*w) for w in r["words"]] for key, r in records.items() if "words" in r}
    if timestamps:
        write_atomically(Path(f"{result_path}.ctm"), [line for e in entries if e["key"] in hyps
                                                      for line in ctm_lines(e["key"], words[e["key"]])])
    if subtitles:
        folder = Path(f"{result_path}.subtitles")
        folder.mkdir(exist_ok=True)
        for e in entries:
            if e["key"] in hyps:
                cues = subtitle_cues(words[e["key"]])
                write_atomically(folder / f"{e['key'].replace('/', '_')}.{subtitles}", [srt(cues) if subtitles == "srt" else vtt(cues)])
    for path in partial_paths(result_path):
        path.unlink()
    return {e["key"]: hyps.get(e["key"], "") for e in entries}, errors


def main(argv=None):
    args = parse_args(argv)
    # a malformed line (or a shard's missing index) stops the run before the model is loaded
    shards = expand_shards(args.data_path) if is_shard_spec(args.data_path) else None
    entries = index_entries(shards, read_indexes(shards)) if shards else read_jsonl(args.data_path)
    result_path = Path(args.result_path)
    if result_path.is_dir():
        raise InputError(f"{result_path}: --result_path is a directory; name the file to write")
    try:  # a new folder for the results is made, before the model is loaded rather than after
        result_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{result_path}: cannot make its folder ({e})") from e
    if not (Path(args.model_dir) / CONFIG_NAME).is_file():
        raise InputError(f"{args.model_dir}: not a model directory (no {CONFIG_NAME}; train.py writes one)")
    rank, world_size, device = setup_distributed(args.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = SpeechLLM.from_pretrained(args.model_dir, dtype, trust_remote_code=args.trust_remote_code,
                                      whisper_model=args.whisper_model_name_or_path,
                                      llm_model=args.llm_model_name_or_path,
                                      merge_lora=not args.keep_lora_unmerged).to(device)
    if args.instruction:
        model.config.instruction = args.instruction
    if args.hotwords:
        args.decoding = replace(args.decoding, hotwords=read_hotwords(args.hotwords, model.tokenizer))
    # shards: the index holds the durations; unusable audio is reported as it is decoded
    usable, problems = (entries, []) if shards else check_entries(entries, None, for_training=False)

    done = read_partials(result_path)
    # utterances an earlier run decoded without the confidence or words asked for now are decoded again
    wanted = ["confidence"] * args.confidence + ["words"] * args.decoding.word_timestamps
    done = {key: r for key, r in done.items() if "error" in r or all(name in r for name in wanted)}
    barrier(world_size)  # every rank has read the same partials before any rank appends to them
    todo = [e for e in usable if e["key"] not in done]
    start = time.perf_counter()
    decode(model, todo, args, device, rank, world_size, Path(f"{result_path}.partial{rank}"), shards)
    barrier(world_size)  # every share is on disk
    elapsed = time.perf_counter() - start
    if rank != 0:
        return None

    hyps, errors = write_results(result_path, entries, problems, args.confidence, args.timestamps, args.subtitles)
    audio_seconds = sum(e["duration"] for e in todo)
    print(f"{len(todo)} utterances, {audio_seconds:.1f} s of audio in {elapsed:.1f} s: "
          f"{len(todo) / elapsed:.2f} utt/s, RTF {elapsed / max(audio_seconds, 1e-9):.4f}")
    if done:
        print(f"{len([e for e in entries if e['key'] in done])} utterances were decoded by an earlier run (resumed)")
    print(f"{len(errors)} of {len(entries)} utterances failed" + (
        f" ({count_reasons(errors.values())}): empty lines in {result_path}, reasons in {result_path}.errors"
        if errors else ""))
    refs = {e["key"]: e["txt"] for e in entries if isinstance(e.get("txt"), str)}
    if refs:  # the same scoring as compute_wer.py
        print(format_report(score(refs, hyps, args.lang)))
    return hyps


if __name__ == "__main__":
    try:
        main()
    except InputError as e:  # the message names file:line; a traceback would only hide it
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():  # live gloo threads can abort the interpreter's exit
            dist.destroy_process_group()
