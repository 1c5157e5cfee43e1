"""Positional encodings and multi-head self-attention (absolute and
Transformer-XL style relative positions), built on
``torch.nn.functional.scaled_dot_product_attention``."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from harken.models.registry import EncoderConfig

NEG_INF = -1e9  # finite "minus infinity": fully masked rows stay NaN-free


def sinusoid(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """(...) float positions -> (..., d_model) sin/cos embedding (interleaved); e.g. (N,) -> (N, D),
    or (B, C) per-row positions of batched streaming chunks -> (B, C, D)."""
    half = torch.arange(0, d_model, 2, device=positions.device, dtype=torch.float32)
    inv = torch.exp(half * (-math.log(10000.0) / d_model))
    ang = positions.to(torch.float32)[..., None] * inv
    return torch.stack([torch.sin(ang), torch.cos(ang)], dim=-1).flatten(-2)


def abs_pos_emb(length: int | torch.Tensor, d_model: int, device=None) -> torch.Tensor:
    """(T, d_model) absolute sinusoidal embedding for positions 0..T-1."""
    pos = torch.arange(length, device=device, dtype=torch.float32)
    return sinusoid(pos, d_model)


def rel_pos_emb(length: int | torch.Tensor, d_model: int, device=None) -> torch.Tensor:
    """(2T-1, d_model) embedding of relative distances T-1, T-2, ..., -(T-1)."""
    pos = torch.arange(length - 1, -length, -1, device=device, dtype=torch.float32)
    return sinusoid(pos, d_model)


def rel_pos_emb_window(klen: int | torch.Tensor, qlen: int | torch.Tensor, d_model: int,
                       device=None) -> torch.Tensor:
    """(klen+qlen-1, d_model) embedding of distances klen-1, ..., -(qlen-1): what ``qlen`` queries
    (the last ``qlen`` of ``klen`` keys, as in chunked streaming with a cache) need.
    ``rel_pos_emb_window(t, t) == rel_pos_emb(t)``."""
    pos = torch.arange(klen - 1, -qlen, -1, device=device, dtype=torch.float32)
    return sinusoid(pos, d_model)


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """(B,H,Tq,Tk+Tq-1) scores indexed by relative-position slot k (distance
    Tk-1-k) -> (B,H,Tq,Tk) with out[..., i, j] = x[..., i, Tq-1-i+j], i.e. the
    score for distance (Tk-Tq+i)-j: the queries are the last Tq of the Tk keys
    (Tq == Tk for the full sequence; Tq < Tk with a streaming cache).
    Pad/reshape trick: one copy, no gather."""
    b, h, t, p = x.shape  # p == tk + t - 1
    x = F.pad(x, (1, 0)).flatten(2)  # (B,H,T*(P+1)); row i holds [0, x[i]]
    # element (i, j) of the (T, P) view of flat[T:] sits at flat index
    # (P+1)*i + (T - i + j), i.e. padded column T-i+j = x[i, T-1-i+j]
    return x[..., t:].unflatten(-1, (t, p))[..., : p - t + 1]


class MultiHeadSelfAttention(nn.Module):
    """Fused-QKV multi-head self-attention.

    With ``rel=True`` it computes Transformer-XL / Conformer relative-position
    attention::

        score[i,j] = ((q_i + u) . k_j + (q_i + v) . p_{i-j}) / sqrt(d_k)

    The positional term ``matrix_bd`` (already scaled and rel-shifted) plus the
    additive key-padding mask is handed to SDPA as a float ``attn_mask`` with
    ``query = q + u``.
    """

    def __init__(self, cfg: EncoderConfig, rel: bool):
        super().__init__()
        d = cfg.d_model
        if d % cfg.num_heads:
            raise ValueError("d_model must be divisible by num_heads")
        self.h = cfg.num_heads
        self.dk = d // cfg.num_heads
        self.rel = rel
        self.attn_dropout = cfg.attn_dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        if rel:
            self.linear_pos = nn.Linear(d, d, bias=False)
            self.pos_bias_u = nn.Parameter(torch.empty(self.h, self.dk))
            self.pos_bias_v = nn.Parameter(torch.empty(self.h, self.dk))
            nn.init.xavier_uniform_(self.pos_bias_u)
            nn.init.xavier_uniform_(self.pos_bias_v)

    def _qkv(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, self.dk).unbind(2)
        return q, k.transpose(1, 2), v.transpose(1, 2)  # q: (B,T,H,dk)

    def pos_scores(self, q: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """Scaled, rel-shifted positional scores (B,H,T,Tk) for q (B,T,H,dk) and ``pos_emb`` of
        Tk+T-1 distances (Tk = T for the full sequence)."""
        scale = 1.0 / math.sqrt(self.dk)
        p = self.linear_pos(pos_emb).view(1, -1, self.h, self.dk).permute(0, 2, 3, 1)
        qv = ((q + self.pos_bias_v) * scale).transpose(1, 2)  # (B,H,T,dk)
        return rel_shift(torch.matmul(qv, p))  # (B,H,T,Tk+T-1) -> (B,H,T,Tk)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        pos_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B,T,D); mask: additive float (B,1,1,T) (0 valid / NEG_INF pad)
        for rel, or boolean (B,1,1,T) True=attend for abs."""
        b, t, d = x.shape
        q, k, v = self._qkv(x)
        drop = self.attn_dropout if self.training else 0.0
        if self.rel:
            bias = self.pos_scores(q, pos_emb) + mask
            qu = (q + self.pos_bias_u).transpose(1, 2)
            o = F.scaled_dot_product_attention(qu, k, v, attn_mask=bias, dropout_p=drop)
        else:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, dropout_p=drop)
        return self.out(o.transpose(1, 2).reshape(b, t, d))

    def forward_chunk(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        pos_emb: torch.Tensor | None,
        cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Streaming step. x (B,C,D): the chunk's queries; ``cache`` (B,H,R,2*dk): keys and values
        of the R earlier frames (R may be 0); ``mask``: additive float (rel) / bool (abs)
        (B,1,1,R+C) key mask or None; ``pos_emb``: (R+2C-1, D) from :func:`rel_pos_emb_window`.
        Returns (out (B,C,D), new cache (B,H,R+C,2*dk))."""
        b, c, d = x.shape
        q, k, v = self._qkv(x)
        kv = torch.cat([cache, torch.cat([k, v], dim=-1)], dim=2)
        k, v = kv.split(self.dk, dim=-1)
        if self.rel:
            bias = self.pos_scores(q, pos_emb)
            if mask is not None:
                bias = bias + mask
            qu = (q + self.pos_bias_u).transpose(1, 2)
            o = F.scaled_dot_product_attention(qu, k, v, attn_mask=bias)
        else:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(b, c, d)), kv

    def forward_explicit(self, x, valid: torch.Tensor, pos_emb=None):
        """Reference implementation (no SDPA, no rel-shift trick; gathers the
        relative-position scores by index).  ``valid``: bool (B,T).  Tests only."""
        b, t, d = x.shape
        q, k, v = self._qkv(x)
        if self.rel:
            p = self.linear_pos(pos_emb).view(-1, self.h, self.dk).transpose(0, 1)  # (H,2T-1,dk)
            qu = (q + self.pos_bias_u).transpose(1, 2)
            qv = (q + self.pos_bias_v).transpose(1, 2)
            ac = qu @ k.transpose(-2, -1)
            i = torch.arange(t)[:, None]
            j = torch.arange(t)[None, :]
            idx = (t - 1) - (i - j)  # slot of distance i-j
            pij = p[:, idx]  # (H,T,T,dk)
            bd = torch.einsum("bhid,hijd->bhij", qv, pij)
            scores = (ac + bd) / math.sqrt(self.dk)
        else:
            scores = (q.transpose(1, 2) @ k.transpose(-2, -1)) / math.sqrt(self.dk)
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        o = torch.softmax(scores, dim=-1) @ v
        return self.out(o.transpose(1, 2).reshape(b, t, d))
