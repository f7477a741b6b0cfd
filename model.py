"""SpeechLLM: a frozen Whisper encoder -> a trainable projector -> a frozen causal LLM.

Read top to bottom: the encoder forward on trimmed audio, the merge of audio embeddings into the
text embeddings, what trains (the projector; optionally LoRA on the LLM, the encoder's top blocks,
or the whole LLM), and the SpeechLLM module (the data path: encode, splice, forward and loss, the
prompt's KV cache, save/load; generate and transcribe only call decoding.decode). Elsewhere: the
pretrained parts load in loading.py, the projector types are in projectors.py, the chat prompt and
a batch's layout in prompt.py, and decoding (options, strategies, guards, confidence) in decoding.py.
"""
import contextlib
import copy
import functools
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import whisper
from safetensors.torch import load_file, save_file
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.modeling_outputs import CausalLMOutputWithPast

from audio import spec_augment, vtlp
from data import Collator, DataSpec
from decoding import CTCLogits, DecodingOptions, decode, decoding_options, transcripts
from loading import dequantize_int8, load_llm, load_whisper, resolve_bundled  # noqa: F401 (resolve_bundled: re-exported)
from projectors import PROJECTOR_TYPES
from prompt import ChatPrompt, shared_prefix_length

N_FRAMES_30S = whisper.audio.N_FRAMES  # 3000 mel frames = 30 s, Whisper's whole context
CONFIG_NAME = "speechllm_config.json"
WEIGHTS_NAME = "model.safetensors"  # the name HF Trainer looks for when resuming


# ----------------------------------------------------------------------------------------
# Encoder on trimmed input, audio token count (the projector types: projectors.py)


def num_encoder_frames(num_mel_frames: torch.Tensor) -> torch.Tensor:
    return (num_mel_frames + 1) // 2  # Whisper's conv2 has stride 2


def num_audio_tokens(num_mel_frames: int, kernel: int) -> int:
    """Audio tokens the projector makes of an utterance: every 30 s window separately."""
    full_windows, rest = divmod(int(num_mel_frames), N_FRAMES_30S)
    tokens_per_window = lambda n: math.ceil((n + 1) // 2 / kernel)  # noqa: E731
    return full_windows * tokens_per_window(N_FRAMES_30S) + (tokens_per_window(rest) if rest else 0)


def whisper_encode(encoder: whisper.model.AudioEncoder, mel: torch.Tensor, mel_lengths: torch.Tensor):
    """Whisper's encoder on inputs of any length <= 30 s. Padded frames are masked out of the
    convolutions and the attention, so a batched utterance encodes exactly as it would alone.
    mel: (B, n_mels, T), mel_lengths: (B,) -> (B, ceil(T/2), D), valid frame counts (B,)."""
    frames = torch.arange(mel.shape[-1], device=mel.device)
    x = F.gelu(encoder.conv1(mel))  # (B, D, T)
    x = x * (frames < mel_lengths[:, None])[:, None].to(x.dtype)  # as if zero-padded, like one utterance alone
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)  # (B, T', D)
    lengths = num_encoder_frames(mel_lengths)
    valid = torch.arange(x.shape[1], device=x.device) < lengths[:, None]  # (B, T')
    x = x + encoder.positional_embedding[: x.shape[1]].to(x.dtype)
    attn_mask = valid[:, None, None, :]  # (B, 1, 1, T'): keys of padded frames are never attended
    for block in encoder.blocks:
        x = x + _masked_self_attention(block.attn, _layer_norm(block.attn_ln, x), attn_mask)
        x = x + block.mlp(_layer_norm(block.mlp_ln, x))
    return _layer_norm(encoder.ln_post, x), lengths


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    # In fp32 whatever the weights' dtype, as Whisper intends; its own LayerNorm casts only the input
    # to fp32, which CPU kernels refuse next to bf16 weights.
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps).to(x.dtype)


