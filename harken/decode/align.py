"""CTC forced alignment: the single best path of a known token sequence through CTC posteriors.

The CTC topology for tokens ``y1..yL`` is the state sequence ``blank y1 blank y2 ... yL blank``
(``S = 2L + 1`` states). A path starts in state 0 or 1, ends in state ``S-1`` or ``S-2``, and at
each frame stays, moves one state on, or skips a blank (``s-2 -> s``) when ``y_s`` differs from
``y_{s-2}`` (a repeated token needs a blank between its two copies). :func:`align` runs Viterbi
over that graph, vectorised over the states with one small numpy step per frame (about 40 us per
frame for 800 states; T = 3000 frames - two minutes of audio - takes ~0.1 s).

:func:`word_alignment` groups the token spans into words at word-boundary symbols (``▁``) and
converts frames to seconds. Frame ``t`` of the model output covers
``[offset + t * step, offset + (t + 1) * step)`` with ``step = frame_shift * subsampling``.

Confidence: a token's ``score`` is ``exp(mean log p(token | frame))`` over the frames that the
aligned path spends in that token (a geometric-mean posterior, in (0, 1]); a word's confidence is
the same quantity over all frames of all its tokens (blank frames are not counted).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch

SPACE = "\u2581"

__all__ = ["AlignmentError", "TokenSpan", "WordSpan", "align", "min_frames", "word_alignment",
           "align_text", "frame_offset"]


class AlignmentError(ValueError):
    """The transcript cannot be aligned to the posteriors (too few frames, or no finite path)."""


class TokenSpan(NamedTuple):
    token: int
    start: int  # first frame (inclusive)
    end: int  # last frame (inclusive)
    score: float  # exp(mean log posterior of the token over start..end)


class WordSpan(NamedTuple):
    word: str
    start: float  # seconds
    end: float  # seconds
    confidence: float  # exp(mean log posterior over the frames of the word's tokens)
    start_frame: int
    end_frame: int  # inclusive


def min_frames(token_ids: Sequence[int]) -> int:
    """Fewest frames a CTC path for ``token_ids`` needs: one per token plus one blank between each
    pair of equal neighbours."""
    ids = list(token_ids)
    return len(ids) + sum(1 for a, b in zip(ids, ids[1:]) if a == b)


def align(log_probs: torch.Tensor, token_ids: Sequence[int], blank: int = 0) -> list[TokenSpan]:
    """Viterbi alignment of ``token_ids`` to ``log_probs`` (T, V) (log posteriors of one utterance,
    padding removed). Returns one :class:`TokenSpan` per token, in order.

    Raises :class:`AlignmentError` when the sequence needs more frames than there are or when no
    path has a finite score."""
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be (T, V), got shape {tuple(log_probs.shape)}")
    ids = [int(i) for i in token_ids]
    T, V = log_probs.shape
    if not ids:
        return []
    if any(i < 0 or i >= V for i in ids):
        raise ValueError(f"token ids must be in [0, {V}), got {ids}")
    if blank in ids:
        raise ValueError("token_ids must not contain the blank id")
    need = min_frames(ids)
    if T < need:
        raise AlignmentError(
            f"cannot align {len(ids)} tokens to {T} frames: the transcript needs at least {need} "
            f"frames (one per token plus a blank between repeated tokens); the audio is too short "
            f"for the text")

    lp = log_probs.detach().to(torch.float32).cpu()
    L = len(ids)
    S = 2 * L + 1
    ext = np.full(S, blank, dtype=np.int64)
    ext[1::2] = ids
    emit = lp[:, torch.from_numpy(ext)].numpy()  # (T, S) log p(state's symbol | frame)
    skip_ok = np.zeros(S, dtype=bool)  # s-2 -> s allowed: s is a token unlike the token at s-2
    if L > 1:
        skip_ok[3::2] = ext[3::2] != ext[1:-2:2]

    # The recursion runs in numpy: one small vector step per frame; torch's per-op overhead (and
    # its intra-op threads fighting over busy cores) made the same loop 2-15x slower.
    alpha = np.full(S, -np.inf, dtype=np.float32)
    alpha[0], alpha[1] = emit[0, 0], emit[0, 1]
    back = np.zeros((T, S), dtype=np.uint8)
    cand = np.full((3, S), -np.inf, dtype=np.float32)
    cols = np.arange(S)
    for t in range(1, T):
        cand[0] = alpha
        cand[1, 1:] = alpha[:-1]
        cand[2, 2:] = np.where(skip_ok[2:], alpha[:-2], -np.inf)
        arg = cand.argmax(axis=0)
        back[t] = arg
        alpha = cand[arg, cols] + emit[t]

    last = S - 1 if alpha[S - 1] >= alpha[S - 2] else S - 2
    if not math.isfinite(float(alpha[last])):
        raise AlignmentError(f"no finite-score CTC path for {L} tokens over {T} frames "
                             f"(posteriors of the transcript's tokens are zero somewhere)")

    # backtrack
    bp = back
    states = np.empty(T, dtype=np.int64)
    s = last
    for t in range(T - 1, -1, -1):
        states[t] = s
        s -= int(bp[t, s])

    frame_lp = emit[np.arange(T), states]  # (T,)
    spans: list[TokenSpan] = []
    token_states = states % 2 == 1
    frames = np.nonzero(token_states)[0]
    # contiguous runs of the same state = one token occurrence
    run_start = 0
    for k in range(1, len(frames) + 1):
        if k == len(frames) or states[frames[k]] != states[frames[k - 1]] or frames[k] != frames[k - 1] + 1:
            a, b = int(frames[run_start]), int(frames[k - 1])
            st = int(states[a])
            spans.append(TokenSpan(int(ext[st]), a, b, float(np.exp(frame_lp[a: b + 1].mean()))))
            run_start = k
    assert len(spans) == L, (len(spans), L)
    return spans


def frame_offset(frame_shift: float = 0.01, subsampling: int = 4, frame_length: float = 0.025) -> float:
    """Seconds to add to ``t * step`` so that output frame ``t`` is centred on what it sees.

    With 4x conv subsampling (two 3x3 stride-2 convolutions, no padding) output frame ``t`` sees
    feature frames ``4t .. 4t+6`` (centre ``4t + 3``), and feature frame ``i`` is centred at
    ``i * frame_shift + frame_length / 2``. Centring a window of one ``step`` there gives
    ``offset = frame_length / 2 + (subsampling - 1) * frame_shift - step / 2`` (22.5 ms for the
    defaults)."""
    step = frame_shift * subsampling
    return frame_length / 2 + (subsampling - 1) * frame_shift - step / 2


def word_alignment(spans: Sequence[TokenSpan], symbols: Sequence[str], frame_shift: float = 0.01,
                   subsampling: int = 4, offset: float = 0.0, words: Sequence[str] | None = None,
                   num_frames: int | None = None) -> list[WordSpan]:
    """Group token spans into words.

    A symbol starting with ``▁`` ends the current word; if it carries more characters (a BPE
    piece) it also starts the next one, otherwise (the char tokenizer's bare ``▁``) it belongs to
    no word. ``words``: the transcript's words, used as the word labels when their number matches
    (so characters the tokenizer maps to ``<unk>`` come back as written). ``num_frames`` clamps
    end times to the audio."""
    step = frame_shift * subsampling
    groups: list[list[TokenSpan]] = []
    labels: list[str] = []
    cur: list[TokenSpan] | None = None
    for sp in spans:
        sym = symbols[sp.token]
        if sym.startswith(SPACE):
            if cur:
                groups.append(cur)
            piece = sym[len(SPACE):]
            cur = [sp] if piece else None
            if piece:
                labels.append(piece)
        elif cur is None:
            cur = [sp]
            labels.append(sym)
        else:
            cur.append(sp)
            labels[-1] += sym
    if cur:
        groups.append(cur)
    if words is not None and len(words) == len(groups):
        labels = list(words)
    limit = None if num_frames is None else max(0.0, num_frames * step + offset)
    out = []
    for label, g in zip(labels, groups):
        n = np.array([s.end - s.start + 1 for s in g], dtype=np.float64)
        logs = np.log(np.maximum([s.score for s in g], 1e-30))
        conf = float(np.exp((n * logs).sum() / n.sum()))
        start = max(0.0, g[0].start * step + offset)
        end = (g[-1].end + 1) * step + offset
        if limit is not None:
            end = min(end, limit)
            start = min(start, end)
        out.append(WordSpan(label, start, end, conf, g[0].start, g[-1].end))
    return out


def align_text(log_probs: torch.Tensor, text: str, tokenizer, frame_shift: float = 0.01,
               subsampling: int = 4, offset: float = 0.0) -> list[WordSpan]:
    """Encode ``text`` with ``tokenizer``, align it to ``log_probs`` (T, V) and return its words."""
    ids = [i for i in tokenizer.encode(text) if i != tokenizer.blank_id]
    spans = align(log_probs, ids, blank=tokenizer.blank_id)
    return word_alignment(spans, tokenizer.tokens, frame_shift, subsampling, offset,
                          words=text.split(), num_frames=log_probs.shape[0])
