"""What trains: the projector, + LoRA on the LLM, + the encoder's top blocks, the whole LLM. Exactly the
chosen weights get gradients and change, they (and only they) are saved and load back, bf16 weights
run forward, backward and generate, and the decoding prefix cache follows weight changes."""
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from conftest import write_corpus
from test_model import make_batch

from model import LLM_DIR, WEIGHTS_NAME, SpeechLLM

SETTINGS = {
    "projector": {},
    "lora": dict(lora_rank=4),
    "encoder_top1": dict(train_encoder_layers=1),
    "lora+encoder_all": dict(lora_rank=4, train_encoder_layers=-1),
    "llm": dict(train_llm=True),
}


def expected_trained(name: str, setting: str) -> bool:
    if name.startswith("projector."):
        return True
    if name.startswith("encoder."):
        return ((setting == "encoder_top1" and name.startswith(("encoder.blocks.1.", "encoder.ln_post.")))
                or (setting == "lora+encoder_all" and name.startswith(("encoder.blocks.", "encoder.ln_post."))))
    return setting == "llm" or (setting.startswith("lora") and ".lora_" in name)


def build(tiny_config, setting, dtype=torch.float32, **extra) -> SpeechLLM:
    torch.manual_seed(0)
    return SpeechLLM(replace(tiny_config, **SETTINGS[setting], **extra), dtype)