def _masked_self_attention(attn, x, attn_mask):
    # openai-whisper's own attention takes no padding mask, so run its weights through SDPA.
    (B, T, D), H = x.shape, attn.n_head
    q, k, v = (proj(x).view(B, T, H, D // H).transpose(1, 2) for proj in (attn.query, attn.key, attn.value))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, D/H)
    return attn.out(out.transpose(1, 2).reshape(B, T, D))


# ----------------------------------------------------------------------------------------
# The merge of audio into the text embeddings (the prompt's ids: prompt.py)


def merge_audio_embeds(inputs_embeds: torch.Tensor, audio_embeds: torch.Tensor, audio_mask: torch.Tensor):
    """Put the audio embeddings, utterance after utterance, at the placeholder positions.
    inputs_embeds: (B, L, llm_dim), audio_embeds: (num_audio_tokens in batch, llm_dim), audio_mask: (B, L)."""
    if audio_mask.sum() != audio_embeds.shape[0]:
        raise ValueError(f"{int(audio_mask.sum())} audio placeholders but {audio_embeds.shape[0]} audio embeddings")
    return inputs_embeds.masked_scatter(audio_mask[..., None], audio_embeds.to(inputs_embeds.dtype))


# ----------------------------------------------------------------------------------------
# What trains: the projector always; options add LoRA on the LLM, the encoder's top blocks, the LLM

LLM_DIR = "llm"  # a fully fine-tuned LLM is saved as an HF model directory inside the model dir


def add_lora(llm, config) -> None:
    """LoRA adapters (peft) injected into the LLM's linear layers in place: the base weights stay
    frozen, and the LLM stays a plain HF model (generate, activation checkpointing unchanged)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = config.lora_target_modules
    inject_adapter_in_model(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                       lora_dropout=config.lora_dropout,
                                       target_modules=targets if targets == "all-linear" else targets.split(",")),
                            llm)


def grow_lora(factor: torch.Tensor, fresh: torch.Tensor, name: str, scale_ratio: float) -> torch.Tensor:
    """A LoRA factor trained at a smaller rank, as the first ranks of a fresh larger one (--init_from a
    run with a smaller --lora_rank): A's rows (rank, in) and B's columns (out, rank) go first, B times the
    old scale over the new (alpha / rank), so the adapters compute what they did; the new ranks keep
    their fresh start (A random, B zero: no change until they train)."""
    grown = fresh.detach().clone()
    if ".lora_A." in name:  # (rank, in)
        grown[: factor.shape[0]] = factor
    else:  # lora_B: (out, rank)
        grown[:, : factor.shape[1]] = factor * scale_ratio
    return grown


def trained_encoder_prefixes(config, num_blocks: int) -> tuple[str, ...]:
    """Parameter-name prefixes of the encoder parts that train: the top N blocks and the final LayerNorm."""
    n = num_blocks if config.train_encoder_layers < 0 else min(config.train_encoder_layers, num_blocks)
    if n == 0:
        return ()
    return tuple(f"encoder.blocks.{i}." for i in range(num_blocks - n, num_blocks)) + ("encoder.ln_post.",)


def model_part(parameter_name: str) -> str:
    """The part a SpeechLLM weight belongs to (its learning rate, average_checkpoints --parts): encoder,
    projector, llm (the LLM's own weights) or lora (the adapters, which sit inside the LLM's modules)."""
    return "lora" if ".lora_" in parameter_name else parameter_name.split(".")[0]


def folded_lora(weights: dict, lora_config: "SpeechLLMConfig", llm_weights: dict) -> dict:
    """A LoRA run's weights for a model that trains the whole LLM instead (--init_from it with
    --train_llm): each adapter pair folded into its linear layer's weight, W + B A * alpha / rank.
    llm_weights: the new model's current weights by name (the base LLM's, where no adapter sits)."""
    scale = lora_config.lora_alpha / lora_config.lora_rank
    folded = {name: value for name, value in weights.items() if ".lora_" not in name}
    for name, a in weights.items():
        if ".lora_A." in name:  # llm.<module>.lora_A.<adapter>.weight (rank, in); B: (out, rank)
            module = name.split(".lora_A.")[0]
            b = weights[name.replace(".lora_A.", ".lora_B.")]
            folded[f"{module}.weight"] = llm_weights[f"{module}.weight"].detach() + (b.float() @ a.float()) * scale
    return folded


def read_llm_weights(llm_dir: Path) -> dict:
    """An HF model directory's weights, single-file or sharded safetensors."""
    index = llm_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS_NAME]
    weights = {}
    for name in files:
        weights.update(load_file(llm_dir / name))
    return weights


# ----------------------------------------------------------------------------------------
# The model


DEFAULT_CTC_DECODE_WEIGHT = 0.5  # measured on the real-speech dev, greedy: w 0 57.85, 0.3 48.77, 0.5 44.87 (README)
# What a model saved before the field existed was used with, where that differs from the default
SAVED_BEFORE_THE_FIELD = dict(projector_kernel=5, ctc_decode_weight=0.0)


def option(default=MISSING, help: str = "", range: str | None = None, **metadata):
    """A config field with what train.py's parser shows (help, aliases, choices) and checks: range, e.g.
    ">= 0, < 1" (train.validate_arguments; every number needs one). flag=False: the run sets it, not a flag."""
    return field(default=default, metadata=dict(help=help, **({"range": range} if range else {}), **metadata))


