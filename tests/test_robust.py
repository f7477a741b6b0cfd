"""Bad input and faults: errors naming file:line, counted skips (training), per-key errors
(recognition), formats decoded right, long audio windowed, resumable atomic results, no code from data."""
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from conftest import ROOT, synth_audio, write_corpus
from helpers.bad_audio import write_bad_audio
from transformers import TrainingArguments

import recognize
import train
from audio import load_audio, log_mel
from data import Collator, InputError, check_entries, read_jsonl
from model import N_FRAMES_30S, SpeechLLM, load_llm, load_whisper


def run(script, *args, env=None):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def add_lines(jsonl: Path, lines: list[dict]):
    with open(jsonl, "a") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


@pytest.fixture()
def model_dir(tmp_path, tiny_model) -> Path:
    tiny_model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


# ----------------------------------------------------------------------------------------
# Input validation


BAD_LINES = {
    "malformed": (b'{"key": "b", "wav": "b.wav"\n', "malformed JSON"),
    "non_utf8": ('{"key": "b", "wav": "caf\u00e9.wav"}\n'.encode("latin-1"), "not UTF-8"),
    "no_wav": (b'{"key": "b", "txt": "hi"}\n', 'needs a "wav" path'),
    "duplicate": (b'{"key": "a", "wav": "b.wav"}\n', "duplicate key 'a' \\(first at line 1\\)"),
}


@pytest.mark.parametrize("case", BAD_LINES)
@pytest.mark.parametrize("script", ["train.py", "recognize.py"])
def test_cli_stops_on_a_bad_jsonl_line_naming_file_and_line(tmp_path, script, case):
    bad_line, message = BAD_LINES[case]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_bytes(b'{"key": "a", "wav": "a.wav", "txt": "x"}\n' + bad_line)
    # the model paths do not exist: the run must stop on the data before it loads any model
    if script == "train.py":
        result = run(script, "--llm_model_name_or_path", tmp_path / "no_llm", "--whisper_model_name_or_path",
                     tmp_path / "no.pt", "--data_path", jsonl, "--output_dir", tmp_path / "exp")
    else:
        result = run(script, "--model_dir", tmp_path / "no_model", "--data_path", jsonl,
                     "--result_path", tmp_path / "result.txt")
    assert result.returncode == 1
    assert re.search(f"^error: {jsonl}:2: {message}", result.stderr, re.MULTILINE), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "result.txt").exists()


def tone(freq, rate, seconds=1.0):
    return 0.4 * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


@pytest.mark.parametrize("fmt, subtype, rate, channels, tolerance", [
    ("WAV", "PCM_16", 8000, 1, 2e-3),
    ("WAV", "PCM_16", 16000, 2, 1e-3),
    ("WAV", "PCM_24", 44100, 2, 1e-3),
    ("WAV", "FLOAT", 48000, 1, 1e-3),
    ("WAV", "DOUBLE", 22050, 2, 1e-3),
    ("FLAC", "PCM_24", 44100, 2, 1e-3),
    ("FLAC", "PCM_16", 8000, 1, 2e-3),
    ("OGG", "VORBIS", 44100, 2, 0.05),  # lossy
])
def test_load_audio_decodes_formats_to_16k_mono(tmp_path, fmt, subtype, rate, channels, tolerance):
    # left = s + d, right = s - d: the mixdown is s
    signal, difference = tone(440, rate), tone(1000, rate) / 4
    samples = np.stack([signal + difference, signal - difference], 1) if channels == 2 else signal
    path = tmp_path / f"a.{fmt.lower()}"
    soundfile.write(path, samples, rate, format=fmt, subtype=subtype)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and abs(len(audio) - 16000) <= 2
    error = np.abs(audio[400:15600] - tone(440, 16000)[400:15600]).max()
    assert error < tolerance, error


