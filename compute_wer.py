"""Word/character error rate in the Kaldi / SpeechIO style.

    python compute_wer.py REF HYP [--lang en|zh|<code>] [--no_norm] [--details]

REF: jsonl lines {"key", "txt"} (key defaults to the wav stem) or Kaldi `key text` lines.
HYP: `key<TAB>text` lines, as recognize.py writes them (`key<TAB>` or `key` alone: empty text).
Prints `WER 8.15 [ 33422 / 409974, 8260 ins, 8070 del, 17092 sub ]` (CER for --lang zh) and
`SER 12.50 [ 1 / 8 ]`. A reference without a hypothesis counts as all deletions; a hypothesis without
a reference is reported and ignored. An empty reference has N=0 and its hypothesis words are
insertions; if the whole set has N=0 the rate is 100 * errors / max(N, 1), i.e. 0.00 when nothing
was inserted. The alignment is jiwer's (Levenshtein over tokens).

    from compute_wer import score, format_report
    print(format_report(score({"k": "the cat"}, {"k": "a cat"}), details=True))
"""
import argparse
import json
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import jiwer
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df"
_ZH_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")  # one CJK character, or a run of letters/digits


@lru_cache(maxsize=None)
def _normalizer(lang: str):
    # EnglishTextNormalizer reads its spelling table on construction: build it once, not per line
    return EnglishTextNormalizer() if lang == "en" else BasicTextNormalizer()


def tokenize(text: str, lang: str = "en", normalize: bool = True) -> list[str]:
    if not normalize:
        return text.split()
    if lang == "zh":  # character error rate; Latin words and numbers stay whole (mixed zh/en)
        return _ZH_TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())
    # Whisper's English normalizer keeps a final ellipsis ("My name is...") as a "." token (its rule
    # that spares decimal points needs a character after the dot): punctuation is no word.
    return [t for t in _normalizer(lang)(text).split() if any(c.isalnum() for c in t)]


@dataclass
class Utterance:
    key: str
    ref: list[str]
    hyp: list[str]
    ins: int = 0
    dele: int = 0
    sub: int = 0
    alignment: list[tuple[str, str, str]] = field(default_factory=list)  # (C/S/D/I, ref word, hyp word)

    @property
    def errors(self) -> int:
        return self.ins + self.dele + self.sub


@dataclass
class ScoreResult:
    label: str  # WER or CER
    utterances: list[Utterance]  # per-utterance details, in reference order
    missing_keys: list[str]
    extra_keys: list[str]

    ins = property(lambda self: sum(u.ins for u in self.utterances))
    dele = property(lambda self: sum(u.dele for u in self.utterances))
    sub = property(lambda self: sum(u.sub for u in self.utterances))
    errors = property(lambda self: self.ins + self.dele + self.sub)
    ref_words = property(lambda self: sum(len(u.ref) for u in self.utterances))
    sentences = property(lambda self: len(self.utterances))
    sentence_errors = property(lambda self: sum(u.errors > 0 for u in self.utterances))

    @property
    def error_rate(self) -> float:
        return 100.0 * self.errors / max(self.ref_words, 1)  # N=0: see the module docstring

    def summary_line(self) -> str:
        return (f"{self.label} {self.error_rate:.2f} [ {self.errors} / {self.ref_words}, "
                f"{self.ins} ins, {self.dele} del, {self.sub} sub ]")

    def sentence_line(self) -> str:
        return (f"SER {100.0 * self.sentence_errors / max(self.sentences, 1):.2f} "
                f"[ {self.sentence_errors} / {self.sentences} ]")


def align(utt: Utterance) -> Utterance:
    if not utt.ref or not utt.hyp:  # nothing to align (and some jiwer versions refuse empty references)
        utt.ins, utt.dele = len(utt.hyp), len(utt.ref)
        utt.alignment = [("D", w, "") for w in utt.ref] + [("I", "", w) for w in utt.hyp]
        return utt
    out = jiwer.process_words(" ".join(utt.ref), " ".join(utt.hyp))
    utt.ins, utt.dele, utt.sub = out.insertions, out.deletions, out.substitutions
    ref, hyp = out.references[0], out.hypotheses[0]  # the tokens the chunk indices refer to
    for chunk in out.alignments[0]:
        r, h = ref[chunk.ref_start_idx:chunk.ref_end_idx], hyp[chunk.hyp_start_idx:chunk.hyp_end_idx]
        op = {"equal": "C", "substitute": "S", "delete": "D", "insert": "I"}[chunk.type]
        utt.alignment += [(op, r[i] if i < len(r) else "", h[i] if i < len(h) else "")
                          for i in range(max(len(r), len(h)))]
    return utt


