"""decoding.py: CTC prefix scores, joint CTC + LLM decoding, pure CTC, the repetition guard, the token
budget and per-utterance confidence, on tiny random models."""
import itertools
import re
import math
from dataclasses import replace

import pytest
import torch
from test_model import loud_projector, make_batch, one_utterance

from decoding import (CTCHead, CTCPrefixScorer, DecodingOptions, RepetitionGuard, ctc_prefix_scores, generate_llm,
                      initial_state, transcript_token_rate, transcripts)
from model import SpeechLLM


def collapse(path, blank):
    return tuple(v for i, v in enumerate(path) if v != blank and (i == 0 or v != path[i - 1]))


def test_ctc_prefix_score_equals_a_brute_force_sum_over_alignments():
    torch.manual_seed(0)
    T, V = 5, 3  # tokens 0..2, blank 3: 4^5 alignments
    log_probs = torch.randn(T, V + 1, dtype=torch.float64).log_softmax(-1)  # frames sum to 1 in float64
    paths = list(itertools.product(range(V + 1), repeat=T))
    path_log_prob = {p: float(log_probs[torch.arange(T), list(p)].sum()) for p in paths}

    def brute(prefix, complete):
        masses = [lp for p, lp in path_log_prob.items()
                  if (collapse(p, V) == prefix if complete else collapse(p, V)[:len(prefix)] == prefix)]
        return math.log(sum(math.exp(m) for m in masses)) if masses else -math.inf

    x_blank = log_probs[None, :, V]  # (1, T)
    tokens = torch.arange(V)[None]  # (1, K): every token as a candidate
    x_tokens = log_probs[None, :, :V]
    # walk the prefixes (), (1,), (1, 1), (1, 1, 0): a repeated label needs a blank between its copies
    state, prefix = initial_state(x_blank)[0], ()
    assert math.isclose(float(state[-1].logsumexp(-1)), brute((), True), rel_tol=1e-9)
    for next_token in [1, 1, 0]:
        psi, r = ctc_prefix_scores(state[None], torch.tensor([prefix[-1] if prefix else -1]), tokens, x_tokens, x_blank)
        for c in range(V):
            assert math.isclose(float(psi[0, c]), brute(prefix + (c,), False), rel_tol=1e-9), (prefix, c)
            # the state of g + c ends in the probability that g + c is the whole transcript
            assert math.isclose(float(r[0, -1, c].logsumexp(-1)), brute(prefix + (c,), True), rel_tol=1e-9)
        state, prefix = r[0, :, next_token], prefix + (next_token,)


def test_ctc_head_scores_and_greedy_path():
    torch.manual_seed(0)
    D, V = 8, 6
    audio = torch.randn(2, 7, D)
    head = CTCHead(audio, torch.tensor([7, 4]), torch.randn(V, D), torch.randn(D))
    for u in range(2):
        log_probs = head.log_probs(u)
        assert log_probs.shape == (int(head.num_frames[u]), V + 1)
        torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(len(log_probs)))
        best = log_probs.argmax(-1).tolist()
        assert head.greedy_ids()[u] == list(collapse(best, V))
        hyp = head.greedy_ids()[u] or [0]
        expected = -torch.nn.functional.ctc_loss(log_probs[:, None], torch.tensor([hyp]), torch.tensor([len(log_probs)]),
                                                 torch.tensor([len(hyp)]), blank=V, reduction="sum")
        assert math.isclose(head.sequence_log_prob(u, hyp), float(expected), rel_tol=1e-5)
    # the padded frames of the shorter utterance are certain blanks: no mass is lost or added
    x = head.token_log_probs(torch.tensor([1]), torch.arange(V)[None])
    assert (x[0, 4:] <= -1e4 + 1).all() and (head.blank_log_probs(torch.tensor([1]))[0, 4:] == 0).all()


@pytest.fixture()
def ctc_model(tiny_config):
    torch.manual_seed(0)
    model = SpeechLLM(replace(tiny_config, ctc_weight=1.0))
    loud_projector(model)
    with torch.no_grad():
        model.projector.ctc_blank.normal_(std=3.0)
    return model