def test_check_pass_gives_each_bad_entry_its_reason(tmp_path, tiny_model):
    jsonl = write_corpus(tmp_path, ["one", "two"], [1.0, 1.5])
    bad_audio = write_bad_audio(tmp_path)
    soundfile.write(tmp_path / "long.wav", synth_audio(5, 31.0), 16000)
    add_lines(jsonl, [{"key": name, "wav": name, "txt": "words"} for name in bad_audio] + [
        {"key": "long", "wav": "long.wav", "txt": "words"},
        {"key": "no_txt", "wav": "utt0.wav"},
        {"key": "blank_txt", "wav": "utt0.wav", "txt": " \t "},
        {"key": "huge_txt", "wav": "utt0.wav", "txt": "hello " * 5000},
    ])
    entries = read_jsonl(jsonl)
    usable, problems = check_entries(entries, tiny_model.data_spec(), for_training=True)
    # a blank transcript is a target ("nothing was said": silence and noise clips)
    assert [e["key"] for e in usable] == ["utt0", "utt1", "damaged.flac", "blank_txt"]
    assert [e["duration"] for e in usable] == [1.0, 1.5, 2.0, 1.0]  # from the header
    training_reasons = {**{name: reason for name, reason in bad_audio.items() if name != "damaged.flac"},
                        "long": "longer than 30 s", "no_txt": "no transcript", "blank_txt": None,
                        "huge_txt": "longer than the LLM's context (4096 tokens)", "damaged.flac": None}
    assert {p["key"]: p["reason"] for p in problems} == {k: v for k, v in training_reasons.items() if v}
    assert all(p["where"] == f"{jsonl}:{i}" for p in problems for i, e in enumerate(entries, 1) if e["key"] == p["key"])

    # the same pass for recognition: only unreadable audio is a problem (long audio is windowed)
    usable, problems = check_entries(read_jsonl(jsonl), None, for_training=False)
    assert {p["key"]: p["reason"] for p in problems} == {
        k: v for k, v in training_reasons.items() if k in bad_audio and v}
    # the damaged FLAC passes the header check; loading it is what fails
    with pytest.raises(ValueError, match="unreadable"):
        load_audio(tmp_path / "damaged.flac")


def test_long_audio_is_encoded_window_by_window_not_truncated(tiny_model):
    audio = synth_audio(0, 65.0)
    mel = log_mel(audio, 80)
    assert mel.shape == (80, 6500)
    tokens_per_window = [tiny_model.num_audio_tokens(n) for n in (3000, 3000, 500)]
    assert tokens_per_window == [300, 300, 50]
    assert tiny_model.num_audio_tokens(6500) == 650
    with torch.no_grad():
        whole = tiny_model.encode_audio(mel[None], torch.tensor([6500]))
        windows = [tiny_model.encode_audio(mel[None, :, s:s + N_FRAMES_30S], torch.tensor([min(N_FRAMES_30S, 6500 - s)]))
                   for s in (0, 3000, 6000)]
    assert whole.shape == (650, tiny_model.llm.config.hidden_size)
    torch.testing.assert_close(whole, torch.cat(windows), rtol=1e-5, atol=1e-5)
    batch = Collator(tiny_model.data_spec(), inference=True)([dict(mel=mel, instruction="Transcribe the speech.")])
    assert batch["audio_mask"].sum() == 650  # the whole clip reaches the prompt


# ----------------------------------------------------------------------------------------
# Training: skips counted and listed, --strict, output dir


def train_args(tmp_path, tiny_llm_dir, tiny_whisper_path, jsonl, *extra):
    return ["--llm_model_name_or_path", str(tiny_llm_dir), "--whisper_model_name_or_path", str(tiny_whisper_path),
            "--projector_hidden", "64", "--data_path", str(jsonl), "--output_dir", str(tmp_path / "exp"),
            "--per_device_train_batch_size", "2", "--num_train_epochs", "1", "--save_strategy", "no",
            "--report_to", "none", "--use_cpu", "True", *extra]


@pytest.mark.slow
def test_training_skips_counts_and_lists_bad_utterances(tmp_path, tiny_llm_dir, tiny_whisper_path, monkeypatch,
                                                        capsys):
    jsonl = write_corpus(tmp_path / "data", ["one", "two", "three"], [1.0, 1.2, 1.4])
    bad_audio = write_bad_audio(tmp_path / "data")
    soundfile.write(tmp_path / "data" / "long.wav", synth_audio(5, 31.0), 16000)
    add_lines(jsonl, [{"key": name, "wav": name, "txt": "words"} for name in bad_audio] + [
        {"key": "long", "wav": "long.wav", "txt": "words"}, {"key": "blank", "wav": "utt0.wav", "txt": 7},
        {"key": "huge", "wav": "utt1.wav", "txt": "hello " * 5000}])
    trained_keys = []
    collate = Collator.__call__
    monkeypatch.setattr(Collator, "__call__", lambda self, batch: trained_keys.extend(i["key"] for i in batch)
                        or collate(self, batch))

    train.main(train_args(tmp_path, tiny_llm_dir, tiny_whisper_path, jsonl))

    exp = tmp_path / "exp"
    assert (exp / "model.safetensors").exists()
    skipped = [json.loads(line) for line in (exp / "skipped.jsonl").read_text().splitlines()]
    assert {s["key"]: s["reason"] for s in skipped} == {
        **bad_audio, "long": "longer than 30 s", "blank": "no transcript",
        "huge": "longer than the LLM's context (4096 tokens)"}
    assert skipped[0]["where"] == f"{jsonl}:4" and skipped[0]["wav"] == str(tmp_path / "data" / "missing.wav")
    # damaged.flac passed the check pass: found while loading, replaced by the next utterance
    assert set(trained_keys) == {"utt0", "utt1", "utt2"} and len(trained_keys) == 4
    out = capsys.readouterr()
    assert (f"{jsonl}: skipped 7 of 11 utterances (1 missing, 1 unreadable, 1 empty, 1 non-finite samples, "
            f"1 longer than 30 s, 1 no transcript, 1 longer than the LLM's context (4096 tokens)), "
            f"listed in {exp / 'skipped.jsonl'}") in out.out
    assert "skipped 8 utterances in all (2 unreadable, 1 missing" in out.out
    assert f"warning: skipped {jsonl}:8: {tmp_path / 'data' / 'damaged.flac'}: unreadable" in out.err


