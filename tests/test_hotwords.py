"""hotwords.py: the bonus for listed phrases, taken back exactly when a phrase is left unfinished."""
import pytest
import torch

from hotwords import DEFAULT_WEIGHT, NO_BONUS, HotwordBonus, Hotwords, greedy_without_fragments

VOCAB = ["<eos>", "the", " the", "joe", " joe", "king", " king", "joking", " joking", "lin", " lin", "ux", " said"]


def tokenizer(text, add_special_tokens=False):
    """Words -> ids; a word after a space is its own token (" joe"), "linux" is two ("lin" "ux")."""
    ids = []
    for i, word in enumerate(text.replace("linux", "lin ux").split(" ")):
        if word:
            ids.append(VOCAB.index((" " if i and word != "ux" else "") + word))
    return {"input_ids": ids}


def ids(*tokens):
    return [VOCAB.index(t) for t in tokens]


def bonus_along(hotwords, path):
    """What the processor adds to the score of each token of path, summed: the hypothesis' total bonus."""
    processor, total = HotwordBonus(hotwords), 0.0
    for step in range(len(path)):
        scores = torch.zeros(1, len(VOCAB))
        total += float(processor(torch.tensor([path[:step]]), scores)[0, path[step]])
    return total


def test_a_finished_phrase_keeps_its_bonus_an_unfinished_one_loses_it():
    hotwords = Hotwords([("joe king", 2.0), ("linux", 1.0)], tokenizer)
    assert bonus_along(hotwords, ids("the", " joe", " king", " said")) == pytest.approx(4.0)
    assert bonus_along(hotwords, ids("the", " joe", " said")) == pytest.approx(0.0)  # left after one token
    assert bonus_along(hotwords, ids("the", " joe", "<eos>")) == pytest.approx(0.0)  # or ended there
    assert bonus_along(hotwords, ids("joe", " king", " lin", "ux")) == pytest.approx(6.0)  # phrase after phrase
    assert bonus_along(hotwords, ids(" joe", " lin", "ux")) == pytest.approx(2.0)  # left for another phrase
    assert bonus_along(hotwords, ids("the", " said")) == 0.0


def greedy_once(table, processors, steps=3):
    """Greedy decoding over a fixed 'LLM': table[step] gives the log-probs of every token."""
    path = []
    for step in range(steps):
        scores = table[step].clone()[None]
        for processor in processors:
            scores = processor(torch.tensor([path]), scores)
        path.append(int(scores.argmax()))
        if path[-1] == 0:  # <eos>
            break
    return path


def greedy(hotwords, table, steps=3):
    """As decoding.py searches greedily: with a list, through greedy_without_fragments."""
    if hotwords is None:
        return [VOCAB[t] for t in greedy_once(table, [], steps)]
    path = greedy_without_fragments(lambda bonus: greedy_once(table, [bonus], steps), hotwords,
                                    lambda path: [[t for t in path if t != 0]])
    return [VOCAB[t] for t in path]


def log_probs(preferences: dict) -> torch.Tensor:
    row = torch.full((len(VOCAB),), -20.0)
    for token, value in preferences.items():
        row[VOCAB.index(token)] = value
    return row


def test_the_list_flips_a_common_word_to_the_rare_one_and_forces_in_no_unspoken_one():
    # the LLM prefers " joking" over " joe" (and, after " joe", ending over " king"): with the bonus
    # of 1.0 a token, " joe" wins, and then " king" (-2.0 + 1.0) beats ending (-0.1 - the 1.0 taken back)
    table = [log_probs({"the": -0.1}), log_probs({" joking": -0.5, " joe": -1.2}), log_probs({"<eos>": -0.1, " king": -2.0})]
    assert greedy(None, table) == ["the", " joking", "<eos>"]
    assert greedy(Hotwords.from_lines(["joe king 1.0"], tokenizer), table) == ["the", " joe", " king"]
    # a listed phrase the audio does not support (-20) stays out
    assert greedy(Hotwords.from_lines(["linux"], tokenizer), table) == ["the", " joking", "<eos>"]


