"""A corpus of real human speech: the voice clips of the freeware game Beneath a Steel Sky (CD version
0.0372, Debian package beneath-a-steel-sky; free to redistribute and modify), each labelled with the
script line the game shows while it plays (its capitalized stress on words folded, see fold_emphasis).

    bash recipes/game_speech/install_real_speech.sh   # apt: /usr/share/scummvm/beneath-a-steel-sky/sky.{dnr,dsk}
    python recipes/game_speech/make_bass_speech.py --out corpus/bass [--game DIR] [--limit N] [--num_dev 300]

Writes OUT/wav/<key>.wav (16 kHz mono 16-bit), OUT/train.jsonl, OUT/dev.jsonl (key, wav, txt, duration,
scene, section, text_number, label_source="script") and OUT/stats.json. Deterministic; resumable
(existing wavs are kept; they are written under a temp name, then renamed).

The formats, as read in ScummVM's engines/sky/ (disk.cpp, rnc_deco.cpp, text.cpp, hufftext.cpp,
sound.cpp, struc.h); this is an independent reimplementation:
- sky.dnr: u32 count, then 8-byte entries: u16 file number, u24 offset (bit 23: offset is in
  16-byte units), u24 size+flags (bit 23: stored raw; bit 22: the RNC data includes the header).
  Files start with a 22-byte header (11 LE u16: flag, ..., s_tot_size at byte 12); flag bit 7 with
  "RNC\\1" after the header means the body is RNC ProPack method 1: 18-byte BE header (sizes, CRC-16s,
  block count), then per block three canonical Huffman tables (literal-run length, distance, length)
  and an LZ77 stream; bits are read LSB-first from LE 16-bit words, literal runs are byte-aligned.
- Text: file 60600+s holds text section s (English). u16 offset of a 1-byte-per-line length table,
  u16 offset of the bit stream, then per 32-line block its length; lengths count 2-bit units
  (a byte >= 0x80 means (b & 0x7F) * 8). Lines are Huffman-coded MSB-first, NUL-terminated; the
  tree is not in sky.dsk (it was in the game executable), so the 0.0372 tree is given below as its
  leaves in order and their depths (transcribed from ScummVM's hufftext.cpp, _huffTree_00372).
- Speech: text number (section << 12 | line) plays file 50000 + SPEECH_CONVERT[section] + line:
  unsigned 8-bit mono PCM at 11025 Hz after the 22-byte header, s_tot_size - 22 bytes long.
  Files 59494-59672 are the CD intro (voices, images, background sounds) and have no script text.

There is no speaker in the data (who speaks a line is decided by the game scripts), so `speaker` is
left out. Scenes are the game's 32-line text blocks ("s<section>b<block>"), consecutive script lines
that are mostly one conversation or room; dev holds out whole blocks, in the order of a hash of the
block name, until it has --num_dev clips.
"""
import argparse
import hashlib
import json
import os
import random
import re
import struct
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile
import soxr

DEFAULT_GAME = Path("/usr/share/scummvm/beneath-a-steel-sky")
HEADER = 22                       # bytes of the data file header (struc.h DataFileHeader)
SPEECH_BASE, TEXT_BASE, RATE = 50000, 60600, 11025
SPEECH_CONVERT = (0, 600, 1100, 2430, 3380, 4530, 5080, 5230)  # first speech file of each text section
INTRO = range(59494, 59673)       # CD intro files: no text
VERSION_0372_ENTRIES = 5097       # sky.dnr entries of v0.0372 (disk.cpp determineGameVersion)
HUFF_LEAVES = (b' eaostn.ir\x00EumAlIdRNSTOhcDgLCpU!yMPvH?b\'f,GBVkFqwK-WJ*zYj+Q\x85)Z\x8b<\x95~\x8a\x87:'
               b'\x7f]#xX\x91\x88`20\x831/(=\x86^39\x984}8\\"\x90&\x8d56\x92\x8f\x8e\x93\x8c7\x80\x81\x99$@[\x9a'
               b'_>\x96\x82%\t\x9c\x97{\x94!')
HUFF_DEPTHS = ("3445555554665556666665776667777776887778877799888998889999aa9aa9bbaaabbabbaccbccbccbbbccccddcccdd"
               "ddddddeedeeeeffeeeffefffgg")  # base-17 digits, one per leaf


# ---- sky.dnr / sky.dsk ------------------------------------------------------------------------------
def read_index(dnr: bytes) -> dict[int, tuple[int, int, bool, bool]]:
    """file number -> (byte offset in sky.dsk, stored size, may be RNC-packed, RNC data holds the header)."""
    count, = struct.unpack_from("<I", dnr)
    index = {}
    for i in range(count):
        number, off_lo, off_hi, flags_lo, flags_hi = struct.unpack_from("<HHBHB", dnr, 4 + 8 * i)
        offset, flags = off_lo | off_hi << 16, flags_lo | flags_hi << 16
        start = (offset & 0x7FFFFF) << (4 if offset & 0x800000 else 0)
        index[number] = (start, flags & 0x3FFFFF, not flags & 0x800000, bool(flags & 0x400000))
    return index