def unpadded(model, ids):
    ids = ids.tolist()
    while ids and ids[-1] == model.prompt.placeholder_id:
        ids.pop()
    return ids


@pytest.mark.parametrize("num_beams", [1, 3])
def test_weight_zero_decodes_exactly_as_the_llm_alone(ctc_model, num_beams):
    batch = make_batch(ctc_model, [0.8, 2.6, 1.7], inference=True)
    plain = generate_llm(ctc_model, ctc_model.embed(batch["mel"], batch["mel_lengths"], batch["input_ids"],
                                                    batch["audio_mask"]), batch, num_beams, 12)
    ours = ctc_model.generate(**batch, num_beams=num_beams, max_new_tokens=12, ctc_decode_weight=0.0, max_repeats=0)
    assert ours.tolist() == plain.tolist()
    # the joint scorer itself at w = 0 (LLM scores on its candidates, -inf elsewhere) changes nothing
    original = CTCPrefixScorer.__init__

    def at_weight_zero(self, head, weight, *args, **kwargs):
        original(self, head, 0.0, *args, **kwargs)
    try:
        CTCPrefixScorer.__init__ = at_weight_zero
        forced = ctc_model.generate(**batch, num_beams=num_beams, max_new_tokens=12, ctc_decode_weight=0.5, max_repeats=0)
    finally:
        CTCPrefixScorer.__init__ = original
    assert forced.tolist() == plain.tolist()


@pytest.mark.parametrize("num_beams", [1, 3])
def test_joint_decoding_batched_equals_one_by_one(ctc_model, num_beams, device):
    ctc_model.to(device)
    seconds = [0.8, 2.6, 1.7]
    batch = make_batch(ctc_model, seconds, inference=True)
    options = dict(num_beams=num_beams, ctc_decode_weight=0.3)
    together = [unpadded(ctc_model, ids) for ids in ctc_model.generate(**batch, **options)]
    alone = []
    for i in range(len(seconds)):
        single = one_utterance(batch, i)
        alone.append(unpadded(ctc_model, ctc_model.generate(**single, **options)[0]))
    assert together == alone
    assert len({tuple(ids) for ids in together}) > 1
    plain = [unpadded(ctc_model, ids) for ids in ctc_model.generate(**batch, num_beams=num_beams, ctc_decode_weight=0.0)]
    assert plain != together  # the CTC scores really steer the search


def spell(model, batch, references: list[list[int]]):
    """Audio embeddings that make the CTC head spell each reference (confidently), blanks elsewhere."""
    token_embeds = model.llm.get_input_embeddings().weight.detach()
    frames = batch["audio_mask"].sum(1).tolist()
    rows = []
    for ids, n in zip(references, frames):
        row = 30 * model.projector.ctc_blank.detach().expand(n, -1).clone()
        row[1:2 * len(ids):2] = 30 * token_embeds[ids]  # blank, token, blank, token, ...
        rows.append(row)
    return torch.cat(rows)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_joint_decoding_returns_what_ctc_spells_where_the_llm_invents(ctc_model, num_beams, monkeypatch):
    tokenizer = ctc_model.tokenizer
    texts = ["one two three", "hello world"]
    references = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    batch = make_batch(ctc_model, [2.0, 1.5], inference=True)
    with torch.no_grad():  # a blank on the scale of a token embedding, so that neither outscores the other
        ctc_model.projector.ctc_blank.copy_(0.2 * torch.randn(ctc_model.projector.ctc_blank.shape))
    monkeypatch.setattr(ctc_model, "encode_audio", lambda mel, mel_lengths: spell(ctc_model, batch, references))
    def decoded(**options):
        return transcripts(ctc_model, ctc_model.generate(**batch, **options))
    llm_alone = decoded(num_beams=num_beams, ctc_decode_weight=0.0)
    assert all(h != t for h, t in zip(llm_alone, texts))  # the random LLM invents
    assert decoded(num_beams=num_beams, ctc_decode_weight=0.5) == texts
    assert decoded(decode="ctc") == texts
    _, confidence = ctc_model.generate(**batch, ctc_decode_weight=0.5, return_confidence=True)
    assert all(c["ctc_disagreement"] == 0 and c["ctc_logprob"] > -0.1 for c in confidence)
    _, invented = ctc_model.generate(**batch, ctc_decode_weight=0.0, return_confidence=True)
    assert all(c["ctc_disagreement"] > 0.5 and c["ctc_logprob"] < -5 for c in invented)


