"""Hotword biasing at decoding time, without retraining: a bonus for hypotheses that spell a listed
phrase, as icefall's context graphs give it. The phrases' token sequences form a prefix trie; a
hypothesis that extends a phrase by a token earns that phrase's weight, one that leaves a phrase
unfinished has everything the phrase earned taken back, so only a finished phrase keeps its bonus,
and the total a hypothesis gains is the weight times the tokens of the phrases it completes.

    hotwords = Hotwords.from_lines(["Linux 2.0", "Joe King"], tokenizer)   # "phrase[ weight]" per line
    processors.append(HotwordBonus(hotwords))   # after the other logits processors (decoding.py)

It adds to the scores the other processors leave; joint CTC scoring takes the phrases' next tokens
among its candidates (Hotwords.candidates), so the audio decides whether a phrase was said.
"""
import math
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

    def state(self, ids: list[int]) -> tuple[Node, float]:
        """-> the node the hypothesis' unfinished phrase has reached and what it earned so far. A token
        that cannot go on restarts matching at the root (a phrase may begin right there)."""
        node = self.root
        for token in ids:
            node = node.children.get(token) or self.root.children.get(token) or self.root
        return node, self.earned(ids, node)

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
    turn takes an unfinished phrase's bonus back too."""

    def __init__(self, hotwords: Hotwords):
        self.hotwords = hotwords

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        root = self.hotwords.root
        taken_back, rows, tokens, values = [], [], [], []  # one tensor each for the whole batch
        for row, ids in enumerate(input_ids.tolist()):
            node, earned = self.hotwords.state(ids)
            back = 0.0 if node.ends_phrase else earned  # leaving an unfinished phrase returns its bonus
            weights = {token: child.weight - back for token, child in root.children.items()}  # begin a phrase
            if node is not root:  # or go on with this one (wins over beginning one)
                weights |= {token: child.weight for token, child in node.children.items()}
            taken_back.append(back)
            rows, tokens, values = rows + [row] * len(weights), tokens + list(weights), values + list(weights.values())
        bonus = -torch.tensor(taken_back, dtype=scores.dtype, device=scores.device)[:, None].repeat(1, scores.shape[1])
        bonus[rows, tokens] = torch.tensor(values, dtype=scores.dtype, device=scores.device)
        return scores + bonus
