import json

import numpy as np
import pytest
import soundfile
import torch
from conftest import synth_audio

from data import Collator, LengthGroupedSampler, load_audio, log_mel, read_jsonl


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
    train = Collator(tiny_model)(items)
    assert train["mel"].shape == (2, 80, 100) and train["mel_lengths"].tolist() == [100, 50]
    assert torch.all(train["mel"][1, :, 50:] == 0)
    longest = max(len(tiny_model.prompt(i["instruction"], tiny_model.num_audio_tokens(i["mel"].shape[-1]), i["txt"])
                      ["input_ids"]) for i in items)
    assert train["input_ids"].shape[1] == longest
    assert train["attention_mask"][:, 0].all()  # right padding for training
    infer = Collator(tiny_model, inference=True)(items)
    assert "labels" not in infer and infer["attention_mask"][:, -1].all()  # left padding for generation


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
