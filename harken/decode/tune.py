"""Tuning LM fusion weights on held-out data, and model log-probs for a manifest."""

from __future__ import annotations

from typing import Sequence

import torch

from harken.decode.beam import CtcBeamSearch
from harken.decode.context import ContextGraph
from harken.decode.lm import load_lm


def _wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    from harken.evaluate import error_report

    return error_report(refs, hyps).wer


def grid_search(log_probs_list: Sequence, refs: Sequence[str], tokenizer, lm_path: str,
                lm_weights: Sequence[float], word_bonuses: Sequence[float], beam_size: int = 8,
                topk: int = 8, blank_skip: float = 0.999, hotwords: Sequence[tuple[str, float]] = (),
                table: list | None = None) -> tuple[float, float, float]:
    """Decode every utterance (``log_probs_list``: one (T,V) array each, valid frames only) for each
    (lm_weight, word_bonus) and return the pair with the lowest WER as ``(weight, bonus, wer)``.
    Ties keep the first pair in grid order (weights outer, bonuses inner).  The top-k pruning and
    blank-skip work is done once; ``table`` (a list), if given, receives every (weight, bonus, wer)."""
    if len(log_probs_list) != len(refs):
        raise ValueError("one reference per utterance")
    ctx = ContextGraph.from_phrases(list(hotwords), tokenizer) if hotwords else None
    dec = CtcBeamSearch(tokenizer, beam_size=beam_size, topk=topk, blank_skip=blank_skip,
                        lm=load_lm(lm_path), context=ctx)
    prepared = []
    for lp in log_probs_list:
        lp = torch.as_tensor(lp)
        prepared.extend(dec.prepare(lp[None], torch.tensor([lp.shape[0]])))
    best: tuple[float, float, float] | None = None
    for w in lm_weights:
        for b in word_bonuses:
            dec.lm_weight, dec.word_bonus = float(w), float(b)
            hyps = [h[0].text for h in dec.decode_prepared(prepared)]
            wer = _wer(refs, hyps)
            if table is not None:
                table.append((float(w), float(b), wer))
            if best is None or wer < best[2]:
                best = (float(w), float(b), wer)
    if best is None:
        raise ValueError("empty grid")
    return best


def rescore_grid(nbests: Sequence[Sequence], rescores: Sequence[Sequence[float]], refs: Sequence[str],
                 weights: Sequence[float], table: list | None = None) -> tuple[float, float]:
    """The rescoring weight (``harken.decode.rescore``) with the lowest WER as ``(weight, wer)``:
    ``nbests`` holds each utterance's beam hypotheses, ``rescores`` Whisper's log-probs of them.
    Weight 0 is the first pass alone; ties keep the first weight in grid order."""
    from harken.decode.rescore import pick_best

    if not (len(nbests) == len(rescores) == len(refs)):
        raise ValueError("one n-best list, one score list and one reference per utterance")
    best: tuple[float, float] | None = None
    for w in weights:
        hyps = [hs[pick_best([h.score for h in hs], sc, float(w))].text if hs else ""
                for hs, sc in zip(nbests, rescores)]
        wer = _wer(refs, hyps)
        if table is not None:
            table.append((float(w), wer))
        if best is None or wer < best[1]:
            best = (float(w), wer)
    if best is None:
        raise ValueError("empty grid")
    return best