class Disk:
    def __init__(self, game: Path):
        self.index = read_index((game / "sky.dnr").read_bytes())
        self.dsk = (game / "sky.dsk").read_bytes()

    def load(self, number: int) -> bytes:
        start, size, packable, header_packed = self.index[number]
        data = self.dsk[start:start + size]
        if packable and data[0] & 0x80 and data[HEADER:HEADER + 4] == b"RNC\x01":
            body = rnc_unpack(data[HEADER:])
            return body if header_packed else data[:HEADER] + body
        return data


# ---- RNC ProPack method 1 ---------------------------------------------------------------------------
_CRC_TABLE = []
for _i in range(256):
    for _ in range(8):
        _i = _i >> 1 ^ 0xA001 if _i & 1 else _i >> 1
    _CRC_TABLE.append(_i)


def crc16(data: bytes) -> int:
    """CRC-16/ARC (reflected polynomial 0xA001), RNC's checksum."""
    crc = 0
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ crc >> 8
    return crc


class BitReader:
    """LSB-first bits from little-endian 16-bit words; `pos` is where the next word (or literal) starts."""

    def __init__(self, data: bytes, pos: int):
        self.data, self.pos, self.buf, self.count = data + bytes(4), pos, 0, 0

    def read(self, n: int) -> int:
        while self.count < n:
            self.buf |= (self.data[self.pos] | self.data[self.pos + 1] << 8) << self.count
            self.pos, self.count = self.pos + 2, self.count + 16
        value, self.buf, self.count = self.buf & (1 << n) - 1, self.buf >> n, self.count - n
        return value

    def take(self, n: int) -> bytes:  # a byte-aligned literal run; buffered bits are kept
        self.pos += n
        return self.data[self.pos - n:self.pos]


def huffman_table(bits: BitReader) -> dict[tuple[int, int], int]:
    """Canonical code lengths (5-bit count, 4 bits each) -> {(length, code as read LSB-first): symbol}."""
    lengths = [bits.read(4) for _ in range(bits.read(5))]
    table, code = {}, 0
    for length in range(1, 17):
        for symbol, symbol_length in enumerate(lengths):
            if symbol_length == length:
                table[length, int(f"{code >> 16 - length:0{length}b}"[::-1], 2)] = symbol
                code += 1 << 16 - length
    return table


def huffman_value(bits: BitReader, table: dict) -> int:
    code = 0
    for length in range(1, 17):
        code |= bits.read(1) << length - 1
        if (length, code) in table:
            symbol = table[length, code]  # symbols >= 2 are a bit count: 1xxx with symbol-1 extra bits
            return symbol if symbol < 2 else 1 << symbol - 1 | bits.read(symbol - 1)
    raise ValueError("RNC: invalid Huffman code")


def rnc_unpack(data: bytes) -> bytes:
    if data[:4] != b"RNC\x01":
        raise ValueError("not RNC method 1")
    size, packed_size, crc, packed_crc = struct.unpack_from(">IIHH", data, 4)
    if crc16(data[18:18 + packed_size]) != packed_crc:
        raise ValueError("RNC: packed CRC mismatch")
    bits, out = BitReader(data, 18), bytearray()
    bits.read(2)
    for _ in range(data[17]):
        literal, distance, length = huffman_table(bits), huffman_table(bits), huffman_table(bits)
        counts = bits.read(16)
        for i in range(counts):
            out += bits.take(huffman_value(bits, literal))
            if i < counts - 1:  # every step but the last copies a match
                back = huffman_value(bits, distance) + 1
                for _ in range(huffman_value(bits, length) + 2):
                    out.append(out[-back])
    if len(out) != size or crc16(out) != crc:
        raise ValueError("RNC: unpacked size or CRC mismatch")
    return bytes(out)


# ---- text ---------------------------------------------------------------------------------------------
def huffman_codes(leaves: bytes, depths: str) -> dict[tuple[int, int], int]:
    """A tree given by its leaves left to right and their depths -> {(length, MSB-first code): byte}."""
    codes, code, previous = {}, -1, None
    for leaf, digit in zip(leaves, depths, strict=True):
        depth = int(digit, 17)
        code = 0 if previous is None else (code + 1) << depth - previous if depth >= previous \
            else (code + 1) >> previous - depth
        codes[depth, code], previous = leaf, depth
    return codes