def test_resume_refuses_an_optimizer_state_that_does_not_fit_the_model(tmp_path, tiny_llm_dir, tiny_whisper_path):
    """Adam's state is matched to parameters by position: a checkpoint from code that orders them
    otherwise must stop with a clear error, not crash the fused kernel (seen: SIGSEGV) or train on."""
    jsonl = write_corpus(tmp_path / "data", ["one", "two"], [1.0, 1.2])
    args = train_args(tmp_path, tiny_llm_dir, tiny_whisper_path, jsonl, "--save_strategy", "steps", "--save_steps", "1")
    train.main(args + ["--max_steps", "1"])
    for final in ["model.safetensors", "speechllm_config.json"]:  # as if killed after the checkpoint
        (tmp_path / "exp" / final).unlink()
    optimizer_file = tmp_path / "exp" / "checkpoint-1" / "optimizer.pt"
    saved = torch.load(optimizer_file, weights_only=True)
    order = list(saved["state"])
    saved["state"] = {new: saved["state"][old] for new, old in zip(order, order[::-1])}  # the same moments, reordered
    torch.save(saved, optimizer_file)
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'exp' / 'checkpoint-1'}: its optimizer state does "
                                                   "not fit this model (a (")):
        train.main(args + ["--max_steps", "2"])


def test_strict_training_stops_before_any_step(tmp_path, tiny_llm_dir, tiny_whisper_path):
    jsonl = write_corpus(tmp_path / "data", ["one", "two"], [1.0, 1.2])
    add_lines(jsonl, [{"key": "gone", "wav": "gone.wav", "txt": "x"}, {"key": "blank", "wav": "utt0.wav", "txt": None}])
    with pytest.raises(InputError) as error:
        train.main(train_args(tmp_path, tiny_llm_dir, tiny_whisper_path, jsonl, "--strict", "True"))
    assert str(error.value) == (f"2 of 4 utterances in {jsonl} cannot be used (1 missing, 1 no transcript):\n"
                                f"  {jsonl}:3: {tmp_path / 'data' / 'gone.wav'}: missing\n"
                                f"  {jsonl}:4: {tmp_path / 'data' / 'utt0.wav'}: no transcript")
    assert not (tmp_path / "exp" / "model.safetensors").exists()


@pytest.mark.slow
def test_strict_training_stops_on_audio_that_fails_to_decode(tmp_path, tiny_llm_dir, tiny_whisper_path):
    jsonl = write_corpus(tmp_path / "data", ["one", "two", "three"], [1.0, 1.2, 1.4])
    write_bad_audio(tmp_path / "data")
    add_lines(jsonl, [{"key": "damaged", "wav": "damaged.flac", "txt": "x"}])  # passes the check pass
    with pytest.raises(InputError, match=f"^{jsonl}:4: {tmp_path / 'data' / 'damaged.flac'}: unreadable$"):
        train.main(train_args(tmp_path, tiny_llm_dir, tiny_whisper_path, jsonl, "--strict"))
    assert not (tmp_path / "exp" / "model.safetensors").exists()


def test_finished_model_is_not_overwritten(tmp_path, tiny_llm_dir, tiny_whisper_path):
    jsonl = write_corpus(tmp_path / "data", ["one"], [1.0])
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "model.safetensors").write_text("old model")
    (exp / "speechllm_config.json").write_text("{}")
    result = run("train.py", *train_args(tmp_path, tiny_llm_dir, tiny_whisper_path, jsonl))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (f"error: {exp} already holds a trained model (model.safetensors, speechllm_config.json); "
            "pass --overwrite_output_dir") in result.stderr
    assert (exp / "model.safetensors").read_text() == "old model"