def score(refs: dict[str, str], hyps: dict[str, str], lang: str = "en", normalize: bool = True) -> ScoreResult:
    utterances = [align(Utterance(key, tokenize(ref, lang, normalize), tokenize(hyps.get(key, ""), lang, normalize)))
                  for key, ref in refs.items()]
    return ScoreResult("CER" if lang == "zh" else "WER", utterances,
                       missing_keys=[k for k in refs if k not in hyps], extra_keys=[k for k in hyps if k not in refs])


def _lines(path):
    # utf-8-sig: a BOM would otherwise glue itself to the first key
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        if line.strip():
            yield line_no, line


def _add(table: dict, key: str, text: str, where: str):
    if key in table:  # a silent overwrite would score one of the two and drop the other
        raise ValueError(f"{where}: duplicate key {key!r}")
    table[key] = text


def read_references(path) -> dict[str, str]:
    """jsonl ({"key", "txt"}, key defaulting to the wav stem) or Kaldi `key text` lines."""
    lines = list(_lines(path))
    is_jsonl = bool(lines) and lines[0][1].lstrip().startswith("{")
    refs = {}
    for line_no, line in lines:
        if is_jsonl:
            try:
                entry = json.loads(line)
                key = entry["key"] if "key" in entry else Path(entry["wav"]).stem
                if not isinstance(entry["txt"], str) or not isinstance(key, (str, int)) or not str(key).strip():
                    raise TypeError("txt must be a string, key a non-empty string")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: needs a jsonl object with \"txt\" and \"key\" or \"wav\" "
                                 f"({type(e).__name__}: {e})") from None
            _add(refs, str(key), entry["txt"], f"{path}:{line_no}")
        else:
            key, *text = line.split(maxsplit=1)
            _add(refs, key, text[0] if text else "", f"{path}:{line_no}")
    return refs


def read_hypotheses(path) -> dict[str, str]:
    """`key<TAB>text` lines; a key alone (or with an empty text) is an empty hypothesis."""
    hyps = {}
    for line_no, line in _lines(path):
        key, _, text = line.partition("\t")
        if len(key.split()) != 1 or key != key.strip():  # e.g. `key text` with a space instead of the tab
            raise ValueError(f"{path}:{line_no}: expected `key<TAB>text`, got {line[:80]!r}")
        _add(hyps, key, text, f"{path}:{line_no}")
    return hyps


def _cols(text: str) -> int:  # terminal columns: CJK characters are two wide
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def format_report(result: ScoreResult, details: bool = False) -> str:
    lines = []
    for u in result.utterances if details else []:
        width = [max(_cols(r), _cols(h), 1) for _, r, h in u.alignment]
        # Kaldi style: errors upper-cased, the missing side of an insertion/deletion shown as ***
        cells = [[(t.upper() if op != "C" else t) or "*" * w for t in (r, h)]
                 for (op, r, h), w in zip(u.alignment, width)]
        ref, hyp = (" ".join(c[i] + " " * (w - _cols(c[i])) for c, w in zip(cells, width)).rstrip() for i in (0, 1))
        correct = sum(op == "C" for op, _, _ in u.alignment)
        lines += [f"utt: {u.key}",
                  f"{result.label.lower()}: {100.0 * u.errors / max(len(u.ref), 1):.2f} % N={len(u.ref)} "
                  f"C={correct} S={u.sub} D={u.dele} I={u.ins}",
                  f"REF: {ref}".rstrip(), f"HYP: {hyp}".rstrip(), ""]
    shown = None if details else 20  # the full lists with --details
    for keys, what in ((result.missing_keys, "missing hypotheses (scored as deletions)"),
                       (result.extra_keys, "hypotheses without reference (ignored)")):
        if keys:
            more = " ..." if shown and len(keys) > shown else ""
            lines.append(f"{what}: {len(keys)}: " + " ".join(keys[:shown]) + more)
    lines += [result.summary_line(), result.sentence_line()]
    return "\n".join(lines)


def main(argv=None) -> ScoreResult:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref", help="jsonl with key/txt, or Kaldi `key text`")
    p.add_argument("hyp", help="`key<TAB>text` lines")
    p.add_argument("--lang", default="en", help="en (Whisper's English normalizer), zh (CER), other (basic)")
    p.add_argument("--no_norm", action="store_true", help="score raw whitespace tokens")
    p.add_argument("--details", action="store_true", help="per-utterance alignment")
    args = p.parse_args(argv)
    try:
        refs, hyps = read_references(args.ref), read_hypotheses(args.hyp)
    except (ValueError, OSError) as e:
        p.error(str(e))  # the file:line message, without a traceback
    result = score(refs, hyps, args.lang, not args.no_norm)
    print(format_report(result, args.details))
    return result


if __name__ == "__main__":
    main()