TEXT_CODES = huffman_codes(HUFF_LEAVES, HUFF_DEPTHS)


def decode_text(section: bytes, line: int, codes: dict = TEXT_CODES) -> bytes:
    """Line `line` (0-4095) of a text section file, raw bytes without the terminating NUL."""
    skip_table, stream = struct.unpack_from("<HH", section)
    block = line >> 5
    units = sum(struct.unpack_from(f"<{block}H", section, 4))  # 2-bit units
    for skip in section[skip_table + 32 * block:skip_table + line]:
        units += (skip & 0x7F) << 3 if skip & 0x80 else skip
    bit = (stream + (units >> 2)) * 8 + (units & 3) * 2
    out, code, length = bytearray(), 0, 0
    while True:
        code, length, bit = code << 1 | section[bit >> 3] >> 7 - (bit & 7) & 1, length + 1, bit + 1
        if (length, code) in codes:
            if codes[length, code] == 0:
                return bytes(out)
            out.append(codes[length, code])
            code = length = 0
        elif length > 32:
            raise ValueError(f"text {line}: invalid Huffman code")


def line_count(section: bytes) -> int:
    skip_table, stream = struct.unpack_from("<HH", section)
    return stream - skip_table  # the length table has a byte per line


def clean(raw: bytes) -> str:
    """The line as shown: ` is the font's opening quote; control and non-ASCII glyphs are dropped."""
    text = "".join(c for c in raw.decode("latin-1").replace("`", "'") if " " <= c < "\x7f")
    return " ".join(text.split())


WORD = re.compile(r"[A-Za-z][A-Za-z']*")


def fold_emphasis(lines: list[str], script: list[str], english: dict[str, str] | None = None) -> list[str]:
    """The script stresses words in capitals ("I had to INSPECT it."); a transcript would not, and a
    model trained on them would shout at random. A capitalized word of 2+ letters takes the script's
    most common other spelling of it inside sentences (all lines, spoken or not: "inspect", "I'm",
    "Joey"), else its spelling in `english` (lowercase word -> spelling), capitalized at the start of
    a sentence; other words (LINC, the computer's name; ID) stay."""
    def starts_sentence(m: re.Match) -> bool:
        before = m.string[:m.start()].rstrip()
        return not before or before[-1] in ".!?"

    inside, anywhere = Counter(), Counter()
    for line in script:
        for m in WORD.finditer(line):
            if not m.group().isupper():
                anywhere[m.group()] += 1
                inside[m.group()] += not starts_sentence(m)
    spelling = dict(english or {})
    for form, _ in sorted(anywhere.items(), key=lambda kv: (inside[kv[0]], kv[1], kv[0])):
        spelling[form.lower()] = form  # ascending: the most common is written last and stays

    def fold(m: re.Match) -> str:
        word = m.group()
        if not word.isupper() or sum(c.isalpha() for c in word) < 2 or word.lower() not in spelling:
            return word
        form = spelling[word.lower()]
        return form[0].upper() + form[1:] if starts_sentence(m) else form

    return [WORD.sub(fold, line) for line in lines]


def english_spellings(words: set[str]) -> dict[str, str]:
    """Lowercase word -> "word" or "Word", whichever GPT-2's byte-pair vocabulary (in openai-whisper)
    holds as one more frequent token (a lower id: it was merged earlier); words of 3+ letters only,
    so that acronyms (ID, OK) stay."""
    import whisper.tokenizer

    encoding = whisper.tokenizer.get_encoding("gpt2")
    spellings = {}
    for word in words:
        if len(word) < 3 or not word.isalpha():
            continue
        ids = {form: encoding.encode(" " + form) for form in (word, word.capitalize())}
        ids = {form: tokens[0] for form, tokens in ids.items() if len(tokens) == 1}
        if ids:
            spellings[word] = min(ids, key=ids.get)
    return spellings


# ---- speech -------------------------------------------------------------------------------------------
def speech_text_number(file_number: int) -> int | None:
    """The text number whose speech is this file (inverse of sound.cpp startSpeech), None for no text."""
    n = file_number - SPEECH_BASE
    if n < 0 or file_number in INTRO:
        return None
    section = max(s for s, first in enumerate(SPEECH_CONVERT) if first <= n)
    return section << 12 | n - SPEECH_CONVERT[section]


def speech_pcm(data: bytes) -> np.ndarray:
    """Header + unsigned 8-bit PCM -> float32 in [-1, 1); the game plays s_tot_size - 22 bytes."""
    total, = struct.unpack_from("<H", data, 12)
    pcm = np.frombuffer(data, np.uint8, count=max(0, min(total, len(data)) - HEADER), offset=HEADER)
    return (pcm.astype(np.float32) - 128.0) / 128.0