def test_output_dir_with_checkpoints_only_resumes_and_overwrite_clears_a_finished_one(tmp_path):
    exp = tmp_path / "exp"
    (exp / "checkpoint-3").mkdir(parents=True)
    args = TrainingArguments(output_dir=str(exp), use_cpu=True, report_to="none")
    train.prepare_output_dir(args, overwrite=False)  # a killed run: left as it is, to resume
    assert (exp / "checkpoint-3").is_dir()
    (exp / "model.safetensors").write_text("old")
    (exp / "speechllm_config.json").write_text("{}")
    (exp / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="already holds a trained model"):
        train.prepare_output_dir(args, overwrite=False)
    train.prepare_output_dir(args, overwrite=True)  # a fresh run: the old model and its checkpoints go
    assert sorted(p.name for p in exp.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------------------
# Recognition: per-key errors, resume after a kill, atomic result


@pytest.mark.slow
def test_recognition_lists_failed_keys_and_exits_zero(tmp_path, model_dir):
    jsonl = write_corpus(tmp_path / "data", ["one", "two", "three"], [1.0, 1.5, 0.8])
    bad_audio = write_bad_audio(tmp_path / "data")
    soundfile.write(tmp_path / "data" / "long.wav", synth_audio(7, 65.0), 16000)
    add_lines(jsonl, [{"key": name, "wav": name} for name in bad_audio] + [{"key": "long", "wav": "long.wav"}])
    result_path = tmp_path / "result.txt"
    result = run("recognize.py", "--model_dir", model_dir, "--data_path", jsonl, "--result_path", result_path,
                 "--batch_size", 3, "--max_new_tokens", 4)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split("\t") for line in result_path.read_text().splitlines()]
    keys = ["utt0", "utt1", "utt2", *bad_audio, "long"]
    assert [line[0] for line in lines] == keys  # every key, input order
    assert all(line[1] == "" for line in lines if line[0] in bad_audio)
    errors = result_path.with_name("result.txt.errors").read_text()
    assert errors == "".join(f"{name}\t{reason}\n" for name, reason in bad_audio.items())
    assert "5 of 9 utterances failed (2 unreadable, 1 missing, 1 empty, 1 non-finite samples)" in result.stdout
    assert not list(tmp_path.glob("result.txt.partial*")) and not list(tmp_path.glob("result.txt.tmp*"))


def traced_recognize(tmp_path, model_dir, jsonl, result_path, name, crash_after_batches=0):
    trace = tmp_path / f"trace_{name}"
    trace.mkdir(exist_ok=True)
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "helpers" / "traced_recognize.py"), "--model_dir", str(model_dir),
         "--data_path", str(jsonl), "--result_path", str(result_path), "--batch_size", "2", "--max_new_tokens", "6"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1", TRACE_DIR=str(trace), CRASH_AFTER_BATCHES=str(crash_after_batches)))
    assert result.returncode == (17 if crash_after_batches else 0), result.stderr[-3000:]
    decoded = [key for line in open(trace / "rank0.jsonl") for key in json.loads(line)["keys"]]
    (trace / "rank0.jsonl").unlink()
    return result, decoded


@pytest.mark.slow
def test_killed_recognition_resumes_and_replaces_the_result_atomically(tmp_path, model_dir):
    jsonl = write_corpus(tmp_path / "data", [f"utterance {i}" for i in range(7)], [1.0, 1.6, 0.7, 1.3, 0.9, 1.1, 1.5])
    straight = tmp_path / "straight.txt"
    traced_recognize(tmp_path, model_dir, jsonl, straight, "straight")

    result_path = tmp_path / "result.txt"
    result_path.write_text("a good result of an earlier run\n")
    _, before_kill = traced_recognize(tmp_path, model_dir, jsonl, result_path, "crash", crash_after_batches=2)
    assert len(before_kill) == 4
    assert result_path.read_text() == "a good result of an earlier run\n"  # not half of a new one
    partial = tmp_path / "result.txt.partial0"
    assert len(partial.read_text().splitlines()) == 4
    with open(partial, "a") as f:
        f.write('{"key": "utt6", "te')  # a line torn by the kill: that utterance is decoded again

    out, after_kill = traced_recognize(tmp_path, model_dir, jsonl, result_path, "crash")
    assert sorted(before_kill + after_kill) == [f"utt{i}" for i in range(7)]  # nothing decoded twice
    assert "4 utterances were decoded by an earlier run (resumed)" in out.stdout
    assert result_path.read_bytes() == straight.read_bytes()
    assert not partial.exists()


