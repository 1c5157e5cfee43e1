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
        return self.dropout(self.w2(self.dropout(F.silu(self.w1(self.norm(x))))))


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
        x = self.dw(F.pad(x.transpose(1, 2), self.pad))  # (B,D,T)
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
