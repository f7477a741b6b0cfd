"""Property-based fuzzing of the input contract (hypothesis; seeded and small, so CI stays fast):
generated audio files (lengths, rates, channels, containers, subtypes, NaN/inf/silence/clipping) and
jsonl lines (missing, extra, ill-typed fields, odd paths, BOM, CRLF) never crash a run.
- The check pass and the loader agree on what is usable; whatever the check pass keeps trains and decodes.
- A jsonl line that cannot be used is an InputError naming file:line, before any model is loaded.
- recognize.main writes exactly one line per key, and a reason in .errors for each failure.
- train.main trains on what the check pass keeps and skips the rest with a counted reason.
- Out-of-range options are refused before anything is loaded."""
import dataclasses
import json
import re
import tempfile
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import numpy as np
import pytest
import soundfile
import torch
from conftest import synth_audio
from hypothesis import HealthCheck, event, example, given, reject, settings, strategies as st

import recognize
import train
from compute_wer import read_hypotheses
from audio import BadAudio, audio_problem, load_audio, log_mel
from data import Collator, InputError, SpeechDataset, check_entries, count_reasons, num_mel_frames, read_jsonl
from model import SpeechLLM, SpeechLLMConfig


def fuzz(max_examples: int):
    """Seeded (the same cases on every run and machine), no example database, no per-example deadline."""
    return settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck))


class TinyModel(SpeechLLM):
    def __repr__(self):  # hypothesis prints a failing example's arguments, the fixtures too
        return "TinyModel"


@pytest.fixture(scope="module")
def model(tiny_config) -> SpeechLLM:
    torch.manual_seed(0)
    return TinyModel(tiny_config)


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz_model")
    model.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------
# Audio files


# Every container and subtype this libsndfile writes; RAW has no header, so nothing could read it back.
FORMATS = [(fmt, subtype) for fmt in sorted(soundfile.available_formats()) if fmt != "RAW"
           for subtype in sorted(soundfile.available_subtypes(fmt)) if soundfile.check_format(fmt, subtype)]
# libsndfile (1.2) does not read these back as it wrote them: DWVW data fails to decode, and a 24-bit
# PAF file under 10 frames has a header of 10 frames but no data. Their headers look fine, so, like
# the damaged FLAC of test_robust.py, only loading them finds out.
UNFAITHFUL = {("AIFF", "DWVW_12"), ("AIFF", "DWVW_16"), ("AIFF", "DWVW_24"), ("PAF", "PCM_24")}
FLOATS = ("FLOAT", "DOUBLE")  # the subtypes that can store NaN and inf


class Audio(NamedTuple):
    format: str
    subtype: str
    rate: int
    length: int  # samples per channel
    channels: int
    content: str


@st.composite
def audio_files(draw) -> Audio:
    content = draw(st.sampled_from(["tone", "silence", "clipping", "loud", "huge", "nan", "inf"]))
    fmt, subtype = draw(st.sampled_from([f for f in FORMATS if f[1] in FLOATS or content not in ("huge", "nan", "inf")]))
    rate = draw(st.one_of(st.sampled_from([8000, 16000, 22050, 44100, 48000]), st.integers(1, 192_000)))
    length = draw(st.one_of(st.integers(0, 400), st.integers(0, 3 * rate)))  # up to one STFT window, up to 3 s
    return Audio(fmt, subtype, rate, length, draw(st.integers(1, 4)), content)


