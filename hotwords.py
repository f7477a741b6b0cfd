"""Hotword biasing at decoding time, without retraining: a bonus for hypotheses that spell a listed
phrase, as icefall's context graphs give it. The phrases' token sequences form a prefix trie; a
hypothesis that extends a phrase by a token earns that phrase's weight, one that leaves a phrase
unfinished has everything the phrase earned taken back, so only a finished phrase keeps its bonus,
and the total a hypothesis gains is the weight times the tokens of the phrases it completes.

    hotwords = Hotwords.from_lines(["Linux 2.0", "Joe King"], tokenizer)   # "phrase[ weight]" per line
    processors.append(HotwordBonus(hotwords))   # after the other logits processors (decoding.py)

It adds to the scores the other processors leave; joint CTC scoring takes the phrases' next tokens
among its candidates (Hotwords.candidates), so the audio decides whether a phrase was said. Greedy
search runs through greedy_without_fragments, which searches again where a phrase was begun and left.
"""
import math
from types import MappingProxyType
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor

DEFAULT_WEIGHT = 1.5  # log-probability per token of a listed phrase


@dataclass
class Node:
    depth: int = 0  # tokens from the root
    weight: float = 0.0  # the bonus for each token of the phrase(s) through here
    children: dict = field(default_factory=dict)  # token -> Node
    ends_phrase: bool = False


class Hotwords:
    """A prefix trie of the phrases' token sequences, each phrase written with and without the leading
    space it has inside a sentence (BPE tokenizes the two differently)."""

    def __init__(self, phrases: list[tuple[str, float]], tokenizer):
        self.root = Node()
        for phrase, weight in phrases:
            for text in (phrase, " " + phrase):
                node = self.root
                for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
                    node = node.children.setdefault(token, Node(node.depth + 1))
                    node.weight = max(node.weight, weight)
                node.ends_phrase = True

    @classmethod
    def from_lines(cls, lines: list[str], tokenizer, where: str = "hotwords") -> "Hotwords":
        """'phrase' or 'phrase<TAB or space>weight' per line; blank lines are skipped."""
        phrases = []
        for number, line in enumerate(lines, 1):
            text, _, last = line.strip().rpartition(" ")
            try:
                phrase, weight = (text.strip(), float(last)) if text else (line.strip(), DEFAULT_WEIGHT)
            except ValueError:
                phrase, weight = line.strip(), DEFAULT_WEIGHT
            if phrase and not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"{where}:{number}: the weight must be a number >= 0, got {last!r}")
            if phrase:
                phrases.append((phrase, weight))
        return cls(phrases, tokenizer)

    def state(self, ids: list[int], no_start: dict | None = None) -> tuple[Node, float]:
        """-> the node the hypothesis' unfinished phrase has reached and what it earned so far."""
        node = self.walk(ids, no_start)[-1] if ids else self.root
        return node, self.earned(ids, node)

    def walk(self, ids: list[int], no_start: dict | None = None) -> list[Node]:
        """The node after each token. A token that cannot go on restarts matching at the root (a phrase
        may begin right there), unless no_start ({position: {(prefix, token)}}, see
        greedy_without_fragments) forbids that phrase to begin after that prefix."""
        nodes, node = [], self.root
        for i, token in enumerate(ids):
            step = node.children.get(token) if node is not self.root else None
            if step is None and token in self.root.children and not (
                    no_start and i in no_start and (tuple(ids[:i]), token) in no_start[i]):
                step = self.root.children[token]
            node = step or self.root
            nodes.append(node)
        return nodes

    def fragments(self, ids: list[int], no_start: dict | None = None) -> list[tuple[int, tuple, int]]:
        """The phrases the hypothesis began and left unfinished (or ended in): (position, prefix before
        it, its first token) of each, the keys no_start takes."""
        out, before = [], self.root
        for i, node in enumerate(self.walk(ids, no_start) + [None]):  # None: the hypothesis ends
            left = node is None or node.depth != before.depth + 1
            if left and before is not self.root and not before.ends_phrase:
                start = i - before.depth
                out.append((start, tuple(ids[:start]), ids[start]))
            before = node
        return out

    def candidates(self, ids: list[int]) -> list[int]:
        """The tokens that go on the hypothesis' phrase or begin one: what joint CTC scoring must score."""
        node, _ = self.state(ids)
        return sorted(set(node.children) | set(self.root.children))

    def earned(self, ids: list[int], node: Node) -> float:
        """The bonus given to the last node.depth tokens on the way to node."""
        walk, total = self.root, 0.0
        for token in ids[len(ids) - node.depth:] if node.depth else []:
            walk = walk.children[token]
            total += walk.weight
        return total


