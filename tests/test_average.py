"""tools/average_checkpoints.py: the mean of the trained weights, selected by step or eval loss."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from model import SpeechLLM
import loading
from loading import dequantize_int8
from tools.average_checkpoints import main as average


def save_checkpoints(model, run_dir, steps_and_losses):
    """checkpoint-N dirs whose projector weights differ (scaled by N); the last holds the eval history."""
    original = {k: v.clone() for k, v in model.projector.state_dict().items()}
    for step, _ in steps_and_losses:
        with torch.no_grad():
            for name, param in model.projector.named_parameters():
                param.copy_(original[name] * step)
        model.save_pretrained(run_dir / f"checkpoint-{step}")
    history = [{"step": step, "eval_loss": loss} for step, loss in steps_and_losses]
    (run_dir / f"checkpoint-{steps_and_losses[-1][0]}" / "trainer_state.json").write_text(
        json.dumps({"log_history": history}))
    return original


def test_average_of_identical_checkpoints_equals_each(tiny_model, tmp_path):
    for name in ("a", "b", "c"):
        tiny_model.save_pretrained(tmp_path / name)
    average(["--dirs", *(str(tmp_path / n) for n in "abc"), "--out", str(tmp_path / "avg")])
    mean, one = load_file(tmp_path / "avg" / "model.safetensors"), load_file(tmp_path / "a" / "model.safetensors")
    assert mean.keys() == one.keys() and all(torch.equal(mean[k], one[k]) for k in one)
    assert SpeechLLM.from_pretrained(tmp_path / "avg").config == tiny_model.config


def test_average_of_two_differs_from_both_last_and_best(tiny_model, tmp_path):
    run = tmp_path / "run"
    original = save_checkpoints(tiny_model, run, [(1, 3.0), (2, 2.0), (3, 2.5), (4, 2.7)])
    average([str(run), "--last", "2", "--out", str(tmp_path / "last2")])
    mean = load_file(tmp_path / "last2" / "model.safetensors")
    torch.testing.assert_close(mean["projector.linear1.weight"], original["linear1.weight"] * 3.5)  # (3 + 4) / 2
    for step in (3, 4):
        assert not torch.equal(mean["projector.linear1.weight"],
                               load_file(run / f"checkpoint-{step}" / "model.safetensors")["projector.linear1.weight"])
    average([str(run), "--best", "2", "--out", str(tmp_path / "best2")])  # eval losses 2.0 (step 2), 2.5 (step 3)
    best = load_file(tmp_path / "best2" / "model.safetensors")
    torch.testing.assert_close(best["projector.linear1.weight"], original["linear1.weight"] * 2.5)
    with pytest.raises(SystemExit):  # never overwrites
        average([str(run), "--last", "2", "--out", str(tmp_path / "best2")])


def test_checkpoints_of_different_configurations_are_refused(tiny_model, tiny_config, tmp_path):
    tiny_model.save_pretrained(tmp_path / "a")
    SpeechLLM(replace(tiny_config, lora_rank=2)).save_pretrained(tmp_path / "b")
    with pytest.raises(SystemExit, match="one configuration"):
        average(["--dirs", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "avg")])


def test_runs_differing_only_in_how_they_trained_average(tiny_model, tiny_config, tmp_path):
    tiny_model.save_pretrained(tmp_path / "a")
    other = SpeechLLM(replace(tiny_config, spec_augment=True, vtlp=0.1, lora_dropout=0.1))
    other.save_pretrained(tmp_path / "b")
    average(["--dirs", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "avg")])
    mean = load_file(tmp_path / "avg" / "model.safetensors")
    a, b = tiny_model.trainable_parameters(), other.trainable_parameters()
    for name in a:
        torch.testing.assert_close(mean[name], (a[name].detach() + b[name].detach()) / 2)
    assert SpeechLLM.from_pretrained(tmp_path / "avg").config == tiny_model.config  # the first dir's


def test_runs_on_other_data_average_with_the_larger_token_budget(tiny_model, tiny_config, tmp_path):
    """The decoding token budget is measured on each run's training data: the mean keeps the larger."""
    tiny_model.save_pretrained(tmp_path / "a")
    SpeechLLM(replace(tiny_config, max_tokens_per_second=tiny_config.max_tokens_per_second + 1.5,
                      max_tokens_extra=tiny_config.max_tokens_extra - 1)).save_pretrained(tmp_path / "b")
    average(["--dirs", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "avg")])
    config = SpeechLLM.from_pretrained(tmp_path / "avg").config
    assert config.max_tokens_per_second == tiny_config.max_tokens_per_second + 1.5
    assert config.max_tokens_extra == tiny_config.max_tokens_extra
    assert replace(config, max_tokens_per_second=tiny_config.max_tokens_per_second) == tiny_model.config


