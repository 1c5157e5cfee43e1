"""CTC acoustic model (encoder + linear output layer) and CTC loss with
correct label smoothing."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from harken.models.registry import EncoderConfig, build_encoder, encoder_flops

BLANK_ID = 0


class CtcModel(nn.Module):
    """``frontend`` (optional, e.g. ``harken.features.Frontend``) -> encoder ->
    ``Linear(d_model, vocab_size)`` -> float32 log-softmax.  Blank id is 0.

    ``forward(x, x_lens)``: x is a waveform batch (B,S) when a frontend is
    attached, otherwise features (B,T,F).  Returns ``(log_probs (B,T',V),
    out_lens (B,) int64)``.
    """

    blank_id = BLANK_ID

    def __init__(self, encoder_cfg: EncoderConfig, vocab_size: int, frontend: nn.Module | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.frontend = frontend
        self.encoder = build_encoder(encoder_cfg)
        # the encoder's own (completed) config: wav2vec2 takes d_model from its checkpoint
        self.encoder_cfg: EncoderConfig = getattr(self.encoder, "cfg", encoder_cfg)
        self.output = nn.Linear(int(getattr(self.encoder, "d_model", self.encoder_cfg.d_model)), vocab_size)

    @property
    def takes_waveform(self) -> bool:
        """True when the encoder reads the raw waveform itself (no fbank frontend)."""
        return bool(getattr(self.encoder, "takes_waveform", False))

    @property
    def subsampling_factor(self) -> int:
        """Encoder input units per output frame (feature frames, or samples for waveform encoders)."""
        return self.encoder.subsampling_factor

    @property
    def right_context(self) -> int:
        return int(getattr(self.encoder, "right_context", 0))

    def output_lengths(self, feat_lens: torch.Tensor) -> torch.Tensor:
        return self.encoder.output_lengths(feat_lens)

    def encoder_output(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[Tensor, Tensor]:
        """Hidden states (B,T',d_model) and their lengths."""
        return self.encoder(feats, feat_lens)

    def encode_features(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[Tensor, Tensor]:
        """Features (B,T,F) -> (log_probs (B,T',V) float32, out_lens)."""
        h, lens = self.encoder(feats, feat_lens)
        logits = self.output(h)
        return torch.log_softmax(logits.float(), dim=-1), lens

    def forward(self, x: torch.Tensor, x_lens: torch.Tensor, precomputed_features: bool = False,
                intermediate: bool = False):
        """``precomputed_features``: x is cached fbank features; the frontend applies only CMVN and
        SpecAugment (going through ``forward`` keeps DDP's gradient hooks in play).

        ``intermediate`` (training with intermediate CTC): also return the log-probs of the
        encoder's ``interctc_layers`` through the same head, ``(log_probs, out_lens, [log_probs_k,
        ...])`` (same shape and lengths as ``log_probs``).  The default (inference, export) computes
        none of them."""
        if self.frontend is not None:
            x, x_lens = (self.frontend(x, x_lens, precomputed=True) if precomputed_features
                         else self.frontend(x, x_lens))
        if not intermediate:
            return self.encode_features(x, x_lens)
        if not hasattr(self.encoder, "forward_intermediate"):
            raise ValueError(f"encoder {type(self.encoder).__name__} has no intermediate outputs (interctc_layers)")
        h, lens, inter = self.encoder.forward_intermediate(x, x_lens)
        return self._log_probs(h), lens, [self._log_probs(hk) for hk in inter]

    def _log_probs(self, h: Tensor) -> Tensor:
        return torch.log_softmax(self.output(h).float(), dim=-1)

    def config(self) -> dict[str, Any]:
        """Everything needed (besides the frontend) to rebuild the module."""
        return {"encoder": self.encoder_cfg.to_dict(), "vocab_size": self.vocab_size}

    @classmethod
    def from_config(cls, d: dict[str, Any], frontend: nn.Module | None = None) -> "CtcModel":
        return cls(EncoderConfig.from_dict(d["encoder"]), d["vocab_size"], frontend=frontend)

    def flops(self, num_frames: int, batch_size: int = 1) -> float:
        """Analytic forward FLOPs for a batch of ``batch_size`` utterances of ``num_frames`` feature
        frames (see :func:`harken.models.registry.encoder_flops`)."""
        return encoder_flops(self.encoder_cfg, num_frames, self.vocab_size, batch_size)


def ctc_loss(
    log_probs: torch.Tensor,
    out_lens: torch.Tensor,
    targets: torch.Tensor,
    target_lens: torch.Tensor,
    blank: int = BLANK_ID,
    label_smoothing: float = 0.0,
    reduction: str = "sum",
    zero_infinity: bool = True,
) -> torch.Tensor:
    """CTC loss with optional label smoothing.

    Args:
        log_probs: (B,T,V) log-softmax outputs (cast to float32).
        out_lens: (B,) valid frames per utterance.
        targets: (B,U) padded label ids (padding value irrelevant).
        target_lens: (B,) label counts.
        label_smoothing: alpha in [0, 1).
        reduction: "sum" (summed over utterances; the trainer normalises),
            "mean" (per-utterance loss averaged over the batch) or "none"
            (per-utterance losses (B,), e.g. to detect non-finite values).

    Label smoothing (regulariser form, NOT mixing the posteriors with a
    uniform distribution before the CTC forward-backward, which would change
    the alignment lattice and is wrong)::

        loss_b = (1 - alpha) * CTC_b
                 + alpha * sum_{t < T_b} KL(U || p_t)
        KL(U || p_t) = -log V - (1/V) * sum_v log p_t(v)   (>= 0)

    i.e. each valid frame's posterior is pulled toward the uniform
    distribution U over the V output symbols (cross-entropy against U minus
    its constant entropy).  Padded frames are masked out; the same reduction
    is applied to the combined per-utterance loss.  ``zero_infinity=True``
    zeroes infeasible utterances (T' too short for the labels).
    """
    lp = log_probs.float()
    out_lens = out_lens.long()
    per_utt = F.ctc_loss(
        lp.transpose(0, 1),
        targets.long(),
        out_lens,
        target_lens.long(),
        blank=blank,
        reduction="none",
        zero_infinity=zero_infinity,
    )
    if label_smoothing > 0.0:
        v = lp.size(-1)
        valid = torch.arange(lp.size(1), device=lp.device)[None, :] < out_lens[:, None]
        kl = -math.log(v) - lp.mean(dim=-1)  # (B,T)
        kl = torch.where(valid, kl, torch.zeros_like(kl)).sum(dim=1)
        per_utt = (1.0 - label_smoothing) * per_utt + label_smoothing * kl
    if reduction == "none":
        return per_utt
    if reduction == "sum":
        return per_utt.sum()
    if reduction == "mean":
        return per_utt.mean()
    raise ValueError(f"unknown reduction {reduction!r}")
