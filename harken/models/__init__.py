"""Acoustic models: encoders (conformer, transformer) and the CTC head."""

from harken.models import conformer as _conformer  # noqa: F401  (registers)
from harken.models import transformer as _transformer  # noqa: F401  (registers)
from harken.models.ctc import CtcModel, ctc_loss
from harken.models.registry import (
    ENCODER_PRESETS,
    ENCODERS,
    EncoderConfig,
    build_encoder,
    encoder_flops,
    encoder_preset,
    register_encoder,
)

__all__ = [
    "ENCODERS",
    "ENCODER_PRESETS",
    "EncoderConfig",
    "CtcModel",
    "build_encoder",
    "ctc_loss",
    "encoder_flops",
    "encoder_preset",
    "register_encoder",
]
