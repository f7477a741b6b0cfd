"""Word/character error rate in the Kaldi / SpeechIO style.

    python compute_wer.py REF HYP [--lang en|zh|<code>] [--no_norm] [--details]

REF: jsonl lines {"key", "txt"} (key defaults to the wav stem) or Kaldi `key text` lines.
HYP: `key<TAB>text` lines, as recognize.py writes them.
Prints `WER 8.15 [ 33422 / 409974, 8260 ins, 8070 del, 17092 sub ]` (CER for --lang zh) and the
sentence error rate. A reference without a hypothesis counts as all deletions; a hypothesis without
a reference is reported and ignored. The alignment is jiwer's (Levenshtein over tokens).
"""
import argparse
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import jiwer
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df"
_ZH_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")  # one CJK character, or a run of letters/digits


def tokenize(text: str, lang: str = "en", normalize: bool = True) -> list[str]:
    if not normalize:
        return text.split()
    if lang == "en":
        return EnglishTextNormalizer()(text).split()
    if lang == "zh":  # character error rate; Latin words and numbers stay whole (mixed zh/en)
        return _ZH_TOKEN.findall(unicodedata.normalize("NFKC", text).lower())
    return BasicTextNormalizer()(text).split()


@dataclass
class Utterance:
    key: str
    ref: list[str]
    hyp: list[str]
    ins: int = 0
    dele: int = 0
    sub: int = 0
    alignment: list[tuple[str, str, str]] = field(default_factory=list)  # (op, ref word, hyp word)

    @property
    def errors(self) -> int:
        return self.ins + self.dele + self.sub


@dataclass
class ScoreResult:
    label: str
    utterances: list[Utterance]
    missing_keys: list[str]
    extra_keys: list[str]

    def total(self, name: str) -> int:
        return sum(getattr(u, name) for u in self.utterances)

    @property
    def ref_words(self) -> int:
        return sum(len(u.ref) for u in self.utterances)

    @property
    def error_rate(self) -> float:
        # With no reference words at all, any insertion is 100% wrong, none is 0%.
        return 100.0 * self.total("errors") / self.ref_words if self.ref_words else 100.0 * (self.total("errors") > 0)

    def summary_line(self) -> str:
        return (f"{self.label} {self.error_rate:.2f} [ {self.total('errors')} / {self.ref_words}, "
                f"{self.total('ins')} ins, {self.total('dele')} del, {self.total('sub')} sub ]")

    def sentence_line(self) -> str:
        wrong = sum(u.errors > 0 for u in self.utterances)
        return f"SER {100.0 * wrong / max(len(self.utterances), 1):.2f} [ {wrong} / {len(self.utterances)} ]"


def align(utt: Utterance) -> Utterance:
    if not utt.ref or not utt.hyp:  # jiwer refuses empty references
        utt.ins, utt.dele = len(utt.hyp), len(utt.ref)
        utt.alignment = [("D", w, "") for w in utt.ref] + [("I", "", w) for w in utt.hyp]
        return utt
    out = jiwer.process_words(" ".join(utt.ref), " ".join(utt.hyp))
    utt.ins, utt.dele, utt.sub = out.insertions, out.deletions, out.substitutions
    for chunk in out.alignments[0]:
        ref, hyp = utt.ref[chunk.ref_start_idx:chunk.ref_end_idx], utt.hyp[chunk.hyp_start_idx:chunk.hyp_end_idx]
        op = {"equal": "C", "substitute": "S", "delete": "D", "insert": "I"}[chunk.type]
        for i in range(max(len(ref), len(hyp))):
            utt.alignment.append((op, ref[i] if i < len(ref) else "", hyp[i] if i < len(hyp) else ""))
    return utt


def score(refs: dict[str, str], hyps: dict[str, str], lang: str = "en", normalize: bool = True) -> ScoreResult:
    utterances = [align(Utterance(key, tokenize(ref, lang, normalize), tokenize(hyps.get(key, ""), lang, normalize)))
                  for key, ref in refs.items()]
    return ScoreResult("CER" if lang == "zh" else "WER", utterances,
                       missing_keys=[k for k in refs if k not in hyps], extra_keys=[k for k in hyps if k not in refs])


def read_references(path) -> dict[str, str]:
    """jsonl ({"key", "txt"}, key defaulting to the wav stem) or Kaldi `key text` lines."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    is_jsonl = next((line.lstrip().startswith("{") for line in lines if line.strip()), False)
    refs = {}
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if is_jsonl:
            try:
                entry = json.loads(line)
                key = entry.get("key") or Path(entry["wav"]).stem
                refs[str(key)] = str(entry["txt"])
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}:{line_no}: needs a jsonl object with \"txt\" and \"key\" or \"wav\" ({e})")
        else:
            key, _, text = line.strip().partition(" ")
            refs[key] = text
    return refs


def read_hypotheses(path) -> dict[str, str]:
    """`key<TAB>text` lines; a key alone (or with an empty text) is an empty hypothesis."""
    hyps = {}
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, _, text = line.partition("\t")
        if not key or key != key.strip():
            raise ValueError(f"{path}:{line_no}: expected `key<TAB>text`, got {line[:80]!r}")
        hyps[key] = text
    return hyps


def format_report(result: ScoreResult, details: bool = False) -> str:
    lines = []
    if details:
        for u in result.utterances:
            ops = [op for op, _, _ in u.alignment]
            width = [max(len(r), len(h), 1) for _, r, h in u.alignment]
            # Kaldi style: errors upper-cased, gaps shown as ***
            ref = [(r.upper() if op != "C" else r) or "*" * w for (op, r, _), w in zip(u.alignment, width)]
            hyp = [(h.upper() if op != "C" else h) or "*" * w for (op, _, h), w in zip(u.alignment, width)]
            lines += [f"utt: {u.key}",
                      f"{result.label.lower()}: {100.0 * u.errors / max(len(u.ref), 1):.2f} % N={len(u.ref)} "
                      f"C={ops.count('C')} S={u.sub} D={u.dele} I={u.ins}",
                      "REF: " + " ".join(t.ljust(w) for t, w in zip(ref, width)).rstrip(),
                      "HYP: " + " ".join(t.ljust(w) for t, w in zip(hyp, width)).rstrip(), ""]
    if result.missing_keys:
        lines.append(f"missing hypotheses (scored as deletions): {len(result.missing_keys)}: "
                     + " ".join(result.missing_keys[:20]) + (" ..." if len(result.missing_keys) > 20 else ""))
    if result.extra_keys:
        lines.append(f"hypotheses without reference (ignored): {len(result.extra_keys)}: "
                     + " ".join(result.extra_keys[:20]) + (" ..." if len(result.extra_keys) > 20 else ""))
    lines += [result.summary_line(), result.sentence_line()]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref")
    p.add_argument("hyp")
    p.add_argument("--lang", default="en", help="en (Whisper's English normalizer), zh (CER), other (basic)")
    p.add_argument("--no_norm", action="store_true", help="score raw whitespace tokens")
    p.add_argument("--details", action="store_true", help="per-utterance alignment")
    args = p.parse_args(argv)
    result = score(read_references(args.ref), read_hypotheses(args.hyp), args.lang, not args.no_norm)
    print(format_report(result, args.details))
    return result


if __name__ == "__main__":
    main()
