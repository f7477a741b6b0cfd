"""The projector types (projectors.PROJECTOR_TYPES), each tested as the default conv one is: the audio
token count follows its rate, a batch encodes as its utterances one by one, save/load round-trips."""
import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import synth_audio
from test_model import make_batch

from audio import log_mel
from model import N_FRAMES_30S, SpeechLLM, SpeechLLMConfig
from projectors import PROJECTOR_TYPES

TOKENS_PER_SECOND = {"conv": 10, "qwen2-audio": 25, "linear": 10}  # at each type's default kernel


@pytest.fixture(params=list(PROJECTOR_TYPES))
def projector_model(request, tiny_config) -> SpeechLLM:
    torch.manual_seed(0)
    kind = request.param
    return SpeechLLM(replace(tiny_config, projector_type=kind, projector_kernel=PROJECTOR_TYPES[kind].default_kernel))


@pytest.mark.parametrize("seconds", [0.05, 1.0, 2.3, 30.0, 45.5])
def test_audio_token_count_follows_each_types_rate(projector_model, seconds):
    kind, kernel = projector_model.config.projector_type, projector_model.config.projector_kernel
    mel = log_mel(synth_audio(0, seconds), 80)
    expected = sum(math.ceil(math.ceil(w.shape[-1] / 2) / kernel) for w in mel.split(N_FRAMES_30S, dim=-1))
    assert projector_model.num_audio_tokens(mel.shape[-1]) == expected
    embeds = projector_model.encode_audio(mel[None], torch.tensor([mel.shape[-1]]))
    assert embeds.shape == (expected, projector_model.llm.config.hidden_size)
    if seconds in (1.0, 30.0):
        assert expected == TOKENS_PER_SECOND[kind] * seconds


def test_batched_encoding_equals_one_by_one(projector_model):
    batch = make_batch(projector_model, [2.0, 0.7, 1.3, 0.93])  # odd and even encoder frame counts
    together = projector_model.encode_audio(batch["mel"], batch["mel_lengths"])
    alone = [projector_model.encode_audio(batch["mel"][i:i + 1, :, :n], n[None])
             for i, n in enumerate(batch["mel_lengths"])]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-5)
    assert batch["audio_mask"].sum() == len(together)  # the collator's placeholders: one per audio token


def test_each_type_is_its_own_architecture(tiny_config):
    shapes = {kind: {name: tuple(p.shape) for name, p in SpeechLLM(replace(tiny_config, projector_type=kind))
                     .projector.named_parameters()} for kind in PROJECTOR_TYPES}
    assert shapes["qwen2-audio"] == {"norm.weight": (64,), "norm.bias": (64,), "linear.weight": (64, 32),
                                     "linear.bias": (64,)}
    assert shapes["linear"]["linear1.weight"] == (64, 5 * 32)  # 5 stacked 32-wide encoder frames
    assert shapes["conv"]["conv.weight"] == (32, 32, 5)


def test_save_load_keeps_the_type_and_its_outputs(projector_model, tmp_path):
    for p in projector_model.projector.parameters():  # not what a fresh model would have
        torch.nn.init.normal_(p, std=0.3)
    batch = make_batch(projector_model, [1.2, 0.6], inference=True)
    projector_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "speechllm_config.json").read_text())
    assert saved["projector_type"] == projector_model.config.projector_type
    loaded = SpeechLLM.from_pretrained(tmp_path)
    assert type(loaded.projector) is type(projector_model.projector)
    torch.testing.assert_close(loaded.encode_audio(batch["mel"], batch["mel_lengths"]),
                               projector_model.encode_audio(batch["mel"], batch["mel_lengths"]))
    assert loaded.generate(**batch, max_new_tokens=6).tolist() == projector_model.generate(**batch, max_new_tokens=6).tolist()


def test_a_config_saved_before_projector_types_loads_as_conv(tiny_config, tmp_path):
    old = {k: v for k, v in json.loads(json.dumps(tiny_config.__dict__)).items()
           if k not in ("projector_type", "hidden_size")}
    (tmp_path / "speechllm_config.json").write_text(json.dumps(old))
    assert SpeechLLMConfig.from_json(tmp_path / "speechllm_config.json").projector_type == "conv"


def test_unknown_type_is_a_clear_error(tiny_config):
    with pytest.raises(ValueError, match="projector_type 'qformer': not one of"):
        SpeechLLM(replace(tiny_config, projector_type="qformer"))


def test_mismatched_mel_count_is_a_clear_error(tiny_model):
    mel = log_mel(synth_audio(0, 1.0), 128)  # large-v3's features into an 80-mel encoder
    with pytest.raises(ValueError, match="128 mel bins, but this Whisper encoder takes 80"):
        tiny_model.encode_audio(mel[None], torch.tensor([mel.shape[-1]]))
