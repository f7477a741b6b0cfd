"""Sharded data (shards.py): tools/prepare_data.py shard, the index, the streamed dataset (ranks,
workers, shuffling, duration batches, exact resume, bad samples), reading over a real HTTP server on
127.0.0.1 with a connection dropped mid-shard and over an S3 server (moto), and train.py /
recognize.py on shards."""
import io
import json
import os
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from conftest import ROOT, write_corpus
from helpers.bad_audio import write_damaged_flac
from helpers.range_server import serve

sys.path.insert(0, str(ROOT / "tools"))

import prepare_data  # noqa: E402
from audio import load_audio  # noqa: E402
from data import InputError  # noqa: E402
from shards import (ShardDataset, TrackedLoader, expand_shards, index_entries, index_name, read_indexes,  # noqa: E402
                    read_samples)

DURATIONS = [0.5, 1.7, 0.8, 2.5, 1.1, 0.6, 2.0, 1.4, 0.9, 1.2, 3.0, 0.7, 1.9, 1.0]


@pytest.fixture()
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "clips", [f"text {i}" for i in range(len(DURATIONS))], DURATIONS)


def make_shards(corpus: Path, out: Path, *extra) -> list[str]:
    prepare_data.main(["shard", str(corpus), str(out), "--max_count", "3", *extra])
    return expand_shards(f"{out}/shard-*.tar")


def keys_of(batches) -> list[list[str]]:
    return [[item["key"] for item in items] for items, _ in batches]


def contents(batches) -> list[list[tuple[str, float]]]:
    """Each batch's (key, sum of its log-mel): equal only if every byte of the audio arrived."""
    return [[(item["key"], float(item["mel"].sum())) for item in items] for items, _ in batches]


def dataset(shards, **kwargs) -> ShardDataset:
    return ShardDataset(shards, 80, "Transcribe.", **dict(dict(batch_seconds=3.0, buffer_size=4, seed=1), **kwargs))


# ----------------------------------------------------------------------------------------
# Writing


def test_shard_tool_writes_shards_of_n_utterances_with_an_index(corpus, tmp_path, capsys):
    shards = make_shards(corpus, tmp_path / "shards")
    assert len(shards) == 5 and f"wrote 14 utterances to 5 shards" in capsys.readouterr().out
    entries = index_entries(shards, read_indexes(shards))
    assert [e["key"] for e in entries] == [f"utt{i}" for i in range(14)]  # input order
    assert [e["duration"] for e in entries] == DURATIONS and entries[3]["txt"] == "text 3"
    # FLAC at 16 bits: the audio the model gets, within 16-bit rounding
    first = dict(read_samples(shards[1]))
    offset, sample = next(iter(first.items()))
    meta = json.loads(sample["json"])
    assert meta == {"key": "utt3", "txt": "text 3", "duration": 2.5} and set(sample) == {"__key__", "flac", "json"}
    assert np.abs(load_audio(io.BytesIO(sample["flac"])) - load_audio(corpus.parent / "utt3.wav")).max() < 1e-4
    # the index's offsets give random access: reading from one starts at that sample
    offsets = json.loads(Path(index_name(shards[1])).read_text())["offsets"]
    assert [o for o, _ in read_samples(shards[1], offsets[2])] == [offsets[2]]
    # the same input makes the same bytes; an existing set is kept without --force
    before = Path(shards[0]).read_bytes()
    with pytest.raises(InputError, match="already holds shards"):
        make_shards(corpus, tmp_path / "shards")
    make_shards(corpus, tmp_path / "shards", "--force")
    assert Path(shards[0]).read_bytes() == before


def test_shard_tool_by_size_original_bytes_segments_and_skips(corpus, tmp_path, capsys):
    with open(corpus, "a") as f:  # a segment, a missing file, a file of no audio
        f.write(json.dumps({"key": "seg", "wav": "utt3.wav", "start": 0.5, "end": 1.5, "txt": "s"}) + "\n")
        f.write(json.dumps({"key": "gone", "wav": "gone.wav", "txt": "x"}) + "\n")
    (corpus.parent / "junk.wav").write_bytes(b"RIFF" + bytes(100))
    with open(corpus, "a") as f:
        f.write(json.dumps({"key": "junk", "wav": "junk.wav", "txt": "x"}) + "\n")
    shards = make_shards(corpus, tmp_path / "shards", "--max_count", "100", "--max_mb", "0.1", "--audio", "original")
    assert "skipped 2: 1 missing, 1 unreadable" in capsys.readouterr().out
    samples = [sample for shard in shards for _, sample in read_samples(shard)]
    assert all(os.path.getsize(s) < 0.1 * 2**20 + 100_000 for s in shards) and len(shards) > 2
    by_key = {json.loads(s["json"])["key"]: s for s in samples}
    assert by_key["utt3"]["wav"] == (corpus.parent / "utt3.wav").read_bytes()  # the original bytes
    assert "flac" in by_key["seg"] and json.loads(by_key["seg"]["json"])["duration"] == 1.0  # a segment: cut


