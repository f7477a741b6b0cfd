import json
import math

import pytest
import torch
from conftest import synth_audio

from audio import log_mel
from data import Collator
from decoding import transcripts
from model import N_FRAMES_30S, SpeechLLM, SpeechLLMConfig, merge_audio_embeds, num_audio_tokens, whisper_encode

INSTRUCTION = "Transcribe the speech."


def make_batch(model, seconds, transcripts=None, inference=False, instruction=INSTRUCTION):
    transcripts = transcripts or ["hello"] * len(seconds)
    items = [dict(mel=log_mel(synth_audio(i, s), model.n_mels, model.config.pad_to_30s), txt=t,
                  instruction=instruction) for i, (s, t) in enumerate(zip(seconds, transcripts))]
    return on_device(Collator(model.data_spec(), inference=inference)(items), model.device)


def on_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@pytest.mark.parametrize("seconds", [0.05, 1.0, 2.3, 29.99, 30.0, 45.5])
def test_audio_token_count_follows_audio_length(tiny_model, seconds):
    mel = log_mel(synth_audio(0, seconds), 80)
    expected = sum(math.ceil(math.ceil(w / 2) / 5) for w in mel.split(N_FRAMES_30S, dim=-1) for w in [w.shape[-1]])
    assert num_audio_tokens(mel.shape[-1], kernel=5) == expected
    embeds = tiny_model.encode_audio(mel[None], torch.tensor([mel.shape[-1]]))
    assert embeds.shape == (expected, tiny_model.llm.config.hidden_size)
    if seconds in (1.0, 30.0):
        assert expected == 10 * seconds  # k=5: 10 audio tokens per second


def test_pad_to_30s_is_whispers_native_input(tiny_model):
    """Padded to 30 s, the masked encoder equals openai-whisper's own encoder, and gives 300 tokens."""
    mel = log_mel(synth_audio(0, 3.0), 80, pad_to_30s=True)[None]
    assert mel.shape[-1] == N_FRAMES_30S
    ours, frames = whisper_encode(tiny_model.encoder, mel, torch.tensor([N_FRAMES_30S]))
    torch.testing.assert_close(ours, tiny_model.encoder(mel), rtol=1e-4, atol=1e-4)
    assert tiny_model.num_audio_tokens(mel.shape[-1]) == 300


def test_batched_encoding_equals_one_by_one(tiny_model):
    batch = make_batch(tiny_model, [2.0, 0.7, 1.3])
    together = tiny_model.encode_audio(batch["mel"], batch["mel_lengths"])
    alone = [tiny_model.encode_audio(batch["mel"][i:i + 1, :, :n], n[None]) for i, n in enumerate(batch["mel_lengths"])]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-5)


def test_merge_puts_audio_embeddings_exactly_at_placeholders(tiny_model):
    batch = make_batch(tiny_model, [1.0, 2.5], ["one", "two three four"])
    text_embeds = tiny_model.llm.get_input_embeddings()(batch["input_ids"])
    audio_embeds = tiny_model.encode_audio(batch["mel"], batch["mel_lengths"])
    merged = tiny_model.embed(batch["mel"], batch["mel_lengths"], batch["input_ids"], batch["audio_mask"])
    mask = batch["audio_mask"]
    assert mask.sum(1).tolist() == [tiny_model.num_audio_tokens(n) for n in batch["mel_lengths"].tolist()] == [10, 25]
    torch.testing.assert_close(merged[mask], audio_embeds)  # row-major: utterance 0's tokens, then 1's
    torch.testing.assert_close(merged[~mask], text_embeds[~mask])
    # the audio sits inside the user turn, right after the instruction
    row = batch["input_ids"][0].tolist()
    first = mask[0].nonzero()[0].item()
    assert tiny_model.tokenizer.decode(row[:first]).endswith(INSTRUCTION)
    with pytest.raises(ValueError, match="placeholders"):
        merge_audio_embeds(text_embeds, audio_embeds[1:], mask)


