"""Encoder base classes.

:class:`Encoder` is the contract every registered encoder follows (the trainer, the model builder
and the exporters read only this):

* ``forward(x, x_lens) -> (hidden (B,T',d_model), out_lens (B,))``;
* ``takes_waveform``: False (the default) for encoders fed fbank features by the model's
  :class:`~harken.features.Frontend`; True for encoders that read the raw waveform (B,S) and
  compute their own features (wav2vec2, Whisper): they get no fbank frontend and no CMVN;
* ``find_unused_parameters``: True when some parameters can go without a gradient in a step
  (wav2vec2's layer drop), so DDP must look for them;
* ``prepare_config(cfg)``: a copy of the config completed before the model is built (wav2vec2 reads
  ``d_model`` from its checkpoint);
* ``param_groups(model, base_lr, weight_decay)``: the AdamW parameter groups for a whole model
  holding this encoder (the default: weight decay on matrices, none on biases and 1-D parameters);
* ``subsampling_factor``, ``right_context`` and ``output_lengths(lens)``: the time geometry
  (input units per output frame, input frames an output frame needs after its own, output lengths).

:class:`AttentionEncoder` is the shared body of the conformer and transformer encoders: the conv
subsampling front-end, positional encodings, padding and chunk masks, activation checkpointing,
WeNet-style chunk streaming (:meth:`AttentionEncoder.forward_chunk`), half-rate middle layers
(``time_reduce_layers``) and the intermediate outputs of intermediate CTC
(:meth:`AttentionEncoder.forward_intermediate`, training only).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from harken.models.attention import NEG_INF, abs_pos_emb, rel_pos_emb, rel_pos_emb_window, sinusoid
from harken.models.registry import EncoderConfig
from harken.models.subsampling import build_subsampling


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups over the trainable parameters of ``model`` (DDP-wrapped or not): matrices
    with ``weight_decay``, biases and 1-D parameters (norms, scales) without."""
    core = getattr(model, "module", model)
    decay, no_decay = [], []
    for n, p in core.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or n.endswith(".bias") else decay).append(p)
    return [{"name": "decay", "params": decay, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]


class Encoder(nn.Module):
    """Base class of all encoders (see the module docstring for the contract)."""

    takes_waveform: bool = False
    find_unused_parameters: bool = False

    @classmethod
    def prepare_config(cls, cfg: EncoderConfig) -> EncoderConfig:
        """The config the encoder is built from (a copy when anything changes); default: ``cfg``."""
        return cfg

    @classmethod
    def param_groups(cls, model: nn.Module, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW parameter groups for ``model`` (a whole CtcModel holding this encoder).  Groups
        without an ``lr`` get the optimizer's ``base_lr``."""
        return default_param_groups(model, weight_decay)

    @property
    def subsampling_factor(self) -> int:
        raise NotImplementedError

    @property
    def right_context(self) -> int:
        return 0

    def output_lengths(self, lens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


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


def upsample2(x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """(B,Th,D) at half rate -> (B,t,D): every frame repeated twice, cut to ``t`` frames."""
    return x.unsqueeze(2).expand(-1, -1, 2, -1).flatten(1, 2)[:, :t]


class TimeReduce(nn.Module):
    """Halve the frame rate (Squeezeformer-style): a depthwise conv of kernel 3 and stride 2
    (centred: half-rate frame j sees frames 2j-1..2j+1) and a pointwise linear.  T frames give
    ceil(T/2); padded frames are zeroed first, so a padded batch gives what each item gives alone.
    The stride-1 depthwise conv (fast CPU backward) is taken every other frame: the depthwise conv
    costs 3 multiply-adds per channel and frame, so doing it at both phases is negligible."""

    def __init__(self, d_model: int):
        super().__init__()
        self.dw = nn.Conv1d(d_model, d_model, 3, groups=d_model, padding=0)
        self.pw = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:  # x (B,T,D), valid (B,T,1)
        x = x.masked_fill(~valid, 0.0)
        x = depthwise_conv1d(F.pad(x.transpose(1, 2), (1, 1)), self.dw)[:, :, ::2]  # (B,D,ceil(T/2))
        return self.pw(x.transpose(1, 2))


class TimeRecover(nn.Module):
    """Back to the full frame rate after the half-rate layers (Squeezeformer-style): each frame
    repeated twice, a linear projection, plus the full-rate input of the half-rate layers."""

    def __init__(self, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # x (B,Th,D), skip (B,T,D)
        return skip + self.proj(upsample2(x, skip.size(1)))


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


def chunk_attention_mask(t: int, chunk_size: int, left_chunks: int = -1, device=None) -> torch.Tensor:
    """(T,T) bool: frame i may attend frame j iff j's chunk is i's or one of the ``left_chunks``
    chunks before it (-1: all earlier chunks).  Chunks are ``chunk_size`` frames from frame 0."""
    ci = torch.arange(t, device=device) // chunk_size
    allowed = ci[None, :] <= ci[:, None]
    if left_chunks >= 0:
        allowed = allowed & (ci[None, :] >= ci[:, None] - left_chunks)
    return allowed


class AttentionEncoder(Encoder):
    """Shared front-end / masks / checkpointing / streaming logic of the conformer and transformer
    encoders.  Subclasses fill ``self.layers`` (blocks with ``forward(x, att_mask, valid, pos_emb)``
    and ``forward_chunk(...)``) and may set ``self.after_norm``."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.pos_enc not in ("rel", "abs"):
            raise ValueError(f"unknown pos_enc {cfg.pos_enc!r}")
        self.cfg = cfg
        self.d_model = cfg.d_model
        self.subsampling = build_subsampling(cfg)
        self.xscale = math.sqrt(cfg.d_model)
        self.pos_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList()
        self.after_norm: nn.Module = nn.Identity()
        # time_reduce_layers [start, end): those layers run at half the frame rate (only built when
        # set, so the parameters of every other model are as before)
        self.time_reduce: TimeReduce | None = None
        self.time_recover: TimeRecover | None = None
        if cfg.time_reduce_layers:
            self.time_reduce = TimeReduce(cfg.d_model)
            self.time_recover = TimeRecover(cfg.d_model)

    @property
    def subsampling_factor(self) -> int:
        return self.subsampling.factor

    @property
    def right_context(self) -> int:
        return self.subsampling.right_context

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
        h, lens, _ = self._encode(feats, feat_lens, chunk_size, left_chunks, ())
        return h, lens

    def forward_intermediate(self, feats: torch.Tensor, feat_lens: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """:meth:`forward` plus the outputs of the ``cfg.interctc_layers`` (1-based, in that order),
        each through ``after_norm`` and at the output frame rate (B,T',d_model), for intermediate
        CTC in training.  Inference calls :meth:`forward`, which computes none of them."""
        return self._encode(feats, feat_lens, None, None, tuple(self.cfg.interctc_layers))

    def _context(self, x: torch.Tensor, lens: torch.Tensor, chunk_size: int, left_chunks: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(att_mask, valid (B,T,1), pos_emb) for the layers over x (B,T,D) with ``lens`` valid
        frames: key padding (and the chunk mask), and the relative-position embedding."""
        t = x.size(1)
        valid = torch.arange(t, device=x.device)[None, :] < lens[:, None]  # (B,T')
        keys = valid[:, None, None, :]  # (B,1,1,T') key padding; (B,1,T',T') with a chunk mask
        if chunk_size > 0:
            keys = keys & chunk_attention_mask(t, chunk_size, left_chunks, x.device)[None, None]
        if self.cfg.pos_enc == "rel":
            pos_emb = self.pos_dropout(rel_pos_emb(t, self.d_model, x.device).to(x.dtype))
            att_mask = torch.zeros(keys.shape, dtype=x.dtype, device=x.device).masked_fill(~keys, NEG_INF)
        else:
            pos_emb = None
            att_mask = keys
        return att_mask, valid[:, :, None], pos_emb

    def _encode(self, feats: torch.Tensor, feat_lens: torch.Tensor, chunk_size: int | None,
                left_chunks: int | None, collect: tuple[int, ...]
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The body of :meth:`forward`; ``collect``: 1-based layers whose outputs are also returned."""
        x, lens = self.subsampling(feats, feat_lens)
        t = x.size(1)
        if chunk_size is None:
            chunk_size, drawn_left = self.draw_chunk(t)
            left_chunks = drawn_left if left_chunks is None else left_chunks
        elif left_chunks is None:
            left_chunks = self.cfg.left_chunks
        if self.time_reduce is not None and chunk_size > 0:
            raise ValueError("time_reduce_layers does not support chunked attention (streaming)")
        x = x * self.xscale
        ctx = full = self._context(x, lens, chunk_size, left_chunks)
        if self.cfg.pos_enc != "rel":
            x = x + abs_pos_emb(t, self.d_model, x.device).to(x.dtype)
        x = self.pos_dropout(x)
        start, end = self.cfg.time_reduce_layers if self.time_reduce is not None else (-1, -1)
        skip = x
        ckpt = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        inter: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            if i == start:  # to half the frame rate; padded frames are zeroed first
                skip = x
                x = self.time_reduce(x, full[1])
                ctx = self._context(x, torch.div(lens + 1, 2, rounding_mode="floor"), 0, -1)
            elif i == end:
                x = self.time_recover(x, skip)
                ctx = full
            if ckpt:
                x = checkpoint(layer, x, *ctx, use_reentrant=False)
            else:
                x = layer(x, *ctx)
            if i + 1 in collect:
                inter.append(self.after_norm(upsample2(x, t) if start <= i < end else x))
        if end == len(self.layers):
            x = self.time_recover(x, skip)
        return self.after_norm(x), lens, inter

    # ------------------------------------------------------------------------------ streaming
    def _check_streams(self) -> None:
        if self.time_reduce is not None:
            raise ValueError("this model cannot stream: its encoder has time_reduce_layers "
                             f"{list(self.cfg.time_reduce_layers)} (half-rate layers need full context)")

    def init_cache(self, batch: int = 1, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty caches for :meth:`forward_chunk`: attention (N,B,H,0,2*dk) and convolution
        (N,B,D,K-1) (zeros; (N,B,D,0) for encoders without convolutions)."""
        self._check_streams()
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

        chunk_feats (B, ``subsampling.input_frames(C)``, F) normalised features (4C+3 for conv2d4 and
        dwconv4, 8C+7 for dwconv8):
        the chunk's input frames plus the subsampling's right context (the last chunk may be
        shorter, at least ``right_context + 1`` frames); consecutive chunks advance by
        ``subsampling_factor * C`` frames and so overlap by ``right_context + 1 - factor``.
        ``offset``: output frames before this chunk (absolute positions; used by absolute
        positional encodings).  att_cache (N,B,H,R,2*dk):
        keys/values of the R frames this chunk may see before it; cnn_cache (N,B,D,K-1).
        ``att_mask`` (B, R+C) bool: which keys are valid (None: all).  ``required_cache_size``:
        frames kept in the returned attention cache (-1: all, i.e. unlimited left context).

        Returns (out (B,C,D), new_att_cache (N,B,H,R',2*dk), new_cnn_cache (N,B,D,K-1)).  Equal to
        rows [offset, offset+C) of the full forward under the chunk mask that matches."""
        self._check_streams()
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