def test_repetition_guard_ends_a_loop_and_keeps_short_repeats():
    vocab = 10

    def looping_llm(ids):  # always prefers to continue the pattern 1 2 1 2 ..., then token 5
        scores = torch.zeros(1, vocab)
        scores[0, 1 if not ids or ids[-1] == 2 else 2] = 10
        scores[0, 5] = 5
        return scores

    guard, ids = RepetitionGuard(max_repeats=3), []
    for _ in range(12):
        ids.append(int(guard(torch.tensor([ids], dtype=torch.long), looping_llm(ids)).argmax()))
    assert ids[:7] == [1, 2, 1, 2, 1, 2, 5]  # three copies of "1 2", then the loop is cut
    assert "1 2 1 2 1 2 1 2" not in " ".join(map(str, ids))
    # "no no no" (one token three times) stays possible, a fourth copy does not
    scores = guard(torch.tensor([[7, 7]]), torch.zeros(1, vocab))
    assert scores[0, 7] == 0
    scores = guard(torch.tensor([[7, 7, 7]]), torch.zeros(1, vocab))
    assert scores[0, 7] == -math.inf and (scores[0, :7] == 0).all()


def test_repetition_guard_counts_words_that_differ_only_in_case_and_punctuation():
    texts = {0: " H", 1: "!", 2: "?", 3: "??", 4: " h", 5: " Well", 6: ",", 7: " no", 8: " way", 9: " No"}
    guard = RepetitionGuard(max_repeats=3, token_text=texts.__getitem__)
    h_loop = [5, 6, 0, 1, 0, 2, 4, 3]  # "Well, H! H? h??": token-wise no repeat of 3
    assert guard.words(h_loop, complete=True) == [("well", 5), ("h", 0), ("h", 0), ("h", 4)]
    scores = guard(torch.tensor([h_loop, [5, 6, 0, 1, 0, 2, 5, 6]]), torch.zeros(2, 10))
    assert (scores[0] == -math.inf).tolist() == [i in (0, 4) for i in range(10)]  # both spellings that began a copy
    assert (scores[1] == 0).all()  # two copies: a fourth is not next
    # a two-word n-gram: "no way! No way? no way" -> no fourth "no"
    assert guard.word_loop_starts([7, 8, 1, 9, 8, 2, 7, 8], complete=True) == [7, 9]
    # a window that may have cut its first word leaves it out: " H" there may end a longer word
    assert guard.words([0, 1, 0, 2, 4], complete=False) == [("h", 0), ("h", 4)]


def test_generate_guards_words_with_the_models_own_token_texts(ctc_model, monkeypatch):
    """decode() hands the guard its prompt's token texts: without them the word rule is off."""
    import decoding

    guards = []

    class RecordingGuard(RepetitionGuard):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            guards.append(self)

    monkeypatch.setattr(decoding, "RepetitionGuard", RecordingGuard)
    ctc_model.generate(**make_batch(ctc_model, [2.0], inference=True), max_new_tokens=4)
    assert len(guards) == 1 and guards[0].token_text == ctc_model.prompt.token_text


