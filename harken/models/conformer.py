"""Conformer encoder (pre-LN, macaron FF, rel-pos MHSA, conv module)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from harken.models.attention import NEG_INF, MultiHeadSelfAttention, abs_pos_emb, rel_pos_emb
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

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, lens = self.subsampling(feats, feat_lens)
        t = x.size(1)
        valid = torch.arange(t, device=x.device)[None, :] < lens[:, None]  # (B,T')
        x = x * self.xscale
        if self.cfg.pos_enc == "rel":
            pos_emb = self.pos_dropout(rel_pos_emb(t, self.d_model, x.device).to(x.dtype))
            att_mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device)
            att_mask = att_mask.masked_fill(~valid, NEG_INF)[:, None, None, :]
        else:
            x = x + abs_pos_emb(t, self.d_model, x.device).to(x.dtype)
            pos_emb = None
            att_mask = valid[:, None, None, :]
        x = self.pos_dropout(x)
        valid3 = valid[:, :, None]
        ckpt = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if ckpt:
                x = checkpoint(layer, x, att_mask, valid3, pos_emb, use_reentrant=False)
            else:
                x = layer(x, att_mask, valid3, pos_emb)
        return self.after_norm(x), lens


@register_encoder("conformer")
class ConformerEncoder(_EncoderBase):
    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.num_layers))
