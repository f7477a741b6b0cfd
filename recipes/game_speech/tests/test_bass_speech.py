"""recipes/game_speech/make_bass_speech.py on small files built here (not the game's): the sky.dnr index, an RNC
method 1 stream written by a tiny encoder below, Huffman-coded text sections, speech headers, and a
whole synthetic game folder run through main()."""
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this recipe

import make_bass_speech as mbs  # noqa: E402


def dnr_entry(number: int, offset: int, size: int, raw: bool = False, units16: bool = False,
              header_packed: bool = False) -> bytes:
    offset_field = (offset >> 4 | 0x800000) if units16 else offset
    flags = size | raw << 23 | header_packed << 22
    return struct.pack("<H", number) + offset_field.to_bytes(3, "little") + flags.to_bytes(3, "little")


def test_read_index_and_load(tmp_path):
    raw_file, other = b"RAW FILE CONTENTS", b"0123456789"
    dsk = bytes(32) + raw_file + bytes(15) + other  # `other` at 64: stored in 16-byte units
    entries = [dnr_entry(60600, 32, len(raw_file), raw=True), dnr_entry(50007, 64, len(other), units16=True,
                                                                         header_packed=True)]
    (tmp_path / "sky.dnr").write_bytes(struct.pack("<I", len(entries)) + b"".join(entries))
    (tmp_path / "sky.dsk").write_bytes(dsk)
    assert mbs.read_index((tmp_path / "sky.dnr").read_bytes()) == {
        60600: (32, len(raw_file), False, False), 50007: (64, len(other), True, True)}
    disk = mbs.Disk(tmp_path)
    assert disk.load(60600) == raw_file and disk.load(50007) == other  # `other` has no RNC signature


def test_crc16():
    assert mbs.crc16(b"123456789") == 0xBB3D  # CRC-16/ARC check value
    assert mbs.crc16(b"") == 0


