"""Greedy CTC decoding: best token per frame, merge repeats, drop blanks."""

from __future__ import annotations

import torch


def greedy_ids(log_probs: torch.Tensor, lens: torch.Tensor, blank: int = 0) -> list[list[int]]:
    best = log_probs.argmax(-1).cpu()  # (B, T)
    out = []
    for b in range(best.shape[0]):
        seq = best[b, : int(lens[b])]
        if seq.numel() == 0:
            out.append([])
            continue
        keep = torch.ones_like(seq, dtype=torch.bool)
        keep[1:] = seq[1:] != seq[:-1]
        seq = seq[keep]
        out.append(seq[seq != blank].tolist())
    return out


def greedy_frames(log_probs: torch.Tensor, lens: torch.Tensor, blank: int = 0):
    """Per utterance: list of (token id, first frame, last frame, mean posterior) for each emitted
    token; used for rough token times and confidences."""
    probs, best = log_probs.float().exp().max(-1)
    results = []
    for b in range(best.shape[0]):
        n = int(lens[b])
        seq, pr = best[b, :n].tolist(), probs[b, :n].tolist()
        toks, prev = [], blank
        for t, (tok, p) in enumerate(zip(seq, pr)):
            if tok != blank and tok != prev:
                toks.append([tok, t, t, [p]])
            elif tok != blank and tok == prev and toks:
                toks[-1][2] = t
                toks[-1][3].append(p)
            prev = tok
        results.append([(k, s, e, sum(ps) / len(ps)) for k, s, e, ps in toks])
    return results
