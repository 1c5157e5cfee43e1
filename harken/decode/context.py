"""Hotwords (context biasing) as a token-level trie walked alongside each beam hypothesis.

Each phrase is tokenized with the model's tokenizer; while a hypothesis follows a phrase's tokens it
earns ``boost`` (natural-log units) per matched token -- the convention of icefall's and
sherpa-onnx's context graphs.  The bonus is kept only once the phrase is complete *and* followed by
a word boundary (a ``▁``-initial token or the end of the utterance); if the hypothesis leaves the
trie before that (including "adams" going on as "adamst"), the bonus earned is taken back, so a
partial match gains nothing in the end.  A
phrase can only begin at a word start (first token of the utterance, after a bare ``▁`` token, or on
a token that itself starts with ``▁``), so "ann" does not fire inside "joanna".  When phrases share
a prefix, the trie node keeps the largest boost; a complete phrase that is also the prefix of a
longer one keeps its bonus (once a word boundary follows) and the longer one may add more.
"""

from __future__ import annotations

from typing import Sequence

SPACE = "\u2581"


def parse_hotword(spec: str, default_boost: float = 2.0) -> tuple[str, float]:
    """``"rosalind:4.0"`` -> ("rosalind", 4.0); ``"new york"`` -> ("new york", default_boost)."""
    phrase, sep, boost = spec.rpartition(":")
    if sep and phrase.strip():
        try:
            return phrase.strip(), float(boost)
        except ValueError:
            pass
    return spec.strip(), float(default_boost)


class ContextGraph:
    def __init__(self, phrases: Sequence[tuple[Sequence[int], float]]):
        self.children: list[dict[int, int]] = [{}]
        self.boost: list[float] = [0.0]
        self.is_end: list[bool] = [False]
        for toks, boost in phrases:
            toks = list(toks)
            if not toks:
                continue
            node = 0
            for t in toks:
                nxt = self.children[node].get(t)
                if nxt is None:
                    nxt = len(self.children)
                    self.children[node][t] = nxt
                    self.children.append({})
                    self.boost.append(float(boost))
                    self.is_end.append(False)
                else:
                    self.boost[nxt] = max(self.boost[nxt], float(boost))
                node = nxt
            self.is_end[node] = True

    @classmethod
    def from_phrases(cls, phrases: Sequence[tuple[str, float]], tokenizer, normalize: bool = True) -> "ContextGraph":
        from harken.text.normalize import normalize_text

        items = []
        for text, boost in phrases:
            t = normalize_text(text) if normalize else text
            ids = [i for i in tokenizer.encode(t) if i > 1]  # no blank/unk pieces
            if ids:
                items.append((ids, boost))
        return cls(items)

    def __len__(self) -> int:
        return len(self.children) - 1

    def step(self, state: int, acc: float, token: int, word_start: bool, starts_word: bool) -> tuple[int, float, float]:
        """Advance by one emitted token.  ``acc`` is the bonus not yet kept (what a failure takes
        back); ``word_start``: a phrase may begin at this token; ``starts_word``: the token itself
        opens a new word (``▁``-initial), which confirms a phrase completed on the previous token.
        Returns (new state, new acc, score delta)."""
        delta = 0.0
        if state:
            if self.is_end[state] and starts_word:
                acc = 0.0  # the phrase is followed by a word boundary: its bonus is kept
            nxt = self.children[state].get(token)
            if nxt is not None:
                gain = self.boost[nxt]
                return nxt, acc + gain, gain
            delta = -acc  # left the trie mid-phrase (or the "phrase" went on as a longer word)
            state, acc = 0, 0.0
        if word_start:
            nxt = self.children[0].get(token)
            if nxt is not None:
                gain = self.boost[nxt]
                return nxt, gain, delta + gain
        return 0, 0.0, delta

    def finish(self, state: int, acc: float) -> float:
        """Score delta at the end of the utterance: a complete phrase keeps its bonus, an unfinished
        one gives it back."""
        return 0.0 if self.is_end[state] else -acc