def test_repetition_guard_ends_the_llms_loop(ctc_model):
    """An LLM made to loop (its layers silenced, so with tied embeddings it predicts its own input
    token again and again) gets at most 3 copies of any n-gram with the guard."""
    with torch.no_grad():
        for layer in ctc_model.llm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    batch = make_batch(ctc_model, [3.0, 2.0, 2.5], inference=True)
    unguarded = ctc_model.generate(**batch, max_repeats=0, max_new_tokens=40)
    guarded = ctc_model.generate(**batch, max_new_tokens=40)

    def longest_run(ids):  # most consecutive copies of any n-gram
        ids, best = unpadded(ctc_model, ids), 1
        for n in range(1, 9):
            for start in range(len(ids)):
                copies = 1
                while start + (copies + 1) * n <= len(ids) and \
                        ids[start + copies * n:start + (copies + 1) * n] == ids[start:start + n]:
                    copies += 1
                best = max(best, copies)
        return best
    assert min(map(longest_run, unguarded)) > 3  # the constructed case does loop
    assert max(map(longest_run, guarded)) <= 3
    assert all(len(unpadded(ctc_model, ids)) >= 12 for ids in guarded)  # cut loops, not ended ones


def test_token_budget_bounds_each_utterance(ctc_model):
    ctc_model.config.max_tokens_per_second, ctc_model.config.max_tokens_extra = 2.0, 1
    seconds = [0.8, 2.6, 1.7]
    batch = make_batch(ctc_model, seconds, inference=True)
    budgets = [1 + math.ceil(2.0 * s) for s in seconds]
    eos = set(ctc_model.prompt.eos_token_ids)
    for num_beams in (1, 3):
        rows = [unpadded(ctc_model, ids) for ids in ctc_model.generate(**batch, num_beams=num_beams)]
        assert all(len([t for t in row if t not in eos]) <= budget for row, budget in zip(rows, budgets))
        assert any(len(row) >= budget for row, budget in zip(rows, budgets))  # a budget really stopped a row


def test_confidence_is_the_llms_mean_log_prob_of_its_tokens(ctc_model):
    batch = make_batch(ctc_model, [0.8, 2.6], inference=True)
    ids, confidence = ctc_model.generate(**batch, max_new_tokens=8, ctc_decode_weight=0.0, max_repeats=0,
                                             return_confidence=True)
    out = ctc_model.generate(**batch, max_new_tokens=8, ctc_decode_weight=0.0, max_repeats=0,
                                 output_scores=True, return_dict_in_generate=True)
    assert out.sequences.tolist() == ids.tolist()
    step_log_probs = torch.stack(out.scores, 1).log_softmax(-1)  # (B, L, V): greedy's scores are the logits
    eos = ctc_model.prompt.eos_token_ids
    for row, c in zip(range(len(ids)), confidence):
        tokens = unpadded(ctc_model, ids[row])
        n = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
        expected = step_log_probs[row, torch.arange(n), ids[row, :n]].mean()
        assert math.isclose(c["llm_logprob"], float(expected), abs_tol=1e-3)
        assert set(c) == {"llm_logprob", "ctc_logprob", "ctc_disagreement"}


def test_ctc_decoding_needs_a_ctc_head(tiny_model):
    batch = make_batch(tiny_model, [1.0], inference=True)
    with pytest.raises(ValueError, match="no CTC head"):
        tiny_model.generate(**batch, decode="ctc")
    with pytest.raises(ValueError, match="no CTC head"):
        tiny_model.generate(**batch, ctc_decode_weight=0.3)
    _, confidence = tiny_model.generate(**batch, max_new_tokens=4, return_confidence=True)
    assert set(confidence[0]) == {"llm_logprob"}


@pytest.mark.parametrize("options, message", [
    (dict(ctc_decode_weight=1.0), r"^ctc_decode_weight must be in \[0, 1\)"),
    (dict(ctc_decode_weight=float("nan")), r"^ctc_decode_weight must be in \[0, 1\)"),
    (dict(num_beams=0), "^num_beams must be >= 1"), (dict(decode="beam"), "^decode must be 'llm' or 'ctc'"),
    (dict(max_repeats=-1), "^max_repeats must be >= 0"), (dict(max_new_tokens=0), "^max_new_tokens must be >= 1")])
def test_decoding_options_are_checked_when_made(options, message):
    with pytest.raises(ValueError, match=message):
        DecodingOptions(**options)