def test_shard_tool_takes_a_kaldi_dir(corpus, tmp_path, monkeypatch):
    """Through the Kaldi importer: a segment of a recording becomes a sample of its own, cut."""
    monkeypatch.chdir(corpus.parent)
    kaldi = tmp_path / "kaldi"
    kaldi.mkdir()
    (kaldi / "wav.scp").write_text("rec3 utt3.wav\nrec1 utt1.wav\n")
    (kaldi / "segments").write_text("a rec3 0.5 1.5\nb rec1 0 -1\n")
    (kaldi / "text").write_text("a first words\nb second words\n")
    shards = make_shards(kaldi, tmp_path / "shards", "--from", "kaldi")
    assert [(e["key"], e["duration"], e["txt"]) for e in index_entries(shards, read_indexes(shards))] == [
        ("a", 1.0, "first words"), ("b", 1.7, "second words")]


# ----------------------------------------------------------------------------------------
# The streamed dataset


def loader(ds: ShardDataset, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                       collate_fn=lambda batch: batch, multiprocessing_context="fork" if workers else None)


def test_an_epoch_holds_every_utterance_once_over_ranks_and_workers(corpus, tmp_path):
    shards = make_shards(corpus, tmp_path / "shards")
    seen = Counter()
    for rank in range(2):
        for items in keys_of(loader(dataset(shards, epochs=1, rank=rank, world_size=2), workers=2)):
            seen.update(items)
    assert seen == Counter(f"utt{i}" for i in range(14))
    with pytest.raises(InputError, match="5 shards for 6 readers"):
        next(iter(dataset(shards, world_size=6)))


