"""Encoder configuration, registry and analytic FLOP estimate."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn


@dataclass
class EncoderConfig:
    """Hyper-parameters shared by all encoders.

    ``subsampling="conv2d4"``: two stride-2 3x3 convolutions without padding,
    ``T' = ((T - 1) // 2 - 1) // 2``.  ``subsampling_channels=0`` means
    ``d_model`` channels; fewer channels make the front-end cheaper.

    The last five fields configure ``type="wav2vec2"`` (a pretrained Hugging Face encoder fed the
    raw waveform); the defaults leave every other encoder unchanged.
    """

    type: str = "conformer"  # "conformer" | "transformer" | "wav2vec2"
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


ENCODERS: dict[str, type] = {}


def register_encoder(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in ENCODERS and ENCODERS[name] is not cls:
            raise ValueError(f"encoder {name!r} already registered")
        ENCODERS[name] = cls
        return cls

    return deco


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    # importing the modules populates the registry
    from harken.models import conformer, transformer  # noqa: F401

    if cfg.type == "wav2vec2":  # imported lazily: it needs the optional `transformers` package
        from harken.models import wav2vec2  # noqa: F401

    if cfg.type not in ENCODERS:
        raise KeyError(f"unknown encoder type {cfg.type!r}; known: {sorted(ENCODERS)}")
    return ENCODERS[cfg.type](cfg)


def subsampled_length(num_frames: int) -> int:
    return max(0, ((num_frames - 1) // 2 - 1) // 2)


def encoder_flops(cfg: EncoderConfig, num_frames: int, vocab_size: int = 0) -> float:
    """Analytic forward FLOPs (2 x multiply-adds of matmuls and convolutions)
    for ONE utterance of ``num_frames`` input feature frames, including the
    subsampling front-end; plus the CTC output projection if ``vocab_size``.
    Element-wise ops (norms, activations, softmax) are not counted.  A training
    step costs about 3x the forward."""
    T, F = num_frames, cfg.input_dim
    C, D = cfg.channels, cfg.d_model
    T1, F1 = (T - 1) // 2, (F - 1) // 2
    T2, F2 = (T1 - 1) // 2, (F1 - 1) // 2
    T2 = max(T2, 0)
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
    if cfg.pos_enc == "rel":
        P = max(2 * L - 1, 0)
        per_layer += P * D * D  # positional projection
        per_layer += L * P * D  # matrix_bd
    if cfg.type == "conformer":
        per_layer += L * D * 2 * D + L * D * cfg.conv_kernel + L * D * D
    macs += cfg.num_layers * per_layer
    macs += L * D * vocab_size
    return 2.0 * macs
