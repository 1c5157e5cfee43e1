"""Acoustic models: encoders (conformer, transformer, wav2vec2, ...) and the CTC head.

Encoders register themselves when their module is imported; :mod:`harken.models.registry` imports
them lazily by name (``encoder_class``), so importing this package loads none of them."""

from harken.models.ctc import CtcModel, ctc_loss
from harken.models.registry import (
    ENCODER_PRESETS,
    ENCODERS,
    EncoderConfig,
    build_encoder,
    encoder_class,
    encoder_flops,
    encoder_names,
    encoder_preset,
    register_encoder,
)

__all__ = [
    "ENCODERS",
    "ENCODER_PRESETS",
    "EncoderConfig",
    "CtcModel",
    "build_encoder",
    "encoder_class",
    "encoder_names",
    "ctc_loss",
    "encoder_flops",
    "encoder_preset",
    "register_encoder",
]