def test_a_models_saved_decoding_weight_is_checked_as_a_given_one(tiny_config):
    assert DecodingOptions().resolved(replace(tiny_config, ctc_decode_weight=0.5)).ctc_decode_weight == 0.5
    assert DecodingOptions(ctc_decode_weight=0.0).resolved(replace(tiny_config, ctc_decode_weight=0.5)).ctc_decode_weight == 0.0
    with pytest.raises(ValueError, match="^ctc_decode_weight must be in"):
        DecodingOptions().resolved(replace(tiny_config, ctc_decode_weight=1.0))


def test_generate_takes_options_or_their_fields_and_passes_the_rest_to_the_llm(ctc_model):
    batch = make_batch(ctc_model, [0.8, 1.9], inference=True)
    options = DecodingOptions(num_beams=2, max_new_tokens=6, ctc_decode_weight=0.3)
    ids = ctc_model.generate(**batch, options=options)
    assert ctc_model.generate(**batch, num_beams=2, max_new_tokens=6, ctc_decode_weight=0.3).tolist() == ids.tolist()
    out = ctc_model.generate(**batch, options=options, return_dict_in_generate=True)  # a generate() kwarg
    assert out.sequences.tolist() == ids.tolist()
    assert options.generate_kwargs == {}  # options are frozen: the call's kwargs went into a copy


def test_token_rate_budget_covers_the_corpus():
    durations = [0.5, 0.8] * 50 + [float(s) for s in range(1, 31)] * 10
    num_tokens = [3, 4] * 50 + [int(3.5 * s) for s in range(1, 31)] * 10
    rate, extra = transcript_token_rate(durations, num_tokens)
    assert 3 <= rate <= 4
    covered = sum(n <= extra + math.ceil(rate * d) for d, n in zip(durations, num_tokens))
    assert covered >= 0.995 * len(durations)


def test_recognize_writes_confidence_and_decodes_with_ctc(ctc_model, tmp_path):
    """recognize.py --confidence: a confidence line per decoded key, equal to generate()'s; kept
    through a resume (an utterance decoded without it is decoded again); --decode ctc = the CTC path."""
    import json

    import recognize
    from conftest import write_corpus

    ctc_model.save_pretrained(tmp_path / "model")
    jsonl = write_corpus(tmp_path / "data", ["a", "b", "c"], [1.0, 2.0, 1.5])
    result_path = tmp_path / "result.txt"
    common = ["--model_dir", str(tmp_path / "model"), "--data_path", str(jsonl), "--batch_size", "2",
              "--max_new_tokens", "6", "--ctc_decode_weight", "0.3"]
    # an earlier run, killed after one utterance, decoded without --confidence
    hyps = recognize.main(common + ["--result_path", str(tmp_path / "plain.txt")])
    (tmp_path / "result.txt.partial0").write_text(json.dumps(dict(key="utt1", text=hyps["utt1"])) + "\n")
    hyps_confident = recognize.main(common + ["--result_path", str(result_path), "--confidence"])
    assert hyps_confident == hyps
    lines = [json.loads(line) for line in open(f"{result_path}.confidence.jsonl")]
    assert [x["key"] for x in lines] == ["utt0", "utt1", "utt2"]

    model = SpeechLLM.from_pretrained(tmp_path / "model")
    from audio import load_audio, log_mel
    from data import Collator
    items = [dict(mel=log_mel(load_audio(str(tmp_path / "data" / f"utt{i}.wav")), 80), instruction=model.config.instruction)
             for i in range(3)]
    ids, confidence = model.generate(**Collator(model.data_spec(), inference=True)(items), max_new_tokens=6, ctc_decode_weight=0.3,
                                     return_confidence=True)
    assert transcripts(model, ids) == [hyps[f"utt{i}"] for i in range(3)]
    for line, expected in zip(lines, confidence):
        assert line.pop("key") and line == pytest.approx(expected, abs=2e-3)

    ctc_hyps = recognize.main(common + ["--result_path", str(tmp_path / "ctc.txt"), "--decode", "ctc"])
    ctc_texts = transcripts(model, model.generate(**Collator(model.data_spec(), inference=True)(items), decode="ctc"))
    assert [ctc_hyps[f"utt{i}"] for i in range(3)] == [" ".join(t.split()) for t in ctc_texts]


