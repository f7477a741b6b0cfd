"""Tiny random models built from config objects, a real chat tokenizer, and synthetic audio."""
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import whisper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import SpeechLLM, SpeechLLMConfig, resolve_bundled  # noqa: E402


def smollm2_gguf() -> Path:
    return Path(resolve_bundled("bundled:smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer and ChatML template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llm")
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # no pad_token_id: it would zero (tie) a real token
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_whisper_path(tmp_path_factory) -> Path:
    """A 2-layer random Whisper saved the way openai-whisper ships checkpoints ({dims, model_state_dict})."""
    torch.manual_seed(0)
    dims = whisper.model.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2,
                                         n_audio_layer=2, n_vocab=64, n_text_ctx=16, n_text_state=32,
                                         n_text_head=2, n_text_layer=1)
    path = tmp_path_factory.mktemp("tiny_whisper") / "tiny.pt"
    torch.save({"dims": asdict(dims), "model_state_dict": whisper.model.Whisper(dims).state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def tiny_config(tiny_llm_dir, tiny_whisper_path) -> SpeechLLMConfig:
    return SpeechLLMConfig(whisper_model=str(tiny_whisper_path), llm_model=str(tiny_llm_dir),
                           projector_kernel=5, projector_hidden=64)


@pytest.fixture()
def tiny_model(tiny_config) -> SpeechLLM:
    torch.manual_seed(0)
    return SpeechLLM(tiny_config)


def synth_audio(seed: int, seconds: float) -> np.ndarray:
    """A distinct, deterministic sound per seed: a few tones plus a little noise, 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    audio = sum(rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) for _ in range(3))
    return (audio + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def write_corpus(folder: Path, transcripts: list[str], durations: list[float]) -> Path:
    """wav files + a jsonl with relative wav paths, as a user would write it."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (txt, seconds) in enumerate(zip(transcripts, durations)):
        soundfile.write(folder / f"utt{i}.wav", synth_audio(i, seconds), 16000)
        lines.append(json.dumps({"key": f"utt{i}", "wav": f"utt{i}.wav", "txt": txt}))
    jsonl = folder / "data.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    return jsonl
