"""Conformer encoder (pre-LN, macaron FF, rel-pos MHSA, conv module)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from harken.models.attention import (
    NEG_INF,
    MultiHeadSelfAttention,
    abs_pos_emb,
    rel_pos_emb,
    rel_pos_emb_window,
    sinusoid,
)
from harken.models.registry import EncoderConfig, register_encoder
from harken.models.subsampling import Conv2dSubsampling4


class FeedForward(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.w1 = nn.Linear(cfg.d_model, cfg.ff_dim)
        self.w2 = nn.Linear(cfg.ff_dim, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):  # returns the residual branch (pre-LN)
        # a single dropout on the d_model-sized output (an inner dropout on the
        # ff_dim-sized hidden costs ~5% of a CPU training step)
        return self.dropout(self.w2(F.silu(self.w1(self.norm(x)))))


class _DepthwiseConv1dFn(torch.autograd.Function):
    """Depthwise conv1d (no padding) with a hand-written backward: oneDNN's
    depthwise-conv backward on CPU is ~40x slower than its forward; here both
    gradients are themselves cheap grouped convolutions."""

    @staticmethod
    def forward(ctx, xp, w, b):  # xp (B,D,T+K-1), w (D,1,K), b (D,)
        ctx.save_for_backward(xp, w)
        return F.conv1d(xp, w, b, groups=w.size(0))

    @staticmethod
    def backward(ctx, g):
        xp, w = ctx.saved_tensors
        bsz, d, tp = xp.shape
        k = w.size(-1)
        t = tp - k + 1
        g = g.contiguous()
        gi = gw = gb = None
        if ctx.needs_input_grad[0]:
            gi = F.conv1d(g, w.flip(-1), padding=k - 1, groups=d)
        if ctx.needs_input_grad[1]:
            gw = F.conv1d(xp.reshape(1, bsz * d, tp), g.reshape(bsz * d, 1, t), groups=bsz * d)
            gw = gw.view(bsz, d, k).sum(0).unsqueeze(1)
        if ctx.needs_input_grad[2]:
            gb = g.sum((0, 2))
        return gi, gw, gb


def depthwise_conv1d(xp: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """``conv`` (groups == channels, padding 0) applied to pre-padded xp.
    The custom-backward path is used only when training on CPU, so eval-mode
    export (torch.export / ONNX) sees a plain ``conv1d``."""
    if conv.training and torch.is_grad_enabled() and xp.device.type == "cpu":
        return _DepthwiseConv1dFn.apply(xp.contiguous(), conv.weight, conv.bias)
    return conv(xp)


class ConvModule(nn.Module):
    """pointwise(2D) -> GLU -> depthwise(K) -> norm -> SiLU -> pointwise.
    Padded frames are zeroed before the depthwise conv so they cannot leak
    into valid frames.  ``causal`` uses left-only padding (streaming)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d, k = cfg.d_model, cfg.conv_kernel
        self.norm_in = nn.LayerNorm(d)
        self.pw1 = nn.Linear(d, 2 * d)
        self.causal = cfg.causal
        self.pad = (k - 1, 0) if cfg.causal else ((k - 1) // 2, (k - 1) // 2)
        if not cfg.causal and k % 2 == 0:
            raise ValueError("conv_kernel must be odd for non-causal conv")
        self.dw = nn.Conv1d(d, d, k, groups=d, padding=0)
        if cfg.conv_norm == "batch_norm":
            self.bn = nn.BatchNorm1d(d)
            self.ln = None
        elif cfg.conv_norm == "layer_norm":
            self.bn = None
            self.ln = nn.LayerNorm(d)
        else:
            raise ValueError(f"unknown conv_norm {cfg.conv_norm!r}")
        self.pw2 = nn.Linear(d, d)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, valid):  # x (B,T,D), valid (B,T,1) bool
        x = F.glu(self.pw1(self.norm_in(x)), dim=-1)
        x = x.masked_fill(~valid, 0.0)
        x = depthwise_conv1d(F.pad(x.transpose(1, 2), self.pad), self.dw)  # (B,D,T)
        if self.bn is not None:
            x = self.bn(x).transpose(1, 2)
        else:
            x = self.ln(x.transpose(1, 2))
        return self.dropout(self.pw2(F.silu(x)))

    @property
    def cache_frames(self) -> int:
        return self.dw.kernel_size[0] - 1

    def forward_chunk(self, x, cache):
        """Streaming step (causal only). x (B,C,D); cache (B,D,K-1): the GLU outputs of the K-1
        frames before the chunk (zeros at the start, as the full forward's left padding).
        Returns (out (B,C,D), new cache (B,D,K-1))."""
        if not self.causal:
            raise ValueError("streaming needs a causal convolution module (model.encoder.causal=true)")
        x = F.glu(self.pw1(self.norm_in(x)), dim=-1).transpose(1, 2)  # (B,D,C)
        xp = torch.cat([cache, x], dim=2)
        new_cache = xp[:, :, xp.size(2) - self.cache_frames:]
        x = self.dw(xp)
        if self.bn is not None:
            x = self.bn(x).transpose(1, 2)
        else:
            x = self.ln(x.transpose(1, 2))
        return self.pw2(F.silu(x)), new_cache


class ConformerBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.macaron = cfg.macaron
        self.ff1 = FeedForward(cfg) if cfg.macaron else None
        self.norm_att = nn.LayerNorm(cfg.d_model)
        self.att = MultiHeadSelfAttention(cfg, rel=cfg.pos_enc == "rel")
        self.conv = ConvModule(cfg)
        self.ff2 = FeedForward(cfg)
        self.norm_out = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.ff_scale = 0.5 if cfg.macaron else 1.0

    def forward(self, x, att_mask, valid, pos_emb):
        if self.ff1 is not None:
            x = x + 0.5 * self.ff1(x)
        x = x + self.dropout(self.att(self.norm_att(x), att_mask, pos_emb))
        x = x + self.conv(x, valid)
        x = x + self.ff_scale * self.ff2(x)
        return self.norm_out(x)

    def forward_chunk(self, x, att_mask, pos_emb, att_cache, cnn_cache):
        if self.ff1 is not None:
            x = x + 0.5 * self.ff1(x)
        a, new_att = self.att.forward_chunk(self.norm_att(x), att_mask, pos_emb, att_cache)
        x = x + a
        c, new_cnn = self.conv.forward_chunk(x, cnn_cache)
        x = x + c
        x = x + self.ff_scale * self.ff2(x)
        return self.norm_out(x), new_att, new_cnn