class RncWriter:
    """Bits LSB-first into LE 16-bit words, a word taken when its first bit is written; literals are
    appended where the stream ends, so they follow the word being filled (what the reader expects)."""

    def __init__(self):
        self.out, self.word, self.used = bytearray(), 0, 16

    def bits(self, value: int, n: int):
        for i in range(n):
            if self.used == 16:
                self.word, self.used = len(self.out), 0
                self.out += bytes(2)
            self.out[self.word + self.used // 8] |= (value >> i & 1) << self.used % 8
            self.used += 1

    def value(self, v: int):  # every table: 16 symbols of 4 bits, so symbol s has canonical code s
        symbol = v if v < 2 else v.bit_length()
        for j in range(3, -1, -1):
            self.bits(symbol >> j & 1, 1)
        if symbol >= 2:
            self.bits(v - (1 << symbol - 1), symbol - 1)


def rnc_pack(steps: list[tuple[bytes, int, int]]) -> bytes:
    """One block of (literal bytes, match distance, match length) steps; the last one's match is unused."""
    w, out = RncWriter(), bytearray()
    w.bits(0, 2)
    for _ in range(3):
        w.bits(16, 5)
        for _ in range(16):
            w.bits(4, 4)
    w.bits(len(steps), 16)
    for i, (literal, distance, length) in enumerate(steps):
        w.value(len(literal))
        w.out += literal
        out += literal
        if i < len(steps) - 1:
            w.value(distance - 1)
            w.value(length - 2)
            for _ in range(length):
                out.append(out[-distance])
    packed = bytes(w.out)
    header = b"RNC\x01" + struct.pack(">IIHH", len(out), len(packed), mbs.crc16(out), mbs.crc16(packed))
    return header + bytes([0, 1]) + packed


def test_rnc_unpack():
    packed = rnc_pack([(b"abc", 3, 6), (b"", 9, 20), (b"XYZ!", 0, 0)])
    assert mbs.rnc_unpack(packed) == b"abcabcabc" + b"abcabcabc" * 2 + b"ab" + b"XYZ!"
    assert mbs.rnc_unpack(rnc_pack([(bytes(range(40)), 0, 0)])) == bytes(range(40))
    broken = bytearray(packed)
    broken[-1] ^= 0x40
    with pytest.raises(ValueError, match="CRC"):
        mbs.rnc_unpack(bytes(broken))


def test_bit_reader_keeps_buffered_bits_across_a_literal():
    bits = mbs.BitReader(bytes([0b10110101, 0xFF, ord("h"), ord("i"), 0b00000101, 0]), 0)
    assert bits.read(3) == 0b101 and bits.read(5) == 0b10110
    assert bits.take(0) == b"" and bits.read(2) == 0b11  # the rest of the first word...
    assert bits.take(2) == b"hi" and bits.read(8) == 0b01111111  # ...then the word after the literal
    assert bits.read(3) == 0b001


def text_section(lines: list[bytes], codes: dict) -> bytes:
    """A text section file: 2-bit aligned Huffman-coded NUL-terminated lines, lengths in 2-bit units."""
    encode = {leaf: format(code, f"0{length}b") for (length, code), leaf in codes.items()}
    coded = []
    for line in lines:
        bits = "".join(encode[b] for b in line + b"\0")
        bits += "0" * (-len(bits) % (16 if len(bits) > 2 * 127 else 2))  # long lines: multiples of 8 units
        coded.append(bits)
    units = [len(bits) // 2 for bits in coded]
    skips = bytes(u if u < 128 else 0x80 | u >> 3 for u in units)
    blocks = [sum(units[i:i + 32]) for i in range(0, len(lines) - 32, 32)]
    stream = "".join(coded)
    stream += "0" * (-len(stream) % 8)
    skip_table = 4 + 2 * len(blocks)
    head = struct.pack(f"<HH{len(blocks)}H", skip_table, skip_table + len(skips), *blocks)
    return head + skips + int(stream, 2).to_bytes(len(stream) // 8, "big")


def test_huffman_codes_from_leaf_depths():
    codes = mbs.huffman_codes(b"\0ab ", "1233")
    assert codes == {(1, 0b0): 0, (2, 0b10): ord("a"), (3, 0b110): ord("b"), (3, 0b111): ord(" ")}
    # the game's tree: a complete prefix code of 123 leaves; ' ' is 000, 'e' 0010, 'a' 0011, NUL 100000
    assert len(mbs.TEXT_CODES) == 123 and sum(2.0 ** -length for length, _ in mbs.TEXT_CODES) == 1.0
    assert mbs.TEXT_CODES[3, 0b000] == ord(" ") and mbs.TEXT_CODES[4, 0b0010] == ord("e")
    assert mbs.TEXT_CODES[4, 0b0011] == ord("a") and mbs.TEXT_CODES[6, 0b100000] == 0  # NUL ends a line


def test_decode_text():
    codes = mbs.huffman_codes(b"\0ab ", "1233")
    lines = [b"ab", b"ba a", b"b" * 90, b""] + [b"a"] * 28 + [b"bb", b"b ab"]
    section = text_section(lines, codes)
    assert section[4 + 2 + 2] & 0x80  # line 2 is long: its length byte counts 8-unit steps
    assert mbs.line_count(section) == len(lines)
    for number, line in enumerate(lines):
        assert mbs.decode_text(section, number, codes) == line
    real = text_section([b"Get OUT of here!", b"`ON' position..."], mbs.TEXT_CODES)
    assert mbs.decode_text(real, 1) == b"`ON' position..."
    assert mbs.clean(mbs.decode_text(real, 1)) == "'ON' position..."


def test_clean():
    assert mbs.clean(b"It's switched to the `OFF'  position\x01...\x8e ") == "It's switched to the 'OFF' position..."


def test_fold_emphasis_uses_the_scripts_own_spelling():
    lines = ["I had to INSPECT it.", "YOU there! WHAT is LINC?", "Well, I'M here, JOEY.", "OK, I'm BUSY.",
             "Don't inspect you, Joey. What?"]
    assert mbs.fold_emphasis(lines, lines + ["a busy day"]) == [
        "I had to inspect it.", "You there! What is LINC?", "Well, I'm here, Joey.", "OK, I'm busy.",
        "Don't inspect you, Joey. What?"]  # LINC and OK are never written otherwise; "I" stays
    script = ["Light the LIGHT.", "A light bulb.", "The light is on.", "It's a Light Bulb."]  # "light" inside 2 to 1
    assert mbs.fold_emphasis(["A LIGHT?", "LIGHT!"], script) == ["A light?", "Light!"]
    english = mbs.english_spellings({"lunch", "nora", "linc", "id"})
    assert english == {"lunch": "lunch", "nora": "Nora"}
    assert mbs.fold_emphasis(["We had LUNCH with NORA and LINC.", "Not ALIVE."], ["the Lunch Box"], english) == [
        "We had Lunch with Nora and LINC.", "Not ALIVE."]  # the script's own spelling comes first


def test_speech_numbers_and_pcm():
    assert mbs.speech_text_number(50000) == 0
    assert mbs.speech_text_number(50000 + 600 + 5) == 1 << 12 | 5
    assert mbs.speech_text_number(50000 + 2430 + 921) == 3 << 12 | 921
    assert mbs.speech_text_number(50000 + 5230 + 3) == 7 << 12 | 3
    assert mbs.speech_text_number(59500) is None and mbs.speech_text_number(49999) is None
    header = struct.pack("<11H", 0x81, 0, 0, 0, 0, 0, mbs.HEADER + 4, 0, 0, 0, 0)
    pcm = mbs.speech_pcm(header + bytes([128, 192, 64, 0, 99, 99]))  # the game plays s_tot_size - 22 bytes
    np.testing.assert_array_equal(pcm, [0.0, 0.5, -0.5, -1.0])


def test_pick_dev_holds_out_whole_scenes():
    clips = [dict(scene=f"s1b{i % 7:02d}") for i in range(70)]
    dev = mbs.pick_dev(clips, 25)
    assert len(dev) == 3 and dev == mbs.pick_dev(list(reversed(clips)), 25)
    assert mbs.pick_dev(clips, 0) == set()


def speech_file(samples: np.ndarray, packed: bool) -> bytes:
    body = samples.astype(np.uint8).tobytes()
    header = struct.pack("<11H", 0x81 if packed else 0, 0, 0, 0, 0, 0, mbs.HEADER + len(body), 0, 0, 0, 0)
    if packed:  # the first 105 bytes, then one match repeating them
        return header + rnc_pack([(body[:105], 105, len(body) - 105), (b"", 0, 0)])
    return header + body


def test_main_on_a_synthetic_game(tmp_path):
    game = tmp_path / "game"
    game.mkdir()
    t = np.arange(mbs.RATE)
    tone = 128 + 60 * np.sin(2 * np.pi * 220 * t / mbs.RATE)
    periodic = np.tile(tone[:105], 42)  # 0.4 s
    files = {
        mbs.TEXT_BASE: text_section([b"Hello THERE.", b"unused", b"Silence."], mbs.TEXT_CODES),
        mbs.TEXT_BASE + 1: text_section([b"x", b"It's `ON' there."], mbs.TEXT_CODES),
        **{mbs.TEXT_BASE + s: text_section([b""], mbs.TEXT_CODES) for s in range(2, 8)},
        50000: speech_file(tone, packed=False),          # section 0 line 0
        50002: speech_file(np.full(5000, 128), packed=False),  # silence
        50601: speech_file(periodic, packed=True),       # section 1 line 1
        59500: speech_file(tone, packed=False),          # CD intro voice: no text
    }
    dsk, entries = bytearray(), []
    for number, data in files.items():
        entries.append(dnr_entry(number, len(dsk), len(data), raw=number >= mbs.TEXT_BASE))
        dsk += data
    entries += [dnr_entry(1000 + i, 0, 0, raw=True) for i in range(mbs.VERSION_0372_ENTRIES - len(entries))]
    (game / "sky.dnr").write_bytes(struct.pack("<I", len(entries)) + b"".join(entries))
    (game / "sky.dsk").write_bytes(bytes(dsk))

    out = tmp_path / "out"
    mbs.main(["--out", str(out), "--game", str(game), "--num_dev", "1"])
    rows = [json.loads(line) for name in ("train", "dev") for line in (out / f"{name}.jsonl").open()]
    assert sorted((r["key"], r["txt"], r["duration"], r["scene"]) for r in rows) == [
        ("bass_s0_0000", "Hello there.", 1.0, "s0b00"), ("bass_s1_0001", "It's 'ON' there.", 0.4, "s1b00")]
    assert all(r["label_source"] == "script" and r["wav"] == f"wav/{r['key']}.wav" for r in rows)
    assert len(list((out / "dev.jsonl").open())) == 1
    audio, rate = soundfile.read(out / rows[0]["wav"])
    assert rate == 16000 and len(audio) == 16000 and 0.3 < np.abs(audio).max() < 0.5
    stats = json.loads((out / "stats.json").read_text())
    assert stats["clips"] == 2 and stats["skipped"] == {"no script text (CD intro file)": 1, "empty audio": 1}
    mbs.main(["--out", str(out), "--game", str(game), "--num_dev", "1"])  # resumed: same corpus
    assert json.loads((out / "stats.json").read_text()) == stats
