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
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn


@dataclass
class EncoderConfig:
    """Hyper-parameters shared by all encoders.

    ``subsampling="conv2d4"``: two stride-2 3x3 convolutions without padding; ``"dwconv4"`` /
    ``"dwconv8"``: a cheaper depthwise-separable stem (NeMo FastConformer style) with 4x / 8x
    time reduction (factors, right contexts and output lengths: :mod:`harken.models.subsampling`).
    ``subsampling_channels=0`` means ``d_model`` channels; fewer channels make the front-end cheaper.

    ``time_reduce_layers=[start, end]``: the layers ``start..end-1`` (0-based, as a Python slice)
    run at half the stem's frame rate (Squeezeformer-style: a strided depthwise conv before them,
    repeat-interleave + linear + a residual from before the reduction after them); the output stays
    at the stem's rate.  Not for streaming models.  ``interctc_layers``: 1-based layers whose outputs
    also feed the CTC head in training (intermediate CTC, weighted by ``model.interctc_weight``);
    inference never computes them.  Both default to empty: the encoder is as before.

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
    # harken.models.base.AttentionEncoder (conformer/transformer only; see the docstring above)
    time_reduce_layers: list[int] = field(default_factory=list, metadata={"range": ">=0"})
    interctc_layers: list[int] = field(default_factory=list, metadata={"range": ">=1"})
    # type="wav2vec2" only (ignored by the other encoders); see harken.models.wav2vec2.
    # d_model is then taken from the pretrained config and `dropout` is applied to its output.
    pretrained: str | None = None  # local Hugging Face checkpoint dir (config.json + weights)
    freeze_feature_encoder: bool = True  # keep the conv waveform feature encoder fixed
    layerdrop: float = 0.05  # probability of skipping each transformer layer while training
    mask_time_prob: float = 0.05  # wav2vec2's own time masking of the projected features
    encoder_lr_scale: float = 0.1  # encoder learning rate = optim.lr * this (the CTC head gets optim.lr)
    # type="whisper" only: how many top layers train (-1: all; 0: the encoder frozen, the CTC head alone),
    # and layer-wise learning-rate decay (layer i of n at optim.lr x encoder_lr_scale x decay ** (n-1-i))
    trainable_layers: int = -1
    layer_lr_decay: float = 1.0

    def __post_init__(self) -> None:
        # cross-field checks of the layer options (a ValueError reaches the user as a ConfigError)
        tr, n = list(self.time_reduce_layers), self.num_layers
        if tr:
            if len(tr) != 2 or not 0 <= tr[0] < tr[1] <= n:
                raise ValueError(f"time_reduce_layers={tr} must be [start, end] with 0 <= start < end <= "
                                 f"num_layers={n} (layers start..end-1, 0-based, run at half the frame rate)")
            if self.causal or self.chunk_size > 0 or self.dynamic_chunk:
                raise ValueError(f"time_reduce_layers={tr} cannot stream: it needs full-context, non-causal "
                                 "attention (set causal=false, chunk_size=0 and dynamic_chunk=false, or leave "
                                 "time_reduce_layers empty)")
        bad = [k for k in self.interctc_layers if not 1 <= k < n]
        if bad:
            raise ValueError(f"interctc_layers={list(self.interctc_layers)}: each must be a 1-based layer below "
                             f"the last (1..{n - 1} for num_layers={n}); the last layer is the main CTC output")
        if (tr or self.interctc_layers) and not _supports_layer_options(self.type):
            raise ValueError(f"time_reduce_layers / interctc_layers need a conformer or transformer encoder, "
                             f"not type={self.type!r}")

        if (self.trainable_layers >= 0 or self.layer_lr_decay != 1.0) and self.type != "whisper":
            raise ValueError(f"trainable_layers / layer_lr_decay apply to the whisper encoder, not type={self.type!r} "
                             "(wav2vec2: freeze_feature_encoder and encoder_lr_scale)")

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


def _supports_layer_options(name: str) -> bool:
    """Whether encoder ``name`` implements ``time_reduce_layers`` / ``interctc_layers`` (it has
    ``forward_intermediate``; an unknown or unimportable type is left to the type check)."""
    try:
        cls = encoder_class(name)
    except (UnknownEncoderError, ImportError):
        return True
    return hasattr(cls, "forward_intermediate")


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
    Only fbank-fed encoders with the built-in stems (conv2d4, dwconv4, dwconv8) are modelled;
    the layers of ``time_reduce_layers`` are counted at half the frame rate, with the reduction and
    recovery projections."""
    from harken.models.subsampling import Conv2dSubsampling4, DepthwiseConv2dSubsampling, subsampling_class

    sub = subsampling_class(cfg.subsampling)
    T, F = num_frames, cfg.input_dim
    C, D = cfg.channels, cfg.d_model
    macs = 0.0
    # the first stride-2 convolution (1 input channel) of every stem
    T1, F1 = max(0, (T - 1) // 2), max(0, (F - 1) // 2)
    macs += T1 * F1 * C * 9
    if sub is Conv2dSubsampling4:
        T2, F2 = sub.output_lengths(T), sub.output_lengths(F)
        macs += T2 * F2 * C * C * 9  # conv2: full C x C x 3 x 3
    elif isinstance(sub, type) and issubclass(sub, DepthwiseConv2dSubsampling):
        T2, F2 = T1, F1
        for _ in range(sub.stages - 1):  # depthwise 3x3 stride 2, then pointwise 1x1
            T2, F2 = max(0, (T2 - 1) // 2), max(0, (F2 - 1) // 2)
            macs += T2 * F2 * C * 9 + T2 * F2 * C * C
    else:
        raise ValueError(f"encoder_flops models the built-in subsamplings, not {cfg.subsampling!r}")
    macs += T2 * C * F2 * D  # linear to d_model
    n_ff = 2 if (cfg.type == "conformer" and cfg.macaron) else 1

    def layer(L: int) -> tuple[float, float]:  # (per utterance, per batch) of one layer over L frames
        per = n_ff * 2 * L * D * cfg.ff_dim
        per += L * D * 3 * D + L * D * D  # qkv + out proj
        per += 2 * L * L * D  # q k^T and attn @ v
        shared = 0.0
        if cfg.pos_enc == "rel":
            P = max(2 * L - 1, 0)
            shared += P * D * D  # positional projection: once per batch
            per += L * P * D  # matrix_bd
        if cfg.type == "conformer":
            per += L * D * 2 * D + L * D * cfg.conv_kernel + L * D * D
        return per, shared

    L = T2
    start, end = cfg.time_reduce_layers if cfg.time_reduce_layers else (0, 0)
    Lh = (L + 1) // 2
    shared = 0.0  # per batch, not per utterance
    for i in range(cfg.num_layers):
        per, sh = layer(Lh if start <= i < end else L)
        macs += per
        shared += sh
    if end > start:
        macs += 2 * Lh * D * 3 + Lh * D * D  # reduction: depthwise k=3 (at both phases) + pointwise
        macs += L * D * D  # recovery projection
    macs += L * D * vocab_size
    return 2.0 * (batch_size * macs + shared)
