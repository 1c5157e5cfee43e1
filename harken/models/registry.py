"""Encoder configuration, registry and analytic FLOP estimate.

Encoders are registered by name with :func:`register_encoder` (a class decorator in the encoder's
own module).  The built-in encoders are listed in ``BUILTIN_ENCODERS`` (name -> module) and imported
only when first asked for, so this module imports no encoder at import time and an encoder needing
an optional package (wav2vec2: ``transformers``) costs nothing until it is used.  A new encoder is
one module plus one line in ``BUILTIN_ENCODERS`` (or a :func:`register_encoder_module` call from a
plug-in).  See :mod:`harken.models.base` for what an encoder class declares.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn


@dataclass
class EncoderConfig:
    """Hyper-parameters shared by all encoders.

    ``subsampling="conv2d4"``: two stride-2 3x3 convolutions without padding (its factor, right
    context and output lengths: :mod:`harken.models.subsampling`).  ``subsampling_channels=0``
    means ``d_model`` channels; fewer channels make the front-end cheaper.

    The last five fields configure ``type="wav2vec2"`` (a pretrained Hugging Face encoder fed the
    raw waveform); the defaults leave every other encoder unchanged.
    """

    type: str = "conformer"  # a registered encoder: see encoder_names()
    input_dim: int = 80
    d_model: int = 144
    num_layers: int = 6
    num_heads: int = 4
    ff_dim: int = 576
    conv_kernel: int = 15
    dropout: float = 0.1
    attn_dropout: float = 0.0
    subsampling: str = "conv2d4"
    subsampling_channels: int = 0
    pos_enc: str = "rel"  # "rel" | "abs"
    macaron: bool = True
    conv_norm: str = "layer_norm"  # "layer_norm" | "batch_norm"
    activation_checkpointing: bool = False
    causal: bool = False  # left-only depthwise convolution (needed for streaming conformers)
    # Streaming (WeNet-style chunk attention; conformer/transformer only).  ``chunk_size`` > 0:
    # every forward uses a fixed chunk mask of that many output frames (40 ms each), seeing
    # ``left_chunks`` chunks back (-1: all).  ``dynamic_chunk``: in training, each batch draws its
    # chunk size from the torch global RNG: full context with probability ~1/2, else uniform in
    # 1..max_dynamic_chunk; with ``dynamic_left_chunks`` the left context is drawn too
    # (0..max(left, ...) chunks).  In eval, ``chunk_size`` applies (0: full context).
    dynamic_chunk: bool = False
    chunk_size: int = 0
    left_chunks: int = -1
    max_dynamic_chunk: int = 25
    dynamic_left_chunks: bool = False
    # type="wav2vec2" only (ignored by the other encoders); see harken.models.wav2vec2.
    # d_model is then taken from the pretrained config and `dropout` is applied to its output.
    pretrained: str | None = None  # local Hugging Face checkpoint dir (config.json + weights)
    freeze_feature_encoder: bool = True  # keep the conv waveform feature encoder fixed
    layerdrop: float = 0.05  # probability of skipping each transformer layer while training
    mask_time_prob: float = 0.05  # wav2vec2's own time masking of the projected features
    encoder_lr_scale: float = 0.1  # encoder learning rate = optim.lr * this (the CTC head gets optim.lr)

    @property
    def channels(self) -> int:
        return self.subsampling_channels or self.d_model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown EncoderConfig keys: {sorted(unknown)}")
        return cls(**d)


# Named presets (conformer, rel-pos, macaron).  "medium" ~ 21M params with vocab 500.
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=144, num_layers=4, num_heads=4, ff_dim=576, conv_kernel=15),
    "small": dict(d_model=144, num_layers=8, num_heads=4, ff_dim=576, conv_kernel=15),
    "medium": dict(d_model=256, num_layers=12, num_heads=4, ff_dim=1024, conv_kernel=15),
    "large": dict(d_model=512, num_layers=12, num_heads=8, ff_dim=2048, conv_kernel=31),
}


def encoder_preset(name: str, **overrides: Any) -> EncoderConfig:
    """An :class:`EncoderConfig` for a named preset, with optional overrides."""
    if name not in ENCODER_PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(ENCODER_PRESETS)}")
    return EncoderConfig(**{**ENCODER_PRESETS[name], **overrides})


# name -> module that registers it (imported lazily by encoder_class)
BUILTIN_ENCODERS: dict[str, str] = {
    "conformer": "harken.models.conformer",
    "transformer": "harken.models.transformer",
    "wav2vec2": "harken.models.wav2vec2",
    "whisper": "harken.models.whisper",
}

ENCODERS: dict[str, type] = {}


class UnknownEncoderError(KeyError, ValueError):
    """An encoder type no module registers (a KeyError for old callers, a ValueError for the CLI)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def register_encoder(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in ENCODERS and ENCODERS[name] is not cls:
            raise ValueError(f"encoder {name!r} already registered")
        ENCODERS[name] = cls
        return cls

    return deco


def register_encoder_module(name: str, module: str) -> None:
    """Declare that importing ``module`` registers encoder ``name`` (for plug-ins)."""
    BUILTIN_ENCODERS[name] = module


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def encoder_names() -> list[str]:
    """Every encoder type that can be built: those registered so far plus the built-in ones whose
    module exists (listed without importing them, so optional dependencies are not loaded)."""
    return sorted(set(ENCODERS) | {n for n, m in BUILTIN_ENCODERS.items() if _module_exists(m)})


def encoder_class(name: str) -> type:
    """The encoder class registered as ``name`` (importing its module on first use)."""
    if name not in ENCODERS and name in BUILTIN_ENCODERS and _module_exists(BUILTIN_ENCODERS[name]):
        importlib.import_module(BUILTIN_ENCODERS[name])
    if name not in ENCODERS:
        raise UnknownEncoderError(f"unknown encoder type {name!r}; known: {', '.join(encoder_names())}")
    return ENCODERS[name]


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    """The encoder ``cfg.type`` names, built from ``cls.prepare_config(cfg)``."""
    cls = encoder_class(cfg.type)
    prepare = getattr(cls, "prepare_config", None)
    return cls(prepare(cfg) if prepare is not None else cfg)


def encoder_flops(cfg: EncoderConfig, num_frames: int, vocab_size: int = 0, batch_size: int = 1) -> float:
    """Analytic forward FLOPs (2 x multiply-adds of matmuls and convolutions) of a batch of
    ``batch_size`` utterances of ``num_frames`` input feature frames each, including the
    subsampling front-end; plus the CTC output projection if ``vocab_size``.  Element-wise ops
    (norms, activations, softmax) are not counted.  A training step costs about 3x the forward.

    The relative-position projection (``linear_pos`` of the 2T'-1 distance embeddings) does not
    depend on the utterance: it is computed once per batch and layer, so it is counted once per
    batch, not ``batch_size`` times.  ``encoder_flops(cfg, T, V, B) / B`` is the per-utterance cost
    within a batch of B; ``batch_size=1`` (the default) is the cost of one utterance alone.
    Only fbank-fed encoders with the conv2d4 subsampling are modelled."""
    from harken.models.subsampling import Conv2dSubsampling4, subsampling_class

    sub = subsampling_class(cfg.subsampling)
    if sub is not Conv2dSubsampling4:
        raise ValueError(f"encoder_flops models the conv2d4 subsampling, not {cfg.subsampling!r}")
    T, F = num_frames, cfg.input_dim
    C, D = cfg.channels, cfg.d_model
    # the two stride-2 convolutions: first halving, then the full output size
    T1, F1 = max(0, (T - 1) // 2), max(0, (F - 1) // 2)
    T2, F2 = sub.output_lengths(T), sub.output_lengths(F)
    macs = 0.0
    macs += T1 * F1 * C * 9  # conv1 (1 input channel)
    macs += T2 * F2 * C * C * 9  # conv2
    macs += T2 * C * F2 * D  # linear to d_model
    L = T2
    per_layer = 0.0
    n_ff = 2 if (cfg.type == "conformer" and cfg.macaron) else 1
    per_layer += n_ff * 2 * L * D * cfg.ff_dim
    per_layer += L * D * 3 * D + L * D * D  # qkv + out proj
    per_layer += 2 * L * L * D  # q k^T and attn @ v
    shared = 0.0  # per batch, not per utterance
    if cfg.pos_enc == "rel":
        P = max(2 * L - 1, 0)
        shared += P * D * D  # positional projection: once per batch
        per_layer += L * P * D  # matrix_bd
    if cfg.type == "conformer":
        per_layer += L * D * 2 * D + L * D * cfg.conv_kernel + L * D * D
    macs += cfg.num_layers * per_layer
    macs += L * D * vocab_size
    return 2.0 * (batch_size * macs + cfg.num_layers * shared)
