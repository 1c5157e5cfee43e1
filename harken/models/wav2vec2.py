"""A pretrained wav2vec2 encoder (Hugging Face ``transformers``) fine-tuned with harken's CTC head.

``EncoderConfig(type="wav2vec2", pretrained="path/to/local/hf/dir")``.  The encoder is fed the raw
16 kHz waveform (B,S) in [-1, 1] with sample lengths -- the model is built with ``frontend=None`` --
and returns ``(hidden (B,T',D), T')`` at one frame per ``prod(conv_stride)`` samples (320 = 20 ms
for every released wav2vec2 checkpoint).

* Input normalisation: zero mean / unit variance per utterance over its valid samples, like
  ``Wav2Vec2FeatureExtractor(do_normalize=True)`` (eps 1e-7); skipped when the checkpoint's
  ``preprocessor_config.json`` says ``do_normalize: false``.  Padding is zero after normalising.
* An attention mask is always built from the lengths, so the transformer never sees padding, and
  the GroupNorm of "group"-norm checkpoints (wav2vec2-base) takes its statistics over the valid
  frames only: a padded utterance gets the same output as alone (HF's own forward lets padding
  shift those statistics, which is why it tells base models to decode unpadded).
* ``d_model`` comes from the pretrained config (``hidden_size``); the given value is overwritten.
* ``layerdrop`` and ``mask_time_prob`` override the checkpoint's values; ``dropout`` is applied to
  the encoder output (the role of ``final_dropout`` in ``Wav2Vec2ForCTC``).  The checkpoint's own
  dropouts (hidden, attention, feat_proj, ...) are kept as they are.
* ``freeze_feature_encoder``: the conv feature encoder gets ``requires_grad=False``.

Nothing is ever downloaded: ``from_pretrained`` runs with ``local_files_only=True``.

Training: the encoder class declares ``takes_waveform = True`` (so :func:`harken.models.build.build_model`
builds it without the fbank frontend and the trainer estimates no CMVN), ``find_unused_parameters``
(layer drop) and its own optimizer groups (:meth:`Wav2Vec2Encoder.param_groups`: the encoder at
``encoder_lr_scale`` times the head's learning rate).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from harken.models.base import Encoder
from harken.models.registry import EncoderConfig, register_encoder

if TYPE_CHECKING:
    from harken.models.ctc import CtcModel

SAMPLE_RATE = 16000
_NORM_EPS = 1e-7


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the wav2vec2 encoder needs `transformers`: pip install 'harken[wav2vec2]'") from e
    return transformers


def _pretrained_dir(cfg: EncoderConfig) -> Path:
    if not cfg.pretrained:
        raise ValueError("encoder type 'wav2vec2' needs model.encoder.pretrained=<local Hugging Face model dir>")
    p = Path(cfg.pretrained).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{cfg.pretrained}: not a local Hugging Face model dir (no config.json); "
                                f"nothing is downloaded, copy the checkpoint there first")
    return p


def _read_preprocessor(p: Path) -> dict:
    """The checkpoint's feature-extractor settings: ``preprocessor_config.json`` (the Hub layout) or
    the ``feature_extractor`` section of ``processor_config.json`` (transformers 5); {} if neither."""
    f = p / "preprocessor_config.json"
    if f.is_file():
        return json.loads(f.read_text())
    f = p / "processor_config.json"
    if f.is_file():
        return json.loads(f.read_text()).get("feature_extractor", {})
    return {}


class _MaskedGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose statistics skip padded frames while ``self.lengths`` (B,) is set.
    Swapped in by class assignment, so parameters and state-dict keys stay HF's."""

    lengths: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lengths is None:
            return super().forward(x)
        b, c, t = x.shape
        g = self.num_groups
        xf = x.float().reshape(b, g, c // g, t)
        m = (torch.arange(t, device=x.device)[None, :] < self.lengths[:, None]).reshape(b, 1, 1, t).float()
        n = (m.sum(dim=(2, 3), keepdim=True) * (c // g)).clamp(min=1.0)
        mean = (xf * m).sum(dim=(2, 3), keepdim=True) / n
        var = (((xf - mean) * m) ** 2).sum(dim=(2, 3), keepdim=True) / n
        y = ((xf - mean) / torch.sqrt(var + self.eps)).reshape(b, c, t)
        if self.affine:
            y = y * self.weight.float()[None, :, None] + self.bias.float()[None, :, None]
        return y.to(x.dtype)


def hidden_size(cfg: EncoderConfig) -> int:
    """The pretrained model's hidden size (its config.json only; weights are not read)."""
    return int(json.loads((_pretrained_dir(cfg) / "config.json").read_text())["hidden_size"])


@register_encoder("wav2vec2")
class Wav2Vec2Encoder(Encoder):
    """Encoder contract: ``forward(wave (B,S), wave_lens (B,)) -> (hidden (B,T',D), out_lens (B,))``."""

    takes_waveform = True  # reads the raw waveform: no fbank frontend, no CMVN
    find_unused_parameters = True  # layer drop leaves some parameters without gradients in some steps

    @classmethod
    def prepare_config(cls, cfg: EncoderConfig) -> EncoderConfig:
        """A copy with ``d_model`` from the checkpoint's config.json (weights are not read)."""
        return dataclasses.replace(cfg, d_model=hidden_size(cfg))

    @classmethod
    def param_groups(cls, model: nn.Module, base_lr: float, weight_decay: float) -> list[dict]:
        return param_groups(model, base_lr, weight_decay)

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        tf = _transformers()
        path = _pretrained_dir(cfg)
        prep = _read_preprocessor(path)
        sr = int(prep.get("sampling_rate", SAMPLE_RATE))
        if sr != SAMPLE_RATE:
            raise ValueError(f"{path}: the checkpoint expects {sr} Hz audio; harken feeds {SAMPLE_RATE} Hz")
        self.normalize = bool(prep.get("do_normalize", True))
        self.model = tf.Wav2Vec2Model.from_pretrained(
            str(path), local_files_only=True, layerdrop=cfg.layerdrop, mask_time_prob=cfg.mask_time_prob)
        hf = self.model.config
        # time masking is drawn here (not inside HF) so that utterances shorter than one mask span
        # are simply not masked instead of raising; HF's own masking is switched off
        self.mask_time_prob = float(cfg.mask_time_prob)
        hf.mask_time_prob = 0.0
        # exact GroupNorm over valid frames (see the module docstring)
        self._group_norms: list[_MaskedGroupNorm] = []
        for layer in self.model.feature_extractor.conv_layers:
            norm = getattr(layer, "layer_norm", None)
            if type(norm) is nn.GroupNorm:
                norm.__class__ = _MaskedGroupNorm
                self._group_norms.append(norm)
        if cfg.freeze_feature_encoder:
            self.model.freeze_feature_encoder()
        if cfg.activation_checkpointing:
            enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5
            (enable or self.model.gradient_checkpointing_enable)()
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.d_model != int(hf.hidden_size):  # built without prepare_config: keep the caller's cfg as it is
            cfg = dataclasses.replace(cfg, d_model=int(hf.hidden_size))
        self.cfg = cfg
        self.d_model = cfg.d_model  # the CTC head is sized from this
        self.samples_per_frame = int(math.prod(hf.conv_stride))

    # -- timing --------------------------------------------------------------------------
    @property
    def subsampling_factor(self) -> int:
        """Input units (samples) per output frame: 320 for released checkpoints."""
        return self.samples_per_frame

    @property
    def frame_seconds(self) -> float:
        """Seconds per output frame (0.02 for released checkpoints)."""
        return self.samples_per_frame / SAMPLE_RATE

    def output_lengths(self, wave_lens: torch.Tensor) -> torch.Tensor:
        """Output frames for ``wave_lens`` samples (the conv feature encoder's formula)."""
        return self.model._get_feat_extract_output_lengths(wave_lens.long()).clamp(min=0).long()

    # -- forward -------------------------------------------------------------------------
    def normalize_wave(self, wave: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per-utterance zero mean / unit variance over valid samples; padding set to 0."""
        v = valid.to(wave.dtype)
        n = v.sum(dim=1, keepdim=True).clamp(min=1.0)
        mean = (wave * v).sum(dim=1, keepdim=True) / n
        var = (((wave - mean) * v) ** 2).sum(dim=1, keepdim=True) / n
        return (wave - mean) / torch.sqrt(var + _NORM_EPS) * v

    def _time_mask(self, batch: int, frames: int, out_lens: torch.Tensor) -> torch.Tensor | None:
        hf = self.model.config
        if not (self.training and self.mask_time_prob > 0 and getattr(hf, "apply_spec_augment", True)):
            return None
        if frames < hf.mask_time_length:
            return None
        from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

        frame_mask = torch.arange(frames)[None, :] < out_lens.cpu()[:, None]
        m = _compute_mask_indices((batch, frames), mask_prob=self.mask_time_prob, mask_length=hf.mask_time_length,
                                  attention_mask=frame_mask.long(), min_masks=hf.mask_time_min_masks)
        return torch.from_numpy(m).to(out_lens.device) & frame_mask.to(out_lens.device)

    def forward(self, wave: torch.Tensor, wave_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if wave.dim() != 2:
            raise ValueError(f"wav2vec2 encoder expects a waveform batch (B,S), got shape {tuple(wave.shape)}")
        wave_lens = wave_lens.to(wave.device).long()
        valid = torch.arange(wave.shape[1], device=wave.device)[None, :] < wave_lens[:, None]
        x = self.normalize_wave(wave.float(), valid) if self.normalize else wave.float() * valid
        out_lens = self.output_lengths(wave_lens)
        frames = int(self.model._get_feat_extract_output_lengths(torch.tensor(wave.shape[1])))
        mask = self._time_mask(wave.shape[0], max(frames, 0), out_lens)
        self._set_group_norm_lengths(wave_lens)
        try:
            h = self.model(x, attention_mask=valid.long(), mask_time_indices=mask).last_hidden_state
        finally:
            for norm in self._group_norms:
                norm.lengths = None
        return self.dropout(h), out_lens

    def _set_group_norm_lengths(self, wave_lens: torch.Tensor) -> None:
        if not self._group_norms:
            return
        lens = wave_lens
        for layer in self.model.feature_extractor.conv_layers:
            lens = torch.div(lens - layer.conv.kernel_size[0], layer.conv.stride[0], rounding_mode="floor") + 1
            norm = getattr(layer, "layer_norm", None)
            if isinstance(norm, _MaskedGroupNorm):
                norm.lengths = lens.clamp(min=0)


# ---------------------------------------------------------------------------------------- training
def build_wav2vec2_ctc(encoder_cfg: EncoderConfig, vocab_size: int) -> CtcModel:
    """A :class:`CtcModel` with no fbank frontend (it is fed the raw waveform) around the pretrained
    wav2vec2 encoder named by ``encoder_cfg.pretrained``.  ``encoder_cfg`` is not modified; the
    model's own copy has ``d_model`` set from the checkpoint."""
    if encoder_cfg.type != "wav2vec2":
        raise ValueError(f"build_wav2vec2_ctc needs encoder type 'wav2vec2', not {encoder_cfg.type!r}")
    from harken.models.ctc import CtcModel

    return CtcModel(encoder_cfg, vocab_size, frontend=None)


def param_groups(model: nn.Module, base_lr: float, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: the CTC head (and anything outside the encoder) at ``base_lr``, the
    pretrained encoder at ``base_lr * encoder_lr_scale``; biases and 1-D parameters (norms) without
    weight decay; frozen parameters (the feature encoder) left out.  Head groups come first, so
    ``scheduler.get_last_lr()[0]`` is the head's rate.  Each group carries a ``name``."""
    core = getattr(model, "module", model)  # DDP-wrapped or not
    scale = float(core.encoder_cfg.encoder_lr_scale)
    buckets: dict[str, list] = {"head": [], "head_no_decay": [], "encoder": [], "encoder_no_decay": []}
    for n, p in core.named_parameters():
        if not p.requires_grad:
            continue
        part = "encoder" if n.startswith("encoder.") else "head"
        no_decay = p.ndim <= 1 or n.endswith(".bias")
        buckets[part + ("_no_decay" if no_decay else "")].append(p)
    groups = []
    for name, params in buckets.items():
        if not params:
            continue
        groups.append({"name": name, "params": params,
                       "lr": base_lr * (scale if name.startswith("encoder") else 1.0),
                       "weight_decay": 0.0 if name.endswith("no_decay") else weight_decay})
    return groups