@pytest.mark.parametrize("flags, message", [(["--ctc_decode_weight", "1.0"], "must be in \\[0, 1\\)"),
                                            (["--max_repeats", "-1"], "must be >= 0"),
                                            (["--chunk_seconds", "0.5"], "must be 0 \\(off\\) or >= 1"),
                                            (["--chunk_seconds", "nan"], "must be 0 \\(off\\) or >= 1")])
def test_recognize_refuses_bad_decoding_flags(flags, message, capsys):
    import recognize
    with pytest.raises(SystemExit):
        recognize.parse_args(["--model_dir", "m", "--data_path", "d", "--result_path", "r", *flags])
    assert re.search(message, capsys.readouterr().err)


def test_recognize_batch_seconds_decodes_as_batch_size_and_a_segment_as_its_cut_file(ctc_model, tmp_path):
    """recognize.py --batch_seconds: batches within the budget, the same text as fixed batches (an
    utterance decodes the same in any batch). A segment line decodes as the file of its cut audio."""
    import json
    from types import SimpleNamespace

    import soundfile

    import recognize
    from conftest import write_corpus
    from audio import load_audio
    from data import check_entries, read_jsonl

    ctc_model.save_pretrained(tmp_path / "model")
    jsonl = write_corpus(tmp_path / "data", list("abcdef"), [0.6, 3.0, 1.0, 2.0, 0.8, 1.4])
    soundfile.write(tmp_path / "data" / "cut.wav", load_audio(tmp_path / "data" / "utt1.wav")[8000:32000], 16000,
                    subtype="FLOAT")
    with open(jsonl, "a") as f:
        f.write(json.dumps(dict(key="segment", wav="utt1.wav", start=0.5, end=2.0)) + "\n")
        f.write(json.dumps(dict(key="cut", wav="cut.wav")) + "\n")
    common = ["--model_dir", str(tmp_path / "model"), "--data_path", str(jsonl), "--max_new_tokens", "6"]
    fixed = recognize.main(common + ["--result_path", str(tmp_path / "fixed.txt"), "--batch_size", "2"])
    # (a token cap of its own: the default, 3 s of the longest clip's tokens, leaves no room for two prompts)
    by_seconds = recognize.main(common + ["--result_path", str(tmp_path / "seconds.txt"), "--batch_seconds", "3",
                                          "--batch_tokens", "500"])
    assert by_seconds == fixed and len(fixed) == 8
    assert fixed["segment"] == fixed["cut"]

    entries, _ = check_entries(read_jsonl(jsonl), None, for_training=False)
    entries = sorted(entries, key=lambda e: -e["duration"])
    args = SimpleNamespace(batch_seconds=3.0, batch_tokens=500, batch_size=16, decoding=DecodingOptions(max_new_tokens=6))
    batches = recognize.decoding_batches(ctc_model.data_spec(), ctc_model.config, entries, args)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert [len(b) for b in batches] != [8] and max(len(b) for b in batches) > 1
    assert all(len(b) * max(entries[i]["duration"] for i in b) <= 3.0 or len(b) == 1 for b in batches)


def test_long_audio_pieces_cover_it_and_cut_at_pauses():
    import numpy as np

    from conftest import synth_audio
    from audio import long_audio_pieces

    audio = synth_audio(0, 70.0)
    for pause in (22.0, 47.0):  # 200 ms of silence: where the cuts should go
        audio[int(pause * 16000):int((pause + 0.2) * 16000)] = 0
    pieces = long_audio_pieces(audio, 30.0)
    assert pieces[0][0] == 0 and pieces[-1][1] == len(audio)
    assert all(a < b == c for (a, b), (c, _) in zip(pieces, pieces[1:]))  # end to end, no gap, no overlap
    assert all(b - a <= 30 * 16000 for a, b in pieces)
    assert [pause <= b / 16000 <= pause + 0.2 for (a, b), pause in zip(pieces, (22.0, 47.0))] == [True, True]
    assert len(pieces) == 3
    assert long_audio_pieces(audio[:30 * 16000], 30.0) == [(0, 30 * 16000)]
    noise = np.random.default_rng(0).standard_normal(65 * 16000).astype(np.float32)  # no pause: still <= 30 s
    assert all(b - a <= 30 * 16000 for a, b in long_audio_pieces(noise, 30.0))