@dataclass
class SpeechLLMConfig:
    """A model's settings: saved with it (speechllm_config.json), and train.py's flags as they are."""
    whisper_model: str = option(help="whisper name, .pt file, CTranslate2 directory or a `bundled:` name",
                                aliases=["--whisper_model_name_or_path"])
    llm_model: str = option(help="hub id, local directory, .gguf file or a `bundled:` name",
                            aliases=["--llm_model_name_or_path"])
    # configs saved before there were types are conv
    projector_type: str = option("conv", choices=list(PROJECTOR_TYPES), help=(
        "conv: Conv1d + 2-layer MLP; qwen2-audio: Qwen2-Audio's average pooling + one linear layer; "
        "linear: SLAM-ASR's k frames concatenated + linear-ReLU-linear"))
    projector_kernel: int | None = option(None, range=">= 1", help=(  # None: set from the type when made
        "encoder frames (50 per second) per audio token, whatever the type (default: the type's, 5, qwen2-audio 2)"))
    projector_hidden: int = option(2048, range=">= 1", help="hidden layer width (conv, linear)")
    projector_output_norm: bool = option(True, help=(
        "LayerNorm on the audio embeddings, its gain starting at the token embeddings' scale"))
    ctc_weight: float = option(0.0, range=">= 0", help=(
        "training: add ctc_weight * a CTC loss that pulls audio embeddings towards the transcript's token "
        "embeddings; > 0 gives the model its CTC head (for ctc_decode_weight, decode ctc)"))
    instruction: str = option("Transcribe the speech.", help="default; jsonl `instruction` wins")
    pad_to_30s: bool = option(False, help="Whisper's native input: every clip padded to 30 s, 300 audio tokens (slower)")
    spec_augment: bool = option(False, help=(
        "SpecAugment: frequency bands and time spans of the log-mel masked in training (never in eval)"))
    vtlp: float = option(0.0, range=">= 0, < 0.5", help=(
        "vocal tract length perturbation in training: each clip's filterbank warped by a factor drawn "
        "from [1 - vtlp, 1 + vtlp] (0.1 in Jaitly & Hinton, 2013; 0 = off)"))
    # What trains besides the projector (see trainable_parameters); all off: projector only
    lora_rank: int = option(0, range=">= 0", help="LoRA adapters of this rank on the LLM (0 = none)")
    lora_alpha: float = option(16.0, range="> 0", help="LoRA scale: the update is B A * alpha / rank")
    lora_dropout: float = option(0.05, range=">= 0, < 1", help="LoRA's dropout on its input")
    lora_target_modules: str = option("all-linear", help=(
        "comma-separated module names, or all-linear (peft's name for every linear layer of attention and MLP)"))
    train_encoder_layers: int = option(0, range=">= -1", help=(
        "train the encoder's top N blocks and its final LayerNorm (0 = frozen, -1 = all)"))
    train_llm: bool = option(False, help="full fine-tuning of every LLM weight")
    # Decoding defaults (decoding.py): the weight from its flag, the token budget measured by train.py
    ctc_decode_weight: float | None = option(None, help=(  # None: set from ctc_weight when made
        f"the joint CTC + LLM decoding weight saved with the model, in [0, 1) (default: {DEFAULT_CTC_DECODE_WEIGHT} "
        "with a CTC head, else 0); recognize.py --ctc_decode_weight overrides it"))
    # the token budget per utterance: ceil(rate * seconds) + extra (decoding.token_budget)
    max_tokens_per_second: float = option(8.0, flag=False)
    max_tokens_extra: int = option(16, flag=False)

    def __post_init__(self):
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type {self.projector_type!r}: not one of {list(PROJECTOR_TYPES)}")
        if self.train_llm and self.lora_rank > 0:  # a trained LLM needs no adapters; peft would save only those
            raise ValueError("train_llm trains every LLM weight: give lora_rank 0 (a LoRA run's adapters are "
                             "folded into the LLM when a --train_llm run starts --init_from it)")
        if self.projector_kernel is None:
            self.projector_kernel = PROJECTOR_TYPES[self.projector_type].default_kernel
        if self.ctc_decode_weight is None:
            self.ctc_decode_weight = DEFAULT_CTC_DECODE_WEIGHT if self.ctc_weight > 0 else 0.0

    @classmethod
    def from_json(cls, path: Path) -> "SpeechLLMConfig":
        """A saved config; a field it predates gets the value that model was used with."""
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**SAVED_BEFORE_THE_FIELD | {k: v for k, v in data.items() if k in known})


