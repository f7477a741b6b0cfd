"""Decoding, whole: the options (DecodingOptions), the one entry point (decode: a model, a batch, options
-> token ids), the token budget, the CTC head (its posteriors, pure CTC greedy decoding, joint CTC +
LLM scoring), the repetition guard and per-utterance confidence. The model (model.py) holds the data
path (encode, splice, the LLM, the prompt's KV cache); a new decoding strategy goes here. The pieces
that steer the LLM's generate() are logits processors: generate() passes them the generated ids so far
(the hypothesis prefix; the prompt went in as embeddings) and the next-token scores of every row
(utterance x beam).

Joint decoding is ESPnet's joint CTC/attention decoding (Watanabe et al., 2017): a hypothesis scores
(1 - w) log p_LLM + w log p_CTC(prefix), where the CTC prefix probability is the mass of every
alignment of the audio whose labels start with the hypothesis. It cannot grow past what the audio
can hold, and words nobody said get almost none of it: the two failure modes of an LLM decoder.
"""
import itertools
import math
import re
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList

from audio import MEL_FRAMES_PER_SECOND
from hotwords import HotwordBonus, Hotwords, greedy_without_fragments
from prompt import move_padding_after_prefix, shared_prefix_length
from timestamps import Word, aligned_log_probs, ctc_forced_align, words_from_tokens