# ----------------------------------------------------------------------------------------
# Security: weights without pickles, no remote code from a model dir's JSON


def evil_llm_dir(tmp_path, tiny_llm_dir) -> tuple[Path, Path]:
    """The tiny LLM with an auto_map to Python code that leaves a marker file when imported."""
    llm_dir, marker = tmp_path / "evil_llm", tmp_path / "code_ran"
    shutil.copytree(tiny_llm_dir, llm_dir)
    (llm_dir / "evil.py").write_text(
        f"import pathlib\nfrom transformers import LlamaForCausalLM\npathlib.Path({str(marker)!r}).touch()\n\n\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    pass\n")
    config = json.loads((llm_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (llm_dir / "config.json").write_text(json.dumps(config))
    return llm_dir, marker


def test_model_dir_json_does_not_turn_on_remote_code(tmp_path, tiny_llm_dir, tiny_model, monkeypatch):
    import transformers.dynamic_module_utils

    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    llm_dir, marker = evil_llm_dir(tmp_path, tiny_llm_dir)
    tiny_model.config.llm_model = str(llm_dir)
    tiny_model.save_pretrained(tmp_path / "model")
    config_path = tmp_path / "model" / "speechllm_config.json"
    config = json.loads(config_path.read_text())
    config.update(trust_remote_code=True, auto_map={"AutoModelForCausalLM": "evil.EvilForCausalLM"})
    config_path.write_text(json.dumps(config))
    jsonl = write_corpus(tmp_path / "data", ["one"], [1.0])
    args = ["--model_dir", tmp_path / "model", "--data_path", jsonl, "--result_path", tmp_path / "r.txt",
            "--max_new_tokens", "2"]

    assert type(SpeechLLM.from_pretrained(tmp_path / "model").llm).__name__ == "LlamaForCausalLM"
    recognize.main(list(map(str, args)))
    assert not marker.exists()
    recognize.main(list(map(str, args)) + ["--trust_remote_code"])  # only the flag runs the repo's code
    assert marker.exists()


def test_llm_weights_are_never_unpickled(tmp_path, tiny_llm_dir):
    llm_dir = tmp_path / "pickled_llm"
    shutil.copytree(tiny_llm_dir, llm_dir)
    from safetensors.torch import load_file

    torch.save(load_file(llm_dir / "model.safetensors"), llm_dir / "pytorch_model.bin")
    (llm_dir / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        load_llm(str(llm_dir))


class LeavesAMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def test_whisper_checkpoint_cannot_run_pickled_code(tmp_path, tiny_whisper_path):
    checkpoint = torch.load(tiny_whisper_path, weights_only=True)
    marker = tmp_path / "code_ran"
    checkpoint["payload"] = LeavesAMarker(marker)
    torch.save(checkpoint, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_whisper(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.exists()


def test_recognize_names_a_model_dir_that_is_not_one(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"key": "a", "wav": "a.wav"}\n')
    result = run("recognize.py", "--model_dir", tmp_path / "no_model", "--data_path", jsonl,
                 "--result_path", tmp_path / "result.txt")
    assert result.returncode == 1
    assert f"error: {tmp_path / 'no_model'}: not a model directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_recognize_makes_the_results_folder_and_names_a_result_path_it_cannot_write(model_dir, tmp_path):
    """A result path in a folder that does not exist yet is decoded into (the folder is made, as
    before loading the model); a directory, or a folder under a file, is a clear error."""
    jsonl = write_corpus(tmp_path / "data", ["a", "b"], [1.0, 1.5])
    common = ["--model_dir", str(model_dir), "--data_path", str(jsonl), "--max_new_tokens", "4"]
    result_path = tmp_path / "new" / "deeper" / "result.txt"
    hyps = recognize.main(common + ["--result_path", str(result_path)])
    assert [line.split("\t")[0] for line in result_path.read_text().splitlines()] == sorted(hyps) == ["utt0", "utt1"]

    (tmp_path / "a_file").write_text("mine\n")
    for bad, message in [(tmp_path / "new", "--result_path is a directory"),
                         (tmp_path / "a_file" / "result.txt", "cannot make its folder")]:
        result = run("recognize.py", *common, "--result_path", bad)
        assert result.returncode == 1
        assert f"error: {bad}: {message}" in result.stderr
        assert "Traceback" not in result.stderr
    assert (tmp_path / "a_file").read_text() == "mine\n"