def test_greedy_search_leaves_no_fragment_of_a_phrase_the_bonus_began():
    # the bonus makes " joe" win over " joking" (-1.2 + 1.0 > -0.5), but " king" is impossible after
    # it: searched once, greedy is stuck with " joe" and ends there (the bonus taken back too late)
    table = [log_probs({"the": -0.1}), log_probs({" joking": -0.5, " joe": -1.2}), log_probs({"<eos>": -0.1})]
    hotwords = Hotwords.from_lines(["joe king 1.0"], tokenizer)
    assert [VOCAB[t] for t in greedy_once(table, [HotwordBonus(hotwords)])] == ["the", " joe", "<eos>"]
    assert greedy(hotwords, table) == ["the", " joking", "<eos>"]
    # the same where the search runs out of steps inside the phrase
    table[2] = log_probs({"<eos>": -0.1, " king": -2.0})
    assert [VOCAB[t] for t in greedy_once(table, [HotwordBonus(hotwords)], steps=2)] == ["the", " joe"]
    assert greedy(hotwords, table, steps=2) == ["the", " joking"]
    # a fragment the LLM writes on its own (" joe" first even without the bonus) stays
    table[1] = log_probs({" joking": -1.5, " joe": -0.2})
    table[2] = log_probs({"<eos>": -0.1})
    assert greedy(hotwords, table) == greedy(None, table) == ["the", " joe", "<eos>"]


def test_greedy_searches_again_a_bounded_number_of_times_then_without_the_bonus():
    """Each search again costs a whole greedy search: past max_researches, a row still leaving a new
    fragment is searched without any bonus, i.e. as plain greedy search."""
    table = [log_probs({"the": -0.1}), log_probs({" joking": -0.5, " joe": -1.2}), log_probs({"<eos>": -0.1})]
    hotwords = Hotwords.from_lines(["joe king 1.0"], tokenizer)
    calls = []

    def search(bonus):
        calls.append(bonus.no_start)
        return greedy_once(table, [bonus], 3)

    path = greedy_without_fragments(search, hotwords, lambda path: [[t for t in path if t != 0]], max_researches=0)
    assert [VOCAB[t] for t in path] == greedy(None, table) == ["the", " joking", "<eos>"]
    assert len(calls) == 2 and calls[1] == [NO_BONUS] and calls[1][0] is NO_BONUS
    bonus = HotwordBonus(hotwords, [NO_BONUS])(torch.tensor([ids("the")]), torch.zeros(1, len(VOCAB)))
    assert torch.equal(bonus, torch.zeros(1, len(VOCAB)))  # no bonus, nothing taken back


def test_fragments_and_where_a_phrase_may_not_begin():
    hotwords = Hotwords([("joe king", 2.0), ("linux", 1.0)], tokenizer)
    path = ids("the", " joe", " said", " joe", " king", " lin")
    assert hotwords.fragments(path) == [(1, tuple(path[:1]), path[1]), (5, tuple(path[:5]), path[5])]
    no_start = {1: {(tuple(path[:1]), path[1])}}
    assert hotwords.fragments(path, no_start) == [(5, tuple(path[:5]), path[5])]
    assert hotwords.state(path[:2], no_start)[0] is hotwords.root  # " joe" there begins nothing
    assert hotwords.state(path[:4], no_start)[0].depth == 1  # but it does later
    bonus = HotwordBonus(hotwords, [no_start])(torch.tensor([path[:1]]), torch.zeros(1, len(VOCAB)))[0]
    assert bonus[VOCAB.index(" joe")] == 0.0 and bonus[VOCAB.index(" lin")] == 1.0


def test_rows_are_biased_independently():
    hotwords = Hotwords([("joe king", 2.0)], tokenizer)
    rows = [ids("the", " joe"), ids("the", " said")]
    together = HotwordBonus(hotwords)(torch.tensor(rows), torch.zeros(2, len(VOCAB)))
    for i, row in enumerate(rows):
        assert torch.equal(together[i], HotwordBonus(hotwords)(torch.tensor([row]), torch.zeros(1, len(VOCAB)))[0])


def test_hotword_lines():
    hotwords = Hotwords.from_lines(["joe king 3", "", "linux", "the joe king"], tokenizer)
    assert hotwords.root.children[VOCAB.index(" joe")].weight == 3.0
    assert hotwords.root.children[VOCAB.index(" lin")].weight == DEFAULT_WEIGHT
    with pytest.raises(ValueError, match="words.txt:1: the weight"):
        Hotwords.from_lines(["joe -1"], tokenizer, where="words.txt")