def test_label_mask_covers_exactly_answer_and_end_of_turn(tiny_model):
    batch = make_batch(tiny_model, [1.0, 2.0], ["hello world", "a longer transcript here"])
    tok = tiny_model.tokenizer
    for row, labels, attention, txt in zip(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                           ["hello world", "a longer transcript here"]):
        trained = labels != -100
        answer = tok(txt, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        assert labels[trained].tolist() == answer
        assert row[trained].tolist() == answer  # labels are the input ids themselves (the LLM shifts)
        # the trained span is contiguous, right after "<|im_start|>assistant\n", before the padding
        positions = trained.nonzero().flatten()
        assert positions.tolist() == list(range(positions[0], positions[0] + len(answer)))
        assert tok.decode(row[: positions[0]]).endswith("<|im_start|>assistant\n")
        assert attention[positions[-1] + 1:].sum() == 0


def test_instruction_per_sample_changes_the_prompt(tiny_model):
    a = tiny_model.prompt("Transcribe the speech.", 4, "hi")
    b = tiny_model.prompt("Write down what is said.", 4, "hi")
    assert "Write down what is said." in tiny_model.tokenizer.decode(b["input_ids"])
    assert a["labels"][-3:] == b["labels"][-3:] and a["input_ids"] != b["input_ids"]


def test_only_projector_parameters_receive_gradients(tiny_model):
    tiny_model.train()
    assert not tiny_model.llm.training and not tiny_model.encoder.training and tiny_model.projector.training
    loss = tiny_model(**make_batch(tiny_model, [1.0, 1.5])).loss
    loss.backward()
    for name, p in tiny_model.named_parameters():
        if name.startswith("projector."):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def one_utterance(batch, i):
    """Utterance i of an inference batch as a batch of one, without its padding."""
    single = {k: v[i:i + 1] for k, v in batch.items()}
    keep = single["attention_mask"][0].bool()
    single.update(input_ids=single["input_ids"][:, keep], attention_mask=single["attention_mask"][:, keep],
                  audio_mask=single["audio_mask"][:, keep], mel=single["mel"][..., : single["mel_lengths"][0]])
    return single


def loud_projector(model, seed=0):
    """Large random projector weights, so that the audio steers the random LLM's output."""
    torch.manual_seed(seed)
    for p in model.projector.parameters():
        torch.nn.init.normal_(p, std=0.3)


def test_batched_greedy_equals_one_by_one(tiny_model, device):
    tiny_model.to(device)
    loud_projector(tiny_model)
    seconds = [0.8, 2.6, 1.7, 1.2]
    batch = make_batch(tiny_model, seconds, inference=True)
    assert (batch["attention_mask"][:, 0] == 0).any()  # prompts of different length: left padding is in play
    lengths = dict(min_new_tokens=4, max_new_tokens=12)  # a random LLM would end at once
    pad = tiny_model.prompt.placeholder_id

    def unpadded(ids):
        ids = ids.tolist()
        while ids and ids[-1] == pad:
            ids.pop()
        return ids

    together = [unpadded(ids) for ids in tiny_model.generate(**batch, **lengths)]
    alone = []
    for i in range(len(seconds)):
        single = one_utterance(batch, i)
        alone.append(unpadded(tiny_model.generate(**single, **lengths)[0]))
    assert together == alone
    assert len({tuple(ids) for ids in together}) > 1  # the comparison is not vacuous


def answer_logprob(model, batch, answer_ids: list[int]) -> float:
    """Sum of log-probabilities of the answer tokens after the prompt (teacher forcing)."""
    ids = torch.cat([batch["input_ids"], torch.tensor([answer_ids])], 1)
    audio_mask = torch.cat([batch["audio_mask"], torch.zeros(1, len(answer_ids), dtype=torch.bool)], 1)
    embeds = model.embed(batch["mel"], batch["mel_lengths"], ids, audio_mask)
    logprobs = model.llm(inputs_embeds=embeds).logits.log_softmax(-1)[0, -len(answer_ids) - 1:-1]
    return logprobs.gather(1, torch.tensor(answer_ids)[:, None]).sum().item()


def test_beam_search_returns_the_best_scoring_hypothesis(tiny_model):
    """Fixed-length hypotheses (eos suppressed) make scores comparable. Beam search returns its
    beams best first by the model's own log-probability, and finds better ones than greedy."""
    fixed = dict(max_new_tokens=5, min_new_tokens=5)
    beats, worse = 0, 0
    for seed in range(8):
        loud_projector(tiny_model, seed)  # a different "speech" for the same random LLM
        batch = make_batch(tiny_model, [1.0], inference=True)
        greedy = tiny_model.generate(**batch, **fixed)[0].tolist()
        assert tiny_model.generate(**batch, num_beams=1, **fixed)[0].tolist() == greedy
        beams = tiny_model.generate(**batch, num_beams=4, num_return_sequences=4, **fixed).tolist()
        assert tiny_model.generate(**batch, num_beams=4, **fixed)[0].tolist() == beams[0]
        with torch.no_grad():
            scores = [answer_logprob(tiny_model, batch, ids) for ids in beams]
            greedy_score = answer_logprob(tiny_model, batch, greedy)
        assert scores == sorted(scores, reverse=True)
        beats += scores[0] > greedy_score + 1e-4
        worse += scores[0] < greedy_score - 1e-4  # beam search may prune the greedy path; rarely
    assert beats >= 2 and worse <= 1, (beats, worse)


def test_save_pretrained_from_pretrained_reproduces_outputs(tiny_model, tmp_path):
    loud_projector(tiny_model, seed=1)  # not the initialization from_pretrained would give anyway
    tiny_model.config.instruction = "Please transcribe."
    batch = make_batch(tiny_model, [1.2, 0.6], inference=True, instruction="Please transcribe.")
    tiny_model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "speechllm_config.json"]
    loaded = SpeechLLM.from_pretrained(tmp_path)
    assert loaded.config == tiny_model.config
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.generate(**batch, max_new_tokens=8).tolist() == tiny_model.generate(**batch, max_new_tokens=8).tolist()
    assert loaded.transcribe([synth_audio(0, 1.2)], instruction="Please transcribe.") == transcripts(
        tiny_model, tiny_model.generate(**{k: v[:1] for k, v in make_batch(tiny_model, [1.2], inference=True,
                                                                          instruction="Please transcribe.").items()}))