def train_steps(model, steps=2, lr=1e-2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = make_batch(model, [1.0, 1.6], ["hello world", "good morning to you"])
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()
    return batch


@pytest.mark.parametrize("setting", SETTINGS)
def test_exactly_the_chosen_weights_train(tiny_config, setting):
    model = build(tiny_config, setting)
    names = {name for name, _ in model.named_parameters()}
    assert set(model.trainable_parameters()) == {n for n in names if expected_trained(n, setting)}
    if setting.startswith("lora"):
        assert any(".lora_A." in n for n in names) and any("mlp.down_proj.lora_B" in n for n in names)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    # two steps: a LoRA B starts at zero, so its A gets a zero gradient in the first
    train_steps(model, steps=2)
    for name, param in model.named_parameters():
        if expected_trained(name, setting):
            assert param.grad is not None and not torch.equal(param, before[name]), name
        else:
            assert param.grad is None and torch.equal(param, before[name]), name
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name


@pytest.mark.parametrize("setting", SETTINGS)
def test_training_prefix_cache_carries_gradients_exactly_when_the_llm_trains(tiny_config, setting):
    """Every setting runs the prompt's opening once per batch; its keys and values depend on LoRA / LLM
    weights that train, so there they are computed with gradients, never taken from the cache."""
    model = build(tiny_config, setting)
    model.train()
    batch = make_batch(model, [1.0, 1.6], ["hello", "good morning"])
    prefix = model.training_prefix_length(batch["input_ids"], batch["attention_mask"], batch["audio_mask"])
    assert prefix > 0
    cache = model.prefix_kv_cache(batch["input_ids"][0, :prefix], 2)
    keys = cache.layers[0].keys  # (2, kv_heads, prefix, head_dim)
    assert keys.shape[0] == 2 and keys.shape[2] == prefix
    assert keys.requires_grad == model.llm_trains == ("lora" in setting or setting == "llm")


@pytest.mark.parametrize("setting", SETTINGS)
def test_save_then_from_pretrained_reproduces_outputs(tiny_config, setting, tmp_path):
    model = build(tiny_config, setting)
    batch = train_steps(model)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    # the model dir holds exactly what trained; a fully fine-tuned LLM as an HF model dir of its own
    assert set(saved) == {n for n in model.trainable_parameters() if setting != "llm" or not n.startswith("llm.")}
    assert (tmp_path / LLM_DIR / "config.json").exists() == (setting == "llm")
    loaded = SpeechLLM.from_pretrained(tmp_path)
    # a fully fine-tuned model is rebuilt from its own LLM dir: the base LLM is not needed
    assert loaded.config == replace(model.config, llm_model=str(tmp_path / LLM_DIR) if setting == "llm"
                                    else model.config.llm_model)
    for name, param in loaded.state_dict().items():
        assert torch.equal(param, model.state_dict()[name]), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_merged_lora_decodes_like_unmerged(tiny_config, tmp_path):
    model = build(tiny_config, "lora", lora_alpha=64.0)
    train_steps(model, steps=3, lr=5e-2)
    model.save_pretrained(tmp_path)
    batch = make_batch(model, [1.0, 2.0, 1.4], inference=True)
    unmerged = model.generate(**batch, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    merged_model = SpeechLLM.from_pretrained(tmp_path, merge_lora=True)
    merged = merged_model.generate(**batch, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(merged.sequences, unmerged.sequences)
    torch.testing.assert_close(torch.stack(merged.scores), torch.stack(unmerged.scores), rtol=1e-4, atol=1e-4)
    # and the adapters matter: without them the model decodes otherwise
    base = SpeechLLM.from_pretrained(tmp_path)
    with torch.no_grad():
        for name, param in base.named_parameters():
            if ".lora_B." in name:
                param.zero_()
    plain = base.generate(**batch, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    assert not torch.allclose(torch.stack(plain.scores), torch.stack(unmerged.scores), atol=1e-3)
    with pytest.raises(ValueError, match="merged"):
        merged_model.save_pretrained(tmp_path / "again")


def test_recognize_merges_lora_unless_asked_not_to(tiny_config, tmp_path, monkeypatch):
    import recognize

    model = build(tiny_config, "lora", lora_alpha=64.0)
    train_steps(model, steps=3, lr=5e-2)
    model.save_pretrained(tmp_path / "model")
    jsonl = write_corpus(tmp_path / "data", ["a", "b", "c"], [1.0, 2.0, 1.4])
    merged = []  # what each recognize.py run loaded
    load = SpeechLLM.from_pretrained.__func__
    monkeypatch.setattr(SpeechLLM, "from_pretrained", classmethod(
        lambda cls, *args, **kwargs: merged.append(kwargs["merge_lora"]) or load(cls, *args, **kwargs)))
    results = []
    for flags in ([], ["--keep_lora_unmerged"]):
        result = tmp_path / f"result{len(results)}.txt"
        recognize.main(["--model_dir", str(tmp_path / "model"), "--data_path", str(jsonl), "--result_path", str(result),
                        "--max_new_tokens", "6", *flags])
        results.append(result.read_text())
    assert merged == [True, False]
    assert results[0] == results[1] and len(results[0].splitlines()) == 3


@pytest.mark.parametrize("setting", ["lora", "llm"])
def test_decoding_prefix_cache_does_not_outlive_a_weight_change(tiny_config, setting):
    model = build(tiny_config, setting)
    batch = make_batch(model, [1.0, 1.7], inference=True)

    def scores(prefix_cache):
        out = model.generate(**batch, max_new_tokens=4, prefix_cache=prefix_cache, output_scores=True,
                                 return_dict_in_generate=True)
        return torch.stack(out.scores)

    first = scores(prefix_cache=True)  # fills the cache
    train_steps(model, steps=2, lr=5e-2)
    after = scores(prefix_cache=True)
    torch.testing.assert_close(after, scores(prefix_cache=False), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(after, first, atol=1e-3)  # the step did change what the LLM computes


def test_warm_start_loads_what_the_dir_holds_and_refuses_to_drop_weights(tiny_config, tmp_path):
    stage1 = build(tiny_config, "projector")
    train_steps(stage1)
    stage1.save_pretrained(tmp_path / "stage1")
    stage2 = build(tiny_config, "lora+encoder_all")
    stage2.load_trained(tmp_path / "stage1", warm_start=True)  # --init_from: a part of what stage 2 trains
    for name, value in stage1.projector.state_dict().items():
        assert torch.equal(stage2.projector.state_dict()[name], value), name
    assert all(p.abs().sum() == 0 for n, p in stage2.named_parameters() if ".lora_B." in n)  # LoRA starts at zero
    with pytest.raises(ValueError, match="lacks"):  # from_pretrained-style loading is exact
        stage2.load_trained(tmp_path / "stage1")
    train_steps(stage2)
    stage2.save_pretrained(tmp_path / "stage2")
    with pytest.raises(ValueError, match="does not train"):  # its LoRA and encoder weights would be lost
        build(tiny_config, "projector").load_trained(tmp_path / "stage2", warm_start=True)


def test_warm_start_grows_a_smaller_lora_rank_and_computes_the_same(tiny_config, tmp_path):
    """--init_from a LoRA r4 run with --lora_rank 8 (a reader with more capacity): the old adapters
    become the first 4 ranks, so the model starts where the r4 run ended, and the new ranks train."""
    small = build(tiny_config, "lora")  # rank 4
    batch = train_steps(small, steps=3)
    small.save_pretrained(tmp_path / "r4")
    grown = SpeechLLM(replace(tiny_config, lora_rank=8, lora_alpha=8.0), torch.float32)  # another alpha: B rescaled
    grown.load_trained(tmp_path / "r4", warm_start=True)
    grown.eval()
    with torch.no_grad():
        torch.testing.assert_close(grown(**batch).loss, small(**batch).loss, rtol=1e-5, atol=1e-5)
    trained_b = {n: p.detach().clone() for n, p in grown.named_parameters() if ".lora_B." in n}
    assert all(b[:, 4:].abs().sum() == 0 for b in trained_b.values())  # the new ranks start at zero
    train_steps(grown, steps=2)
    assert any(p[:, 4:].abs().sum() > 0 for n, p in grown.named_parameters() if ".lora_B." in n)
    with pytest.raises(ValueError, match="only --init_from"):  # exact loading keeps exact shapes
        grown.load_trained(tmp_path / "r4")
    grown.save_pretrained(tmp_path / "r8")
    with pytest.raises(ValueError, match="only --init_from"):  # a smaller rank cannot hold a larger one
        build(tiny_config, "lora").load_trained(tmp_path / "r8", warm_start=True)


@pytest.mark.parametrize("setting", SETTINGS)
def test_bf16_weights_forward_backward_generate(tiny_config, setting, device):
    """The GPU path's dtype: bf16 weights everywhere (CPU runs bf16 too). Its most likely failure is a
    dtype mismatch between the audio embeddings, LoRA adapters and the LLM."""
    model = build(tiny_config, setting, dtype=torch.bfloat16).to(device)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.train()
    batch = make_batch(model, [1.0, 1.6], ["hello world", "good morning"])
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.dtype == torch.bfloat16 for g in grads.values())
    model.eval()
    ids = model.generate(**make_batch(model, [1.0, 1.6], inference=True), max_new_tokens=5, num_beams=2)
    assert ids.shape[0] == 2 and ids.shape[1] <= 5


def test_spec_augment_masks_only_in_training_and_within_each_utterance(tiny_config):
    from audio import spec_augment

    torch.manual_seed(0)
    mel, lengths = torch.randn(3, 80, 3000), torch.tensor([3000, 120, 60])
    masked = spec_augment(mel, lengths)
    for i, length in enumerate(lengths.tolist()):
        changed = masked[i] != mel[i]
        assert not changed[:, length:].any()  # padding stays padding
        assert 0 < changed[:, :length].float().mean() < 0.5  # masked, not wiped out
        assert torch.all(masked[i][changed] == mel[i, :, :length].mean())
    assert_augments_only_in_training(build(tiny_config, "projector", spec_augment=True))


def assert_augments_only_in_training(model):
    """The loss changes from step to step in training (a new draw each step) and not in eval."""
    batch = make_batch(model, [1.0, 1.6], ["hello world", "good morning"])
    with torch.no_grad():
        eval_loss = model(**batch).loss
        model.train()
        train_losses = [model(**batch).loss for _ in range(2)]
        model.eval()
        assert torch.equal(model(**batch).loss, eval_loss)
    assert not torch.equal(train_losses[0], train_losses[1])


def tone_mel(hz: float) -> torch.Tensor:
    """The log-mel of a 1 s sine at hz: (80, 100)."""
    from audio import SAMPLE_RATE, log_mel
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    return log_mel((0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 80)


@pytest.mark.parametrize("factor", [0.9, 1.1])
@pytest.mark.parametrize("hz", [700.0, 2500.0])
def test_vtlp_moves_a_tone_to_where_the_warp_says(factor, hz):
    """A filter centred at f reads the spectrum at factor * f (below the 4.8 kHz knee), so a tone at
    hz lands where a tone at hz / factor would: lower for a factor above 1 (a longer vocal tract)."""
    from audio import vtlp
    original = tone_mel(hz).mean(1)  # (80,): the spectrum over time
    warped = vtlp(tone_mel(hz)[None], torch.tensor([factor]))[0].mean(1)
    expected = tone_mel(hz / factor).mean(1)
    assert warped.argmax() == expected.argmax() != original.argmax()
    similarity = partial(torch.nn.functional.cosine_similarity, dim=0)
    assert similarity(warped, expected) > max(0.98, similarity(original, expected) + 0.04)


def test_vtlp_is_the_identity_at_factor_1_and_warps_each_utterance_by_its_own_factor():
    from audio import vtlp
    torch.manual_seed(0)
    mel = torch.randn(2, 80, 30)
    assert torch.equal(vtlp(mel, torch.ones(2)), mel)
    both = vtlp(mel, torch.tensor([1.1, 0.9]))
    assert torch.equal(both[0], vtlp(mel[:1], torch.tensor([1.1]))[0])
    assert torch.equal(both[1], vtlp(mel[1:], torch.tensor([0.9]))[0])
    assert not torch.equal(both[0], mel[0])
    near_nyquist = tone_mel(7600.0)[None].expand(2, -1, -1)  # above the knee the warp tapers to none
    assert vtlp(near_nyquist, torch.tensor([1.1, 0.9])).mean(2).argmax(1).tolist() == \
        [near_nyquist[0].mean(1).argmax().item()] * 2


def test_vtlp_warps_only_in_training(tiny_config):
    assert_augments_only_in_training(build(tiny_config, "projector", vtlp=0.1))


def test_warm_start_from_a_fully_fine_tuned_dir_loads_its_llm(tiny_config, tmp_path):
    """A stage on top of full fine-tuning (or a DDP resume of one): the new model is built from the
    base LLM, and load_trained reads the dir's own llm/ weights into it."""
    stage1 = build(tiny_config, "llm")
    train_steps(stage1)
    stage1.save_pretrained(tmp_path / "stage1")
    stage2 = build(tiny_config, "llm")  # the base LLM, as train.py builds it
    assert not torch.equal(stage2.llm.get_input_embeddings().weight, stage1.llm.get_input_embeddings().weight)
    stage2.load_trained(tmp_path / "stage1", warm_start=True)
    for name, value in stage1.llm.state_dict().items():
        assert torch.equal(stage2.llm.state_dict()[name], value), name


def test_warm_start_of_full_fine_tuning_from_a_lora_run_folds_its_adapters(tiny_config, tmp_path):
    """--train_llm --init_from a LoRA run: the adapters are folded into the LLM's weights, so the new
    model starts computing what the LoRA run computed; LoRA and --train_llm together are refused
    (peft would save only the adapters, losing the trained LLM)."""
    lora = build(tiny_config, "lora", lora_dropout=0.0)
    train_steps(lora)
    assert any(p.abs().sum() > 0 for n, p in lora.named_parameters() if ".lora_B." in n)
    lora.save_pretrained(tmp_path / "lora")
    full = build(tiny_config, "llm")
    batch = make_batch(lora, [1.0, 1.6], ["hello world", "good morning to you"])
    before = full(**batch).logits
    full.load_trained(tmp_path / "lora", warm_start=True)
    expected = lora(**batch).logits
    assert not torch.allclose(before, expected, atol=1e-3)  # the adapters changed what the LLM computes
    torch.testing.assert_close(full(**batch).logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="lora_rank 0"):
        build(tiny_config, "lora", train_llm=True)


def test_cpu_bf16_autocast_only_where_the_cpu_has_native_bf16(monkeypatch, capsys):
    import train
    if torch.cuda.is_available():
        pytest.skip("the flag is for CPU runs")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert train.cpu_bf16_autocast_wanted(True) is False
    assert "no native bf16" in capsys.readouterr().err
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert train.cpu_bf16_autocast_wanted(True) is True and train.cpu_bf16_autocast_wanted(False) is False


@pytest.mark.parametrize("trains,encoder_lr,projector_lr,llm_lr", [
    ("lora", None, None, None), ("lora", 1e-5, None, None), ("lora", None, 5e-3, None), ("lora", 1e-5, 5e-3, None),
    ("lora", None, None, 2e-5), ("llm", None, None, 2e-5), ("llm", 1e-5, 5e-3, 2e-5)])
def test_part_learning_rates_set_only_their_groups(tiny_config, tmp_path, trains, encoder_lr, projector_lr, llm_lr):
    """--encoder_learning_rate / --projector_learning_rate / --llm_learning_rate put the encoder's
    trained blocks / the projector / the LLM's own weights (--train_llm) in groups of their own lr, the
    LoRA adapters (inside the LLM's modules) keep --learning_rate; weight decay still skips norms and
    biases; every trained parameter is in exactly one group."""
    from transformers import TrainingArguments

    import train
    model = build(tiny_config, "lora+encoder_all") if trains == "lora" else build(tiny_config, "llm", train_encoder_layers=-1)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.01, report_to="none",
                             use_cpu=True)
    trainer = train.SpeechLLMTrainer(model=model, args=args, encoder_learning_rate=encoder_lr,
                                     projector_learning_rate=projector_lr, llm_learning_rate=llm_lr)
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [(group["lr"], group["weight_decay"], names[id(p)]) for group in optimizer.param_groups
               for p in group["params"]]
    assert sorted(n for _, _, n in grouped) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    decay = set(trainer.get_decay_parameter_names(model))
    for lr, wd, name in grouped:
        part_lr = None if ".lora_" in name else {"encoder": encoder_lr, "projector": projector_lr,
                                                  "llm": llm_lr}[name.split(".")[0]]
        assert lr == (part_lr if part_lr is not None else 1e-3), name
        assert wd == (0.01 if name in decay else 0.0), name
    assert {n.split(".")[0] for _, _, n in grouped} == {"encoder", "projector", "llm"}
    assert any((".lora_" in n) if trains == "lora" else n.endswith("down_proj.weight") for _, _, n in grouped)
    assert any(wd == 0.0 for _, wd, _ in grouped) and any(wd == 0.01 for _, wd, _ in grouped)
