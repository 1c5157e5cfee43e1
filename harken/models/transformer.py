"""Transformer encoder (pre-LN MHSA + FF, absolute or relative positions)."""

from __future__ import annotations

import torch.nn as nn

from harken.models.attention import MultiHeadSelfAttention
from harken.models.base import AttentionEncoder, FeedForward
from harken.models.registry import EncoderConfig, register_encoder


class TransformerBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.norm_att = nn.LayerNorm(cfg.d_model)
        self.att = MultiHeadSelfAttention(cfg, rel=cfg.pos_enc == "rel")
        self.ff = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, att_mask, valid, pos_emb):
        x = x + self.dropout(self.att(self.norm_att(x), att_mask, pos_emb))
        return x + self.ff(x)

    def forward_chunk(self, x, att_mask, pos_emb, att_cache, cnn_cache):
        a, new_att = self.att.forward_chunk(self.norm_att(x), att_mask, pos_emb, att_cache)
        x = x + a
        return x + self.ff(x), new_att, cnn_cache


@register_encoder("transformer")
class TransformerEncoder(AttentionEncoder):
    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.after_norm = nn.LayerNorm(cfg.d_model)
