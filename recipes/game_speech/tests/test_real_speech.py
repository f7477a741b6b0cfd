"""recipes/game_speech/make_real_speech.py on small files built here (not the game's): the queen.1c table, a .DOG
dialogue's lines and voice file names, and snapping a transcript to the script."""
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this recipe

import make_real_speech as mrs  # noqa: E402


def test_read_table():
    names = [(b"020001P2.SB", 10, 5), (b"BOB1.DOG", 15, 7)]
    blob = b"QTBLCEM10" + bytes(4) + struct.pack(">H", len(names))
    blob += b"".join(struct.pack(">12sBII", name, 1, offset, size) for name, offset, size in names)
    assert mrs.read_table(blob) == {"020001P2.SB": (10, 5), "BOB1.DOG": (15, 7)}


def test_split_segments():
    assert mrs.split_segments("Could I have a look at it?*03I might be able to repair it.*02") == [
        "Could I have a look at it?", "I might be able to repair it.", ""]
    assert mrs.split_segments("*FRTell him.*XY00(237,112)Go on.") == ["", "Tell him.", "Go on."]


def _string(text: str, align: int) -> bytes:
    raw = bytes([len(text)]) + text.encode()
    return raw + bytes(-len(raw) % align)


def dog_file(talk_key: int, joe: list[tuple[int, str]], person: list[tuple[int, str]], again: tuple[str, str]) -> bytes:
    """A .DOG with one dialogue level: 20-byte bank header, header, tree, Joe's and the person's tables."""
    joe_table = b"".join(struct.pack(">hh", 0, node) + _string(text, 4) for node, text in joe)
    person_table = b"".join(struct.pack(">hh", 0, node) + _string(text, 4) for node, text in person)
    joe_offset = 32 + 96  # 1 level of 6 tree nodes of 16 bytes
    person1 = joe_offset + len(joe_table)
    person2 = person1 + len(person_table)
    header = struct.pack(">5h", 1, 99, talk_key, len(joe), len(person)) + bytes(12) + struct.pack(">3H", person1, 0, person2)
    body = header + bytes(32 - len(header)) + bytes(96) + joe_table + person_table
    return b"AmBkxxxxxxxxDatas   " + body + _string(again[0], 2) + _string(again[1], 2)


def test_dog_lines():
    data = dog_file(7, joe=[(0, "Excuse me Bob.*03"), (0x1E, "Does she live here?*04Is she nice?*02")],
                    person=[(0x1E, "Yes.*FLShe is.*01"), (0x1E, "Never said: the game speaks a node's first line.")],
                    again=("Back again?*01", "Yes."))
    assert mrs.dog_lines("BOB1", data) == {
        "07SSSSJ1": ("Excuse me Bob.", "JOE"), "07SSSSJ2": ("", "JOE"),  # node 0: Joe's opening line
        "07001EJ1": ("Does she live here?", "JOE"), "07001EJ2": ("Is she nice?", "JOE"), "07001EJ3": ("", "JOE"),
        "07001EP1": ("Yes.", "BOB"), "07001EP2": ("She is.", "BOB"), "07001EP3": ("", "BOB"),
        "07XXXXP1": ("Back again?", "BOB"), "07XXXXP2": ("", "BOB"), "07XXXXJ1": ("Yes.", "JOE")}


def test_spoken_drops_markup():
    assert mrs.spoken("Soldier Treatment^_, and I'm tough. ") == "Soldier Treatment, and I'm tough."
    assert mrs.spoken("<gulp> ") == "" and mrs.spoken("@@ She's beautiful! @@") == "She's beautiful!"
    assert mrs.spoken("Do you want to RESTART (Y/N)?") == "Do you want to RESTART?"


LINES = ["You couldn't pilot your way out of a paper bag.", "I'm a better pilot than you will ever be.",
         "At least MY plane doesn't have training wheels."]


def test_snap_to_the_script():
    line, match_score = mrs.snap("you couldnt pilot your way out of a piece of bag!", LINES)
    assert line == LINES[0] and match_score > 0.85
    clip = dict(key="x", scene="none", script_txt="", speaker=None, duration=1.0)
    result = dict(text="You couldn't pilot your way out of a piece of bag!", avg_logprob=-0.2,
                  no_speech_prob=0.0, compression_ratio=1.0)
    labelled = mrs.label(clip, result, LINES, min_match=0.6, min_search_match=0.85)
    assert labelled["txt"] == LINES[0] and labelled["label_source"] == "script"
    # a line that matches nothing keeps the teacher's text
    other = dict(result, text="The weather is lovely in the mountains today.")
    labelled = mrs.label(clip, other, LINES, min_match=0.6, min_search_match=0.85)
    assert labelled["txt"] == other["text"] and labelled["label_source"] == "teacher" and "reason" not in labelled
    # a clip the script names is confirmed against its own line only; contradicted, it is rejected
    named = dict(clip, scene="AND1", script_txt=LINES[1])
    assert mrs.label(named, dict(result, text="I'm a better pilot than you'll ever be"), LINES, 0.5, 0.85)["txt"] == LINES[1]
    assert mrs.label(named, result, LINES, 0.5, 0.85)["reason"] == "the teacher contradicts the script"
    assert mrs.label(named, result, LINES, 0.5, 0.85, trust_teacher=True)["txt"] == result["text"]