def test_a_config_saved_before_a_field_existed_loads_as_that_model_was_used(tmp_path):
    """The defaults that live in the config (the type's kernel, 0.5 with a CTC head) are not what
    a model saved before those fields was used with: a conv kernel of 5, the LLM alone."""
    path = tmp_path / "speechllm_config.json"
    path.write_text(json.dumps(dict(whisper_model="W", llm_model="L", ctc_weight=1.0, unknown_field=3)))
    config = SpeechLLMConfig.from_json(path)
    assert (config.projector_type, config.projector_kernel, config.ctc_decode_weight) == ("conv", 5, 0.0)
    assert SpeechLLMConfig(whisper_model="W", llm_model="L", ctc_weight=1.0).ctc_decode_weight == 0.5
    assert SpeechLLMConfig(whisper_model="W", llm_model="L", projector_type="qwen2-audio").projector_kernel == 2


def test_loss_on_label_positions_only_equals_the_llms_own_loss(tiny_model, device):
    tiny_model.to(device)
    loud_projector(tiny_model)
    batch = make_batch(tiny_model, [1.0, 2.4, 0.6], ["one", "two three four five", "six seven"])
    embeds = tiny_model.embed(batch["mel"], batch["mel_lengths"], batch["input_ids"], batch["audio_mask"])
    full = tiny_model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
    ours = tiny_model(**batch)
    torch.testing.assert_close(ours.loss, full.loss, rtol=1e-5, atol=1e-6)
    assert ours.logits.shape[1] < full.logits.shape[1]  # the LM head did skip the prompt