def test_recognize_decodes_a_long_recording_in_pieces_joined_in_order(ctc_model, tmp_path):
    """recognize.py and transcribe(): a recording longer than --chunk_seconds reads as its pieces (cut
    at pauses) decoded as segments, their texts joined; a resume re-decodes an entry whose pieces a
    killed run left incomplete; --chunk_seconds 0 decodes it in one prompt."""
    import json

    import soundfile

    import recognize
    from conftest import synth_audio
    from audio import long_audio_pieces

    ctc_model.save_pretrained(tmp_path / "model")
    audio = synth_audio(3, 50.0)
    audio[int(12.0 * 16000):int(12.3 * 16000)] = 0
    soundfile.write(tmp_path / "long.wav", audio, 16000, subtype="FLOAT")
    soundfile.write(tmp_path / "short.wav", synth_audio(4, 2.0), 16000)
    pieces = long_audio_pieces(audio, 20.0)
    assert len(pieces) == 3 and 12.0 <= pieces[0][1] / 16000 <= 12.3
    lines = [dict(key="long", wav="long.wav"), dict(key="short", wav="short.wav")]
    lines += [dict(key=f"piece{i}", wav="long.wav", start=a / 16000, end=b / 16000) for i, (a, b) in enumerate(pieces)]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines))
    common = ["--model_dir", str(tmp_path / "model"), "--data_path", str(jsonl), "--batch_size", "2",
              "--max_new_tokens", "3", "--ctc_decode_weight", "0.3"]
    result_path = tmp_path / "result.txt"
    # a killed run that finished one piece of "long" and a wrong text for it: the entry is decoded again
    (tmp_path / "result.txt.partial0").write_text(json.dumps({"key": "long 0/3", "text": "stale"}) + "\n")
    hyps = recognize.main(common + ["--result_path", str(result_path), "--chunk_seconds", "20"])
    assert list(hyps) == ["long", "short", "piece0", "piece1", "piece2"]
    assert hyps["long"] == " ".join(hyps[f"piece{i}"] for i in range(3) if hyps[f"piece{i}"]) and "stale" not in hyps["long"]
    assert [line.split("\t")[0] for line in result_path.read_text().splitlines()] == list(hyps)
    assert not list(tmp_path.glob("result.txt.partial*"))

    whole = recognize.main(common + ["--result_path", str(tmp_path / "whole.txt"), "--chunk_seconds", "0"])
    assert list(whole) == list(hyps) and whole["short"] == hyps["short"]
    model = SpeechLLM.from_pretrained(tmp_path / "model")
    transcribed = model.transcribe([str(tmp_path / "long.wav"), audio[:2 * 16000]], chunk_seconds=20,
                                   max_new_tokens=3, ctc_decode_weight=0.3)
    assert transcribed[0] == hyps["long"]


def test_join_pieces_needs_every_piece_and_keeps_the_first_error():
    import recognize

    records = {"a 0/2": dict(key="a 0/2", text="hello", confidence=dict(llm_logprob=-1.0)),
               "a 1/2": dict(key="a 1/2", text="world", confidence=dict(llm_logprob=-3.0)),
               "b 0/3": dict(key="b 0/3", text="x"), "b 2/3": dict(key="b 2/3", text="z"),
               "c 0/2": dict(key="c 0/2", text="x"), "c 1/2": dict(key="c 1/2", error="unreadable"),
               "d": dict(key="d", text="plain")}
    joined = recognize.join_pieces(records)
    assert joined == {"d": records["d"], "a": dict(key="a", text="hello world", confidence=dict(llm_logprob=-2.0)),
                      "c": dict(key="c", error="unreadable")}
