"""Device placement, checked on the CPU: the first GPU run crashed where the code made a tensor
without a device (joint CTC decoding: the scorer's end-of-turn ids stayed on the CPU) or where
DeepSpeed left one behind (ZeRO-3: Whisper's positional table). Under `torch.device("meta")` as the
default device, a tensor made without `device=` lands on "meta", and using it next to the CPU inputs
fails just as a CPU tensor next to CUDA inputs does; tensors made from the inputs stay on the CPU.
The LLM's own code (transformers) runs with the CPU as its default: it is not ours to check."""
import functools
from dataclasses import replace

import pytest
import torch
from test_model import loud_projector, make_batch

from decoding import CTCPrefixScorer, RepetitionGuard, TokenBudget
from hotwords import HotwordBonus, Hotwords
from model import SpeechLLM
from train import move_buffers

DECODING_MODES = {"greedy, joint CTC": dict(ctc_decode_weight=0.5), "beam 3, joint CTC": dict(num_beams=3, ctc_decode_weight=0.5),
                  "greedy, LLM alone": dict(ctc_decode_weight=0.0), "beam 2, LLM alone": dict(num_beams=2, ctc_decode_weight=0.0),
                  "CTC alone": dict(decode="ctc"), "confidence": dict(ctc_decode_weight=0.5, return_confidence=True)}


@pytest.fixture(scope="module")
def ctc_model(tiny_config):
    torch.manual_seed(0)
    model = SpeechLLM(replace(tiny_config, ctc_weight=1.0))
    loud_projector(model)
    return model


def on_default_device(function, device: str):
    @functools.wraps(function)  # generate() reads the forward's signature
    def wrapped(*args, **kwargs):
        with torch.device(device):
            return function(*args, **kwargs)
    return wrapped


@pytest.fixture()
def only_our_code_on_meta(monkeypatch):
    """model -> the LLM's forward and generate under the CPU default; our logits processors, which
    generate() calls, back under "meta"."""
    for processor in (CTCPrefixScorer, RepetitionGuard, TokenBudget, HotwordBonus):
        monkeypatch.setattr(processor, "__call__", on_default_device(processor.__call__, "meta"))

    def patch(model):
        for method in ("forward", "generate"):
            monkeypatch.setattr(model.llm, method, on_default_device(getattr(model.llm, method), "cpu"))
    return patch


@pytest.mark.parametrize("mode", DECODING_MODES)
def test_decoding_makes_every_tensor_on_its_inputs_device(ctc_model, mode, only_our_code_on_meta):
    batch = make_batch(ctc_model, [0.8, 1.9], inference=True)
    expected = ctc_model.generate(**batch, min_new_tokens=3, **DECODING_MODES[mode])
    only_our_code_on_meta(ctc_model)
    with torch.device("meta"):
        out = ctc_model.generate(**batch, min_new_tokens=3, **DECODING_MODES[mode])
    ids = out[0] if isinstance(out, tuple) else out
    assert ids.device.type == "cpu"
    torch.testing.assert_close(ids, expected[0] if isinstance(expected, tuple) else expected)


def test_hotword_biasing_makes_every_tensor_on_its_inputs_device(ctc_model, only_our_code_on_meta):
    batch = make_batch(ctc_model, [0.8, 1.9], inference=True)
    options = dict(min_new_tokens=3, ctc_decode_weight=0.5, word_timestamps=True,
                   hotwords=Hotwords.from_lines(["hello world 2.0", "Joe King"], ctc_model.tokenizer))
    expected, _ = ctc_model.generate(**batch, **options)
    only_our_code_on_meta(ctc_model)
    with torch.device("meta"):
        ids, details = ctc_model.generate(**batch, **options)
    assert ids.device.type == "cpu" and torch.equal(ids, expected) and all(d["words"] for d in details)


def test_hotword_bonus_is_the_same_made_under_meta(ctc_model):
    """The bonus itself, which a random LLM's output would not show: a value made off the scores'
    device would be dropped silently by the indexed assignment."""
    bonus = HotwordBonus(Hotwords.from_lines(["Joe King"], ctc_model.tokenizer))
    joe = ctc_model.tokenizer(" Joe", add_special_tokens=False)["input_ids"]
    rows = torch.tensor([joe, [0] * len(joe)])
    on_cpu = bonus(rows, torch.zeros(2, len(ctc_model.tokenizer)))
    with torch.device("meta"):
        assert torch.equal(bonus(rows, torch.zeros(2, len(ctc_model.tokenizer), device="cpu")), on_cpu)
    assert on_cpu[0].max() > 0  # " King" extends the phrase


@pytest.mark.parametrize("augment", [False, True])
def test_training_step_makes_every_tensor_on_its_inputs_device(tiny_config, augment, only_our_code_on_meta):
    torch.manual_seed(0)
    model = SpeechLLM(replace(tiny_config, ctc_weight=1.0, lora_rank=4, train_encoder_layers=1,
                              spec_augment=augment, vtlp=0.1 if augment else 0.0)).train()
    batch = make_batch(model, [0.8, 1.9], ["one two", "three four five"])
    only_our_code_on_meta(model)
    with torch.device("meta"):
        loss = model(**batch).loss
        loss.backward()
    assert loss.device.type == "cpu" and torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.device.type == "cpu" for p in model.trainable_parameters().values())


def test_move_buffers_moves_every_buffer_and_leaves_the_parameters(tiny_model):
    """What train.py does under ZeRO-3, whose engine moves the parameters but not the buffers of the
    modules it did not build (Whisper's encoder): afterwards no buffer is left behind."""
    buffers = dict(tiny_model.named_buffers())
    assert "encoder.positional_embedding" in buffers
    move_buffers(tiny_model, "meta")
    assert {name: b.device.type for name, b in tiny_model.named_buffers()} == {name: "meta" for name in buffers}
    assert {p.device.type for p in tiny_model.parameters()} == {"cpu"}


def test_a_gpu_run_loads_data_in_workers_unless_told_otherwise(monkeypatch):
    from types import SimpleNamespace

    from train import feed_the_gpu

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    for device, argv, expected in [("cuda", [], None), ("cuda", ["--dataloader_num_workers", "0"], 0),
                                   ("cuda", ["--dataloader_num_workers=2"], 0), ("cpu", [], 0)]:
        args = SimpleNamespace(device=torch.device(device), dataloader_num_workers=0)
        feed_the_gpu(args, argv)
        if expected is None:  # up to 4, leaving a core to the training process itself
            assert 1 <= args.dataloader_num_workers <= 4, (device, argv)
        else:
            assert args.dataloader_num_workers == expected, (device, argv)