class _EncoderBase(nn.Module):
    """Shared front-end / masks / checkpointing logic."""

    subsampling_factor = 4

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.pos_enc not in ("rel", "abs"):
            raise ValueError(f"unknown pos_enc {cfg.pos_enc!r}")
        self.cfg = cfg
        self.d_model = cfg.d_model
        self.subsampling = Conv2dSubsampling4(cfg)
        self.xscale = math.sqrt(cfg.d_model)
        self.pos_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList()
        self.after_norm: nn.Module = nn.Identity()

    def output_lengths(self, feat_lens: torch.Tensor) -> torch.Tensor:
        return self.subsampling.output_lengths(feat_lens)

    def draw_chunk(self, t: int) -> tuple[int, int]:
        """(chunk_size, left_chunks) for a forward over ``t`` output frames: a random draw in
        training with ``dynamic_chunk`` (torch global RNG, so a resumed run draws the same), else
        the configured fixed chunk (0 = full context)."""
        cfg = self.cfg
        if self.training and cfg.dynamic_chunk and t > 0:
            # WeNet's recipe: about half the batches see full context, the rest a chunk of
            # 1..max_dynamic_chunk output frames
            c = int(torch.randint(1, t + 1, (1,)).item())
            if c > t // 2:
                return 0, -1
            c = c % cfg.max_dynamic_chunk + 1
            left = cfg.left_chunks
            if cfg.dynamic_left_chunks:
                left = int(torch.randint(0, max(0, (t - 1) // c) + 1, (1,)).item())
            return c, left
        return cfg.chunk_size, cfg.left_chunks

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor, chunk_size: int | None = None,
                left_chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``chunk_size``/``left_chunks``: override the chunk mask (0 = full context); by default
        :meth:`draw_chunk` decides."""
        x, lens = self.subsampling(feats, feat_lens)
        t = x.size(1)
        if chunk_size is None:
            chunk_size, drawn_left = self.draw_chunk(t)
            left_chunks = drawn_left if left_chunks is None else left_chunks
        elif left_chunks is None:
            left_chunks = self.cfg.left_chunks
        valid = torch.arange(t, device=x.device)[None, :] < lens[:, None]  # (B,T')
        keys = valid[:, None, None, :]  # (B,1,1,T') key padding; (B,1,T',T') with a chunk mask
        if chunk_size > 0:
            keys = keys & chunk_attention_mask(t, chunk_size, left_chunks, x.device)[None, None]
        x = x * self.xscale
        if self.cfg.pos_enc == "rel":
            pos_emb = self.pos_dropout(rel_pos_emb(t, self.d_model, x.device).to(x.dtype))
            att_mask = torch.zeros(keys.shape, dtype=x.dtype, device=x.device).masked_fill(~keys, NEG_INF)
        else:
            x = x + abs_pos_emb(t, self.d_model, x.device).to(x.dtype)
            pos_emb = None
            att_mask = keys
        x = self.pos_dropout(x)
        valid3 = valid[:, :, None]
        ckpt = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if ckpt:
                x = checkpoint(layer, x, att_mask, valid3, pos_emb, use_reentrant=False)
            else:
                x = layer(x, att_mask, valid3, pos_emb)
        return self.after_norm(x), lens

    # ------------------------------------------------------------------------------ streaming
    def init_cache(self, batch: int = 1, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty caches for :meth:`forward_chunk`: attention (N,B,H,0,2*dk) and convolution
        (N,B,D,K-1) (zeros; (N,B,D,0) for encoders without convolutions)."""
        n = len(self.layers)
        att = self.layers[0].att if n else None
        h, dk = (att.h, att.dk) if att is not None else (1, 1)
        conv = getattr(self.layers[0], "conv", None) if n else None
        k1 = conv.cache_frames if conv is not None else 0
        return (torch.zeros(n, batch, h, 0, 2 * dk, device=device, dtype=dtype),
                torch.zeros(n, batch, self.d_model, k1, device=device, dtype=dtype))

    def forward_chunk(
        self,
        chunk_feats: torch.Tensor,
        offset: int | torch.Tensor,
        att_cache: torch.Tensor,
        cnn_cache: torch.Tensor,
        att_mask: torch.Tensor | None = None,
        required_cache_size: int = -1,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One streaming step (eval mode), WeNet's contract.

        chunk_feats (B, 4*C+3, F) normalised features: the chunk's input frames plus the
        subsampling's right context (the last chunk may be shorter, >= 7 frames); consecutive
        chunks overlap by 3 frames (stride 4*C).  ``offset``: output frames before this chunk
        (absolute positions; used by absolute positional encodings).  att_cache (N,B,H,R,2*dk):
        keys/values of the R frames this chunk may see before it; cnn_cache (N,B,D,K-1).
        ``att_mask`` (B, R+C) bool: which keys are valid (None: all).  ``required_cache_size``:
        frames kept in the returned attention cache (-1: all, i.e. unlimited left context).

        Returns (out (B,C,D), new_att_cache (N,B,H,R',2*dk), new_cnn_cache (N,B,D,K-1)).  Equal to
        rows [offset, offset+C) of the full forward under the chunk mask that matches."""
        x = self.subsampling.project(chunk_feats) * self.xscale
        c = x.size(1)
        r = att_cache.size(3)
        if self.cfg.pos_enc == "rel":
            pos_emb = rel_pos_emb_window(r + c, c, self.d_model, x.device).to(x.dtype)
            mask = None
            if att_mask is not None:
                mask = torch.zeros(att_mask.shape, dtype=x.dtype, device=x.device)
                mask = mask.masked_fill(~att_mask, NEG_INF)[:, None, None, :]
        else:
            pos = torch.arange(c, device=x.device) + offset
            x = x + sinusoid(pos, self.d_model).to(x.dtype)
            pos_emb = None
            mask = None if att_mask is None else att_mask[:, None, None, :]
        new_att, new_cnn = [], []
        for i, layer in enumerate(self.layers):
            x, kv, cc = layer.forward_chunk(x, mask, pos_emb, att_cache[i], cnn_cache[i])
            if required_cache_size >= 0:
                kv = kv[:, :, kv.size(2) - min(required_cache_size, kv.size(2)):]
            new_att.append(kv)
            new_cnn.append(cc)
        return self.after_norm(x), torch.stack(new_att), torch.stack(new_cnn)


def chunk_attention_mask(t: int, chunk_size: int, left_chunks: int = -1, device=None) -> torch.Tensor:
    """(T,T) bool: frame i may attend frame j iff j's chunk is i's or one of the ``left_chunks``
    chunks before it (-1: all earlier chunks).  Chunks are ``chunk_size`` frames from frame 0."""
    ci = torch.arange(t, device=device) // chunk_size
    allowed = ci[None, :] <= ci[:, None]
    if left_chunks >= 0:
        allowed = allowed & (ci[None, :] >= ci[:, None] - left_chunks)
    return allowed


@register_encoder("conformer")
class ConformerEncoder(_EncoderBase):
    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.num_layers))