def test_float16_copy_halves_the_file_and_loads_into_fp32(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "a")
    average(["--dirs", str(tmp_path / "a"), "--out", str(tmp_path / "half"), "--dtype", "float16"])
    half = load_file(tmp_path / "half" / "model.safetensors")
    assert all(v.dtype == torch.float16 for v in half.values())
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < 0.55 * (tmp_path / "a" / "model.safetensors").stat().st_size
    loaded = SpeechLLM.from_pretrained(tmp_path / "half")
    for name, value in loaded.trainable_parameters().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, tiny_model.trainable_parameters()[name].detach(), rtol=1e-3, atol=1e-4)


def test_int8_copy_is_within_half_a_step_of_each_weight(tiny_model, tmp_path, monkeypatch):
    group_size = 16
    monkeypatch.setattr(loading, "INT8_GROUP", group_size)  # the tiny model's rows are shorter than 64
    tiny_model.save_pretrained(tmp_path / "a")
    average(["--dirs", str(tmp_path / "a"), "--out", str(tmp_path / "int8"), "--dtype", "int8"])
    stored = load_file(tmp_path / "int8" / "model.safetensors")
    matrices = [k for k, v in tiny_model.trainable_parameters().items() if v.dim() >= 2]
    assert matrices and all(stored[k].dtype == torch.int8 for k in matrices)
    assert (tmp_path / "int8" / "model.safetensors").stat().st_size < 0.4 * (tmp_path / "a" / "model.safetensors").stat().st_size
    loaded = SpeechLLM.from_pretrained(tmp_path / "int8")
    grouped_matrices = 0
    for name, value in loaded.trainable_parameters().items():
        original = tiny_model.trainable_parameters()[name].detach()
        assert value.dtype == torch.float32
        # round to nearest: at most half a step (the group's absmax / 127 / 2) from the trained weight
        step = torch.zeros(())
        if name in matrices:  # the finest step that still reaches the largest weight of its group
            rows = original.reshape(len(original), -1)
            group = group_size if rows.shape[1] % group_size == 0 else rows.shape[1]
            grouped_matrices += rows.shape[1] > group
            step = stored[name + ".int8_scale"]
            torch.testing.assert_close(step, rows.reshape(len(rows), -1, group).abs().amax(-1) / 127)
            step = step.repeat_interleave(group, 1).reshape(original.shape)
        assert torch.all((value - original).abs() <= step / 2 + 1e-7), name
    assert grouped_matrices > 0  # rows of several groups
    # averaging an int8 dir reads it back as weights, not as integers
    average(["--dirs", str(tmp_path / "int8"), "--out", str(tmp_path / "again")])
    again = load_file(tmp_path / "again" / "model.safetensors")
    for name, value in loaded.trainable_parameters().items():
        torch.testing.assert_close(again[name], value.detach())


def test_int8_files_with_one_scale_per_row_still_load():
    """The format shipped before the groups: a scale of shape (out, 1, ...) per matrix or kernel."""
    kernel = torch.randn(6, 4, 5)
    scale = kernel.abs().amax(dim=(1, 2), keepdim=True) / 127  # (6, 1, 1)
    stored = {"w": torch.round(kernel / scale).to(torch.int8), "w.int8_scale": scale, "b": torch.ones(6)}
    loaded = dequantize_int8(stored)
    assert torch.all((loaded["w"] - kernel).abs() <= scale / 2 + 1e-7) and torch.equal(loaded["b"], torch.ones(6))


def test_interpolate_encoder_moves_only_the_trained_encoder_toward_whisper(tiny_config, tiny_whisper_path, tmp_path):
    """WiSE-FT: encoder weights = alpha * tuned + (1 - alpha) * pretrained; projector and LoRA as trained."""
    from loading import load_whisper

    torch.manual_seed(0)
    model = SpeechLLM(replace(tiny_config, train_encoder_layers=1, lora_rank=2))
    with torch.no_grad():  # "fine-tuned": every trained weight moved away from where it started
        for param in model.trainable_parameters().values():
            param.add_(torch.randn_like(param))
    model.save_pretrained(tmp_path / "tuned")
    tuned = load_file(tmp_path / "tuned" / "model.safetensors")
    pretrained = load_whisper(str(tiny_whisper_path)).state_dict()
    encoder = [k for k in tuned if k.startswith("encoder.")]
    assert encoder and any(k.startswith("projector.") for k in tuned) and any(".lora_" in k for k in tuned)
    assert all(not torch.allclose(tuned[k], pretrained[k]) for k in encoder)

    for alpha in (0.0, 0.25, 1.0):
        out = tmp_path / f"wise{alpha}"
        average(["--dirs", str(tmp_path / "tuned"), "--out", str(out), "--interpolate_encoder", str(alpha)])
        mixed = load_file(out / "model.safetensors")
        assert mixed.keys() == tuned.keys()
        for k in tuned:
            expected = alpha * tuned[k] + (1 - alpha) * pretrained[k] if k in encoder else tuned[k]
            torch.testing.assert_close(mixed[k], expected)
    # it loads, with the interpolated encoder block in place
    loaded = SpeechLLM.from_pretrained(tmp_path / "wise0.25")
    for k in encoder:
        torch.testing.assert_close(loaded.state_dict()[k], 0.25 * tuned[k] + 0.75 * pretrained[k])
    # with int8 storage too (interpolated first, then quantized)
    average(["--dirs", str(tmp_path / "tuned"), "--out", str(tmp_path / "wise_int8"), "--interpolate_encoder", "0.5",
             "--dtype", "int8"])
    stored = dequantize_int8(load_file(tmp_path / "wise_int8" / "model.safetensors"))
    for k in encoder:
        torch.testing.assert_close(stored[k], 0.5 * tuned[k] + 0.5 * pretrained[k], atol=0.02, rtol=0)


