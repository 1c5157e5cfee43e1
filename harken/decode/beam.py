"""CTC prefix beam search with optional word n-gram LM shallow fusion and hotword biasing.

The search keeps, for every prefix (label sequence) in the beam, the log probability of all its
alignments that end in a blank (``pb``) and in its last token (``pnb``).  Per frame:

* blank:            prefix keeps its labels,     pb'  += (pb + pnb) * P(blank)
* repeat last tok:  prefix keeps its labels,     pnb' += pnb * P(tok)
                    prefix + tok (after blank),  pnb' += pb * P(tok)
* other token k:    prefix + k,                  pnb' += (pb + pnb) * P(k)

Speed-ups (both switchable off, e.g. for the exact tests): only the ``topk`` most likely non-blank
tokens of a frame are expanded, and a frame whose blank posterior exceeds ``blank_skip`` is treated
as pure blank (all mass moves into ``pb``; consecutive such frames are folded into one step).  The
per-frame top-k and the skip mask are computed for the whole batch at once in torch; the beam
bookkeeping itself is plain Python over a prefix trie (each prefix is an int node: extending it is a
dict lookup, never a tuple copy), which for beams of ~8 is faster than tensor ops.

Language model (shallow fusion): words are delimited by tokens that start with ``▁`` (a bare ``▁``
for the char tokenizer, ``▁piece`` for BPE).  When a word is complete -- the next ``▁`` token or the
end of the utterance -- the hypothesis gains ``lm_weight * ln P_lm(word | history) + word_bonus``;
``</s>`` is scored at the end.  While a word is being spelled, a hypothesis whose partial word begins
no word of the LM vocabulary is ranked with the LM's ``<unk>`` score in advance (``unk_lookahead``),
which is withdrawn when the word completes and is scored for real, so final scores are exact.

Final hypothesis score = acoustic log prob (sum over the alignments that stayed in the beam)
+ lm_weight * LM log prob (natural log) + word_bonus * words + hotword bonuses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from harken.decode.context import ContextGraph
from harken.decode.lm import LN10, UNK, ArpaLM

SPACE = "\u2581"
NEG = float("-inf")
_UNK_MARK = "\x00"


@dataclass
class Hypothesis:
    tokens: list[int]
    text: str
    score: float  # total: am_score + lm_weight * lm_score + word_bonus * num_words + hotword bonus
    am_score: float = 0.0  # acoustic log prob (natural log)
    lm_score: float = 0.0  # LM log prob, natural log, unweighted (0 without LM)
    num_words: int = 0
    frames: list[int] = field(default_factory=list)  # frame at which each token was first emitted


def _lae(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    if b == NEG:
        return a
    return a + math.log1p(math.exp(b - a))


class CtcBeamSearch:
    """Reusable decoder for one tokenizer (and optionally an LM and hotwords).

    Args:
        tokenizer: a harken tokenizer (``tokens`` list, blank 0, unk 1, ``decode``).
        beam_size: prefixes kept per frame.
        topk: non-blank tokens expanded per frame (0 or >= vocab: all).
        blank_skip: frames with P(blank) above this are treated as pure blank (>= 1: off).
        lm: an ``ArpaLM`` (or anything with begin/score/end/is_word_prefix); None: no LM.
        lm_weight, word_bonus: fusion weights (used only with an LM).
        context: a ``ContextGraph`` of hotwords, or None.
        unk_lookahead: rank partial out-of-vocabulary words with the LM's <unk> score early.
    """

    def __init__(self, tokenizer, beam_size: int = 8, topk: int = 8, blank_skip: float = 0.999,
                 lm: ArpaLM | None = None, lm_weight: float = 0.5, word_bonus: float = 0.0,
                 context: ContextGraph | None = None, unk_lookahead: bool = True):
        self.tokenizer = tokenizer
        self.beam_size = max(1, int(beam_size))
        self.topk = int(topk)
        self.blank_skip = float(blank_skip)
        self.lm = lm
        self.lm_weight = float(lm_weight)
        self.word_bonus = float(word_bonus)
        self.context = context if context is not None and len(context) else None
        self.unk_lookahead = unk_lookahead
        toks = list(tokenizer.tokens)
        self.vocab_size = len(toks)
        self.starts_word = [t.startswith(SPACE) for t in toks]
        self.is_space = [t == SPACE for t in toks]
        pieces = [t[1:] if t.startswith(SPACE) else t for t in toks]
        pieces[1] = _UNK_MARK  # <unk> token
        self.pieces = pieces
        self.starts_word[0] = self.starts_word[1] = False
        self._unk_ln = 0.0
        if lm is not None:
            self._unk_ln = lm.score(lm.begin(), UNK)[0] * LN10

    # ------------------------------------------------------------------------------------------
    def _prepare(self, log_probs: torch.Tensor, lens: torch.Tensor):
        lp = torch.as_tensor(log_probs).detach().float().cpu()
        if lp.dim() == 2:
            lp = lp.unsqueeze(0)
        lens_l = [int(x) for x in torch.as_tensor(lens).reshape(-1).tolist()]
        v = lp.shape[-1]
        if v != self.vocab_size:
            raise ValueError(f"log_probs have {v} classes, tokenizer has {self.vocab_size}")
        blank = lp[..., 0]
        k = v - 1 if self.topk <= 0 or self.topk >= v - 1 else self.topk
        vals, idx = lp[..., 1:].topk(k, dim=-1, sorted=True)
        idx = idx + 1
        skip = blank > math.log(self.blank_skip) if self.blank_skip < 1.0 else torch.zeros_like(blank, dtype=torch.bool)
        return lens_l, blank.tolist(), vals.tolist(), idx.tolist(), skip.tolist()

    def decode(self, log_probs: torch.Tensor, lens: torch.Tensor, nbest: int = 1) -> list[list[Hypothesis]]:
        """log_probs (B,T,V) log-softmax (torch or numpy), lens (B,) -> per utterance up to ``nbest``
        hypotheses, best first."""
        return self.decode_prepared(self.prepare(log_probs, lens), nbest)

    def prepare(self, log_probs, lens) -> list[tuple]:
        """The per-frame blank scores, top-k candidates and skip flags of each utterance (batched
        torch work); ``decode_prepared`` runs the search on them, e.g. repeatedly while tuning."""
        lens_l, blank, vals, idx, skip = self._prepare(log_probs, lens)
        return [(blank[b][:n], vals[b][:n], idx[b][:n], skip[b][:n]) for b, n in enumerate(lens_l)]

    def decode_prepared(self, prepared: list[tuple], nbest: int = 1) -> list[list[Hypothesis]]:
        return [self._decode_one(*p, nbest) for p in prepared]

    # ------------------------------------------------------------------------------------------
    def _decode_one(self, blank, vals, idx, skip, nbest):
        lm, ctx = self.lm, self.context
        lmw, wb = self.lm_weight, self.word_bonus
        V = self.vocab_size
        starts_word, is_space, pieces = self.starts_word, self.is_space, self.pieces
        unk_look = self.unk_lookahead and lm is not None and hasattr(lm, "is_word_prefix")
        unk_pen = lmw * self._unk_ln

        # prefix trie, one entry per node
        parent = [-1]
        tok = [-1]
        frame = [-1]
        ext = [0.0]  # committed non-acoustic score (LM, bonuses, hotwords)
        rank = [0.0]  # ext + transient look-ahead penalty (what pruning sees)
        lm_ln = [0.0]
        nwords = [0]
        lm_state = [lm.begin() if lm is not None else ()]
        partial = [""]
        hstate = [0]
        hacc = [0.0]
        kids: dict[int, int] = {}

        def make(node: int, k: int, t: int) -> int:
            e = ext[node]
            st = lm_state[node]
            ll = lm_ln[node]
            nw = nwords[node]
            part = partial[node]
            if starts_word[k]:
                if part:
                    if lm is not None:
                        lp10, st = lm.score(st, UNK if _UNK_MARK in part else part)
                        ll += lp10 * LN10
                        e += lmw * lp10 * LN10 + wb
                    nw += 1
                part = pieces[k]
            else:
                part = part + pieces[k]
            hs, ha = 0, 0.0
            if ctx is not None:
                ws = node == 0 or starts_word[k] or is_space[tok[node]]
                hs, ha, d = ctx.step(hstate[node], hacc[node], k, ws, starts_word[k])
                e += d
            r = e
            if unk_look and part and (_UNK_MARK in part or not lm.is_word_prefix(part)):
                r += unk_pen
            c = len(parent)
            parent.append(node)
            tok.append(k)
            frame.append(t)
            ext.append(e)
            rank.append(r)
            lm_ln.append(ll)
            nwords.append(nw)
            lm_state.append(st)
            partial.append(part)
            hstate.append(hs)
            hacc.append(ha)
            kids[node * V + k] = c
            return c

        beam = [(0, 0.0, NEG)]  # (node, pb, pnb)
        beam_size = self.beam_size
        pending = None  # folded log P(blank) of skipped frames
        for t in range(len(blank)):
            if skip[t]:
                pending = blank[t] if pending is None else pending + blank[t]
                continue
            if pending is not None:
                beam = [(n, _lae(pb, pnb) + pending, NEG) for n, pb, pnb in beam]
                pending = None
            lpb = blank[t]
            cands = list(zip(idx[t], vals[t]))
            npb: dict[int, float] = {}
            npnb: dict[int, float] = {}
            for node, pb, pnb in beam:
                ptot = _lae(pb, pnb)
                s = ptot + lpb
                v = npb.get(node)
                npb[node] = s if v is None else _lae(v, s)
                last = tok[node]
                for k, lpk in cands:
                    if k == last:
                        if pnb != NEG:
                            s = pnb + lpk
                            v = npnb.get(node)
                            npnb[node] = s if v is None else _lae(v, s)
                        if pb == NEG:
                            continue
                        s = pb + lpk
                    else:
                        s = ptot + lpk
                    c = kids.get(node * V + k)
                    if c is None:
                        c = make(node, k, t)
                    v = npnb.get(c)
                    npnb[c] = s if v is None else _lae(v, s)
            entries = []
            for node, pb in npb.items():
                pnb = npnb.pop(node, NEG)
                entries.append((_lae(pb, pnb) + rank[node], node, pb, pnb))
            for node, pnb in npnb.items():
                entries.append((pnb + rank[node], node, NEG, pnb))
            if len(entries) > beam_size:
                entries.sort(reverse=True)
                del entries[beam_size:]
            beam = [(n, pb, pnb) for _, n, pb, pnb in entries]
        if pending is not None:
            beam = [(n, _lae(pb, pnb) + pending, NEG) for n, pb, pnb in beam]

        # finish: score the last word and </s>, withdraw unfinished hotword bonus
        finals = []
        for node, pb, pnb in beam:
            am = _lae(pb, pnb)
            e, ll, nw = ext[node], lm_ln[node], nwords[node]
            part = partial[node]
            if part:
                nw += 1
                if lm is not None:
                    lp10, st = lm.score(lm_state[node], UNK if _UNK_MARK in part else part)
                    ll += lp10 * LN10
                    e += lmw * lp10 * LN10 + wb
                else:
                    st = lm_state[node]
            else:
                st = lm_state[node]
            if lm is not None:
                lp10 = lm.end(st) * LN10
                ll += lp10
                e += lmw * lp10
            if ctx is not None:
                e += ctx.finish(hstate[node], hacc[node])
            finals.append((am + e, am, ll, nw, node))
        finals.sort(key=lambda x: -x[0])
        out = []
        for total, am, ll, nw, node in finals[:max(1, nbest)]:
            ids, frs = [], []
            n = node
            while n > 0:
                ids.append(tok[n])
                frs.append(frame[n])
                n = parent[n]
            ids.reverse()
            frs.reverse()
            out.append(Hypothesis(tokens=ids, text=self.tokenizer.decode(ids), score=total, am_score=am,
                                  lm_score=ll, num_words=nw, frames=frs))
        return out


def ctc_prefix_beam_search(log_probs, lens, tokenizer, beam_size: int = 8, nbest: int = 1,
                           **kwargs) -> list[list[Hypothesis]]:
    """One-call form of ``CtcBeamSearch(tokenizer, beam_size, **kwargs).decode(log_probs, lens, nbest)``."""
    return CtcBeamSearch(tokenizer, beam_size=beam_size, **kwargs).decode(log_probs, lens, nbest)


def greedy_hypotheses(log_probs, lens, tokenizer) -> list[list[Hypothesis]]:
    """Greedy decoding wrapped as 1-best ``Hypothesis`` lists (score: log prob of the best path)."""
    from harken.decode.greedy import greedy_ids

    lp = torch.as_tensor(log_probs).detach().float().cpu()
    if lp.dim() == 2:
        lp = lp.unsqueeze(0)
    lens_t = torch.as_tensor(lens).reshape(-1)
    best = lp.max(-1).values
    out = []
    for b, ids in enumerate(greedy_ids(lp, lens_t)):
        n = int(lens_t[b])
        s = float(best[b, :n].sum())
        out.append([Hypothesis(tokens=ids, text=tokenizer.decode(ids), score=s, am_score=s,
                               num_words=len(tokenizer.decode(ids).split()))])
    return out


__all__ = ["Hypothesis", "CtcBeamSearch", "ctc_prefix_beam_search", "greedy_hypotheses"]

