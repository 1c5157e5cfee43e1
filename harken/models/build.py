"""Building a model from an experiment config, for every registered encoder type.

``build_model(cfg, vocab_size, cmvn)`` asks the encoder class (see :mod:`harken.models.base`) how it
is fed: an fbank encoder gets a :class:`~harken.features.Frontend` (fbank, SpecAugment, CMVN); an
encoder with ``takes_waveform = True`` (wav2vec2, Whisper) reads the waveform itself and gets none.
:func:`param_groups` and :func:`find_unused_parameters` are what the trainer asks of a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.nn as nn

from harken.models.ctc import CtcModel
from harken.models.registry import EncoderConfig, encoder_class

if TYPE_CHECKING:
    from harken.config import ExperimentConfig
    from harken.features import GlobalCMVN


def takes_waveform(encoder_cfg: EncoderConfig) -> bool:
    """True when the encoder ``encoder_cfg.type`` reads the raw waveform (no fbank frontend/CMVN).
    Imports the encoder's module, not its optional dependencies."""
    return bool(getattr(encoder_class(encoder_cfg.type), "takes_waveform", False))


def build_model(cfg: ExperimentConfig, vocab_size: int, cmvn: GlobalCMVN | None = None) -> CtcModel:
    """The CTC model ``cfg.model`` describes, with an fbank frontend (CMVN ``cmvn``, identity if
    None) unless the encoder reads the waveform itself."""
    if takes_waveform(cfg.model.encoder):
        return CtcModel(cfg.model.encoder, vocab_size, frontend=None)
    from harken.features import Frontend, GlobalCMVN

    fb = cfg.model.fbank
    frontend = Frontend(fb, cfg.model.specaug, cmvn or GlobalCMVN.identity(fb.num_mel_bins))
    return CtcModel(cfg.model.encoder, vocab_size, frontend=frontend)


def _core(model: nn.Module) -> CtcModel:
    return getattr(model, "module", model)  # DDP-wrapped or not


def param_groups(model: nn.Module, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups for ``model`` (a CtcModel, DDP-wrapped or not), as its encoder class
    declares them (default: decay on matrices, none on biases and 1-D parameters; wav2vec2: the
    encoder at a lower learning rate)."""
    return type(_core(model).encoder).param_groups(model, base_lr, weight_decay)


def find_unused_parameters(model: nn.Module) -> bool:
    """Whether DDP must look for parameters without gradients (wav2vec2's layer drop)."""
    return bool(getattr(_core(model).encoder, "find_unused_parameters", False))