# ----------------------------------------------------------------------------------------
# The options and the entry point


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode; checked once, here, whoever builds them (recognize.py's flags, a notebook)."""
    num_beams: int = 1  # 1: greedy
    decode: str = "llm"  # llm: the LLM's greedy / beam search; ctc: the CTC head's greedy path alone
    ctc_decode_weight: float | None = None  # joint CTC + LLM scoring weight w; None: the model's saved default
    max_repeats: int = 3  # repetition guard: copies in a row of any token or word n-gram (0: off)
    max_new_tokens: int | None = None  # None: each utterance's budget from its duration (token_budget)
    return_confidence: bool = False  # decode() also returns per-utterance confidence (see confidence())
    prefix_cache: bool = True  # the prompt's shared opening computed once, its KV cache reused
    word_timestamps: bool = False  # decode() also returns each utterance's words, timed by the CTC head
    hotwords: Hotwords | None = None  # a bonus for hypotheses that spell these phrases (hotwords.py)
    ctc_fallback: float | None = None  # CTC's best path replaces a hypothesis this far from it (ctc_disagreement)
    generate_kwargs: dict = field(default_factory=dict)  # more keyword arguments for the LLM's generate()

    def __post_init__(self):
        problems = {"num_beams": (self.num_beams, ">= 1", self.num_beams >= 1),
                    "decode": (self.decode, "'llm' or 'ctc'", self.decode in ("llm", "ctc")),
                    "ctc_decode_weight": (self.ctc_decode_weight, "in [0, 1) (CTC alone: decode ctc)",
                                          self.ctc_decode_weight is None or 0 <= self.ctc_decode_weight < 1),
                    "max_repeats": (self.max_repeats, ">= 0", self.max_repeats >= 0),
                    "max_new_tokens": (self.max_new_tokens, ">= 1", self.max_new_tokens is None or self.max_new_tokens >= 1),
                    "ctc_fallback": (self.ctc_fallback, "> 0", self.ctc_fallback is None or self.ctc_fallback > 0)}
        for name, (value, rule, holds) in problems.items():
            if not holds:  # NaN fails every comparison, so it never holds
                raise ValueError(f"{name} must be {rule}, got {value!r}")

    def resolved(self, config) -> "DecodingOptions":
        """These options with the model's saved decoding weight where none is given, checked alike."""
        return self if self.ctc_decode_weight is not None else replace(self, ctc_decode_weight=config.ctc_decode_weight)


def decoding_options(options: DecodingOptions | None = None, **kwargs) -> DecodingOptions:
    """options (default: DecodingOptions()) with kwargs replacing its fields; kwargs that are no field
    go to the LLM's generate() (min_new_tokens, output_scores, ...)."""
    options = options or DecodingOptions()
    names = {f.name for f in fields(DecodingOptions)} - {"generate_kwargs"}
    extra = {k: v for k, v in kwargs.items() if k not in names}
    return replace(options, **{k: v for k, v in kwargs.items() if k in names},
                   generate_kwargs=options.generate_kwargs | extra)


@torch.inference_mode()
def decode(model, batch: dict, options: DecodingOptions = DecodingOptions()):
    """Batched decoding of left-padded prompts (a Collator(model.data_spec(), inference=True) batch: mel,
    mel_lengths, input_ids, attention_mask, audio_mask) -> new token ids (B, <= budget), each row ended
    by an end-of-turn token unless it ran out of budget, then padded with the prompt's placeholder id;
    with return_confidence or word_timestamps (ids, a dict per utterance: the confidence() fields,
    "words": its timed words). The encoder runs once per utterance: generate() expands the finished
    embeddings to the beams."""
    options = options.resolved(model.config)
    audio_embeds = model.encode_audio(batch["mel"], batch["mel_lengths"])  # (audio tokens in batch, llm_dim)
    inputs_embeds = model.splice(batch["input_ids"], audio_embeds, batch["audio_mask"])  # (B, L, llm_dim)
    wants_ctc = (options.decode == "ctc" or options.ctc_decode_weight > 0 or options.word_timestamps
                 or options.ctc_fallback is not None or (options.return_confidence and model.projector.ctc_blank is not None))
    head = ctc_head(model, audio_embeds, batch["audio_mask"]) if wants_ctc else None
    if options.decode == "ctc":
        ids = ctc_greedy_ids(head, model.prompt, batch["input_ids"].device)
    else:
        ids = llm_ids(model, batch, inputs_embeds, head, options)
        if options.ctc_fallback is not None:
            ids = ctc_fallback(model, ids, head, options.ctc_fallback)
    if not (options.return_confidence or options.word_timestamps):
        return ids
    llm_log_probs = hypothesis_log_probs(model.llm, inputs_embeds, batch["attention_mask"], ids, model.prompt.eos_token_ids)
    details = confidence(model, ids, head, llm_log_probs) if options.return_confidence else [{} for _ in llm_log_probs]
    if options.word_timestamps:
        for item, words in zip(details, timed_words(model, ids, head, llm_log_probs)):
            item["words"] = words
    return ids, details


def transcripts(model, ids: torch.Tensor) -> list[str]:
    """decode()'s ids (B, L) -> their texts."""
    # A row ends at its first end of turn: the padding after it is placeholder_id, a real token
    # when the LLM has no pad token (Llama 3: token 0, "!"), which skip_special_tokens would keep.
    eos = set(model.prompt.eos_token_ids)
    rows = [itertools.takewhile(lambda token: token not in eos, row) for row in ids.tolist()]
    return [model.tokenizer.decode(list(row), skip_special_tokens=True).strip() for row in rows]


# ----------------------------------------------------------------------------------------
# The LLM's search and the token budget


def llm_ids(model, batch: dict, inputs_embeds, head, options: DecodingOptions) -> torch.Tensor:
    """The LLM's greedy or beam search, steered by the logits processors below: the repetition guard,
    joint CTC scoring (needs the CTC head) and each utterance's token budget. -> (B, <= max budget)."""
    eos = model.prompt.eos_token_ids
    seconds = batch["mel_lengths"].float() / MEL_FRAMES_PER_SECOND  # (B,)
    device = batch["input_ids"].device
    budgets = torch.tensor([token_budget(model.config, options, float(s)) for s in seconds], device=device)  # (B,)

    def search(bonus: HotwordBonus | None = None) -> torch.Tensor:
        processors = LogitsProcessorList()
        if options.max_repeats > 0:  # first: the other processors see the banned tokens as impossible
            processors.append(RepetitionGuard(options.max_repeats, token_text=model.prompt.token_text))
        if options.ctc_decode_weight > 0:
            processors.append(CTCPrefixScorer(head, options.ctc_decode_weight, options.num_beams, eos, hotwords=options.hotwords))
        if bonus is not None:  # after joint scoring: its bonus adds to the joint scores
            processors.append(bonus)
        processors.append(TokenBudget(budgets, options.num_beams, eos))
        return generate_llm(model, inputs_embeds, batch, options.num_beams, int(budgets.max()), options.prefix_cache,
                            logits_processor=processors, **options.generate_kwargs)

    if options.hotwords is None:
        return search()
    if options.num_beams > 1:  # beam search takes an abandoned phrase's bonus back from its hypotheses itself
        return search(HotwordBonus(options.hotwords))
    eos_set = set(eos)
    return greedy_without_fragments(search, options.hotwords, lambda ids: [
        list(itertools.takewhile(lambda token: token not in eos_set, row)) for row in ids.tolist()])


def generate_llm(model, inputs_embeds, batch: dict, num_beams: int, max_new_tokens: int, prefix_cache: bool = True,
                 **generate_kwargs) -> torch.Tensor:
    """The LLM's generate() on prompts with the audio spliced in: (B, L, D) -> new ids (B, <= max_new_tokens)."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    prefix_length = shared_prefix_length(input_ids, attention_mask, batch["audio_mask"]) if prefix_cache else 0
    if prefix_length > 0:
        start = int(attention_mask[0].int().argmax())
        prefix_ids = input_ids[0, start:start + prefix_length]
        expanded_batch = len(input_ids) * max(num_beams, generate_kwargs.get("num_return_sequences", 1))
        generate_kwargs["past_key_values"] = model.prefix_kv_cache(prefix_ids, expanded_batch)
        # generate() runs the LLM only on the embeddings beyond the cache's length
        inputs_embeds, attention_mask = move_padding_after_prefix(inputs_embeds, attention_mask, prefix_length)
    return model.llm.generate(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, num_beams=num_beams, do_sample=False,
        max_new_tokens=max_new_tokens, eos_token_id=model.prompt.eos_token_ids,
        pad_token_id=model.prompt.placeholder_id, **generate_kwargs)


def token_budget(config, options: DecodingOptions, seconds: float) -> int:
    """The most new tokens an utterance of this duration gets: options.max_new_tokens, else the
    model's measured token rate (config.max_tokens_per_second, max_tokens_extra)."""
    return options.max_new_tokens or max_transcript_tokens(seconds, config.max_tokens_per_second,
                                                           config.max_tokens_extra)


def max_transcript_tokens(audio_seconds: float, tokens_per_second: float = 8.0, extra_tokens: int = 16) -> int:
    """The decoding length bound for audio of this duration; train.py measures the rate on its corpus
    (transcript_token_rate). The defaults, 8 tokens/s + 16, are beyond fast speech."""
    return extra_tokens + math.ceil(tokens_per_second * audio_seconds)


def transcript_token_rate(durations: list[float], num_tokens: list[int]) -> tuple[float, int]:
    """The token budget a corpus calls for: (tokens per second, extra tokens) such that the budget
    covers its fastest speech (the 99.5th percentile of tokens/s over clips of 1 s and more) and its
    short clips, whose rate a few tokens make noisy (the extra covers 99.5% of all transcripts)."""
    rates = [n / d for d, n in zip(durations, num_tokens) if d >= 1.0] or [8.0]
    rate = float(np.percentile(rates, 99.5))
    overshoot = [n - rate * d for d, n in zip(durations, num_tokens)]
    return round(rate, 2), max(4, math.ceil(float(np.percentile(overshoot, 99.5)))) + 4


# ----------------------------------------------------------------------------------------
# The CTC head: its scores (trained by model.ctc_loss), its posteriors of a batch, pure CTC decoding


LOG_ZERO = -1e4  # log of "impossible" in the CTC recursions; finite, so that cumulative sums stay exact


def ctc_logits(audio_embeds, token_embeds, blank) -> torch.Tensor:
    """The CTC head model.ctc_loss trains: an audio embedding scores token v by its dot product with
    v's input embedding, and the blank by its dot product with a learned vector (the last column).
    audio_embeds: (..., D), token_embeds: (V, D), blank: (D,) -> (..., V + 1)."""
    return torch.cat([audio_embeds @ token_embeds.T, (audio_embeds @ blank)[..., None]], -1)


class CTCLogits(nn.Module):
    """ctc_logits as a module call, for the training loss. Both weights are borrowed: the LLM's token
    embeddings and the projector's blank. DeepSpeed ZeRO-3 gathers a partitioned weight for the
    forward and backward of the modules it is registered with (its owner, and here this module, as an
    external parameter): so the loss shares the embeddings with the LLM's own use in the same step
    instead of gathering them a second time, which ZeRO-3 refuses. The loss trains the audio side and
    the blank only: under --train_llm the token embeddings are the LLM's, moved by its own loss alone."""

    def forward(self, audio_embeds, token_embeds, blank) -> torch.Tensor:
        return ctc_logits(audio_embeds, token_embeds.detach(), blank)


class CTCHead:
    """The CTC posteriors (ctc_logits) of a batch of utterances, for decoding.
    audio_embeds: (U, T, D) padded, num_frames: (U,), token_embeds: (V, D), blank: (D,)."""

    def __init__(self, audio_embeds, num_frames, token_embeds, blank):
        self.audio_embeds, self.num_frames = audio_embeds.float(), num_frames
        self.token_embeds, self.blank = token_embeds.float(), blank.float()
        self.blank_id = token_embeds.shape[0]
        self._greedy = None
        # the softmax normalizer of every frame, once: (U, T). One utterance at a time, since the
        # full (T, V) matrix of a 30 s clip is 60 MB
        self.log_norm = torch.stack([self.frame_logits(u).logsumexp(-1) for u in range(len(audio_embeds))])

    def frame_logits(self, u: int) -> torch.Tensor:
        """(T, V + 1) unnormalized scores of utterance u; the blank is the last column."""
        return ctc_logits(self.audio_embeds[u], self.token_embeds, self.blank)

    def log_probs(self, u: int) -> torch.Tensor:
        """(T_u, V + 1) log-posteriors of utterance u's real frames."""
        return (self.frame_logits(u) - self.log_norm[u, :, None])[: int(self.num_frames[u])]

    def token_log_probs(self, utts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Log-posteriors of chosen tokens at every frame: utts (N,), tokens (N, K) -> (N, T, K).
        Beyond an utterance's last frame, every token is impossible."""
        x = torch.einsum("ntd,nkd->ntk", self.audio_embeds[utts], self.token_embeds[tokens])
        return self._mask_padding(x - self.log_norm[utts][..., None], utts, LOG_ZERO)

    def blank_log_probs(self, utts: torch.Tensor) -> torch.Tensor:
        """(N, T); beyond an utterance's last frame the blank is certain, so any prefix probability
        computed over the padded length equals the one over the utterance's own frames."""
        x = self.audio_embeds[utts] @ self.blank - self.log_norm[utts]
        return self._mask_padding(x[..., None], utts, 0.0)[..., 0]

    def _mask_padding(self, x, utts, value):
        padded = torch.arange(x.shape[1], device=x.device) >= self.num_frames[utts][:, None]  # (N, T)
        return x.masked_fill(padded[..., None], value)

    def greedy_ids(self) -> list[list[int]]:
        """Pure CTC decoding: the best token of every frame, repeats merged, blanks dropped."""
        if self._greedy is None:
            self._greedy = []
            for u in range(len(self.audio_embeds)):
                best = self.log_probs(u).argmax(-1).tolist()
                self._greedy.append([v for i, v in enumerate(best) if v != self.blank_id and (i == 0 or v != best[i - 1])])
        return self._greedy

    def sequence_log_prob(self, u: int, ids: list[int]) -> float:
        """log p_CTC(ids | utterance u): the mass of every alignment of exactly these labels."""
        if not ids:
            return float(self.log_probs(u)[:, -1].sum())
        log_probs = self.log_probs(u)
        device = log_probs.device
        return -float(F.ctc_loss(log_probs[:, None], torch.tensor([ids], device=device),
                                 torch.tensor([len(log_probs)], device=device), torch.tensor([len(ids)], device=device),
                                 blank=self.blank_id, reduction="sum", zero_infinity=False))


def ctc_head(model, audio_embeds, audio_mask) -> CTCHead:
    """The CTC posteriors of a batch: audio_embeds (num_audio_tokens in batch, D), audio_mask (B, L)."""
    if model.projector.ctc_blank is None:
        raise ValueError("this model has no CTC head (it was trained without --ctc_weight): CTC decoding, "
                         "ctc_decode_weight > 0 and word timestamps need one")
    num_frames = audio_mask.sum(1)  # (B,)
    padded = audio_embeds.new_zeros(len(num_frames), int(num_frames.max()), audio_embeds.shape[-1])  # (B, T, D)
    padded[torch.arange(padded.shape[1], device=padded.device) < num_frames[:, None]] = audio_embeds
    return CTCHead(padded, num_frames, model.llm.get_input_embeddings().weight, model.projector.ctc_blank)


def ctc_fallback(model, ids: torch.Tensor, head: CTCHead, threshold: float) -> torch.Tensor:
    """A hallucination guard: where the LLM's hypothesis is further than `threshold` from CTC's own best
    path (token edit distance over that path's length, confidence()'s ctc_disagreement), CTC's path
    replaces it. -> ids in the same format (B, L'), padded with the placeholder id."""
    eos, best = model.prompt.eos_token_ids, head.greedy_ids()
    rows = []
    for u, row in enumerate(ids.tolist()):
        hyp = list(itertools.takewhile(lambda token: token not in eos, row))
        far = token_edit_distance(hyp, best[u]) / max(len(best[u]), 1) > threshold
        rows.append(best[u] + eos[:1] if far else row)
    width = max(map(len, rows))
    return torch.tensor([r + [model.prompt.placeholder_id] * (width - len(r)) for r in rows], device=ids.device)


def ctc_greedy_ids(head: CTCHead, prompt, device) -> torch.Tensor:
    """Pure CTC decoding in the LLM's format: CTC's best path and an end of turn, padded with the
    placeholder id. -> (B, longest + 1)."""
    ids = [hyp + prompt.eos_token_ids[:1] for hyp in head.greedy_ids()]
    return torch.tensor([hyp + [prompt.placeholder_id] * (max(map(len, ids)) - len(hyp)) for hyp in ids], device=device)


# ----------------------------------------------------------------------------------------
# Joint CTC + LLM scoring: the CTC prefix score, a logits processor


def ctc_prefix_scores(r_prev, last, tokens, x_tokens, x_blank):
    """One step of the CTC prefix score algorithm (Watanabe et al., 2017), for K candidate
    extensions c of N hypotheses g at once, its recursions over time done as cumulative sums.
    r_prev: (N, T, 2) log-probabilities that g is complete at frame t, frame t emitting g's last
      label [..., 0] or a blank [..., 1] (initial_state for the empty g);
    last: (N,) g's last token, -1 when g is empty; tokens: (N, K) the candidates c;
    x_tokens: (N, T, K) log p_t(c); x_blank: (N, T) log p_t(blank).
    -> psi (N, K): log p_CTC(prefix g + c), r (N, T, K, 2): the state of every g + c."""
    N, T, K = x_tokens.shape
    r_prev, x, xb = r_prev.double(), x_tokens.double(), x_blank.double()
    # phi[t]: g is complete before frame t, so frame t may start c. Frame 0 follows a virtual frame
    # -1 at which only the empty g is complete. When c repeats g's last label, a blank must separate them.
    start = torch.where(last < 0, 0.0, LOG_ZERO).double()[:, None]  # (N, 1)
    ready = torch.cat([start, r_prev[:, :-1].logsumexp(-1)], 1)  # (N, T)
    ready_after_blank = torch.cat([start, r_prev[:, :-1, 1]], 1)  # (N, T)
    phi = torch.where((tokens == last[:, None])[:, None], ready_after_blank[..., None], ready[..., None])  # (N, T, K)
    psi = (phi + x).logsumexp(1)  # (N, K): c first emitted at some frame t
    # r[t, 0] = logaddexp(r[t-1, 0], phi[t]) + x[t]: a linear recursion, so with C the cumulative
    # sum of x, r[t, 0] = C[t] + logcumsumexp_{s <= t}(phi[s] - C[s-1])
    C = x.cumsum(1)  # (N, T, K)
    r_label = C + (phi - (C - x)).logcumsumexp(1)
    # r[t, 1] = logaddexp(r[t-1, 0], r[t-1, 1]) + xb[t] = B[t] + logcumsumexp_{s < t}(r[s, 0] - B[s])
    B = xb.cumsum(1)[..., None]  # (N, T, 1)
    r_blank = B + torch.cat([torch.full_like(r_label[:, :1], LOG_ZERO),
                             (r_label - B).logcumsumexp(1)[:, :-1]], 1)
    return psi, torch.stack([r_label, r_blank], -1)


def initial_state(x_blank) -> torch.Tensor:
    """The empty hypothesis: complete at frame t only through blanks at frames 0..t. (N, T) -> (N, T, 2)."""
    all_blank = x_blank.double().cumsum(1)
    return torch.stack([torch.full_like(all_blank, LOG_ZERO), all_blank], -1)


class CTCPrefixScorer(LogitsProcessor):
    """Joint scoring: each row's next-token scores become (1 - w) log p_LLM(c) + w (log p_CTC(g + c)
    - log p_CTC(g)) for candidates c, -inf for the rest, so a hypothesis' total is
    (1 - w) log p_LLM + w log p_CTC(prefix). End of turn is scored with the probability that g is the
    whole transcript. Candidates: the LLM's top `num_candidates` and every token CTC's own best path
    spells for the utterance (words the LLM alone would not propose), and with hotwords the tokens that
    go on or begin a listed phrase. Row r is utterance r // num_beams (generate() expands the batch
    beam by beam); rows that have ended are left alone."""

    def __init__(self, head: CTCHead, weight: float, num_beams: int, eos_token_ids: list[int],
                 num_candidates: int = 8, hotwords: Hotwords | None = None):
        self.head, self.weight, self.num_beams, self.hotwords = head, weight, num_beams, hotwords
        self.eos = torch.tensor(eos_token_ids, device=head.audio_embeds.device)
        self.num_candidates = max(num_candidates, 2 * num_beams)  # beam search keeps 2 x beams per step
        self.ctc_tokens = [sorted(set(ids)) for ids in head.greedy_ids()]
        self.states = {}  # (utterance, hypothesis ids) -> (r (T, 2), psi): the hypotheses of this step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        log_probs = scores.float().log_softmax(-1)  # greedy passes logits, beam search log-probs
        rows = torch.nonzero(~torch.isin(input_ids, self.eos).any(1)).flatten()
        if len(rows) == 0:
            return scores
        utts = rows // self.num_beams
        prefixes = [tuple(input_ids[r].tolist()) for r in rows.tolist()]
        r_prev, psi_prev = zip(*[self.state(u, p) for u, p in zip(utts.tolist(), prefixes)])
        r_prev, psi_prev = torch.stack(r_prev), torch.tensor(psi_prev, dtype=torch.float64, device=rows.device)  # (N, T, 2), (N,)
        top = log_probs[rows].topk(self.num_candidates, -1).indices  # (N, k)
        extra = [self.ctc_tokens[u] + (self.hotwords.candidates(p) if self.hotwords else [])
                 for u, p in zip(utts.tolist(), prefixes)]
        width = max(map(len, extra))
        extra = torch.tensor([e + [t] * (width - len(e)) for e, t in zip(extra, top[:, 0].tolist())], device=rows.device)
        tokens = torch.cat([top, extra.view(len(rows), width)], 1)  # (N, K), duplicates harmless
        last = torch.tensor([p[-1] if p else -1 for p in prefixes], device=rows.device)
        psi, r = ctc_prefix_scores(r_prev, last, tokens, self.head.token_log_probs(utts, tokens),
                                   self.head.blank_log_probs(utts))
        w = self.weight
        joint = torch.full_like(log_probs[rows], -math.inf)
        joint.scatter_(1, tokens, ((1 - w) * log_probs[rows].gather(1, tokens) + w * (psi - psi_prev[:, None])).float())
        complete = r_prev[:, -1].logsumexp(-1)  # (N,): log p_CTC(g is everything said); padded frames are blanks
        joint[:, self.eos] = ((1 - w) * log_probs[rows][:, self.eos] + w * (complete - psi_prev)[:, None]).float()
        self.states = {(u, p + (c,)): (r[i, :, k], float(psi[i, k]))
                       for i, (u, p) in enumerate(zip(utts.tolist(), prefixes)) for k, c in enumerate(tokens[i].tolist())}
        out = scores.clone() if scores.dtype == torch.float32 else scores.float()
        out[rows] = joint
        return out

    def state(self, utt: int, prefix: tuple) -> tuple[torch.Tensor, float]:
        """A hypothesis' CTC state: made in the previous step, or (a token another processor forced,
        the empty hypothesis) computed along the prefix."""
        if (utt, prefix) in self.states:
            return self.states[(utt, prefix)]
        device = self.eos.device
        utts = torch.tensor([utt], device=device)
        r, psi = initial_state(self.head.blank_log_probs(utts))[0], 0.0
        for i, token in enumerate(prefix):
            tokens = torch.tensor([[token]], device=device)
            psi_next, r_next = ctc_prefix_scores(r[None], torch.tensor([prefix[i - 1] if i else -1], device=device), tokens,
                                                 self.head.token_log_probs(utts, tokens), self.head.blank_log_probs(utts))
            r, psi = r_next[0, :, 0], float(psi_next[0, 0])
        return r, psi


# ----------------------------------------------------------------------------------------
# Guards: the repetition guard, the token budget


class RepetitionGuard(LogitsProcessor):
    """A run of `max_repeats` copies of any n-gram (n <= max_ngram tokens) cannot get one more: the
    token that would start it is banned. Loops end; real repetitions up to max_repeats ("no no",
    "no, no, no") stay possible. A tail is such a run when it equals itself shifted by n.
    token_text (id -> its text), if given, adds the same rule over words (n <= max_word_ngram),
    compared in lower case without punctuation: copies that differ only there ("H! H? H??") are
    token-wise different but still a loop. Banned then: the tokens that began each copy."""

    def __init__(self, max_repeats: int = 3, max_ngram: int = 32, token_text=None, max_word_ngram: int = 8,
                 word_window: int = 96):
        self.max_repeats, self.max_ngram = max_repeats, max_ngram
        self.token_text, self.max_word_ngram, self.word_window = token_text, max_word_ngram, word_window
        self._letters = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        length = input_ids.shape[1]
        for n in range(1, min(self.max_ngram, length // self.max_repeats) + 1):
            tail = input_ids[:, length - n * self.max_repeats:]  # (N, n * max_repeats)
            rows = torch.nonzero((tail[:, n:] == tail[:, :-n]).all(1)).flatten()
            scores[rows, tail[rows, -n]] = -math.inf
        if self.token_text is not None:
            for row, ids in enumerate(input_ids[:, -self.word_window:].tolist()):
                scores[row, self.word_loop_starts(ids, complete=length <= self.word_window)] = -math.inf
        return scores

    def words(self, ids: list[int], complete: bool) -> list[tuple[str, int]]:
        """-> (word in lower case without punctuation, id of its first token) of each word in ids.
        A token starting with a space starts a word. Words of punctuation only are left out, and so
        is the first word of a window that may have cut it (complete=False)."""
        words = []
        for token in ids:
            starts_word, letters = self.token_letters(token)
            if not words or starts_word:
                words.append(["", token])
            words[-1][0] += letters
        return [(word, first) for word, first in words[0 if complete else 1:] if word]

    def token_letters(self, token: int) -> tuple[bool, str]:
        """-> (whether the token starts a word, its text in lower case without punctuation), cached:
        a word's letters are its tokens' letters joined, so no text is normalized twice."""
        if token not in self._letters:
            text = self.token_text(token)
            self._letters[token] = (text[:1].isspace(), re.sub(r"[^\w']", "", text.lower()))
        return self._letters[token]

    def word_loop_starts(self, ids: list[int], complete: bool) -> list[int]:
        """The first tokens of the copies when the words of ids end in max_repeats copies of an n-gram."""
        words, banned = self.words(ids, complete), set()
        for n in range(1, min(self.max_word_ngram, len(words) // self.max_repeats) + 1):
            tail = words[len(words) - n * self.max_repeats:]
            if all(tail[i][0] == tail[i + n][0] for i in range(len(tail) - n)):
                banned.update(tail[k * n][1] for k in range(self.max_repeats))
        return sorted(banned)


class TokenBudget(LogitsProcessor):
    """Each row ends once it holds its utterance's budget of tokens (token_budget):
    a batch's rows stop where each would stop alone. budgets: (U,) per utterance."""

    def __init__(self, budgets: torch.Tensor, num_beams: int, eos_token_ids: list[int]):
        self.budgets, self.num_beams = budgets, num_beams
        self.eos = torch.tensor(eos_token_ids, device=budgets.device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows_budget = self.budgets.repeat_interleave(self.num_beams)  # (N,)
        spent = (rows_budget <= input_ids.shape[1])[:, None]  # (N, 1)
        not_eos = ~torch.isin(torch.arange(scores.shape[1], device=scores.device), self.eos)
        return scores.masked_fill(spent & not_eos[None], -math.inf)


# ----------------------------------------------------------------------------------------
# Confidence


def confidence(model, ids, head: CTCHead | None, llm_log_probs: list[list[float]]) -> list[dict]:
    """Per utterance: llm_logprob, the LLM's mean log-probability of the hypothesis' tokens and its
    end of turn (llm_log_probs: hypothesis_log_probs); with a CTC head also ctc_logprob, CTC's
    log-probability of the hypothesis per token, and ctc_disagreement, the token edit distance between
    the hypothesis and CTC's own best path over that path's length. Low log-probs and high
    disagreement flag hallucinations."""
    eos = model.prompt.eos_token_ids
    ctc_best = head.greedy_ids() if head is not None else None
    out = []
    for u, log_probs in enumerate(llm_log_probs):
        item = dict(llm_logprob=round(sum(log_probs) / max(len(log_probs), 1), 4))
        if head is not None:
            hyp = [t for t in ids[u].tolist()[:len(log_probs)] if t not in eos]
            item["ctc_logprob"] = round(head.sequence_log_prob(u, hyp) / max(len(hyp), 1), 4)
            item["ctc_disagreement"] = round(token_edit_distance(hyp, ctc_best[u]) / max(len(ctc_best[u]), 1), 4)
        out.append(item)
    return out


def timed_words(model, ids, head: CTCHead, llm_log_probs: list[list[float]]) -> list[list[Word]]:
    """Each hypothesis force-aligned to its utterance's CTC posteriors (timestamps.py): its words, with
    start and end in seconds from the start of its audio at the audio tokens' resolution (an audio token
    is projector_kernel encoder frames of 2 mel frames; the end moved past CTC's spike, see
    timestamps.END_EXTENSION), CTC's and the LLM's confidence. A hypothesis
    longer than its audio can hold (possible only without joint scoring) is spread evenly over it."""
    eos = model.prompt.eos_token_ids
    seconds_per_token = model.config.projector_kernel * 2 / MEL_FRAMES_PER_SECOND
    out = []
    for u, log_probs in enumerate(llm_log_probs):
        hyp = [t for t in ids[u].tolist()[:len(log_probs)] if t not in eos]
        frames = head.log_probs(u)  # (T, V + 1)
        try:
            spans = ctc_forced_align(frames, hyp, head.blank_id)
        except ValueError:
            spans = [(i * len(frames) // len(hyp), max(i * len(frames) // len(hyp), (i + 1) * len(frames) // len(hyp) - 1))
                     for i in range(len(hyp))]
        out.append(words_from_tokens([model.prompt.token_text(t) for t in hyp], spans,
                                     aligned_log_probs(frames, hyp, spans), log_probs[:len(hyp)], seconds_per_token,
                                     len(frames)))
    return out


def token_edit_distance(a: list[int], b: list[int]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def hypothesis_log_probs(llm, inputs_embeds, attention_mask, new_ids, eos_token_ids) -> list[list[float]]:
    """The LLM's log-probability of every generated token, up to and including its end of turn, by
    one teacher-forced pass over prompt + hypothesis (exact whatever produced the hypothesis).
    inputs_embeds: (B, P, D) left-padded prompts, attention_mask: (B, P), new_ids: (B, L)."""
    ended = torch.isin(new_ids, torch.tensor(eos_token_ids, device=new_ids.device)).int()
    valid = (ended.cumsum(1) - ended) == 0  # (B, L): tokens up to and including the first end of turn
    embeds = torch.cat([inputs_embeds, llm.get_input_embeddings()(new_ids).to(inputs_embeds.dtype)], 1)
    mask = torch.cat([attention_mask, valid.long()], 1)  # (B, P + L)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                 logits_to_keep=new_ids.shape[1] + 1).logits[:, :-1]  # (B, L, V): position P-1+i predicts token i
    token_log_probs = logits.float().log_softmax(-1).gather(2, new_ids[..., None])[..., 0]  # (B, L)
    return [row[keep].tolist() for row, keep in zip(token_log_probs, valid)]
