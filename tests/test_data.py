import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import soundfile
import torch
from conftest import ROOT, synth_audio, write_corpus
from helpers.bad_audio import write_damaged_flac

from audio import load_audio, load_entry_audio, log_mel
from data import (Collator, CollatorKeepingErrors, DataSpec, DurationBatchSampler, LengthGroupedSampler, SpeechDataset,
                  check_entries, pack_batches, read_jsonl, split_long)
from prompt import ChatPrompt


def test_read_jsonl_resolves_paths_and_keys(tmp_path):
    (tmp_path / "sub").mkdir()
    jsonl = tmp_path / "sub" / "list.jsonl"
    jsonl.write_text('{"key": "a", "wav": "a.wav", "txt": "x"}\n\n'
                     '{"wav": "/abs/b.flac", "txt": "y", "duration": 1.5, "instruction": "Repeat."}\n')
    a, b = read_jsonl(jsonl)
    assert a["wav"] == str(tmp_path / "sub" / "a.wav") and a["key"] == "a"
    assert b["wav"] == "/abs/b.flac" and b["key"] == "b" and b["instruction"] == "Repeat."


@pytest.mark.parametrize("bad_line, message", [
    ('{"wav": "a.wav", "txt": ', "malformed JSON"),
    ('{"txt": "no wav"}', 'needs a "wav"'),
    ('["a.wav"]', 'needs a "wav"'),
    ('{"key": "k1", "wav": "c.wav"}', "duplicate key 'k1' \\(first at line 1\\)"),
    ('{"wav": "c.wav", "start": 2, "end": 1.5}', '"end" \\(1.5\\) must be after "start" \\(2\\)'),
    ('{"wav": "c.wav", "start": -1}', '"start" must be a number of seconds >= 0, got -1'),
    ('{"wav": "c.wav", "end": "3"}', "\"end\" must be a number of seconds >= 0, got '3'"),
    ('{"wav": "c.wav", "end": NaN}', '"end" must be a number of seconds >= 0, got nan'),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"key": "k1", "wav": "a.wav"}\n{"key": "k2", "wav": "b.wav"}\n' + bad_line + "\n")
    with pytest.raises(ValueError, match=f"{jsonl}:3: {message}"):
        read_jsonl(jsonl)


def test_read_jsonl_non_utf8(tmp_path):
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes('{"wav": "caf\u00e9.wav"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=f"{jsonl}:1: not UTF-8"):
        read_jsonl(jsonl)


def test_load_audio_mixes_down_and_resamples(tmp_path):
    def tone(freq, rate, seconds=1.0):
        return 0.4 * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)

    # left = s + d, right = s - d: the mixdown is s; 24-bit at 44.1 kHz
    stereo = np.stack([tone(440, 44100) + tone(1000, 44100) / 4, tone(440, 44100) - tone(1000, 44100) / 4], 1)
    soundfile.write(tmp_path / "s.wav", stereo, 44100, subtype="PCM_24")
    audio = load_audio(tmp_path / "s.wav")
    assert audio.dtype == np.float32 and audio.shape == (16000,)
    assert np.abs(audio[200:-200] - tone(440, 16000)[200:-200]).max() < 1e-3


def test_log_mel_lengths():
    audio = synth_audio(0, 2.0)
    assert log_mel(audio, 80).shape == (80, 200)
    assert log_mel(audio, 128).shape == (128, 200)
    assert log_mel(audio, 80, pad_to_30s=True).shape == (80, 3000)
    assert log_mel(synth_audio(0, 31.0), 80, pad_to_30s=True).shape == (80, 6000)


def test_collator_pads_to_batch_maximum_not_model_max_length(tiny_model):
    items = [dict(mel=log_mel(synth_audio(i, s), 80), txt=t, instruction="Transcribe the speech.")
             for i, (s, t) in enumerate([(1.0, "a"), (0.5, "a much longer transcript than the other one")])]
    train = Collator(tiny_model.data_spec())(items)
    assert train["mel"].shape == (2, 80, 100) and train["mel_lengths"].tolist() == [100, 50]
    assert torch.all(train["mel"][1, :, 50:] == 0)
    longest = max(len(tiny_model.prompt(i["instruction"], tiny_model.num_audio_tokens(i["mel"].shape[-1]), i["txt"])
                      ["input_ids"]) for i in items)
    assert train["input_ids"].shape[1] == longest
    assert train["attention_mask"][:, 0].all()  # right padding for training
    infer = Collator(tiny_model.data_spec(), inference=True)(items)
    assert "labels" not in infer and infer["attention_mask"][:, -1].all()  # left padding for generation


@pytest.fixture(scope="module")
def spec(tiny_llm_dir) -> DataSpec:
    """What data.py needs of a model, made without one: a tokenizer's chat prompt and a token count."""
    from transformers import AutoTokenizer
    return DataSpec(prompt=ChatPrompt(AutoTokenizer.from_pretrained(tiny_llm_dir)),
                    num_audio_tokens=lambda frames: frames // 20, instruction="Transcribe the speech.", n_mels=80,
                    pad_to_30s=False, max_positions=100)


def test_the_check_pass_and_the_collator_take_their_model_settings_as_values(tmp_path, spec):
    jsonl = write_corpus(tmp_path, ["a", "hello " * 100], [1.0, 1.0])
    usable, problems = check_entries(read_jsonl(jsonl), spec, for_training=True)
    assert [(p["key"], p["reason"]) for p in problems] == [("utt1", "longer than the LLM's context (100 tokens)")]
    expected = spec.prompt(spec.instruction, 5, "a")["input_ids"]  # 1 s: 100 log-mel frames, 5 audio tokens
    assert [e["key"] for e in usable] == ["utt0"] and usable[0]["num_tokens"] == len(expected)
    batch = Collator(spec)([SpeechDataset(usable, spec.n_mels, spec.instruction)[0]])
    assert batch["audio_mask"].sum() == 5 and batch["input_ids"][0].tolist() == expected
    # data.py's one direction: it is imported without the model (model.py imports data.py)
    imports = subprocess.run([sys.executable, "-c", "import sys, data; print('model' in sys.modules)"], cwd=ROOT,
                             capture_output=True, text=True, check=True)
    assert imports.stdout.strip() == "False"


def test_audio_that_fails_to_load_is_skipped_in_training_and_an_error_in_recognition(tmp_path, spec):
    """damaged.flac passes the check pass (its header is fine); loading it fails."""
    jsonl = write_corpus(tmp_path, ["a", "b"], [1.0, 1.0])
    write_damaged_flac(tmp_path / "damaged.flac")
    lines = jsonl.read_text().splitlines()
    jsonl.write_text("\n".join([lines[0], json.dumps({"key": "damaged", "wav": "damaged.flac", "txt": "c"}), lines[1]]))
    entries, problems = check_entries(read_jsonl(jsonl), None, for_training=False)
    assert [e["key"] for e in entries] == ["utt0", "damaged", "utt1"] and not problems
    # training (on_error): reported once, and the next clip takes its place, so the batch stays full
    reported = []
    training = SpeechDataset(entries, spec.n_mels, spec.instruction, on_error=reported.append)
    assert [training[i]["key"] for i in range(3)] == ["utt0", "utt1", "utt1"]
    assert [(e["key"], e["reason"]) for e in reported] == [("damaged", "unreadable")]
    # recognition: the utterance comes back as an error beside the batch, never dropped
    items = [SpeechDataset(entries, spec.n_mels, spec.instruction)[i] for i in range(3)]
    keys, batch, errors = CollatorKeepingErrors(spec)(items)
    assert keys == ["utt0", "utt1"] and batch["mel"].shape[0] == 2 and errors == {"damaged": "unreadable"}
    assert CollatorKeepingErrors(spec)(items[1:2]) == ([], None, {"damaged": "unreadable"})


def test_long_entries_are_cut_into_pieces_that_cover_them(tmp_path):
    soundfile.write(tmp_path / "long.wav", synth_audio(0, 65.0), 16000)
    entry = dict(key="long", wav=str(tmp_path / "long.wav"), start=2.0, duration=63.0)  # a segment: 2 s to the end
    whole = load_entry_audio(entry)
    segments, in_memory = split_long(entry, 30.0), split_long(entry, 30.0, keep_samples=True)
    assert [p["key"] for p in segments] == [p["key"] for p in in_memory] == ["long 0/3", "long 1/3", "long 2/3"]
    assert [p["duration"] for p in segments] == [p["duration"] for p in in_memory]
    assert all(p["duration"] <= 30 for p in segments) and sum(p["duration"] for p in segments) == 63.0
    # a file's pieces are segments of it, read when decoded; a shard's hold their samples
    assert segments[0]["start"] == 2.0 and segments[-1]["end"] == 65.0
    assert all(a["end"] == b["start"] for a, b in zip(segments, segments[1:]))
    np.testing.assert_array_equal(np.concatenate([load_entry_audio(p) for p in segments]), whole)
    np.testing.assert_array_equal(np.concatenate([p["samples"] for p in in_memory]), whole)
    # short, off (0), or audio that does not load: the entry stays whole
    assert split_long(entry, 0) == [entry] and split_long(entry, 70.0) == [entry]
    missing = dict(entry, wav=str(tmp_path / "missing.wav"))
    assert split_long(missing, 30.0) == [missing]


def test_length_grouped_sampler_groups_and_is_deterministic():
    rng = np.random.default_rng(0)
    durations = rng.uniform(0.5, 20, size=203).tolist()
    sampler = LengthGroupedSampler(durations, batch_size=4, seed=7, group_batches=8)
    first = list(sampler)
    assert sorted(first) == list(range(203))  # every sample once
    assert list(LengthGroupedSampler(durations, batch_size=4, seed=7, group_batches=8)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first  # reshuffled between epochs
    assert list(LengthGroupedSampler(durations, batch_size=4, seed=8, group_batches=8)) != first
    batches = [first[i:i + 4] for i in range(0, 200, 4)]
    spread = np.mean([np.ptp([durations[i] for i in b]) for b in batches])
    random_spread = np.mean([np.ptp(rng.choice(durations, 4)) for _ in range(500)])
    assert spread < 0.3 * random_spread  # batches hold similar lengths
    assert len(first[200:]) == 3  # the one short batch comes last


def test_length_grouped_sampler_gives_the_ranks_of_a_step_batches_of_about_one_length():
    """accelerate deals batch i to rank i % replicas: the batches that run side by side in one step
    come from neighbouring lengths, so no rank idles at the all-reduce waiting for a longer one.
    With one replica the order is the one it always was."""
    rng = np.random.default_rng(1)
    durations = rng.lognormal(1.2, 0.9, 2000).clip(0.5, 30).tolist()

    def step_gap(order: list[int], replicas: int) -> float:  # mean spread of the ranks' longest clips in a step
        assert sorted(order) == list(range(2000))
        longest = [max(durations[i] for i in order[b:b + 4]) for b in range(0, 2000, 4)]
        return float(np.mean([np.ptp(longest[s:s + replicas]) for s in range(0, len(longest), replicas)]))

    unaware = list(LengthGroupedSampler(durations, batch_size=4, seed=3))
    for replicas in (2, 4):
        aware = list(LengthGroupedSampler(durations, batch_size=4, seed=3, num_replicas=replicas))
        assert step_gap(aware, replicas) < 0.2 * step_gap(unaware, replicas)
    assert list(LengthGroupedSampler(durations, batch_size=4, seed=3, num_replicas=1)) == unaware


def wide_spread(n=301, seed=0):
    """Durations from 0.5 to 30 s (most of them short, as real corpora), and LLM sequence lengths:
    a 30-token prompt + 10 audio tokens/s + ~3 transcript tokens/s."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(1.2, 0.9, n), 0.5, 30).round(2).tolist()
    return seconds, [30 + int(13 * s) + int(rng.integers(0, 5)) for s in seconds]


@pytest.mark.parametrize("max_seconds, max_tokens, replicas", [(60, None, 1), (60, None, 2), (45, 400, 3), (10, None, 8)])
def test_duration_batches_fit_the_budget_and_hold_every_utterance_once(max_seconds, max_tokens, replicas):
    seconds, tokens = wide_spread()
    sampler = DurationBatchSampler(seconds, tokens, max_seconds, max_tokens, num_replicas=replicas, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) and len(batches) % replicas == 0  # every rank gets as many
    assert sorted(i for b in batches for i in b) == list(range(len(seconds)))  # each utterance once
    cap = max_tokens or sampler.max_tokens
    for b in batches:
        assert len(b) * max(seconds[i] for i in b) <= max_seconds or len(b) == 1  # a clip over budget goes alone
        assert len(b) * max(tokens[i] for i in b) <= cap or len(b) == 1
    # the padded audio is close to the audio itself: batches hold similar lengths
    padded = sum(len(b) * max(seconds[i] for i in b) for b in batches)
    assert padded < 1.15 * sum(seconds)


def test_duration_batches_are_deterministic_and_reshuffled_each_epoch():
    seconds, tokens = wide_spread()
    sampler = DurationBatchSampler(seconds, tokens, 60, seed=3)
    first = list(sampler)
    assert list(DurationBatchSampler(seconds, tokens, 60, seed=3)) == first
    assert list(DurationBatchSampler(seconds, tokens, 60, seed=4)) != first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(map(sorted, second)) == sorted(map(sorted, first))  # same batches, new order
    assert len(second) == len(first)  # the Trainer fixes its steps per epoch from the first
    sizes = [len(b) for b in first]
    assert max(sizes) > 4 * min(sizes)  # short clips come many to a batch, long ones few


def test_duration_batches_cap_llm_tokens_of_short_clips():
    """By seconds alone, 120 clips of 0.5 s would share a batch with 120 chat prompts; the default cap
    lets a batch of short clips hold no more LLM tokens than 60 s of the 30 s clips (2 x 420)."""
    seconds, tokens = [30.0] * 4 + [0.5] * 120, [420] * 4 + [40] * 120
    sampler = DurationBatchSampler(seconds, tokens, 60)
    assert sampler.max_tokens == 2 * 420
    assert sorted(len(b) for b in sampler) == [2, 2, 15] + [21] * 5


def test_pack_batches_gives_an_over_budget_clip_a_batch_of_its_own():
    assert pack_batches([0, 1, 2, 3], [40.0, 20.0, 10.0, 9.0], [1, 1, 1, 1], 30, 100) == [[0], [1], [2, 3]]
    assert pack_batches([0, 1, 2], [1.0, 1.0, 1.0], [50, 60, 30], 30, 100) == [[0], [1], [2]]  # 2 x 60 > 100
    assert pack_batches([0, 1, 2], [1.0, 1.0, 1.0], [50, 30, 20], 30, 100) == [[0, 1], [2]]


def test_duration_batches_on_more_ranks_than_can_split():
    """Three clips that each fill the budget alone, on two ranks: the first batch is repeated, as
    torch's DistributedSampler repeats samples, so both ranks get two batches."""
    batches = list(DurationBatchSampler([20.0, 20.0, 20.0], [100, 100, 100], 30, num_replicas=2))
    assert len(batches) == 4 and all(len(b) == 1 for b in batches)
    assert sorted(Counter(i for b in batches for i in b).values()) == [1, 1, 2]
