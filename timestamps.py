"""Word timestamps from the CTC head: the final hypothesis force-aligned to the CTC posteriors of its
audio tokens (Viterbi), tokens joined into words, and the words written as a Kaldi CTM file or as
SRT / WebVTT subtitles.

The CTC head scores each audio token (model.num_audio_tokens: one per projector_kernel encoder frames,
100 ms at the default 5) against the LLM's vocabulary plus a blank, so an alignment of the transcript's
tokens to the audio tokens puts each word in time at that resolution, with no model beside the one
trained. Confidence: the CTC posterior of the word's aligned tokens and the LLM's probability of its
own tokens, each a geometric mean over the word; a word's `confidence` is the product of the two.
"""
import math
from dataclasses import dataclass, replace

import torch

LOG_ZERO = -1e30


@dataclass
class Word:
    text: str
    start: float  # seconds
    end: float
    ctc_confidence: float  # the geometric mean of the CTC posteriors of its aligned audio tokens
    llm_confidence: float  # the geometric mean of the LLM's probabilities of its tokens

    @property
    def confidence(self) -> float:
        return self.ctc_confidence * self.llm_confidence


def ctc_forced_align(log_probs: torch.Tensor, ids: list[int], blank: int) -> list[tuple[int, int]]:
    """The most likely CTC alignment of ids to the frames: per token, its first and last frame.
    log_probs: (T, V + 1) of one utterance's real frames. The usual trellis over the blank-interleaved
    labels (blank, id_1, blank, ..., id_L, blank): a state moves on by one, or by two when that skips
    a blank between two different labels. Tokens that cannot fit (more than T frames' worth) raise."""
    T, L = len(log_probs), len(ids)
    if L == 0:
        return []
    labels = torch.full((2 * L + 1,), blank, dtype=torch.long, device=log_probs.device)
    labels[1::2] = torch.tensor(ids, device=log_probs.device)
    x = log_probs.double()[:, labels]  # (T, S)
    S = len(labels)
    skip = torch.zeros(S, dtype=torch.bool, device=log_probs.device)  # may come from s - 2
    skip[3::2] = labels[3::2] != labels[1:-2:2]
    score = torch.full((S,), LOG_ZERO, dtype=torch.float64, device=log_probs.device)
    score[:2] = x[0, :2]
    back = torch.zeros(T, S, dtype=torch.long, device=log_probs.device)  # 0: stay, 1: from s-1, 2: from s-2
    for t in range(1, T):
        stay, step = score, torch.cat([score.new_full((1,), LOG_ZERO), score[:-1]])
        jump = torch.cat([score.new_full((2,), LOG_ZERO), score[:-2]]).masked_fill(~skip, LOG_ZERO)
        best, back[t] = torch.stack([stay, step, jump]).max(0)
        score = best + x[t]
    end = S - 1 if score[S - 1] >= score[S - 2] else S - 2  # ending on the last label or the blank after it
    if score[end] <= LOG_ZERO / 2:
        raise ValueError(f"{L} tokens cannot be aligned to {T} audio tokens")
    path = [end]
    for t in range(T - 1, 0, -1):
        path.append(path[-1] - int(back[t, path[-1]]))
    path.reverse()  # the state of each frame
    spans = [[T, -1] for _ in ids]
    for t, s in enumerate(path):
        if s % 2:  # a label state: token (s - 1) / 2
            span = spans[(s - 1) // 2]
            span[0], span[1] = min(span[0], t), max(span[1], t)
    return [tuple(span) for span in spans]


def aligned_log_probs(log_probs: torch.Tensor, ids: list[int], spans: list[tuple[int, int]]) -> list[float]:
    """Per token, the mean CTC log-posterior of that token over the frames aligned to it."""
    return [float(log_probs[a:b + 1, token].mean()) for token, (a, b) in zip(ids, spans)]


# CTC marks a token by a brief spike where it is recognized, not where its sound ends, so a word's last
# spike comes before its end (median -0.27 s at the 13 clip ends of examples/ joined by silence). The
# end is moved this far into the blank frames after it, never past the next word's start nor the
# audio's end: the extension that put those 13 ends closest of 0-0.6 s (eval_words.py boundaries
# prints the sweep; recipes/game_speech/README.md). Extending while the blank posterior stays below a
# threshold did no better in a trial: after a spike it is near 1 whether the sound goes on or not.
END_EXTENSION = 0.3  # seconds


def words_from_tokens(token_texts: list[str], spans: list[tuple[int, int]], frame_log_probs: list[float],
                      token_log_probs: list[float], seconds_per_frame: float, num_frames: int,
                      offset: float = 0.0, end_extension: float | None = None) -> list[Word]:
    """Tokens -> words, the transcript's whitespace-separated words: a token whose text starts with a
    space starts a word (as the repetition guard joins them). frame_log_probs: per token, the mean CTC
    log-posterior of its aligned frames; token_log_probs: the LLM's per token; num_frames: the audio
    tokens aligned (no word ends past them); end_extension (None: END_EXTENSION): see extend_ends."""
    groups = []  # token indices of each word
    for i, text in enumerate(token_texts):
        if not groups or text[:1].isspace():
            groups.append([])
        groups[-1].append(i)
    words = []
    for group in groups:
        text = "".join(token_texts[i] for i in group).strip()
        if not text:
            continue
        # a word ends with its last token that spells something: CTC places trailing punctuation late,
        # often at the next word's onset (a word ending in "." measured 0.72 s long, others 0.14 s)
        spoken = [i for i in group if any(c.isalnum() for c in token_texts[i])] or group
        start, end = spans[spoken[0]][0], spans[spoken[-1]][1]
        words.append(Word(text, round(offset + start * seconds_per_frame, 3), round(offset + (end + 1) * seconds_per_frame, 3),
                          math.exp(sum(frame_log_probs[i] for i in group) / len(group)),
                          math.exp(sum(token_log_probs[i] for i in group) / len(group))))
    return extend_ends(words, END_EXTENSION if end_extension is None else end_extension,
                       round(offset + num_frames * seconds_per_frame, 3))


def extend_ends(words: list[Word], extension: float, audio_end: float) -> list[Word]:
    """Each word's end moved `extension` seconds later, but not past the next word's start nor audio_end."""
    limits = [w.start for w in words[1:]] + [audio_end]
    return [replace(w, end=round(max(w.end, min(w.end + extension, limit)), 3)) for w, limit in zip(words, limits)]


def ctm_lines(key: str, words: list[Word]) -> list[str]:
    """Kaldi CTM: `key channel start duration word confidence`, one word a line."""
    return [f"{key} 1 {w.start:.2f} {w.end - w.start:.2f} {w.text} {w.confidence:.4f}\n" for w in words]


def subtitle_cues(words: list[Word], max_chars: int = 42, max_seconds: float = 7.0,
                  pause: float = 0.5) -> list[tuple[float, float, str]]:
    """Words -> (start, end, text) cues: a new cue at a pause of `pause` seconds or more, or when the
    line would pass max_chars characters or max_seconds seconds."""
    cues = []
    for w in words:
        if cues:
            start, end, text = cues[-1]
            if (w.start - end < pause and len(text) + 1 + len(w.text) <= max_chars and w.end - start <= max_seconds):
                cues[-1] = (start, w.end, f"{text} {w.text}")
                continue
        cues.append((w.start, w.end, w.text))
    return cues


def timestamp(seconds: float, separator: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{separator}{ms % 1000:03d}"


def srt(cues: list[tuple[float, float, str]]) -> str:
    return "".join(f"{i}\n{timestamp(a, ',')} --> {timestamp(b, ',')}\n{text}\n\n" for i, (a, b, text) in enumerate(cues, 1))


def vtt(cues: list[tuple[float, float, str]]) -> str:
    return "WEBVTT\n\n" + "".join(f"{timestamp(a, '.')} --> {timestamp(b, '.')}\n{text}\n\n" for a, b, text in cues)