def mixed_batch(model):
    """Left-padded prompts of different lengths; the third has another instruction, so the prefix
    shared by all three rows is only the system prompt and the start of the user turn."""
    instructions = [INSTRUCTION, INSTRUCTION, "Write down what is said."]
    items = [dict(mel=log_mel(synth_audio(i, s), model.n_mels), instruction=instruction)
             for i, (s, instruction) in enumerate(zip([0.8, 2.6, 1.7], instructions))]
    return on_device(Collator(model.data_spec(), inference=True)(items), model.device)


@pytest.mark.parametrize("num_beams", [1, 4])
@pytest.mark.parametrize("rows", [[0, 1], [0, 1, 2]])  # one shared instruction; mixed instructions
def test_prefix_kv_cache_decodes_exactly_as_without(tiny_model, num_beams, rows, device):
    from prompt import shared_prefix_length

    tiny_model.to(device)
    loud_projector(tiny_model)
    batch = {k: v[rows] for k, v in mixed_batch(tiny_model).items()}
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding is in play
    instruction_ids = tiny_model.tokenizer(INSTRUCTION, add_special_tokens=False)["input_ids"]
    shared = shared_prefix_length(batch["input_ids"], batch["attention_mask"], batch["audio_mask"])
    before_audio = len(tiny_model.prompt._pieces(INSTRUCTION)[0])
    assert shared == (before_audio if len(rows) == 2 else before_audio - len(instruction_ids))
    lengths = dict(min_new_tokens=4, max_new_tokens=10, num_beams=num_beams)
    without = tiny_model.generate(**batch, prefix_cache=False, **lengths)
    with_cache = tiny_model.generate(**batch, prefix_cache=True, **lengths)
    assert with_cache.tolist() == without.tolist()
    assert tiny_model.generate(**batch, **lengths).tolist() == without.tolist()  # a reused cache: the same
    assert len({tuple(ids) for ids in without.tolist()}) > 1  # the comparison is not vacuous


def test_beam_search_encodes_each_utterance_once(tiny_model):
    """generate() expands the finished embeddings to the beams; the encoder never sees beams."""
    encoded_rows = []
    hook = tiny_model.encoder.conv1.register_forward_hook(lambda module, args, out: encoded_rows.append(len(args[0])))
    batch = make_batch(tiny_model, [0.8, 1.5], inference=True)
    tiny_model.generate(**batch, num_beams=4, max_new_tokens=3)
    hook.remove()
    assert encoded_rows == [2]


def loss_and_projector_grads(model, batch, **forward_kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **forward_kwargs).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.projector.parameters()]


def record_layer_calls(model) -> list[int]:
    """The sequence length each call of the LLM's first attention sees (a recompute is one more call;
    inside the layer, since transformers keeps the layer's own hooks outside the checkpoint)."""
    calls = []
    model.llm.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True)
    return calls