def test_batches_fit_the_budget_and_epochs_are_reshuffled(corpus, tmp_path):
    shards = make_shards(corpus, tmp_path / "shards")
    durations = dict(zip([f"utt{i}" for i in range(14)], DURATIONS))
    batches = keys_of(dataset(shards, epochs=2, buffer_size=6, batch_seconds=4.0))
    for batch in batches:
        assert len(batch) * max(durations[k] for k in batch) <= 4.0 or len(batch) == 1
    epoch0, epoch1 = batches[: len(batches) // 2], batches[len(batches) // 2:]
    assert sorted(k for b in epoch0 for k in b) == sorted(durations) and epoch0 != epoch1
    assert keys_of(dataset(shards, epochs=2, buffer_size=6, batch_seconds=4.0)) == batches  # from the seed
    fixed = keys_of(dataset(shards, epochs=1, batch_seconds=None, batch_size=2))
    assert sorted(map(len, fixed))[-1] == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_exactly_the_batches_an_uninterrupted_run_gives(corpus, tmp_path, workers):
    """Stopped after any number of batches and started again from the positions kept then, the
    stream goes on with the very batches (and order) it would have given: none repeated, none lost."""
    shards = make_shards(corpus, tmp_path / "shards")
    num_slots = max(1, workers)

    def run(resume, count):
        tracked = TrackedLoader(loader(dataset(shards, resume=resume), workers), num_slots, resume)
        stream = iter(tracked)
        return [[item["key"] for item in next(stream)] for _ in range(count)], tracked.state()

    straight, _ = run(None, 24)  # beyond an epoch: the stream runs on forever
    for stop in [1, 4, 7, 13]:
        before, state = run(None, stop)
        after, _ = run(json.loads(json.dumps(state)), 24 - stop)  # as saved in a checkpoint
        assert before + after == straight


def test_bad_samples_are_counted_and_skipped(tmp_path, corpus):
    damaged = corpus.parent / "damaged.flac"
    write_damaged_flac(damaged)  # a good header: only decoding fails
    with open(corpus, "a") as f:
        f.write(json.dumps({"key": "damaged", "wav": "damaged.flac", "txt": "d"}) + "\n")
    shards = make_shards(corpus, tmp_path / "shards", "--audio", "original")
    handmade = tmp_path / "shards" / "shard-000099.tar"
    with webdataset.TarWriter(str(handmade)) as writer:  # one sample without audio, one with broken json
        writer.write({"__key__": "a", "json": b'{"key": "noaudio", "txt": "x", "duration": 1.0}'})
        writer.write({"__key__": "b", "json": b'{"key": ', "wav": (corpus.parent / "utt0.wav").read_bytes()})
    shards.append(str(handmade))
    skipped = []
    keys = [k for b in keys_of(dataset(shards, epochs=1, on_error=skipped.append)) for k in b]
    assert sorted(keys) == sorted(f"utt{i}" for i in range(14))
    assert sorted((e["key"], e["reason"]) for e in skipped) == [
        ("b", "malformed json"), ("damaged", "unreadable"), ("noaudio", "no audio")]
    assert skipped[0]["where"].startswith(str(tmp_path / "shards"))
    # in train.py: a warning and a line in skipped.jsonl each, or with --strict an error
    import train
    log = tmp_path / "skipped.jsonl"
    list(dataset(shards, epochs=1, on_error=partial(train.report_skip, skipped_log=log, strict=False)))
    assert sorted((r["key"], r["reason"]) for r in map(json.loads, log.read_text().splitlines())) == sorted(
        (e["key"], e["reason"]) for e in skipped)
    with pytest.raises(InputError, match=f"{tmp_path / 'shards'}/shard-0000..\\.tar:.*: unreadable"):
        list(dataset(shards, epochs=1, on_error=partial(train.report_skip, skipped_log=log, strict=True)))
    # for recognition they come out as errors: every utterance gets its line
    items = [item for items, _ in dataset(shards, epochs=1, shuffle=False) for item in items]
    assert {i["key"]: i["error"] for i in items if "error" in i} == {
        "b": "malformed json", "damaged": "unreadable", "noaudio": "no audio"}


def test_shards_of_other_tools_get_an_index_and_are_read(tmp_path, corpus):
    """WeNet-style shards: NAME.wav + NAME.txt, no json: the duration comes from the audio header."""
    shard = tmp_path / "wenet" / "part-0.tar"
    shard.parent.mkdir()
    with webdataset.TarWriter(str(shard)) as writer:
        for i in [3, 0]:
            writer.write({"__key__": f"spk1/u{i}", "wav": (corpus.parent / f"utt{i}.wav").read_bytes(),
                          "txt": f"text {i}\n".encode()})
    prepare_data.main(["index", f"{tmp_path}/wenet/*.tar"])
    assert [(e["key"], e["duration"], e["txt"]) for e in index_entries([str(shard)], read_indexes([str(shard)]))] == [
        ("spk1/u3", 2.5, "text 3"), ("spk1/u0", 0.5, "text 0")]
    items = [item for items, _ in dataset([str(shard)], epochs=1) for item in items]
    assert sorted((i["key"], i["txt"], i["mel"].shape[-1]) for i in items) == [("spk1/u0", "text 0", 50),
                                                                                ("spk1/u3", "text 3", 250)]


# ----------------------------------------------------------------------------------------
# Object storage


def test_reading_over_http_survives_connections_dropped_mid_shard(corpus, tmp_path):
    shards = make_shards(corpus, tmp_path / "shards")
    drops = {"shard-000001.tar": 2, "shard-000003.tar": 1}
    server, url = serve(tmp_path / "shards", drops)
    try:
        remote = expand_shards(url + "/shard-{000000..000004}.tar")
        assert [e["key"] for e in index_entries(remote, read_indexes(remote))] == [f"utt{i}" for i in range(14)]
        assert contents(dataset(remote, epochs=1)) == contents(dataset(shards, epochs=1))
        assert drops == {"shard-000001.tar": 0, "shard-000003.tar": 0}  # each dropped, then read again
        with pytest.raises(InputError, match="cannot read the shard's index .*404"):
            read_indexes([url + "/missing.tar"])
    finally:
        server.shutdown()


class CutStream:
    """A response stream that fails after `after` bytes, as a connection reset mid-body does."""

    def __init__(self, stream, after: int, error: Exception):
        self.stream, self.left, self.error = stream, after, error

    def read(self, n: int) -> bytes:
        if self.left <= 0:
            raise self.error
        data = self.stream.read(min(n, self.left))
        self.left -= len(data)
        return data

    def close(self):
        self.stream.close()


def test_reading_from_an_s3_server(corpus, tmp_path, monkeypatch):
    """moto's S3 server on 127.0.0.1; one shard's response stream fails partway (the error botocore
    raises for a reset connection): it is read again from the byte reached, with a Range request."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    from botocore.exceptions import ResponseStreamingError
    import shards as shards_module

    open_at, cut = shards_module.open_at, {"shard-000002.tar"}

    def flaky_open_at(url, offset):
        stream, end = open_at(url, offset)
        if url.rsplit("/", 1)[1] in cut:
            cut.remove(url.rsplit("/", 1)[1])
            stream = CutStream(stream, 30_000, ResponseStreamingError(error="connection reset by peer"))
        return stream, end
    monkeypatch.setattr(shards_module, "open_at", flaky_open_at)
    shards = make_shards(corpus, tmp_path / "shards")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for name, value in [("AWS_ENDPOINT_URL", f"http://{host}:{port}"), ("AWS_ACCESS_KEY_ID", "test"),
                            ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_DEFAULT_REGION", "us-east-1")]:
            monkeypatch.setenv(name, value)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="corpus")
        for path in tmp_path.glob("shards/*"):
            s3.upload_file(str(path), "corpus", f"train/{path.name}")
        remote = expand_shards("s3://corpus/train/shard-{000000..000004}.tar")
        assert contents(dataset(remote, epochs=1)) == contents(dataset(shards, epochs=1))
        assert not cut  # the cut happened, and the shard was read to its end all the same
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------
# train.py and recognize.py on shards


def train_args(tmp_path, tiny_llm_dir, tiny_whisper_path, data_path, output_dir, *extra):
    return ["--llm_model_name_or_path", str(tiny_llm_dir), "--whisper_model_name_or_path", str(tiny_whisper_path),
            "--projector_hidden", "64", "--data_path", data_path, "--output_dir", str(output_dir),
            "--batch_seconds", "3", "--shuffle_buffer", "4", "--save_strategy", "steps", "--save_steps", "1",
            "--report_to", "none", "--use_cpu", "True", "--dataloader_num_workers", "2", *extra]


@pytest.mark.slow
def test_training_on_shards_resumes_where_its_stream_stood(corpus, tmp_path, tiny_llm_dir, tiny_whisper_path, capsys):
    import train

    make_shards(corpus, tmp_path / "shards")
    pattern = f"{tmp_path}/shards/shard-{{000000..000004}}.tar"
    straight = train.main(train_args(tmp_path, tiny_llm_dir, tiny_whisper_path, pattern, tmp_path / "straight",
                                     "--max_steps", "3"))
    assert straight.state.global_step == 3
    positions = json.loads((tmp_path / "straight" / "checkpoint-3" / "data_positions_rank0.json").read_text())
    assert positions["batches"] == 3 and positions["num_slots"] == 2

    killed = tmp_path / "killed"
    train.main(train_args(tmp_path, tiny_llm_dir, tiny_whisper_path, pattern, killed, "--max_steps", "2"))
    for final in ["model.safetensors", "speechllm_config.json"]:  # as if killed after checkpoint 2
        (killed / final).unlink()
    resumed = train.main(train_args(tmp_path, tiny_llm_dir, tiny_whisper_path, pattern, killed, "--max_steps", "3"))
    assert resumed.state.global_step == 3
    assert json.loads((killed / "checkpoint-3" / "data_positions_rank0.json").read_text()) == positions

    # without --max_steps: the steps of --num_train_epochs, estimated from the index
    capsys.readouterr()
    train.main(train_args(tmp_path, tiny_llm_dir, tiny_whisper_path, pattern, tmp_path / "epochs", "--save_strategy", "no"))
    assert "14 utterances in 5 shards; --max_steps" in capsys.readouterr().out


def recognize_traced(tmp_path, model_dir, data_path, result_path, crash_after_batches=0):
    """recognize.py in a process of its own (tests/helpers/traced_recognize.py) -> (its output, keys decoded)."""
    import subprocess
    trace = tmp_path / "trace"
    trace.mkdir(exist_ok=True)
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "helpers" / "traced_recognize.py"), "--model_dir", str(model_dir),
         "--data_path", data_path, "--result_path", str(result_path), "--batch_size", "2", "--max_new_tokens", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1", TRACE_DIR=str(trace), CRASH_AFTER_BATCHES=str(crash_after_batches)))
    assert result.returncode == (17 if crash_after_batches else 0), result.stderr[-3000:]
    decoded = [key for line in open(trace / "rank0.jsonl") for key in json.loads(line)["keys"]]
    (trace / "rank0.jsonl").unlink()
    return result.stdout, decoded


@pytest.mark.slow
def test_recognition_over_shards_gives_every_utterance_one_line_in_input_order_and_resumes(
        corpus, tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "model")
    write_damaged_flac(corpus.parent / "damaged.flac")
    with open(corpus, "a") as f:
        f.write(json.dumps({"key": "damaged", "wav": "damaged.flac"}) + "\n")
    make_shards(corpus, tmp_path / "shards", "--audio", "original")
    keys = [f"utt{i}" for i in range(14)] + ["damaged"]
    pattern = f"{tmp_path}/shards/shard-{{000000..000004}}.tar"

    straight = tmp_path / "straight.txt"
    recognize_traced(tmp_path, tmp_path / "model", pattern, straight)
    assert [line.split("\t")[0] for line in straight.read_text().splitlines()] == keys
    assert (tmp_path / "straight.txt.errors").read_text() == "damaged\tunreadable\n"
    from_jsonl = tmp_path / "from_jsonl.txt"  # the same texts as from the jsonl and its wav files
    recognize_traced(tmp_path, tmp_path / "model", str(corpus), from_jsonl)
    assert from_jsonl.read_text() == straight.read_text()

    result = tmp_path / "result.txt"
    _, before_kill = recognize_traced(tmp_path, tmp_path / "model", pattern, result, crash_after_batches=3)
    out, after_kill = recognize_traced(tmp_path, tmp_path / "model", pattern, result)
    assert sorted(before_kill + after_kill) == sorted(keys)  # nothing decoded twice
    assert "were decoded by an earlier run (resumed)" in out
    assert result.read_bytes() == straight.read_bytes()


@pytest.mark.slow
def test_two_ranks_train_on_their_own_shards_and_resume_bit_exactly(corpus, tmp_path, tiny_llm_dir, tiny_whisper_path):
    """torchrun, 2 CPU ranks (DDP): each rank streams its own shards (no clip on both ranks within an
    epoch), and a run killed at step 5 (checkpoint at 3) and started again ends with the weights of an
    uninterrupted run, bit for bit. --batch_seconds 1: one clip a batch (two of 0.5 s), so that 3 steps
    stay within a rank's first epoch of 6 or 8 clips."""
    from safetensors.torch import load_file
    from test_distributed import traced_torchrun

    make_shards(corpus, tmp_path / "shards", "--max_count", "2")  # 7 shards: 3 or 4 a rank
    args = (tmp_path, tiny_llm_dir, tiny_whisper_path, f"{tmp_path}/shards/*.tar",
            ["--batch_seconds", "1", "--shuffle_buffer", "4"])
    straight, trace, records = traced_torchrun(*args, name="straight", max_steps=6)
    batches = {rank: [r["batch"] for r in records[rank] if "batch" in r] for rank in (0, 1)}
    assert len(batches[0]) == len(batches[1]) == 6  # one batch per step on each rank
    first_steps = [t for rank in (0, 1) for b in batches[rank][:3] for t in b]
    assert len(first_steps) == len(set(first_steps))  # the ranks read disjoint shards
    for rank in (0, 1):
        positions = json.loads((straight / "checkpoint-6" / f"data_positions_rank{rank}.json").read_text())
        assert positions["num_slots"] == 2 and list(positions["positions"]) == [str(rank)]

    traced_torchrun(*args, name="crashed", max_steps=6, crash_at_step=5)
    resumed, _, records = traced_torchrun(*args, name="crashed", max_steps=6)
    after_crash = [r["batch"] for r in records[0][[i for i, r in enumerate(records[0]) if "crashed_at_step" in r][0] + 1:]
                   if "batch" in r]
    assert after_crash == batches[0][3:]  # from step 4 on: the very batches of the uninterrupted run
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