def write_audio(path: Path, audio: Audio) -> Path | None:
    """-> path, or None if the container cannot hold this audio (a rate or channel count it refuses)."""
    n = np.arange(audio.length)[:, None]
    x = 0.3 * np.sin(2 * np.pi * 440 * n / audio.rate + np.arange(audio.channels))  # (length, channels)
    x = {"tone": x, "silence": 0 * x, "clipping": np.clip(8 * x, -1, 1), "loud": 4 * x, "huge": 1e30 * x,
         "nan": np.where(n < audio.length // 2, x, np.nan), "inf": np.where(n < audio.length // 2, x, -np.inf)
         }[audio.content]
    try:
        soundfile.write(path, x, audio.rate, format=audio.format, subtype=audio.subtype)
    except (soundfile.LibsndfileError, ValueError, TypeError, RuntimeError):
        return None
    return path if path.exists() else None


def load_problem(entry: dict) -> str | None:
    try:
        load_audio(entry["wav"])
    except BadAudio as e:
        return str(e)


def usable_reasons(training: bool) -> set[str]:
    audio = {"missing", "not a file", "unreadable", "empty", "too short", "non-finite samples"}
    return audio | ({"no transcript", "longer than 30 s"} if training else set())


@fuzz(150)
@given(audio=audio_files())
@example(audio=Audio("WAV", "PCM_16", 16000, 1, 1, "tone"))  # the issue's 1-sample clip
@example(audio=Audio("WAV", "PCM_16", 44100, 1, 1, "tone"))  # resampled to 0 samples
@example(audio=Audio("WAV", "FLOAT", 16000, 16000, 1, "huge"))  # finite, but its log-mel overflows
def test_check_pass_and_loader_agree(model, audio):
    with tempfile.TemporaryDirectory() as tmp:
        path = write_audio(Path(tmp) / f"a.{audio.format.lower()}", audio) or reject()
        entry = {"wav": str(path)}
        reason = audio_problem(entry)
        try:
            samples, loaded = load_audio(path), None
        except BadAudio as e:
            loaded = str(e)
    event(f"reason: {reason}")
    assert reason is None or loaded is not None, reason  # what the check pass refuses, the loader refuses
    if (audio.format, audio.subtype) not in UNFAITHFUL:
        assert loaded is None or reason is not None, loaded  # and what it keeps, the loader reads
    assert {reason, loaded} - {None} <= usable_reasons(training=False)  # (the reasons may differ)
    if loaded is None:
        assert samples.dtype == np.float32 and samples.ndim == 1 and np.abs(samples).max() <= 1
        mel = log_mel(samples, model.n_mels)
        assert torch.isfinite(mel).all()
        assert abs(mel.shape[-1] - num_mel_frames(entry["duration"], model.config.pad_to_30s)) <= 1  # the check pass's length is the loader's


@fuzz(100)
@given(fmt=st.sampled_from([("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"),
                            ("MP3", "MPEG_LAYER_III"), ("CAF", "ALAC_16"), ("AIFF", "PCM_16")]),
       edits=st.lists(st.tuples(st.integers(0, 127), st.integers(0, 255)), min_size=1, max_size=4),
       keep=st.one_of(st.just(1.0), st.floats(0.5, 1), st.floats(0, 1)))
@example(fmt=("MP3", "MPEG_LAYER_III"), edits=[(21, 45)], keep=1.0)  # its header claims 35 GB of samples
def test_a_damaged_file_is_a_reason_never_a_crash(model, fmt, edits, keep):
    """Bytes of the header overwritten, the file cut short: the check pass may keep it (the header
    can look fine), then loading it gives a reason or audio the model can take."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"a.{fmt[0].lower()}"
        soundfile.write(path, synth_audio(0, 1.0), 16000, format=fmt[0], subtype=fmt[1])
        data = bytearray(path.read_bytes())
        for i, value in edits:
            data[i % len(data)] = value
        path.write_bytes(data[:max(1, round(keep * len(data)))])
        reason, loaded = audio_problem({"wav": str(path)}), load_problem({"wav": str(path)})
        event(f"check: {reason}, load: {loaded}")
        assert {reason, loaded} - {None} <= usable_reasons(training=False)
        if loaded is None:
            samples = load_audio(path)
            assert np.abs(samples).max() <= 1 and torch.isfinite(log_mel(samples, model.n_mels)).all()


@fuzz(25)
@given(audios=st.lists(audio_files(), min_size=1, max_size=3), txt=st.sampled_from(["", "hello world"]))
def test_whatever_the_check_pass_keeps_trains_and_decodes(model, audios, txt):
    with tempfile.TemporaryDirectory() as tmp:
        entries = [dict(key=f"a{i}", wav=str(Path(tmp) / f"a{i}.{a.format.lower()}"), txt=txt, where=f"x:{i}",
                        unfaithful=a[:2] in UNFAITHFUL) for i, a in enumerate(audios)]
        if not all(write_audio(Path(e["wav"]), a) for e, a in zip(entries, audios)):
            reject()
        usable, _ = check_entries(entries, model.data_spec(), for_training=True)
        items = [SpeechDataset(usable, model.n_mels, model.config.instruction)[i] for i in range(len(usable))]
    assert all(e["unfaithful"] for e, item in zip(usable, items) if "error" in item)  # found only when loaded
    items = [item for item in items if "error" not in item]
    event(f"usable: {len(items)} of {len(audios)}")
    if not items:
        return
    model.zero_grad()  # the model is shared: a failed example must not leave its gradients to the next
    loss = model(**Collator(model.data_spec())(items)).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.projector.parameters()
                                        if p.grad is not None)
    ids = model.generate(**Collator(model.data_spec(), inference=True)(items), max_new_tokens=2)
    assert len(ids) == len(items)


# ----------------------------------------------------------------------------------------
# jsonl lines


class Missing:
    def __repr__(self):
        return "MISSING"


MISSING, AUTO = Missing(), "<a unique key>"  # a field left out; a key like utt3
# Where a line's wav points: these names, a file name drawn as text, or a generated audio file.
WAV_KINDS = ["good", "absolute", "parent", "directory", "dot", "missing", "short", "nan"]
KEYS = st.one_of(st.just(AUTO), st.just(MISSING), st.none(), st.just(""), st.integers(-1, 10**9), st.text(max_size=6))
TXTS = st.one_of(st.text(max_size=12), st.just(MISSING), st.none(), st.just(""), st.integers(), st.floats(),
                 st.lists(st.text(max_size=2), max_size=1))
INSTRUCTIONS = st.one_of(st.just(MISSING), st.none(), st.just(""), st.text(max_size=8))
EXTRA = st.dictionaries(st.sampled_from(["duration", "where", "reason", "error", "mel", "speaker"]),
                        st.one_of(st.none(), st.integers(), st.text(max_size=3)), max_size=2)
FILE_NAMES = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="/\x00"), min_size=1, max_size=8)


class Line(NamedTuple):
    key: object
    wav: object  # a WAV_KINDS name, ("named", file name) or Audio
    txt: object
    instruction: object
    extra: dict


class Corpus(NamedTuple):
    lines: list  # Line or raw text
    bom: bool
    newline: str
    ascii: bool  # json.dumps(ensure_ascii=): escaped or raw UTF-8


def corpora(keys=KEYS, instructions=INSTRUCTIONS, wavs=st.sampled_from(WAV_KINDS), raw_lines=st.nothing(),
            sizes=(1, 4)):
    line = st.builds(Line, keys, st.one_of(wavs, st.tuples(st.just("named"), FILE_NAMES), audio_files()), TXTS,
                     instructions, EXTRA)
    return st.builds(Corpus, st.lists(st.one_of(line, raw_lines), min_size=sizes[0], max_size=sizes[1]), st.booleans(),
                     st.sampled_from(["\n", "\r\n"]), st.booleans())


def make_wav(folder: Path, i: int, kind) -> str:
    """Writes the file that line i refers to -> its "wav" field (relative to the jsonl's folder unless absolute)."""
    if isinstance(kind, Audio):
        write_audio(folder / f"gen{i}.{kind.format.lower()}", kind)
        return f"gen{i}.{kind.format.lower()}"
    if isinstance(kind, tuple):  # a file name drawn as text: unicode, spaces, newlines ...
        soundfile.write(folder / f"n{i}{kind[1]}.wav", synth_audio(i, 0.5), 16000)
        return f"n{i}{kind[1]}.wav"
    if kind == "directory":
        (folder / f"dir{i}.wav").mkdir()
        return f"dir{i}.wav"
    if kind in ("dot", "missing"):
        return {"dot": ".", "missing": f"gone{i}.wav"}[kind]
    path = folder.parent / f"up{i}.wav" if kind == "parent" else folder / f"{kind}{i}.wav"
    samples = {"short": np.zeros(1, np.float32), "nan": np.full(800, np.nan, np.float32)}.get(kind)
    soundfile.write(path, synth_audio(i, 0.7) if samples is None else samples, 16000, subtype="FLOAT")
    return {"absolute": str(path), "parent": f"../up{i}.wav"}.get(kind, path.name)


def write_jsonl(folder: Path, corpus: Corpus) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for i, line in enumerate(corpus.lines):
        if isinstance(line, str):
            texts.append(line)
            continue
        fields = dict(line.extra, key=f"utt{i}" if line.key == AUTO else line.key, txt=line.txt,
                      instruction=line.instruction, wav=make_wav(folder, i, line.wav)
                      if isinstance(line.wav, tuple) or line.wav in WAV_KINDS else line.wav)
        texts.append(json.dumps({k: v for k, v in fields.items() if v is not MISSING}, ensure_ascii=corpus.ascii))
    jsonl = folder / "data.jsonl"
    text = corpus.newline.join(texts) + corpus.newline
    jsonl.write_bytes(b"\xef\xbb\xbf" * corpus.bom + text.encode("utf-8", "surrogatepass"))
    return jsonl


@fuzz(150)
@given(corpus=corpora(keys=st.one_of(KEYS, st.sampled_from([True, 1.5, [1], "a b", "a\tb", "x\u2028y", "\ud800"])),
                      instructions=st.one_of(INSTRUCTIONS, st.sampled_from([7, ["a"], "\ud800", "\x00AUDIO\x00"])),
                      wavs=st.one_of(st.sampled_from(WAV_KINDS), st.sampled_from([MISSING, None, "", 5, ["a.wav"]])),
                      raw_lines=st.sampled_from(["", "   ", "[1]", '"a.wav"', "null", "{", '{"wav": "a.wav"} x']),
                      sizes=(1, 2)))
def test_a_line_is_refused_by_file_and_line_or_fit_for_every_use(model, corpus):
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = write_jsonl(Path(tmp) / "data", corpus)
        try:
            entries = read_jsonl(jsonl)
        except InputError as e:
            assert re.match(rf"{re.escape(str(jsonl))}:\d+: ", str(e)), str(e)
            event(f"refused: {str(e).split(': ')[1][:20]}")
            return
        event(f"read {len(entries)} entries")
        for for_training in (False, True):
            usable, problems = check_entries(entries, model.data_spec(), for_training=for_training)
            assert len(usable) + len(problems) == len(entries)
            assert {p["reason"] for p in problems} <= usable_reasons(for_training)
    keys = [e["key"] for e in entries]
    assert len(set(keys)) == len(keys)
    assert all(isinstance(k, str) and k.split() == [k] for k in keys)  # one word: a `key<TAB>text` line stays one line
    for e in entries:
        assert Path(e["wav"]).is_absolute()
        json.dumps(e, ensure_ascii=False).encode("utf-8")  # the partial, result and errors files can hold it
        model.prompt(e.get("instruction") or model.config.instruction, 3, e["txt"] if isinstance(e.get("txt"), str)
                     else None)


# The issue's cases: a 1-sample clip and a directory given as wav, each in both CLIs
ISSUE = Corpus([Line(AUTO, "short", "hi", MISSING, {}), Line(AUTO, "directory", "x", MISSING, {}),
                Line(AUTO, "good", "hello", MISSING, {})], bom=False, newline="\n", ascii=True)


@fuzz(10)
@given(corpus=corpora())
@example(corpus=ISSUE)
def test_recognition_writes_one_line_per_key_and_a_reason_per_failure(model, model_dir, corpus):
    with tempfile.TemporaryDirectory() as tmp:
        jsonl, result = write_jsonl(Path(tmp) / "data", corpus), Path(tmp) / "result.txt"
        argv = ["--model_dir", str(model_dir), "--data_path", str(jsonl), "--result_path", str(result),
                "--batch_size", "2", "--max_new_tokens", "2"]
        try:
            entries = read_jsonl(jsonl)
        except InputError as e:
            with pytest.raises(InputError, match=re.escape(str(e))):
                recognize.main(argv)
            assert not result.exists()
            return event("refused")
        usable, problems = check_entries(entries, None, for_training=False)
        failed = {p["key"]: p["reason"] for p in problems}  # by the check pass, or (UNFAITHFUL) when loaded
        failed |= {e["key"]: reason for e in usable if (reason := load_problem(e))}
        event(f"{len(failed)} of {len(entries)} failed")
        hyps = recognize.main(argv)
        lines = read_hypotheses(result)  # as compute_wer.py reads it: refuses a key that is not one word
        errors = read_hypotheses(Path(f"{result}.errors"))
        assert len(result.read_text(encoding="utf-8").splitlines()) == len(entries)
        assert list(lines) == [e["key"] for e in entries] and lines == hyps
        assert errors == failed
        assert all(lines[key] == "" for key in errors)
        assert not list(Path(tmp).glob("result.txt.partial*"))


@fuzz(12)
@given(corpus=corpora(sizes=(2, 5)))
@example(corpus=ISSUE)
def test_training_trains_on_what_the_check_pass_keeps_and_counts_the_rest(model, tiny_llm_dir, tiny_whisper_path,
                                                                         capsys, corpus):
    with tempfile.TemporaryDirectory() as tmp:
        jsonl, exp = write_jsonl(Path(tmp) / "data", corpus), Path(tmp) / "exp"
        argv = ["--llm_model_name_or_path", str(tiny_llm_dir), "--whisper_model_name_or_path", str(tiny_whisper_path),
                "--projector_hidden", "64", "--data_path", str(jsonl), "--output_dir", str(exp),
                "--per_device_train_batch_size", "2", "--num_train_epochs", "1", "--save_strategy", "no",
                "--report_to", "none", "--use_cpu", "True"]
        try:
            entries = read_jsonl(jsonl)
            usable, problems = check_entries(entries, model.data_spec(), for_training=True)
        except InputError as e:
            with pytest.raises(InputError, match=re.escape(str(e))):
                train.main(argv)
            return event("refused")
        counts = count_reasons(p["reason"] for p in problems)
        failed = {p["key"]: p["reason"] for p in problems} | {e["key"]: r for e in usable if (r := load_problem(e))}
        event(f"{len(failed)} of {len(entries)} skipped")
        trained, collate = [], Collator.__call__
        with mock.patch.object(Collator, "__call__", lambda self, batch: trained.extend(i["key"] for i in batch)
                               or collate(self, batch)):
            if not usable or len(failed) == len(entries):
                message = f"no usable utterance in {jsonl} ({counts})" if not usable else "no audio file of the"
                with pytest.raises(InputError, match=re.escape(message)):
                    train.main(argv)
                return
            capsys.readouterr()
            train.main(argv)
        assert (exp / "model.safetensors").exists()
        assert set(trained) == {e["key"] for e in usable} - set(failed)
        if failed:
            skipped = [json.loads(line) for line in (exp / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]
            assert {s["key"]: s["reason"] for s in skipped} == failed
        if problems:
            assert f"skipped {len(problems)} of {len(entries)} utterances ({counts})" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------
# Options: refused before anything is loaded (the model and data paths here do not exist)


@pytest.mark.parametrize("option, value", [("--batch_size", "0"), ("--batch_size", "-2"), ("--num_beams", "0"),
                                           ("--max_new_tokens", "0"), ("--max_new_tokens", "-1"),
                                           ("--batch_size", "two"), ("--batch_seconds", "0"), ("--batch_seconds", "nan"),
                                           ("--batch_seconds", "inf"), ("--batch_tokens", "0")])
def test_recognize_refuses_out_of_range_options(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as exit:
        recognize.main(["--model_dir", str(tmp_path / "no_model"), "--data_path", str(tmp_path / "no.jsonl"),
                        "--result_path", str(tmp_path / "r.txt"), option, value])
    assert exit.value.code == 2 and f"argument {option}: " in capsys.readouterr().err


def out_of_range_values() -> list[tuple[str, str]]:
    """Every numeric option of ours with values no option allows: a new one must get a range too."""
    fields = [f for cls in (SpeechLLMConfig, train.RunArguments, train.DataArguments) for f in dataclasses.fields(cls)
              if f.metadata.get("flag", True)]
    return [(f.name, value) for f in fields if f.type in (int, int | None) for value in ["-1000000000"]] + [
        (f.name, value) for f in fields if f.type in (float, float | None) for value in ["nan", "-1e9", "inf"]]


@pytest.mark.parametrize("name, value", out_of_range_values())
def test_train_refuses_out_of_range_options(tmp_path, name, value):
    argv = ["--llm_model_name_or_path", str(tmp_path / "no_llm"), "--whisper_model_name_or_path",
            str(tmp_path / "no.pt"), "--data_path", str(tmp_path / "no.jsonl"), "--output_dir", str(tmp_path / "exp")]
    with pytest.raises(InputError, match=f"^--{name} must be "):
        train.main(argv + [f"--{name}={value}"])


def test_train_flags_are_the_config_fields_and_the_old_names_still_work(tmp_path):
    """SpeechLLMConfig is declared once: train.py parses it as it is. --llm_model_name_or_path and
    --whisper_model_name_or_path are the older names of --llm_model and --whisper_model."""
    parser = train.ArgumentParser((SpeechLLMConfig, train.RunArguments, train.DataArguments, train.TrainingArguments))
    common = ["--data_path", "d.jsonl", "--output_dir", str(tmp_path), "--ctc_weight", "0.5", "--lora_rank", "4"]
    old = parser.parse_args_into_dataclasses(common + ["--llm_model_name_or_path", "L", "--whisper_model_name_or_path", "W"])
    new = parser.parse_args_into_dataclasses(common + ["--llm_model", "L", "--whisper_model", "W"])
    assert old[0] == new[0] == SpeechLLMConfig(whisper_model="W", llm_model="L", ctc_weight=0.5, lora_rank=4)
    assert new[0].projector_kernel == 5 and new[0].ctc_decode_weight == 0.5  # the defaults, in the config
    flags = {action.dest for action in parser._actions}
    set_by_the_run = {f.name for f in dataclasses.fields(SpeechLLMConfig) if not f.metadata.get("flag", True)}
    assert set_by_the_run == {"max_tokens_per_second", "max_tokens_extra"}
    assert {f.name for f in dataclasses.fields(SpeechLLMConfig)} - set_by_the_run <= flags
    assert not flags & set_by_the_run


def test_train_refuses_lora_on_a_trained_llm(tmp_path):
    """SpeechLLMConfig's own check, as an input error before anything loads: peft would save the
    adapters alone and lose the trained LLM."""
    argv = ["--llm_model_name_or_path", "x", "--whisper_model_name_or_path", "y", "--data_path",
            str(tmp_path / "no.jsonl"), "--output_dir", str(tmp_path / "exp"), "--lora_rank", "8", "--train_llm", "True"]
    with pytest.raises(InputError, match="^train_llm trains every LLM weight: give lora_rank 0"):
        train.main(argv)


@pytest.mark.parametrize("option", ["--per_device_train_batch_size", "--gradient_accumulation_steps"])
def test_train_refuses_batch_options_out_of_range(tmp_path, option):
    argv = ["--llm_model_name_or_path", "x", "--whisper_model_name_or_path", "y", "--data_path",
            str(tmp_path / "no.jsonl"), "--output_dir", str(tmp_path / "exp"), option, "0"]
    with pytest.raises(InputError, match=f"^{option} must be >= 1"):
        train.main(argv)