class HotwordBonus(LogitsProcessor):
    """Each row's next-token scores: + the weight for a token that extends its phrase (or starts one);
    for any other token, - what the unfinished phrase earned (a finished one keeps it). The end of
    turn takes an unfinished phrase's bonus back too. no_start: per row, the phrases that may not
    begin where they begin (Hotwords.walk), for greedy_without_fragments."""

    def __init__(self, hotwords: Hotwords, no_start: list[dict] | None = None):
        self.hotwords, self.no_start = hotwords, no_start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        root = self.hotwords.root
        taken_back, rows, tokens, values = [], [], [], []  # one tensor each for the whole batch
        for row, ids in enumerate(input_ids.tolist()):
            no_start = self.no_start[row] if self.no_start else None
            if no_start is NO_BONUS:
                taken_back.append(0.0)
                continue
            node, earned = self.hotwords.state(ids, no_start)
            back = 0.0 if node.ends_phrase else earned  # leaving an unfinished phrase returns its bonus
            barred = {token for prefix, token in no_start.get(len(ids), ()) if prefix == tuple(ids)} if no_start else set()
            weights = {token: child.weight - back for token, child in root.children.items() if token not in barred}
            if node is not root:  # or go on with this one (wins over beginning one)
                weights |= {token: child.weight for token, child in node.children.items()}
            taken_back.append(back)
            rows, tokens, values = rows + [row] * len(weights), tokens + list(weights), values + list(weights.values())
        bonus = -torch.tensor(taken_back, dtype=scores.dtype, device=scores.device)[:, None].repeat(1, scores.shape[1])
        bonus[rows, tokens] = torch.tensor(values, dtype=scores.dtype, device=scores.device)
        return scores + bonus


NO_BONUS = MappingProxyType({})  # a row's no_start that turns its bonus off (greedy_without_fragments' last resort)
MAX_RESEARCHES = 3  # each is a whole greedy search of the batch again


def greedy_without_fragments(search, hotwords: Hotwords, hypotheses, max_researches: int = MAX_RESEARCHES):
    """Greedy search with the bonus, and no phrase left unfinished by it. Greedy cannot take back a
    token the bonus chose once the phrase is abandoned (beam search drops such hypotheses), so a name
    begun and left stays as a fragment ("in for R."). Here a phrase that a hypothesis began and left
    may not begin after that same prefix, and the rows are searched again, until no row leaves a new
    one: the search then goes where it would have gone without that phrase's bonus. A fragment the
    LLM writes on its own comes back unchanged and ends the loop.
    search(HotwordBonus) -> the search's output; hypotheses(output) -> each row's token ids (no end
    of turn, no padding). A row's search sees only its own no_start, so batched equals one by one.
    A common first token (" Sl" of "Sloth") can be begun and left at one place after another, each
    costing a search of the batch: after max_researches, a row that still leaves a new fragment is
    searched once more without any bonus (plain greedy: the bonus leaves nothing there)."""
    no_start, researches = None, 0
    while True:
        out = search(HotwordBonus(hotwords, no_start))
        rows = hypotheses(out)
        no_start, new = no_start or [{} for _ in rows], set()
        for row, ids in enumerate(rows):
            if no_start[row] is NO_BONUS:
                continue
            for position, prefix, token in hotwords.fragments(ids, no_start[row]):
                if (prefix, token) not in no_start[row].setdefault(position, set()):
                    no_start[row][position].add((prefix, token))
                    new.add(row)
        if not new:
            return out
        researches += 1
        if researches > max_researches:
            no_start = [NO_BONUS if row in new else rule for row, rule in enumerate(no_start)]