def test_training_prefix_cache_gives_the_llms_loss_and_gradients_on_fewer_tokens(tiny_model):
    loud_projector(tiny_model)
    tiny_model.train()
    batch = make_batch(tiny_model, [1.0, 2.4, 0.6], ["one", "two three four five", "six seven"])
    calls = record_layer_calls(tiny_model)
    without = loss_and_projector_grads(tiny_model, batch, prefix_cache=False)
    with_cache = loss_and_projector_grads(tiny_model, batch)
    again = loss_and_projector_grads(tiny_model, batch)  # from the cache computed in the previous step
    prefix_length = len(tiny_model.prompt._pieces(INSTRUCTION)[0])
    length = batch["input_ids"].shape[1]
    # the prefix's own forward runs once, then every step sees the rows without it
    assert calls == [length, prefix_length, length - prefix_length, length - prefix_length]
    for loss, grads in (with_cache, again):
        torch.testing.assert_close(loss, without[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads, without[1], rtol=1e-4, atol=1e-6)
    assert min(g.abs().max() for g in without[1]) > 1e-3  # gradients well above the tolerance


@pytest.mark.parametrize("trains", [dict(lora_rank=4, lora_dropout=0.0), dict(train_llm=True)], ids=["lora", "llm"])
def test_training_prefix_runs_once_per_batch_with_the_gradients_of_one_run_per_row(tiny_config, trains):
    """While LoRA or the LLM trains, the opening's keys and values depend on the step's weights: the
    LLM runs on the opening once per batch, with gradients, and every weight's gradient is the one
    of running it on each row."""
    from dataclasses import replace

    torch.manual_seed(0)
    model = SpeechLLM(replace(tiny_config, **trains))
    loud_projector(model)
    with torch.no_grad():  # LoRA's B starts at zero, which gives its A no gradient
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.train()
    batch = make_batch(model, [1.0, 2.4, 0.6], ["one", "two three four five", "six seven"])
    trained = [p for p in model.parameters() if p.requires_grad]
    calls = record_layer_calls(model)

    def loss_and_grads(**forward_kwargs):
        model.zero_grad(set_to_none=True)
        loss = model(**batch, **forward_kwargs).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trained]

    without = loss_and_grads(prefix_cache=False)
    with_prefix = loss_and_grads()
    again = loss_and_grads()
    prefix_length = len(model.prompt._pieces(INSTRUCTION)[0])
    length = batch["input_ids"].shape[1]
    assert calls == [length] + [prefix_length, length - prefix_length] * 2  # the opening once per batch, for 1 row
    llm_grads = [g for p, g in zip(trained, without[1]) if p in set(model.llm.parameters())]
    assert llm_grads and min(g.abs().max() for g in llm_grads) > 1e-4  # the LLM's own weights get gradients
    for loss, grads in (with_prefix, again):
        torch.testing.assert_close(loss, without[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads, without[1], rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_recomputes_the_frozen_llm_with_the_same_gradients(tiny_model):
    loud_projector(tiny_model)
    batch = make_batch(tiny_model, [1.0, 2.4], ["one", "two three four five"])
    tiny_model.train()
    reference = loss_and_projector_grads(tiny_model, batch, prefix_cache=False)
    tiny_model.activation_checkpointing_enable()
    calls = record_layer_calls(tiny_model)
    checkpointed = loss_and_projector_grads(tiny_model, batch)
    length = batch["input_ids"].shape[1]
    assert calls == [length, length]  # forward + recompute in backward; no prefix cache (the recompute drops it)
    assert not any(m.training for m in tiny_model.llm.modules() if not getattr(m, "gradient_checkpointing", False))
    torch.testing.assert_close(checkpointed[0], reference[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(checkpointed[1], reference[1], rtol=1e-4, atol=1e-6)
    tiny_model.eval()
    calls.clear()
    with torch.no_grad():
        tiny_model(**batch)
    prefix_length = len(tiny_model.prompt._pieces(INSTRUCTION)[0])
    assert calls == [prefix_length, length - prefix_length]  # eval: no recompute, so the prefix cache is back


def test_audio_embeddings_start_on_the_scale_of_token_embeddings(tiny_model):
    token_norms = tiny_model.llm.get_input_embeddings().weight.norm(dim=-1)  # (vocab,)
    batch = make_batch(tiny_model, [1.0, 2.4])
    with torch.no_grad():
        audio_norms = tiny_model.encode_audio(batch["mel"], batch["mel_lengths"]).norm(dim=-1)  # (num_audio_tokens,)
    # LayerNorm output has unit RMS per dimension; the gain sets the RMS of the token embeddings
    torch.testing.assert_close(audio_norms, torch.full_like(audio_norms, float(token_norms.pow(2).mean().sqrt())),
                               rtol=1e-3, atol=0)


def test_ctc_loss_leaves_a_trained_llms_token_embeddings_to_the_llm(tiny_config):
    """Under --train_llm the CTC term trains the audio side and its blank, never the LLM's token
    embeddings (its targets): only the LLM's own loss moves those."""
    from dataclasses import replace

    torch.manual_seed(0)
    model = SpeechLLM(replace(tiny_config, ctc_weight=1.0, train_llm=True))
    batch = make_batch(model, [1.0, 1.5], ["one two", "three four five"])
    audio_embeds = torch.randn(int(batch["audio_mask"].sum()), 64, requires_grad=True)
    inputs_embeds = model.llm.get_input_embeddings()(batch["input_ids"]).detach()
    inputs_embeds = inputs_embeds.masked_scatter(batch["audio_mask"][..., None], audio_embeds)
    model.ctc_loss(inputs_embeds, batch["audio_mask"], batch["labels"]).backward()
    assert audio_embeds.grad.abs().sum() > 0 and model.projector.ctc_blank.grad.abs().sum() > 0
    assert model.llm.get_input_embeddings().weight.grad is None


def test_ctc_loss_rewards_audio_embeddings_that_spell_the_transcript(tiny_config, tmp_path):
    from dataclasses import replace

    torch.manual_seed(0)
    model = SpeechLLM(replace(tiny_config, ctc_weight=1.0))
    batch = make_batch(model, [1.0, 1.5], ["one two", "three four five"])
    inputs_embeds = model.llm.get_input_embeddings()(batch["input_ids"])  # (B, L, D)
    labels, audio_mask = batch["labels"], batch["audio_mask"]
    random_audio = inputs_embeds.masked_scatter(audio_mask[..., None], torch.randn(int(audio_mask.sum()), 64))
    # audio embeddings = the transcript's token embeddings (x30: confident), one token per frame, then
    # blanks; the blank on the scale of a token embedding (std 0.2), so neither outscores the other
    spelled = inputs_embeds.clone()
    with torch.no_grad():
        model.projector.ctc_blank.copy_(0.2 * torch.randn(64))
    for row in range(2):
        tokens = labels[row][labels[row] != -100][:-len(model.prompt.end_of_turn_ids)]
        frames = audio_mask[row].nonzero().flatten()
        assert len(frames) > len(tokens)
        spelled[row, frames] = 30 * model.projector.ctc_blank.detach()
        spelled[row, frames[:len(tokens)]] = 30 * model.llm.get_input_embeddings()(tokens)
    good = model.ctc_loss(spelled, audio_mask, labels)
    bad = model.ctc_loss(random_audio, audio_mask, labels)
    assert good < 0.1 < 5 < bad
    # in training, the CTC term of the spliced-in audio adds to the LLM's loss (with the prefix KV
    # cache too) and trains the blank; in eval the loss is the LLM's alone
    model.eval()
    llm_loss = model(**batch).loss
    with torch.no_grad():
        embeds = model.embed(batch["mel"], batch["mel_lengths"], batch["input_ids"], audio_mask)
        expected = llm_loss + model.ctc_loss(embeds, audio_mask, labels)
    model.train()
    for prefix_cache in (False, True):
        torch.testing.assert_close(model(**batch, prefix_cache=prefix_cache).loss, expected)
    out = model(**batch)
    out.loss.backward()
    assert model.projector.ctc_blank.grad is not None and model.projector.ctc_blank.grad.abs().sum() > 0
    without = SpeechLLM(tiny_config)  # no blank, no CTC term
    assert not any("ctc_blank" in name for name, _ in without.named_parameters())
    # a warm start may switch the CTC aid off or on; the projector proper carries over
    model.save_pretrained(tmp_path / "ctc")
    without.load_trained(tmp_path / "ctc", warm_start=True)
    torch.testing.assert_close(without.projector.linear2.weight, model.projector.linear2.weight)
    without.save_pretrained(tmp_path / "plain")
    again = SpeechLLM(replace(tiny_config, ctc_weight=1.0))
    again.load_trained(tmp_path / "plain", warm_start=True)
    torch.testing.assert_close(again.projector.conv.weight, model.projector.conv.weight)
