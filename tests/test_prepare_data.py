"""tools/prepare_data.py on small hand-written Kaldi dirs and FunASR jsonl files, and the segments it
writes as data.py reads them: the cut audio is what the model gets."""
import json
import os
import sys

import numpy as np
import pytest
import soundfile
import torch
from conftest import ROOT, synth_audio

sys.path.insert(0, str(ROOT / "tools"))

import prepare_data  # noqa: E402
from audio import load_audio, load_entry_audio, log_mel  # noqa: E402
from data import InputError, SpeechDataset, check_entries, read_jsonl  # noqa: E402


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def kaldi_dir(tmp_path, monkeypatch):
    """A 32 s recording in a folder and file whose names hold spaces, cut into segments, and a
    recording of its own; wav.scp paths relative to the current directory, as in a Kaldi recipe."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my audio").mkdir()
    soundfile.write(tmp_path / "my audio" / "meeting one.wav", synth_audio(0, 32.0), 16000)
    soundfile.write(tmp_path / "my audio" / "b.wav", synth_audio(1, 1.5), 16000)
    data = tmp_path / "data" / "train"
    write(data / "wav.scp", "meeting my audio/meeting one.wav\nrec_b\tmy audio/b.wav\n")
    write(data / "segments", "seg1 meeting 0.50 2.25\nseg2 meeting 10 12.5\nseg3 meeting 31.0 -1\n"
                             "seg4 gone 1 2\nseg_tiny meeting 5.0 5.01\nseg_late meeting 31.5 33\n")
    write(data / "text", "seg1 hello there\nseg2 two  spaces  kept\nseg3\nseg_tiny uh\nseg_late late\nseg9 no audio\n")
    write(data / "utt2spk", "seg1 alice\nseg2 bob\nseg3 alice\n")
    return data


def test_kaldi_segments_become_lines_with_start_and_end(kaldi_dir, tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    prepare_data.main(["kaldi", str(kaldi_dir), str(out)])
    wav = str(tmp_path / "my audio" / "meeting one.wav")
    assert read_lines(out) == [
        dict(key="seg1", wav=wav, start=0.5, end=2.25, txt="hello there", speaker="alice"),
        dict(key="seg2", wav=wav, start=10.0, end=12.5, txt="two  spaces  kept", speaker="bob"),
        dict(key="seg3", wav=wav, start=31.0, txt="", speaker="alice"),  # END -1: to the recording's end
        dict(key="seg_tiny", wav=wav, start=5.0, end=5.01, txt="uh"),
        dict(key="seg_late", wav=wav, start=31.5, end=33.0, txt="late")]
    printed = capsys.readouterr().out
    assert f"wrote 5 lines to {out} (5 segments)" in printed
    assert "skipped 2: 1 recording not in wav.scp, 1 transcript without audio" in printed


def test_segments_are_what_the_model_gets(kaldi_dir, tmp_path, tiny_model):
    out = tmp_path / "train.jsonl"
    prepare_data.main(["kaldi", str(kaldi_dir), str(out)])
    entries = read_jsonl(out)
    # the check pass: durations are the segments', so a 2 s segment of a 32 s file trains (<= 30 s);
    # too short and beyond-the-end segments are skipped with their reasons
    usable, problems = check_entries(entries, tiny_model.data_spec(), for_training=True)
    assert {e["key"]: e["duration"] for e in usable} == {"seg1": 1.75, "seg2": 2.5, "seg3": 1.0}
    assert {p["key"]: p["reason"] for p in problems} == {
        "seg_tiny": "too short", "seg_late": "segment beyond the end of the audio (32.00 s)"}
    recording = load_audio(tmp_path / "my audio" / "meeting one.wav")
    for entry, (first, last) in zip(usable, [(8000, 36000), (160000, 200000), (496000, 512000)]):
        np.testing.assert_array_equal(load_entry_audio(entry), recording[first:last])
    # train.py and recognize.py read audio through SpeechDataset: its features are the segment's
    item = SpeechDataset(usable, 80, "Transcribe the speech.")[0]
    assert torch.equal(item["mel"], log_mel(recording[8000:36000], 80))


def test_segment_overshooting_its_recording_a_little_is_cut_at_the_end(tmp_path):
    soundfile.write(tmp_path / "a.wav", synth_audio(0, 2.0), 16000)
    jsonl = write(tmp_path / "a.jsonl", '{"key": "s", "wav": "a.wav", "start": 1.5, "end": 2.3}\n')
    usable, problems = check_entries(read_jsonl(jsonl), None, for_training=False)
    assert not problems and usable[0]["duration"] == 0.5  # as Kaldi's extract-segments --max-overshoot 0.5
    np.testing.assert_array_equal(load_entry_audio(usable[0]), load_audio(tmp_path / "a.wav")[24000:])


def test_kaldi_without_segments_or_text_is_one_line_per_recording(tmp_path, capsys):
    data = tmp_path / "test"
    write(data / "wav.scp", "a /abs/a file.flac\nb rel.wav\n")
    out = tmp_path / "test.jsonl"
    prepare_data.main(["kaldi", str(data), str(out)])
    assert read_lines(out) == [dict(key="a", wav="/abs/a file.flac"), dict(key="b", wav=os.path.abspath("rel.wav"))]
    assert "wrote 2 lines" in capsys.readouterr().out


@pytest.mark.parametrize("name, content, message", [
    ("wav.scp", "a a.wav\nb sox b.flac -t wav - |\n", "wav.scp:2: a piped command .* is not supported"),
    ("wav.scp", "a a.wav\nb raw.ark:1234\n", "wav.scp:2: an archive offset"),
    ("wav.scp", "a a.wav\na b.wav\n", "wav.scp:2: duplicate id 'a' \\(first at .*wav.scp:1\\)"),
    ("wav.scp", "a\n", "wav.scp:1: no path after the recording id"),
    ("segments", "s1 a 0 1\ns2 a zero 1\n", "segments:2: START and END must be numbers"),
    ("segments", "s1 a 2 1\n", "segments:1: needs 0 <= START < END"),
    ("segments", "s1 a 0 1 1\n", "segments:1: a channel field is not supported"),
    ("segments", "s1 a 0\n", "segments:1: needs UTT_ID RECORDING_ID START END"),
    ("utt2spk", "s1 alice smith\n", "utt2spk:1: needs UTT_ID SPEAKER_ID"),
    ("text", b"s1 caf\xe9\n", "text:1: not UTF-8"),
])
def test_kaldi_errors_name_file_and_line(tmp_path, name, content, message):
    data = tmp_path / "d"
    write(data / "wav.scp", "a a.wav\n")
    path = data / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError, match=message):
        prepare_data.main(["kaldi", str(data), str(tmp_path / "out.jsonl")])
    assert not (tmp_path / "out.jsonl").exists()


def chatml(user: str, assistant: str | None = None, **extra) -> str:
    messages = [dict(role="system", content="You are a helpful assistant."), dict(role="user", content=user)]
    messages += [dict(role="assistant", content=assistant)] if assistant is not None else []
    return json.dumps(dict(messages=messages, speech_length=145, text_length=3, **extra), ensure_ascii=False) + "\n"


def test_funasr_to_ours(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    funasr = write(tmp_path / "funasr.jsonl",
                   chatml("语音转写：<|startofspeech|>!/data/IT0011W0002.wav<|endofspeech|>", "几点了？")
                   + chatml("<|startofspeech|>!my clips/a b.wav<|endofspeech|>", "hello", key="utt_a")
                   + chatml("Speech transcription:<|startofspeech|>!clips/no answer.wav<|endofspeech|>")
                   + chatml("语音转写：<|startofspeech|>!https://example.com/x.wav<|endofspeech|>", "x"))
    out = tmp_path / "ours.jsonl"
    prepare_data.main(["funasr", str(funasr), str(out)])
    assert read_lines(out) == [
        dict(key="IT0011W0002", wav="/data/IT0011W0002.wav", instruction="语音转写：", txt="几点了？"),
        dict(key="utt_a", wav=str(tmp_path / "my clips" / "a b.wav"), txt="hello"),  # no prompt: the default
        dict(key="no_answer", wav=str(tmp_path / "clips" / "no answer.wav"), instruction="Speech transcription:")]
    assert "skipped 1: 1 a URL (download the audio first)" in capsys.readouterr().out
    read_jsonl(out)  # what it writes, train.py and recognize.py read


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', "malformed JSON"),
    (json.dumps({"messages": "hi"}), 'needs "messages": a list'),
    (chatml("transcribe this"), "the user turn needs exactly one <\\|startofspeech\\|>!PATH"),
    (chatml("<|startofspeech|>!a.wav<|endofspeech|><|startofspeech|>!b.wav<|endofspeech|>"), "the user turn needs exactly one"),
    (json.dumps({"messages": [{"role": "user", "content": "<|startofspeech|>!a.wav<|endofspeech|>"}] * 2}),
     "more than one user turn"),
    (chatml("<|startofspeech|>!x/first.wav<|endofspeech|>", "y"), "duplicate key 'first' \\(first at .*:1\\)"),
    (chatml("<|startofspeech|>!b.wav<|endofspeech|>", "y", key="two words"), '"key" must be one word'),
])
def test_funasr_errors_name_file_and_line(tmp_path, line, message):
    funasr = write(tmp_path / "funasr.jsonl", chatml("<|startofspeech|>!first.wav<|endofspeech|>", "x") + line)
    with pytest.raises(InputError, match=f"{funasr}:2: {message}"):
        prepare_data.main(["funasr", str(funasr), str(tmp_path / "out.jsonl")])


def test_ours_to_funasr_and_back(tmp_path, capsys):
    for i, seconds in enumerate([1.0, 2.5]):
        soundfile.write(tmp_path / f"u{i}.wav", synth_audio(i, seconds), 16000)
    ours = write(tmp_path / "ours.jsonl", "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in [
        dict(key="u0", wav="u0.wav", txt="hello world"),
        dict(key="u1", wav="u1.wav", txt="你好", instruction="语音转写："),
        dict(key="seg", wav="u1.wav", txt="x", start=0.5, end=1.0),
        dict(key="untranscribed", wav="u0.wav"),
        dict(key="gone", wav="gone.wav", txt="y")]))
    funasr = tmp_path / "funasr.jsonl"
    prepare_data.main(["to-funasr", str(ours), str(funasr)])
    lines = read_lines(funasr)
    assert lines[1] == dict(key="u1", messages=[
        dict(role="system", content="You are a helpful assistant."),
        dict(role="user", content=f"语音转写：<|startofspeech|>!{tmp_path / 'u1.wav'}<|endofspeech|>"),
        dict(role="assistant", content="你好")], speech_length=250)
    assert lines[0]["messages"][1]["content"].startswith("Speech transcription:<|startofspeech|>!")
    printed = capsys.readouterr().out
    assert "wrote 2 lines" in printed
    assert "skipped 3: " in printed and "1 a segment" in printed and "1 no transcript" in printed
    assert "1 audio missing" in printed

    back = tmp_path / "back.jsonl"
    prepare_data.main(["funasr", str(funasr), str(back)])
    assert [(e["key"], e["wav"], e["txt"], e.get("instruction")) for e in read_jsonl(back)] == [
        ("u0", str(tmp_path / "u0.wav"), "hello world", "Speech transcription:"),
        ("u1", str(tmp_path / "u1.wav"), "你好", "语音转写：")]


def test_an_existing_out_is_kept_without_force(tmp_path):
    data = tmp_path / "d"
    write(data / "wav.scp", "a /abs/a.wav\n")
    out = write(tmp_path / "out.jsonl", "mine\n")
    with pytest.raises(InputError, match="out.jsonl exists: pass --force"):
        prepare_data.main(["kaldi", str(data), str(out)])
    assert out.read_text() == "mine\n"
    prepare_data.main(["kaldi", str(data), str(out), "--force"])
    assert read_lines(out) == [dict(key="a", wav="/abs/a.wav")]