def gathered_if_partitioned(params: list, modifier_rank: int | None = None):
    """DeepSpeed ZeRO-3 keeps parameters partitioned over ranks outside their module's forward: gather
    them for a use outside any forward (the projector's initial gain). Every rank must enter.
    modifier_rank: the rank whose writes to them are kept (partitioned again on exit); None: read only."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _drop_tied_aliases(module, state_dict, prefix, local_metadata):
    """A tied weight (lm_head = token embedding) is one parameter but two state_dict entries; keep
    one, so that excluding frozen parameters (DeepSpeed checkpoints) leaves out the whole LLM."""
    unique = {name for name, _ in module.named_parameters(prefix=prefix[:-1])}
    for name, _ in module.named_parameters(prefix=prefix[:-1], remove_duplicate=False):
        if name not in unique:
            state_dict.pop(name, None)


class SpeechLLM(nn.Module):
    def __init__(self, config: SpeechLLMConfig, dtype=torch.float32, trust_remote_code: bool = False):
        super().__init__()
        self.config = config
        self.encoder = load_whisper(config.whisper_model).encoder.to(dtype)  # Whisper's decoder is not needed
        # Not a config field: a model dir's JSON is data and must not switch on code execution.
        self.llm, self.tokenizer = load_llm(config.llm_model, dtype, trust_remote_code)
        self.n_mels = self.encoder.conv1.in_channels
        # Not a saved field: HF's DeepSpeed integration sizes its "auto" buckets from model.config.hidden_size.
        self.config.hidden_size = self.llm.config.hidden_size
        self.prompt = ChatPrompt(self.tokenizer)
        self.projector = PROJECTOR_TYPES[config.projector_type](
            self.encoder.ln_post.normalized_shape[0], self.llm.config.hidden_size, config.projector_kernel,
            config.projector_hidden, output_norm=config.projector_output_norm,
            ctc_blank=config.ctc_weight > 0).to(dtype)
        if config.projector_output_norm:  # per-dimension RMS of the token embeddings (saved weights override it)
            token_embeds = self.llm.get_input_embeddings().weight
            with gathered_if_partitioned([token_embeds]):  # ZeRO-3 loads the LLM partitioned
                self.projector.norm.weight.data.fill_(token_embeds.float().pow(2).mean().sqrt().item())
        # The CTC loss's scores (training): a module call, so that ZeRO-3 gathers the weights it borrows
        self.ctc_logits = CTCLogits() if self.projector.ctc_blank is not None else None
        if self.ctc_logits is not None and is_deepspeed_zero3_enabled():
            import deepspeed
            for weight in (self.llm.get_input_embeddings().weight, self.projector.ctc_blank):
                deepspeed.zero.register_external_parameter(self.ctc_logits, weight)
        if config.lora_rank > 0:
            add_lora(self.llm, config)
        self.lora_merged = False
        trainable = self.trainable_parameters()
        for name, param in self.named_parameters():
            param.requires_grad_(name in trainable)
        self.train(False)
        self.register_state_dict_post_hook(_drop_tied_aliases)
        self._prefix_caches = {}  # prompt prefix token ids (+ device, dtype, LLM weights) -> its KV cache
        self._prefix_caches_weights = None

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """What this config trains, by name: what the optimizer updates and save_pretrained writes.
        The projector, plus the options' parts: the encoder's top blocks, the LoRA adapters, the LLM."""
        encoder_parts = trained_encoder_prefixes(self.config, len(self.encoder.blocks))

        def trained(name):
            return (name.startswith("projector.") or name.startswith(encoder_parts) or ".lora_" in name
                    or (self.config.train_llm and name.startswith("llm.")))
        return {name: param for name, param in self.named_parameters() if trained(name)}

    @property
    def llm_trains(self) -> bool:
        return self.config.lora_rank > 0 or self.config.train_llm

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # Whisper has no dropout: eval mode whether its top blocks train or not
        self.llm.train(mode and self.llm_trains)  # a frozen LLM stays in eval mode (no dropout); LoRA's dropout trains
        self._checkpointing_in_training(mode)
        return self

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False):
        """The Trainer's --activation_checkpointing: recompute the LLM's layers in the backward pass."""
        self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)
        self.train(self.training)

    def _checkpointing_in_training(self, mode: bool):
        """transformers checkpoints a layer only while that layer is in training mode, but the frozen
        LLM stays in eval mode. Flag just the checkpointed layers themselves (not their attention and
        MLP, so no dropout switches on): with activation checkpointing on, training recomputes them."""
        for module in self.llm.modules():
            if getattr(module, "gradient_checkpointing", False):
                module.training = mode

    @property
    def device(self):
        return next(self.projector.parameters()).device

    def num_audio_tokens(self, num_mel_frames: int) -> int:
        return num_audio_tokens(num_mel_frames, self.config.projector_kernel)

    def data_spec(self) -> DataSpec:
        """What data.py needs of this model, as values. Made when asked: a later change to the config
        (recognize.py --instruction) is in the next one."""
        return DataSpec(prompt=self.prompt,
                        # the module function, not the bound method: the spec holds no reference to the model
                        num_audio_tokens=functools.partial(num_audio_tokens, kernel=self.config.projector_kernel),
                        instruction=self.config.instruction, n_mels=self.n_mels, pad_to_30s=self.config.pad_to_30s,
                        max_positions=self.llm.config.max_position_embeddings)

    def encode_audio(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> torch.Tensor:
        """mel: (B, n_mels, T) -> audio_embeds: (sum of num_audio_tokens over the batch, llm_dim).
        Audio longer than 30 s is encoded as consecutive 30 s windows whose tokens are concatenated."""
        if mel.shape[1] != self.n_mels:  # else a shape error deep inside Whisper's first convolution
            raise ValueError(f"log-mel with {mel.shape[1]} mel bins, but this Whisper encoder takes {self.n_mels} "
                             "(large-v3: 128, earlier models: 80): compute it with data.log_mel(samples, model.n_mels)")
        window = min(mel.shape[-1], N_FRAMES_30S)
        num_windows = math.ceil(mel.shape[-1] / window)
        mel = F.pad(mel, (0, num_windows * window - mel.shape[-1]))
        windows = mel.unflatten(-1, (num_windows, window)).transpose(1, 2).flatten(0, 1)  # (B*W, n_mels, window)
        window_lengths = (mel_lengths[:, None] - torch.arange(num_windows, device=mel.device) * window)
        window_lengths = window_lengths.clamp(0, window).flatten()  # (B*W,)
        windows, window_lengths = windows[window_lengths > 0], window_lengths[window_lengths > 0]
        # No torch.no_grad() needed: autograd records only from the first block with trainable weights
        encoded, frames = whisper_encode(self.encoder, windows.to(self.encoder.conv1.weight.dtype), window_lengths)
        valid_frames = torch.arange(encoded.shape[1], device=mel.device) < frames[:, None]
        encoded = encoded * valid_frames[..., None].to(encoded.dtype)
        audio_embeds = self.projector(encoded.to(next(self.projector.parameters()).dtype))  # (W, tokens, llm_dim)
        tokens = torch.arange(audio_embeds.shape[1], device=mel.device)
        valid_tokens = tokens < (frames[:, None] + self.config.projector_kernel - 1) // self.config.projector_kernel
        return audio_embeds[valid_tokens]

    def embed(self, mel, mel_lengths, input_ids, audio_mask) -> torch.Tensor:
        """Text embeddings with the audio spliced in: (B, L, llm_dim)."""
        return self.splice(input_ids, self.encode_audio(mel, mel_lengths), audio_mask)

    def splice(self, input_ids, audio_embeds, audio_mask) -> torch.Tensor:
        """input_ids (B, L), audio_embeds (num_audio_tokens in batch, llm_dim) -> (B, L, llm_dim)."""
        return merge_audio_embeds(self.llm.get_input_embeddings()(input_ids), audio_embeds, audio_mask)

    def forward(self, mel, mel_lengths, input_ids, attention_mask, audio_mask, labels=None,
                prefix_cache: bool = True):
        if self.training and self.config.vtlp:
            mel = vtlp(mel, 1 + self.config.vtlp * (2 * torch.rand(len(mel), device="cpu") - 1))
        if self.training and self.config.spec_augment:
            mel = spec_augment(mel, mel_lengths)
        inputs_embeds = self.embed(mel, mel_lengths, input_ids, audio_mask)
        if labels is None:
            return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        # Only the transcript is in the loss: the vocabulary-sized LM head runs on the positions that
        # predict a label, not on the system prompt and audio (most of the sequence). Same loss as
        # the LLM's own (mean cross-entropy over labels != -100).
        predicts_label = (labels[:, 1:] != -100).any(0)  # (L-1,): position t predicts token t+1
        positions = predicts_label.nonzero().flatten()  # (K,)
        # The prompt's shared opening (system prompt + instruction) has the same keys and values in
        # every row: the LLM runs on it once (once per run for a frozen LLM), then on the rest of each row.
        prefix_length = self.training_prefix_length(input_ids, attention_mask, audio_mask) if prefix_cache else 0
        past_key_values = None
        if prefix_length > 0:
            past_key_values = self.prefix_kv_cache(input_ids[0, :prefix_length], len(input_ids))
        out = self.llm(inputs_embeds=inputs_embeds[:, prefix_length:], attention_mask=attention_mask,
                       past_key_values=past_key_values, use_cache=past_key_values is not None,
                       logits_to_keep=positions - prefix_length)  # logits: (B, K, vocab)
        targets = labels[:, 1:][:, positions]  # (B, K)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        if self.config.ctc_weight > 0 and self.training:  # a training aid: eval loss stays the LLM's alone
            loss = loss + self.config.ctc_weight * self.ctc_loss(inputs_embeds, audio_mask, labels)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits)

    def ctc_loss(self, inputs_embeds, audio_mask, labels) -> torch.Tensor:
        """CTC between each utterance's audio embeddings and its transcript tokens, an embedding's
        score for a token being its dot product with that token's input embedding (a target: never
        trained by this loss, see CTCLogits), plus a learned blank. It pulls audio embeddings towards
        the embeddings of the words spoken, in order: a direct signal that a frozen LLM otherwise has
        to discover through its own loss.
        inputs_embeds: (B, L, llm_dim) with the audio spliced in; audio_mask, labels: (B, L)."""
        num_audio_tokens = audio_mask.sum(1)  # (B,)
        start = audio_mask.int().argmax(1)  # (B,) audio is one contiguous run per row
        frames = torch.arange(int(num_audio_tokens.max()), device=audio_mask.device)  # (T,)
        index = (start[:, None] + frames).clamp(max=inputs_embeds.shape[1] - 1)  # (B, T)
        audio_embeds = inputs_embeds.gather(1, index[..., None].expand(-1, -1, inputs_embeds.shape[-1]))  # (B, T, D)
        token_embeds = self.llm.get_input_embeddings().weight  # (V, D)
        scores = self.ctc_logits(audio_embeds, token_embeds, self.projector.ctc_blank)  # (B, T, V + 1)
        log_probs = scores.float().log_softmax(-1).transpose(0, 1)  # (T, B, V + 1); blank = V
        end_of_turn = len(self.prompt.end_of_turn_ids)  # the labels' last tokens; not spoken
        transcripts = [row[row != -100][:-end_of_turn] for row in labels]
        return F.ctc_loss(log_probs, torch.cat(transcripts), num_audio_tokens,
                          torch.tensor([len(t) for t in transcripts], device=labels.device),
                          blank=token_embeds.shape[0], zero_infinity=True)

    def training_prefix_length(self, input_ids, attention_mask, audio_mask) -> int:
        """Length of the shared prompt opening a training batch can take from one KV cache: 0 unless
        rows are right-padded (the opening at positions 0..P-1 in every row) and layers are not being
        checkpointed (the recompute drops a KV cache)."""
        if (self.training and self.llm.is_activation_checkpointing) or not bool(attention_mask[:, 0].all()):
            return 0
        return shared_prefix_length(input_ids, attention_mask, audio_mask)

    def prefix_kv_cache(self, prefix_ids: torch.Tensor, batch_size: int):
        """The LLM's KV cache of prefix_ids (P,), repeated to batch_size rows; a fresh copy each call,
        since the LLM extends it in place. Computed once per prefix, device, dtype and autocast, and
        again once the LLM's weights change (a LoRA step, loading): every in-place update of a tensor
        bumps its version counter, so the counters of the LLM's parameters identify its weights.
        While LoRA or the LLM trains, computed anew with gradients: the rows' gradients through their
        copies sum into the one computation, as they would over one computation per row. (LoRA's
        dropout then draws one mask for the opening of the whole batch.)"""
        if self.llm_trains and torch.is_grad_enabled():
            cache = self.llm(input_ids=prefix_ids[None], use_cache=True).past_key_values
            cache.batch_repeat_interleave(batch_size)
            return cache
        weights = tuple(p._version for p in self.llm.parameters())
        if weights != self._prefix_caches_weights:
            self._prefix_caches, self._prefix_caches_weights = {}, weights
        autocast = torch.get_autocast_dtype(self.device.type) if torch.is_autocast_enabled(self.device.type) else None
        key = (tuple(prefix_ids.tolist()), self.device, self.llm.dtype, autocast)
        if key not in self._prefix_caches:
            with torch.no_grad():
                self._prefix_caches[key] = self.llm(input_ids=prefix_ids[None], use_cache=True).past_key_values
        cache = copy.deepcopy(self._prefix_caches[key])
        cache.batch_repeat_interleave(batch_size)
        return cache

    def generate(self, mel, mel_lengths, input_ids, attention_mask, audio_mask,
                 options: DecodingOptions | None = None, **kwargs):
        """decoding.decode on a batch of prompts -> new token ids (B, <= budget), or (ids, confidences)
        with return_confidence. kwargs: DecodingOptions fields replacing those of options; the rest
        (min_new_tokens, output_scores, ...) go to the LLM's generate()."""
        batch = dict(mel=mel, mel_lengths=mel_lengths, input_ids=input_ids, attention_mask=attention_mask,
                     audio_mask=audio_mask)
        return decode(self, batch, decoding_options(options, **kwargs))

    def transcribe(self, audio, options: DecodingOptions | None = None, batch_size: int = 8,
                   instruction: str | None = None, chunk_seconds: float = 30.0, hotwords=None, **kwargs) -> list:
        """Notebook use: file paths or 16 kHz float arrays -> transcripts (in input order). Audio longer
        than chunk_seconds is decoded in pieces cut at pauses, as recognize.py does (0: in one piece).
        options, kwargs: as for generate(); word_timestamps=True: each result is {"text", "words"}, the
        words (timestamps.Word) timed from the start of their audio. hotwords: phrases to favour
        ("phrase" or "phrase weight", as recognize.py --hotwords reads them)."""
        from audio import SAMPLE_RATE, load_audio, log_mel, long_audio_pieces
        from hotwords import Hotwords

        options = replace(decoding_options(options, **kwargs), return_confidence=False)  # text only: see generate()
        if hotwords:
            options = replace(options, hotwords=Hotwords.from_lines(list(hotwords), self.tokenizer))
        items = audio if isinstance(audio, (list, tuple)) else [audio]
        pieces = []  # (item index, its start in seconds, samples)
        for index, item in enumerate(items):
            samples = load_audio(item) if isinstance(item, (str, Path)) else np.asarray(item, dtype=np.float32)
            spans = long_audio_pieces(samples, chunk_seconds) if chunk_seconds else [(0, len(samples))]
            pieces += [(index, a / SAMPLE_RATE, samples[a:b]) for a, b in spans]
        collate = Collator(self.data_spec(), inference=True)
        texts, words = [[] for _ in items], [[] for _ in items]
        for start in range(0, len(pieces), batch_size):
            chunk = pieces[start:start + batch_size]
            batch = [dict(mel=log_mel(samples, self.n_mels, self.config.pad_to_30s),
                          instruction=instruction or self.config.instruction) for _, _, samples in chunk]
            inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in collate(batch).items()}
            out = decode(self, inputs, options)
            ids, details = out if isinstance(out, tuple) else (out, [{}] * len(chunk))
            for (index, offset, _), text, detail in zip(chunk, transcripts(self, ids), details):
                texts[index].append(text)
                words[index] += [replace(w, start=round(w.start + offset, 3), end=round(w.end + offset, 3))
                                 for w in detail.get("words", [])]
        texts = [" ".join(t for t in parts if t) for parts in texts]
        return [dict(text=t, words=w) for t, w in zip(texts, words)] if options.word_timestamps else texts

    def save_pretrained(self, save_dir, state_dict: dict | None = None):
        """What trained (trainable_parameters, safetensors) and the config; the frozen parts come from
        their own files. A fully fine-tuned LLM goes to save_dir/llm as an HF model dir (sharded
        safetensors, its tokenizer). state_dict: the trained weights gathered elsewhere (ZeRO-3)."""
        if self.lora_merged:
            raise ValueError("the LoRA adapters are merged into the LLM's weights: save the model before merge_lora()")
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        trainable = self.trainable_parameters()
        state_dict = {k: v for k, v in (state_dict or trainable).items() if k in trainable}
        if self.config.train_llm:
            llm_weights = {k.removeprefix("llm."): v for k, v in state_dict.items() if k.startswith("llm.")}
            self.llm.save_pretrained(save_dir / LLM_DIR, state_dict=llm_weights)
            self.tokenizer.save_pretrained(save_dir / LLM_DIR)
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("llm.")}
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, save_dir / WEIGHTS_NAME)
        (save_dir / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, model_dir, dtype=torch.float32, trust_remote_code: bool = False,
                        merge_lora: bool = False, **overrides) -> "SpeechLLM":
        """Rebuild a saved model; overrides (e.g. whisper_model=, llm_model=) replace config fields.
        merge_lora: fold LoRA adapters into the LLM's weights, see merge_lora()."""
        model_dir = Path(model_dir)
        config = SpeechLLMConfig.from_json(model_dir / CONFIG_NAME)
        if config.train_llm:  # the fine-tuned LLM is in the model dir: the base LLM is not needed
            config.llm_model = str(model_dir / LLM_DIR)
        for key, value in overrides.items():
            if value is not None:
                setattr(config, key, value)
        model = cls(config, dtype, trust_remote_code)
        model.load_trained(model_dir)
        if merge_lora:
            model.merge_lora()
        return model

    def load_trained(self, model_dir, warm_start: bool = False):
        """The weights a model dir's run trained, into this model: exactly what this model trains, or
        with warm_start a part of it (a trained projector, then new LoRA adapters that start at zero, or
        a smaller LoRA rank's adapters as the first ranks of this one: grow_lora; --init_from). A dir
        holding weights this model does not train is an error: they would be lost."""
        model_dir = Path(model_dir)
        weights = dequantize_int8(load_file(model_dir / WEIGHTS_NAME))  # as saved, or stored in int8
        trainable = self.trainable_parameters()
        # The CTC blank is a training aid: a warm start may switch --ctc_weight on or off.
        optional = {"projector.ctc_blank"}
        if "projector.ctc_blank" not in trainable:
            weights.pop("projector.ctc_blank", None)
        if self.config.train_llm:
            optional |= {name for name in trainable if name.startswith("llm.")}
        # ZeRO-3 builds the LLM partitioned over the ranks: its trained weights are gathered while they
        # are written (under --train_llm the whole LLM, once), then partitioned again from rank 0's copy.
        with torch.no_grad(), gathered_if_partitioned(list(trainable.values()), modifier_rank=0):
            if self.config.train_llm and (model_dir / LLM_DIR).is_dir() and \
                    Path(self.config.llm_model).resolve() != (model_dir / LLM_DIR).resolve():
                missing, unexpected = self.llm.load_state_dict(read_llm_weights(model_dir / LLM_DIR), strict=False)
                missing = set(missing) & set(dict(self.llm.named_parameters()))  # not a tied alias
                if missing or unexpected:
                    raise ValueError(f"{model_dir / LLM_DIR} does not fit this LLM: {len(missing)} weights missing, "
                                     f"{len(unexpected)} unexpected (e.g. {sorted(missing)[:2]}, {unexpected[:2]})")
            if warm_start and self.config.train_llm and any(".lora_" in name for name in weights):
                weights = folded_lora(weights, SpeechLLMConfig.from_json(model_dir / CONFIG_NAME), trainable)
            unexpected = sorted(weights.keys() - trainable.keys())
            if unexpected:
                raise ValueError(f"{model_dir} holds {len(unexpected)} trained weights this model does not train "
                                 f"(e.g. {unexpected[:3]}): give it that run's options (see its {CONFIG_NAME})")
            missing = sorted(trainable.keys() - weights.keys() - optional)
            if missing and not warm_start:
                raise ValueError(f"{model_dir} lacks {len(missing)} weights this model trains (e.g. {missing[:3]})")
            for name, value in weights.items():
                if value.shape != trainable[name].shape:
                    value = self._grown_lora(model_dir, name, value, trainable[name], warm_start)
                trainable[name].copy_(value)

    def _grown_lora(self, model_dir: Path, name: str, factor: torch.Tensor, fresh: torch.Tensor,
                    warm_start: bool) -> torch.Tensor:
        """A smaller-rank run's LoRA factor for this model's larger rank (warm starts only; grow_lora)."""
        rank_dim = 1 if ".lora_B." in name else 0  # A: (rank, in), B: (out, rank)
        old_rank = factor.shape[rank_dim] if factor.ndim == 2 else 0
        if not (warm_start and ".lora_" in name and 0 < old_rank < self.config.lora_rank
                and factor.shape[1 - rank_dim] == fresh.shape[1 - rank_dim]):
            raise ValueError(f"{model_dir}: {name} is {tuple(factor.shape)}, this model's is {tuple(fresh.shape)} "
                             "(only --init_from may start a larger LoRA rank from a smaller one)")
        old = SpeechLLMConfig.from_json(model_dir / CONFIG_NAME)
        return grow_lora(factor, fresh, name, (old.lora_alpha / old_rank) / (self.config.lora_alpha / self.config.lora_rank))

    def merge_lora(self):
        """Fold the LoRA adapters into the LLM's weights (W += B A * alpha / r): decoding then costs
        what the base LLM costs, without the adapters' extra matmuls per linear layer. One way: the
        merged model decodes, but cannot train or save its adapters any more."""
        from peft.tuners.lora import LoraLayer

        for module in self.llm.modules():
            if isinstance(module, LoraLayer):
                module.merge()
        self.lora_merged = True
        self._prefix_caches_weights = None  # merging writes the weights through .data: no version bump
