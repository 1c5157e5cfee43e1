"""Conformer encoder (pre-LN, macaron FF, rel-pos MHSA, conv module)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from harken.models.attention import MultiHeadSelfAttention
from harken.models.base import (  # noqa: F401 (chunk_attention_mask, _DepthwiseConv1dFn: re-exported)
    AttentionEncoder,
    FeedForward,
    _DepthwiseConv1dFn,
    chunk_attention_mask,
    depthwise_conv1d,
)
from harken.models.registry import EncoderConfig, register_encoder


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


# The shared encoder body (subsampling, masks, forward, init_cache, forward_chunk) is
# harken.models.base.AttentionEncoder; chunk_attention_mask and FeedForward live there too.
_EncoderBase = AttentionEncoder  # the old name


@register_encoder("conformer")
class ConformerEncoder(AttentionEncoder):
    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.num_layers))
