"""Word timestamps, subtitles, hotwords and the CTC fallback through recognize.py and transcribe(), on
the tiny random models: files well formed and in input order, long recordings in recording time,
resumable, batched as one by one."""
import json
import re
from dataclasses import replace

import pytest
import soundfile
import torch
from conftest import synth_audio
from test_decoding import ctc_model, one_utterance, unpadded  # noqa: F401 (a fixture)
from test_model import make_batch

import recognize
from decoding import DecodingOptions, decode
from hotwords import Hotwords


def write_recordings(folder):
    """A 50 s recording (decoded in 3 pieces of <= 20 s) and two short clips."""
    folder.mkdir()
    soundfile.write(folder / "long.wav", synth_audio(3, 50.0), 16000)
    for i, seconds in enumerate([2.0, 3.5]):
        soundfile.write(folder / f"short{i}.wav", synth_audio(4 + i, seconds), 16000)
    lines = [dict(key="short1", wav="short1.wav"), dict(key="long", wav="long.wav"), dict(key="short0", wav="short0.wav")]
    (folder / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder / "data.jsonl", {"short1": 3.5, "long": 50.0, "short0": 2.0}


def srt_times(text: str) -> list[tuple[float, float]]:
    """The (start, end) of each cue of an SRT file, in seconds."""
    pattern = r"^(\d\d):(\d\d):(\d\d),(\d{3}) --> (\d\d):(\d\d):(\d\d),(\d{3})$"
    seconds = lambda h, m, s, ms: 3600 * int(h) + 60 * int(m) + int(s) + int(ms) / 1000  # noqa: E731
    return [(seconds(*m[:4]), seconds(*m[4:])) for m in re.findall(pattern, text, re.M)]


def killed_after_one_batch_then_resumed(monkeypatch, argv: list[str]) -> dict:
    """recognize.main(argv) killed as its second batch starts, then run again: -> what the second run returns."""
    real_decode, calls = recognize.decode_batch, []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_decode(*args, **kwargs)
    monkeypatch.setattr(recognize, "decode_batch", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        recognize.main(argv)
    assert len(calls) == 2  # it was killed mid-run, not after the last batch
    monkeypatch.setattr(recognize, "decode_batch", real_decode)
    return recognize.main(argv)


def test_recognize_writes_ctm_and_subtitles_in_recording_time_and_resumes_to_the_same_files(ctc_model, tmp_path, monkeypatch):
    ctc_model.save_pretrained(tmp_path / "model")
    jsonl, durations = write_recordings(tmp_path / "data")
    common = ["--model_dir", str(tmp_path / "model"), "--data_path", str(jsonl), "--batch_size", "2",
              "--max_new_tokens", "5", "--ctc_decode_weight", "0.3", "--chunk_seconds", "20",
              "--timestamps", "--subtitles", "srt"]
    first = tmp_path / "first.txt"
    hyps = recognize.main(common + ["--result_path", str(first)])
    ctm = [line.split() for line in open(f"{first}.ctm")]
    assert all(len(fields) == 6 and fields[1] == "1" for fields in ctm)
    keys = [fields[0] for fields in ctm]
    assert keys == sorted(keys, key=list(durations).index)  # input order, each key's words together
    for key, duration in durations.items():
        words = [(float(start), float(start) + float(length), word) for k, _, start, length, word, _ in ctm if k == key]
        assert len(words) >= 1 and " ".join(w for _, _, w in words).split() == hyps[key].split()
        starts = [start for start, _, _ in words]
        assert starts == sorted(starts) and 0 <= starts[0] and words[-1][1] <= duration + 0.1
        cues = srt_times((tmp_path / "first.txt.subtitles" / f"{key}.srt").read_text())
        assert cues and cues[0][0] == pytest.approx(starts[0], abs=1e-3) and all(a <= b for a, b in cues)
    long_starts = [float(f[2]) for f in ctm if f[0] == "long"]
    assert max(long_starts) > 20.0  # the later pieces' words are in recording time, not their piece's

    second = tmp_path / "second.txt"  # a run killed after its first batch, then run again: the same files
    assert killed_after_one_batch_then_resumed(monkeypatch, common + ["--result_path", str(second)]) == hyps
    for suffix in ["", ".ctm", ".subtitles/long.srt", ".subtitles/short0.srt"]:
        assert open(f"{second}{suffix}").read() == open(f"{first}{suffix}").read(), suffix


def vtt_cues(text: str) -> list[tuple[float, float, str]]:
    """A WebVTT file -> (start, end, text) of each cue; an assertion error unless the whole file is the
    header, then cues of a timing line and one line of text, each followed by a blank line."""
    time = r"(\d\d):(\d\d):(\d\d)\.(\d{3})"
    cue = rf"{time} --> {time}\n((?:(?!-->)[^\n])+)\n\n"
    assert re.fullmatch(rf"WEBVTT\n\n(?:{cue})*", text), text
    seconds = lambda h, m, s, ms: 3600 * int(h) + 60 * int(m) + int(s) + int(ms) / 1000  # noqa: E731
    return [(seconds(*m[:4]), seconds(*m[4:8]), m[8]) for m in re.findall(cue, text)]


def test_recognize_writes_webvtt_that_parses_back_in_order_and_resumes_to_the_same_files(ctc_model, tmp_path, monkeypatch):
    ctc_model.save_pretrained(tmp_path / "model")
    jsonl, durations = write_recordings(tmp_path / "data")
    common = ["--model_dir", str(tmp_path / "model"), "--data_path", str(jsonl), "--batch_size", "2",
              "--max_new_tokens", "5", "--ctc_decode_weight", "0.3", "--chunk_seconds", "20", "--subtitles", "vtt"]
    first = tmp_path / "first.txt"
    hyps = recognize.main(common + ["--result_path", str(first)])
    assert sorted(p.name for p in (tmp_path / "first.txt.subtitles").iterdir()) == sorted(f"{k}.vtt" for k in durations)
    for key, duration in durations.items():
        cues = vtt_cues((tmp_path / "first.txt.subtitles" / f"{key}.vtt").read_text())
        assert cues and " ".join(text for _, _, text in cues).split() == hyps[key].split()
        assert all(0 <= a <= b for a, b, _ in cues) and cues[-1][1] <= duration + 0.1
        assert all(b <= c for (_, b, _), (c, _, _) in zip(cues, cues[1:]))  # in order, none overlapping
    assert vtt_cues((tmp_path / "first.txt.subtitles" / "long.vtt").read_text())[-1][0] > 20.0  # in recording time

    second = tmp_path / "second.txt"  # a run killed after its first batch, then run again: the same files
    assert killed_after_one_batch_then_resumed(monkeypatch, common + ["--result_path", str(second)]) == hyps
    for key in durations:
        suffix = f".subtitles/{key}.vtt"
        assert open(f"{second}{suffix}").read() == open(f"{first}{suffix}").read(), suffix


def test_transcribe_words_batched_as_one_by_one_and_need_a_ctc_head(ctc_model, tiny_model):
    audio = [synth_audio(5, 1.5), synth_audio(6, 2.5)]
    together = ctc_model.transcribe(audio, word_timestamps=True, max_new_tokens=5, ctc_decode_weight=0.3)
    alone = [ctc_model.transcribe([a], word_timestamps=True, max_new_tokens=5, ctc_decode_weight=0.3)[0] for a in audio]
    for batched, single in zip(together, alone):  # times exactly; confidences up to batched float rounding
        assert batched["text"] == single["text"]
        assert [(w.text, w.start, w.end) for w in batched["words"]] == [(w.text, w.start, w.end) for w in single["words"]]
        assert [w.confidence for w in batched["words"]] == pytest.approx([w.confidence for w in single["words"]], rel=1e-3)
    for result, clip in zip(together, audio):
        assert [w.text for w in result["words"]] == result["text"].split()
        assert all(0 <= w.start < w.end <= len(clip) / 16000 + 0.1 and 0 < w.confidence <= 1 for w in result["words"])
    with pytest.raises(ValueError, match="no CTC head"):
        tiny_model.transcribe(audio[:1], word_timestamps=True)


def test_ctc_fallback_writes_ctcs_path_where_the_llm_strays_from_it(ctc_model):
    batch = make_batch(ctc_model, [1.0, 2.0, 1.5], inference=True)
    llm = decode(ctc_model, batch, DecodingOptions(ctc_decode_weight=0.0, max_new_tokens=6))
    ctc = decode(ctc_model, batch, DecodingOptions(decode="ctc"))
    strict = decode(ctc_model, batch, DecodingOptions(ctc_decode_weight=0.0, max_new_tokens=6, ctc_fallback=1e-9))
    lenient = decode(ctc_model, batch, DecodingOptions(ctc_decode_weight=0.0, max_new_tokens=6, ctc_fallback=1e9))
    texts = lambda ids: ctc_model.tokenizer.batch_decode(ids, skip_special_tokens=True)  # noqa: E731
    assert texts(llm) != texts(ctc)  # a random LLM and its CTC head disagree
    assert [t.replace("<|im_end|>", "") for t in texts(strict)] == [t.replace("<|im_end|>", "") for t in texts(ctc)]
    assert torch.equal(lenient, llm)


def test_greedy_with_hotwords_leaves_no_fragment_of_a_phrase(ctc_model):
    """A bonus of 100 a token makes greedy search begin "Joe King" wherever it may: as "J" "oe" " King"
    or as " Joe" " King". Searched once, with two tokens allowed, the first would be left unfinished."""
    batch = make_batch(ctc_model, [1.0, 2.0], inference=True)
    hotwords = Hotwords.from_lines(["Joe King 100"], ctc_model.tokenizer)
    phrase = ctc_model.tokenizer(" Joe King", add_special_tokens=False)["input_ids"]
    assert len(phrase) == 2 and len(ctc_model.tokenizer("Joe King", add_special_tokens=False)["input_ids"]) == 3
    options = DecodingOptions(ctc_decode_weight=0.3, max_new_tokens=2)
    assert decode(ctc_model, batch, replace(options, hotwords=hotwords)).tolist() == [phrase] * 2  # the one that fits
    plain, biased = (decode(ctc_model, batch, replace(options, max_new_tokens=1, hotwords=h)) for h in (None, hotwords))
    assert torch.equal(biased, plain)  # none fits: no fragment, the search as without the list
    options = DecodingOptions(ctc_decode_weight=0.3, max_new_tokens=6, hotwords=Hotwords.from_lines(["Joe King 2"], ctc_model.tokenizer))
    together = [unpadded(ctc_model, ids) for ids in decode(ctc_model, batch, options)]
    assert together == [unpadded(ctc_model, decode(ctc_model, one_utterance(batch, i), options)[0]) for i in range(2)]


def test_recognize_reads_hotwords_and_names_a_bad_line(ctc_model, tmp_path, capsys):
    ctc_model.save_pretrained(tmp_path / "model")
    jsonl, _ = write_recordings(tmp_path / "data")
    (tmp_path / "hot.txt").write_text("Joe King 2.0\nLinux\n")
    common = ["--model_dir", str(tmp_path / "model"), "--data_path", str(jsonl), "--max_new_tokens", "4",
              "--chunk_seconds", "0"]
    plain = recognize.main(common + ["--result_path", str(tmp_path / "plain.txt")])
    biased = recognize.main(common + ["--result_path", str(tmp_path / "hot.txt.result"), "--hotwords", str(tmp_path / "hot.txt")])
    assert set(biased) == set(plain)
    (tmp_path / "bad.txt").write_text("fine\nJoe King -3\n")
    with pytest.raises(recognize.InputError, match="bad.txt:2: the weight"):
        recognize.main(common + ["--result_path", str(tmp_path / "x.txt"), "--hotwords", str(tmp_path / "bad.txt")])