def write_wav(path: Path, audio: np.ndarray):
    audio = soxr.resample(audio, RATE, 16000) if len(audio) else audio
    tmp = path.with_suffix(".tmp.wav")
    soundfile.write(tmp, np.clip(audio, -1.0, 32767 / 32768), 16000, subtype="PCM_16")
    os.replace(tmp, path)


def pick_dev(clips: list[dict], num_dev: int) -> set[str]:
    """Whole scenes, in the order of a hash of their name, until they hold num_dev clips."""
    sizes = Counter(c["scene"] for c in clips)
    dev, total = set(), 0
    for scene in sorted(sizes, key=lambda s: hashlib.sha1(s.encode()).hexdigest()):
        if total >= num_dev:
            break
        dev.add(scene)
        total += sizes[scene]
    return dev


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--game", type=Path, default=DEFAULT_GAME, help="folder with sky.dnr and sky.dsk")
    ap.add_argument("--limit", type=int, help="only the first N speech files (for a quick look)")
    ap.add_argument("--num_dev", type=int, default=300)
    args = ap.parse_args(argv)

    disk = Disk(args.game)
    if len(disk.index) != VERSION_0372_ENTRIES:
        sys.exit(f"sky.dnr has {len(disk.index)} entries: not v0.0372 (CD), whose text tree this script has")
    (args.out / "wav").mkdir(parents=True, exist_ok=True)
    sections = {s: disk.load(TEXT_BASE + s) for s in range(len(SPEECH_CONVERT))}
    lines_in = {s: line_count(data) for s, data in sections.items()}
    files = sorted(n for n in disk.index if SPEECH_BASE <= n < SPEECH_BASE + 10000)[:args.limit]
    clips, skipped, size_mismatch = [], Counter(), 0
    for i, number in enumerate(files):
        text_number = speech_text_number(number)
        if text_number is None:
            skipped["no script text (CD intro file)"] += 1
            continue
        section, line = divmod(text_number, 4096)
        if line >= lines_in[section]:
            skipped["no script line of that number"] += 1
            continue
        txt = clean(decode_text(sections[section], line))
        if not txt:
            skipped["empty script line"] += 1
            continue
        key = f"bass_s{section}_{line:04d}"
        wav = args.out / "wav" / f"{key}.wav"
        if not wav.exists():
            data = disk.load(number)
            size_mismatch += struct.unpack_from("<H", data, 12)[0] != len(data)  # s_tot_size vs what is stored
            audio = speech_pcm(data)
            if len(audio) < RATE // 10 or np.abs(audio).max() <= 1 / 128:
                skipped["empty audio"] += 1
                continue
            write_wav(wav, audio)
        clips.append(dict(key=key, wav=f"wav/{key}.wav", txt=txt,
                          duration=round(soundfile.info(wav).frames / 16000, 3), scene=f"s{section}b{line >> 5:02d}",
                          section=section, text_number=text_number, label_source="script"))
        if (i + 1) % 500 == 0:
            print(f"{i + 1}/{len(files)} files", flush=True)

    script = [clean(decode_text(data, line)) for s, data in sections.items() for line in range(lines_in[s])]
    capitals = {w.lower() for c in clips for w in WORD.findall(c["txt"]) if w.isupper()}
    for clip, txt in zip(clips, fold_emphasis([c["txt"] for c in clips], script, english_spellings(capitals))):
        clip["txt"] = txt
    dev_scenes = pick_dev(clips, args.num_dev)
    splits = {"train": [c for c in clips if c["scene"] not in dev_scenes],
              "dev": [c for c in clips if c["scene"] in dev_scenes]}
    for name, rows in splits.items():
        with open(args.out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    durations = np.array([c["duration"] for c in clips])
    lengths = np.array([len(c["txt"]) for c in clips])
    stats = dict(speech_files=len(files), clips=len(clips), hours=round(durations.sum() / 3600, 3),
                 scenes=len({c["scene"] for c in clips}), skipped=dict(skipped),
                 header_size_mismatch=size_mismatch,  # only counts the files decoded in this run
                 duration_quantiles={q: round(float(np.quantile(durations, q / 100)), 2) for q in (0, 10, 50, 90, 100)}
                 if len(clips) else {},
                 text_length_duration_correlation=round(float(np.corrcoef(lengths, durations)[0, 1]), 3)
                 if len(clips) > 2 else None,
                 **{name: dict(clips=len(rows), hours=round(sum(r["duration"] for r in rows) / 3600, 3),
                               scenes=len({r["scene"] for r in rows})) for name, rows in splits.items()})
    (args.out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))
    for c in random.Random(0).sample(clips, min(10, len(clips))):
        print(f"{c['key']}  {c['duration']:6.2f}s  {c['txt']}")


if __name__ == "__main__":
    main()