def test_interpolate_encoder_refuses_what_it_cannot_do(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "a")  # trained no encoder weights
    with pytest.raises(SystemExit, match="no encoder weights"):
        average(["--dirs", str(tmp_path / "a"), "--out", str(tmp_path / "w"), "--interpolate_encoder", "0.5"])
    assert not (tmp_path / "w").exists()
    with pytest.raises(SystemExit):
        average(["--dirs", str(tmp_path / "a"), "--out", str(tmp_path / "w"), "--interpolate_encoder", "1.5"])


def test_parts_lora_warm_starts_another_encoder_with_a_new_projector(tiny_config, tmp_path):
    """--parts lora keeps the adapters alone: a model on a wider Whisper takes them (--init_from) with
    its own new projector; the whole dir is refused there (its projector does not fit)."""
    from conftest import save_tiny_whisper

    torch.manual_seed(0)
    trained = SpeechLLM(replace(tiny_config, train_encoder_layers=1, lora_rank=2, ctc_weight=1.0))
    with torch.no_grad():
        for param in trained.trainable_parameters().values():
            param.add_(torch.randn_like(param))
    trained.save_pretrained(tmp_path / "run")
    average(["--dirs", str(tmp_path / "run"), "--out", str(tmp_path / "lora"), "--parts", "lora"])
    kept = load_file(tmp_path / "lora" / "model.safetensors")
    saved = load_file(tmp_path / "run" / "model.safetensors")
    assert kept.keys() == {k for k in saved if ".lora_" in k} and kept

    wider = save_tiny_whisper(tmp_path / "wider.pt", n_mels=80, width=48)
    torch.manual_seed(1)
    other = SpeechLLM(replace(tiny_config, whisper_model=str(wider), lora_rank=2, ctc_weight=1.0))
    fresh_projector = {k: v.clone() for k, v in other.projector.state_dict().items()}
    with pytest.raises(ValueError, match="encoder.blocks"):  # the whole run: its tuned encoder, its projector
        other.load_trained(tmp_path / "run", warm_start=True)
    other.load_trained(tmp_path / "lora", warm_start=True)
    weights = other.trainable_parameters()
    assert all(torch.equal(weights[k], kept[k]) for k in kept)
    assert all(torch.equal(v, fresh_projector[k]) for k, v in other.projector.state_dict().items())


def test_parts_refuses_a_part_the_run_did_not_train(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "a")  # the projector alone
    with pytest.raises(SystemExit, match="no lora weights"):
        average(["--dirs", str(tmp_path / "a"), "--out", str(tmp_path / "l"), "--parts", "lora"])
    assert not (tmp_path / "l").exists()


def test_weights_give_a_weighted_mean_and_extrapolate(tiny_model, tmp_path):
    run = tmp_path / "run"
    original = save_checkpoints(tiny_model, run, [(1, 3.0), (2, 2.0), (4, 2.5)])
    dirs = [str(run / f"checkpoint-{step}") for step in (1, 2, 4)]
    average(["--dirs", *dirs, "--weights", "0.5", "0.25", "0.25", "--out", str(tmp_path / "weighted")])
    weighted = load_file(tmp_path / "weighted" / "model.safetensors")["projector.linear1.weight"]
    torch.testing.assert_close(weighted, original["linear1.weight"] * 2)  # 0.5 * 1 + 0.25 * 2 + 0.25 * 4
    # checkpoint-2 moved by what took checkpoint-1 to checkpoint-4: 2 + (4 - 1)
    average(["--dirs", *dirs, "--weights", "-1", "1", "1", "--out", str(tmp_path / "moved")])
    moved = load_file(tmp_path / "moved" / "model.safetensors")["projector.linear1.weight"]
    torch.testing.assert_close(moved, original["linear1.weight"] * 5)
    for bad in (["0.5", "0.5"], ["0.5", "0.5", "0.5"]):  # one per dir, summing to 1
        with pytest.raises(SystemExit, match="one weight per dir"):
            average(["--dirs", *dirs, "--weights", *bad, "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
