"""Word n-gram language models: an interpolated modified Kneser-Ney estimator that writes ARPA files,
and a small ARPA reader/scorer used by the beam search.

Estimator (Chen & Goodman 1998, "interpolated modified Kneser-Ney", the variant lmplz implements):

* sentences are padded as ``<s> w1 .. wk </s>`` (one ``<s>``);
* the highest order uses raw counts; lower orders use *adjusted* counts: the number of distinct words
  seen to the left of the n-gram (continuation counts), except n-grams that begin with ``<s>``, which
  keep their raw counts (nothing can precede ``<s>``);
* per order n, discounts from the count-of-counts t1..t4 of the adjusted counts::

      Y = t1 / (t1 + 2 t2);  D1 = 1 - 2Y t2/t1;  D2 = 2 - 3Y t3/t2;  D3+ = 3 - 4Y t4/t3

  (when some t_k is 0 or a discount falls outside (0, k) -- tiny corpora -- the fallback
  (0.5, 1.0, 1.5) is used, like ``lmplz --discount_fallback``);
* ``p(w|h) = (a(hw) - D(a(hw))) / sum_x a(hx) + gamma(h) p(w|h')`` with
  ``gamma(h) = (D1 N1(h.) + D2 N2(h.) + D3 N3+(h.)) / sum_x a(hx)``; histories never seen fall back
  to ``p(w|h')``; unigrams interpolate with the uniform distribution over the vocabulary (all words,
  ``</s>`` and ``<unk>``; not ``<s>``), so ``<unk>`` receives the left-over mass.

The interpolated model is written in backoff form without approximation: every n-gram with a
non-zero adjusted count is listed with its interpolated probability, and the backoff weight of a
history is its gamma.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import tempfile
import threading
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

log = logging.getLogger("harken.lm")

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
LN10 = math.log(10.0)
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)

__all__ = ["KneserNey", "ArpaLM", "build_lm", "compute_discounts", "read_sentences", "load_lm"]


def compute_discounts(count_of_counts: Sequence[int]) -> tuple[float, float, float] | None:
    """Modified-KN discounts (D1, D2, D3+) from t1..t4; None when they cannot be estimated."""
    t1, t2, t3, t4 = (list(count_of_counts) + [0, 0, 0, 0])[:4]
    if min(t1, t2, t3, t4) <= 0:
        return None
    y = t1 / (t1 + 2.0 * t2)
    d = (1.0 - 2.0 * y * t2 / t1, 2.0 - 3.0 * y * t3 / t2, 3.0 - 4.0 * y * t4 / t3)
    if not all(0.0 < dk < k for dk, k in zip(d, (1, 2, 3))):
        return None
    return d


class KneserNey:
    """Interpolated modified Kneser-Ney n-gram model estimated from tokenized sentences.

    ``discounts``: optional fixed (D1, D2, D3+) for every order (tests, tiny corpora); otherwise
    estimated per order with the fallback described in the module docstring.
    """

    def __init__(self, sentences: Iterable[Sequence[str]], order: int = 3,
                 discounts: Sequence[float] | None = None):
        if order < 1:
            raise ValueError("order must be >= 1")
        self.order = order
        raw: list[dict[tuple, int]] = [defaultdict(int) for _ in range(order + 1)]  # index = n
        n_sent = 0
        for words in sentences:
            s = (BOS, *words, EOS)
            n_sent += 1
            for n in range(1, order + 1):
                cn = raw[n]
                for i in range(len(s) - n + 1):
                    cn[s[i:i + n]] += 1
        if n_sent == 0:
            raise ValueError("no sentences to estimate a language model from")
        # adjusted counts
        adj: list[dict[tuple, int]] = [dict() for _ in range(order + 1)]
        adj[order] = dict(raw[order])
        for n in range(order - 1, 0, -1):
            cont: dict[tuple, int] = defaultdict(int)
            for g in raw[n + 1]:
                cont[g[1:]] += 1
            a = adj[n]
            for g, c in raw[n].items():
                a[g] = c if g[0] == BOS else cont[g]
        adj[1].pop((BOS,), None)  # <s> is never predicted
        self.adjusted = adj
        vocab = {g[0] for g in adj[1]} | {EOS, UNK}
        self.vocab = sorted(vocab)  # predicted words (no <s>)
        # discounts per order
        self.discounts: list[tuple[float, float, float]] = [FALLBACK_DISCOUNTS] * (order + 1)
        self.count_of_counts: list[list[int]] = [[0, 0, 0, 0] for _ in range(order + 1)]
        for n in range(1, order + 1):
            coc = [0, 0, 0, 0]
            for c in adj[n].values():
                if 1 <= c <= 4:
                    coc[c - 1] += 1
            self.count_of_counts[n] = coc
            if discounts is not None:
                d = tuple(float(x) for x in discounts)
            else:
                d = compute_discounts(coc)
                if d is None:
                    log.warning("order %d: count-of-counts %s give no valid discounts; using fallback %s",
                                n, coc, FALLBACK_DISCOUNTS)
                    d = FALLBACK_DISCOUNTS
            self.discounts[n] = d  # type: ignore[assignment]
        # per-history statistics: denominator and gamma numerator, per order
        self._denom: list[dict[tuple, float]] = [dict() for _ in range(order + 1)]
        self._gamma: list[dict[tuple, float]] = [dict() for _ in range(order + 1)]
        for n in range(1, order + 1):
            d1, d2, d3 = self.discounts[n]
            den: dict[tuple, float] = defaultdict(float)
            gam: dict[tuple, float] = defaultdict(float)
            for g, c in adj[n].items():
                h = g[:-1]
                den[h] += c
                gam[h] += d1 if c == 1 else (d2 if c == 2 else d3)
            self._denom[n] = dict(den)
            self._gamma[n] = {h: gam[h] / den[h] for h in den}

    def _disc(self, n: int, c: int) -> float:
        d1, d2, d3 = self.discounts[n]
        return d1 if c == 1 else (d2 if c == 2 else d3)

    def prob(self, word: str, history: Sequence[str] = ()) -> float:
        """P(word | history) computed directly from the counts (reference implementation)."""
        vocab1 = self.adjusted[1]
        word = word if (word,) in vocab1 or word in (EOS, UNK) else UNK
        h = tuple(x if ((x,) in vocab1 or x == BOS) else UNK for x in history)
        h = h[len(h) - min(len(h), self.order - 1):]
        return self._p(len(h) + 1, word, h)

    def _p(self, n: int, w: str, h: tuple) -> float:
        if n == 1:
            den = self._denom[1].get((), 0.0)
            c = self.adjusted[1].get((w,), 0)
            u = (c - self._disc(1, c)) / den if c else 0.0
            return u + self._gamma[1].get((), 1.0) / len(self.vocab)
        den = self._denom[n].get(h)
        lower = self._p(n - 1, w, h[1:])
        if den is None:
            return lower
        c = self.adjusted[n].get(h + (w,), 0)
        u = (c - self._disc(n, c)) / den if c else 0.0
        return u + self._gamma[n][h] * lower

    def write_arpa(self, path: str | os.PathLike) -> None:
        order = self.order
        entries: list[list[tuple[tuple, float, float | None]]] = [[] for _ in range(order + 1)]
        for n in range(1, order + 1):
            grams = list(self.adjusted[n])
            if n == 1:
                grams = [g for g in grams] + [(w,) for w in (EOS, UNK) if (w,) not in self.adjusted[1]]
                grams.append((BOS,))
            for g in sorted(set(grams)):
                if g == (BOS,):
                    lp = -99.0
                else:
                    lp = math.log10(self._p(n, g[-1], g[:-1]))
                bo = None
                if n < order:
                    gm = self._gamma[n + 1].get(g)
                    bo = math.log10(gm) if gm else 0.0
                entries[n].append((g, lp, bo))
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w", encoding="utf-8") as f:
            f.write("\n\\data\\\n")
            for n in range(1, order + 1):
                f.write(f"ngram {n}={len(entries[n])}\n")
            for n in range(1, order + 1):
                f.write(f"\n\\{n}-grams:\n")
                for g, lp, bo in entries[n]:
                    if bo is None:
                        f.write(f"{lp:.7f}\t{' '.join(g)}\n")
                    else:
                        f.write(f"{lp:.7f}\t{' '.join(g)}\t{bo:.7f}\n")
            f.write("\n\\end\\\n")


class ArpaLM:
    """An ARPA backoff model held in dictionaries; scores like KenLM (OOV words -> ``<unk>``).

    Decoding API: ``begin()`` -> state, ``score(state, word)`` -> (log10 prob, next state),
    ``end(state)`` -> log10 P(</s> | state).  States are tuples of the last words, shortened to the
    longest suffix that is itself a listed n-gram (KenLM's state minimisation: exact, and it makes the
    score cache hit more often).

    Scores are cached per model, at most ``SCORE_CACHE_SIZE`` entries; the model is safe to share
    between threads (its tables are read-only after loading)."""

    SCORE_CACHE_SIZE = 200_000

    def __init__(self, probs: list[dict[tuple, float]], backoffs: list[dict[tuple, float]]):
        self.order = len(probs) - 1
        self.probs = probs
        self.backoffs = backoffs
        self.vocab = {g[0] for g in probs[1]}
        if (UNK,) not in probs[1]:
            probs[1][(UNK,)] = -100.0
            self.vocab.add(UNK)
        self._cache: dict[tuple, tuple[float, tuple]] = {}  # bounded: see SCORE_CACHE_SIZE
        self._prefixes: set[str] | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ArpaLM":
        probs: list[dict[tuple, float]] = [dict()]
        backoffs: list[dict[tuple, float]] = [dict()]
        n = 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                if line.startswith("\\"):
                    if line.endswith("-grams:"):
                        n = int(line[1:line.index("-")])
                        while len(probs) <= n:
                            probs.append(dict())
                            backoffs.append(dict())
                    elif line == "\\end\\":
                        break
                    continue
                if n == 0:
                    continue  # \data\ section
                parts = line.split()
                g = tuple(parts[1:1 + n])
                probs[n][g] = float(parts[0])
                if len(parts) > n + 1:
                    bo = float(parts[n + 1])
                    if bo != 0.0:
                        backoffs[n][g] = bo
        if len(probs) < 2 or not probs[1]:
            raise ValueError(f"{path}: no unigrams; not an ARPA file?")
        return cls(probs, backoffs)

    # ------------------------------------------------------------------------------------------
    def logp(self, word: str, history: Sequence[str] = ()) -> float:
        """log10 P(word | history) by backoff."""
        if word not in self.vocab:
            word = UNK
        h = tuple(x if x in self.vocab else UNK for x in history)
        h = h[len(h) - min(len(h), self.order - 1):]
        bo = 0.0
        for i in range(len(h) + 1):
            ctx = h[i:]
            g = ctx + (word,)
            p = self.probs[len(g)].get(g)
            if p is not None:
                return p + bo
            bo += self.backoffs[len(ctx)].get(ctx, 0.0) if ctx else 0.0
        raise AssertionError("unreachable: every word has a unigram")

    def _minimize(self, h: tuple) -> tuple:
        for i in range(len(h)):
            ctx = h[i:]
            if ctx in self.probs[len(ctx)]:
                return ctx
        return ()

    def begin(self) -> tuple:
        return self._minimize((BOS,)) if self.order > 1 else ()

    def score(self, state: tuple, word: str) -> tuple[float, tuple]:
        key = (state, word)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        w = word if word in self.vocab else UNK
        lp = self.logp(w, state)
        nxt = self._minimize((state + (w,))[-(self.order - 1):]) if self.order > 1 else ()
        if len(self._cache) >= self.SCORE_CACHE_SIZE:  # bounded: start over (cheap, thread-safe under the GIL)
            self._cache = {}
        self._cache[key] = (lp, nxt)
        return lp, nxt

    def end(self, state: tuple) -> float:
        return self.score(state, EOS)[0]

    def sentence_logp(self, words: Sequence[str], bos: bool = True, eos: bool = True) -> float:
        """log10 probability of a sentence (KenLM's ``Model.score``)."""
        state = self.begin() if bos else ()
        total = 0.0
        for w in words:
            lp, state = self.score(state, w)
            total += lp
        if eos:
            total += self.end(state)
        return total

    def is_word_prefix(self, s: str) -> bool:
        """Whether ``s`` begins some in-vocabulary word (used to penalise partial OOV words early)."""
        if self._prefixes is None:
            pre: set[str] = set()
            for w in self.vocab:
                if w in (BOS, EOS, UNK):
                    continue
                for i in range(1, len(w) + 1):
                    pre.add(w[:i])
            self._prefixes = pre
        return s in self._prefixes


_LM_CACHE: "OrderedDict[tuple, ArpaLM]" = OrderedDict()
_LM_CACHE_SIZE = 4  # loaded models kept (least recently used dropped first)
_LM_LOCK = threading.Lock()


def load_lm(path: str | os.PathLike) -> ArpaLM:
    """Load (and cache by path and modification time, at most ``_LM_CACHE_SIZE`` models) an ARPA
    language model. Thread-safe."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"language model {p} not found")
    key = (str(p.resolve()), p.stat().st_mtime_ns)
    with _LM_LOCK:
        lm = _LM_CACHE.get(key)
        if lm is not None:
            _LM_CACHE.move_to_end(key)
            return lm
    lm = ArpaLM.load(p)
    with _LM_LOCK:
        _LM_CACHE[key] = lm
        _LM_CACHE.move_to_end(key)
        while len(_LM_CACHE) > _LM_CACHE_SIZE:
            _LM_CACHE.popitem(last=False)
    return lm


def read_sentences(path: str | os.PathLike, normalize: bool = True) -> list[list[str]]:
    from harken.text.normalize import normalize_text

    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            s = normalize_text(line) if normalize else line.strip()
            if s:
                out.append(s.split())
    return out


def build_lm(text: str | os.PathLike, order: int, out: str | os.PathLike, normalize: bool = True,
             use_lmplz: bool | None = None) -> str:
    """Estimate an ARPA model from a text file (one sentence per line).  Uses ``lmplz`` when it is on
    PATH (``use_lmplz=None``), otherwise the built-in estimator.  Returns which one ran."""
    if order < 2:
        raise ValueError("order must be >= 2 (KenLM and the decoder need at least a bigram model)")
    sents = read_sentences(text, normalize)
    lmplz = shutil.which("lmplz")
    if use_lmplz is None:
        use_lmplz = lmplz is not None
    if use_lmplz:
        if lmplz is None:
            raise FileNotFoundError("lmplz is not on PATH")
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as tf:
            tf.write("\n".join(" ".join(s) for s in sents) + "\n")
        try:
            subprocess.run([lmplz, "-o", str(order), "--text", tf.name, "--arpa", str(out),
                            "--discount_fallback"], check=True, capture_output=True)
        finally:
            os.unlink(tf.name)
        return "lmplz"
    KneserNey(sents, order).write_arpa(out)
    return "harken"
