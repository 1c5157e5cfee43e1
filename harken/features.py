"""Feature frontend as torch modules: Kaldi-compatible log-mel filterbank, global CMVN, SpecAugment.

Everything in the ``forward`` paths is plain, batched torch (no numpy, no Python loops over frames
or utterances, no data-dependent Python branches), so :class:`Fbank` and :class:`Frontend` (in eval
mode) export with ``torch.onnx.export(..., dynamo=True)`` with dynamic batch and time dimensions.

:class:`Fbank` reproduces Kaldi's ``compute-fbank-feats`` / kaldi-native-fbank (``use_energy=false``):
per frame: [dither] -> DC removal -> pre-emphasis -> window -> zero-pad to a power of two -> |rfft|^2
-> triangular mel filters on the HTK mel scale -> log(max(x, FLT_EPSILON)).
Waveforms arrive as float32 in [-1, 1] and are multiplied by ``input_scale`` (32768) first, as Kaldi
works on the int16 scale.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "FbankConfig",
    "Fbank",
    "GlobalCMVN",
    "CmvnAccumulator",
    "compute_cmvn",
    "SpecAugmentConfig",
    "SpecAugment",
    "Frontend",
    "mel_scale",
    "kaldi_mel_banks",
    "kaldi_window",
]


# ----------------------------------------------------------------------------------------------
# Fbank
# ----------------------------------------------------------------------------------------------


@dataclass
class FbankConfig:
    sample_rate: int = 16000
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    dither: float = 0.0
    preemph_coeff: float = 0.97
    remove_dc_offset: bool = True
    window_type: str = "povey"  # povey | hann (periodic) | hanning (Kaldi, symmetric) | hamming | rectangular
    round_to_power_of_two: bool = True
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0: nyquist + high_freq (Kaldi semantics)
    snip_edges: bool = True
    input_scale: float = 32768.0
    log_floor: float = 1.1920929e-07  # FLT_EPSILON
    use_power: bool = True

    @property
    def win_length(self) -> int:
        return int(self.sample_rate * 0.001 * self.frame_length_ms)

    @property
    def hop_length(self) -> int:
        return int(self.sample_rate * 0.001 * self.frame_shift_ms)

    @property
    def n_fft(self) -> int:
        w = self.win_length
        return 1 << (w - 1).bit_length() if self.round_to_power_of_two else w


def mel_scale(freq):
    """HTK/Kaldi mel scale: 1127 ln(1 + f / 700). Works on floats and tensors."""
    if isinstance(freq, Tensor):
        return 1127.0 * torch.log1p(freq / 700.0)
    return 1127.0 * math.log1p(freq / 700.0)


def kaldi_mel_banks(cfg: FbankConfig) -> Tensor:
    """Kaldi's triangular mel filters as a ``(n_fft // 2 + 1, num_mel_bins)`` float32 matrix.

    As in Kaldi, only FFT bins ``0 .. n_fft/2 - 1`` get weights; the Nyquist row is zero.
    """
    n_fft = cfg.n_fft
    nyquist = 0.5 * cfg.sample_rate
    high = cfg.high_freq if cfg.high_freq > 0 else nyquist + cfg.high_freq
    low = cfg.low_freq
    if not (0.0 <= low < nyquist and 0.0 < high <= nyquist and low < high):
        raise ValueError(f"bad mel frequency range low_freq={low}, high_freq={high} (nyquist {nyquist})")
    num_bins = cfg.num_mel_bins
    mel_low, mel_high = mel_scale(low), mel_scale(high)
    delta = (mel_high - mel_low) / (num_bins + 1)
    n_half = n_fft // 2
    freqs = torch.arange(n_half, dtype=torch.float64) * (cfg.sample_rate / n_fft)
    mel = mel_scale(freqs)[:, None]  # (n_half, 1)
    b = torch.arange(num_bins, dtype=torch.float64)[None, :]
    left = mel_low + b * delta
    center = mel_low + (b + 1) * delta
    right = mel_low + (b + 2) * delta
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    w = torch.where(mel <= center, up, down)
    w = torch.where((mel > left) & (mel < right), w, torch.zeros_like(w))
    out = torch.zeros(n_half + 1, num_bins, dtype=torch.float64)
    out[:n_half] = w
    return out.to(torch.float32)


def kaldi_window(window_type: str, length: int) -> Tensor:
    """Kaldi's window functions (symmetric, ``a = 2 pi / (N - 1)``); "hann" is periodic as in knf."""
    n = torch.arange(length, dtype=torch.float64)
    a = 2.0 * math.pi / (length - 1) if length > 1 else 0.0
    wt = window_type.lower()
    if wt == "hanning":  # Kaldi's symmetric Hann
        w = 0.5 - 0.5 * torch.cos(a * n)
    elif wt == "hann":  # periodic Hann (torch.hann_window), as kaldi-native-fbank's "hann"
        w = 0.5 - 0.5 * torch.cos((2.0 * math.pi / length) * n)
    elif wt == "hamming":
        w = 0.54 - 0.46 * torch.cos(a * n)
    elif wt == "povey":
        w = (0.5 - 0.5 * torch.cos(a * n)).pow(0.85)
    elif wt == "rectangular":
        w = torch.ones(length, dtype=torch.float64)
    else:
        raise ValueError(f"unknown window_type {window_type!r} (povey, hann, hanning, hamming, rectangular)")
    return w.to(torch.float32)


class Fbank(nn.Module):
    """Batched Kaldi-compatible log-mel filterbank.

    ``forward(wave (B, S) float32 in [-1, 1], lengths (B,) int64) -> (feats (B, T, num_mel_bins),
    n_frames (B,) int64)`` where ``T = num_frames(S)`` (frames of the padded width) and frames at or
    beyond an utterance's own frame count are zero.
    """

    def __init__(self, cfg: FbankConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else FbankConfig()
        self.win = cfg.win_length
        self.hop = cfg.hop_length
        self.n_fft = cfg.n_fft
        if self.win <= 0 or self.hop <= 0:
            raise ValueError("frame_length_ms and frame_shift_ms must give at least one sample")
        # left context (in samples) before frame 0 when snip_edges=False (Kaldi FirstSampleOfFrame)
        self.left = 0 if cfg.snip_edges else self.win // 2 - self.hop // 2
        if self.left < 0:
            raise ValueError("snip_edges=False needs frame_length >= frame_shift")
        self.register_buffer("window", kaldi_window(cfg.window_type, self.win), persistent=False)
        self.register_buffer("mel", kaldi_mel_banks(cfg), persistent=False)

    @property
    def num_mel_bins(self) -> int:
        return self.cfg.num_mel_bins

    def num_frames(self, num_samples):
        """Frame count for ``num_samples`` samples (int or int64 tensor), Kaldi's rule."""
        return _num_frames(num_samples, self.win, self.hop, self.cfg.snip_edges)

    def forward(self, wave: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        win, hop = self.win, self.hop
        x = (wave if wave.is_floating_point() else wave.to(torch.float32)) * cfg.input_scale
        batch, num_samples = x.shape[0], x.shape[1]
        lengths = lengths.to(torch.int64)
        n_frames = self.num_frames(lengths)

        if cfg.snip_edges:
            if num_samples < win:  # shape-only branch; nothing fits
                return x.new_zeros(batch, 0, cfg.num_mel_bins), n_frames
            frames = x.unfold(1, win, hop)  # (B, T, win)
        else:
            # Kaldi reflects out-of-range sample indices at each utterance's own edges:
            # s < 0 -> -s - 1, s >= n -> 2n - 1 - s (applied repeatedly, i.e. periodic with 2n).
            # Build the extended signal [left reflection | wave | K spare] and overwrite the K samples
            # after each utterance's end with its reflection (small gathers/scatter, not per frame),
            # then frame it with unfold. Frames < n_frames never read beyond n + win/2 - 1.
            t_max = (num_samples + hop // 2) // hop
            if t_max <= 0:  # shape-only branch
                return x.new_zeros(batch, 0, cfg.num_mel_bins), n_frames
            ext_len = (t_max - 1) * hop + win
            left, k = self.left, win
            n = lengths.clamp(min=1, max=num_samples)[:, None]  # (B, 1)
            dev = x.device
            left_idx = _reflect(torch.arange(-left, 0, device=dev, dtype=torch.int64)[None, :], n)
            right_pos = n + torch.arange(k, device=dev, dtype=torch.int64)[None, :]  # (B, K)
            right_idx = _reflect(right_pos, n)
            ext = torch.cat([torch.gather(x, 1, left_idx.expand(batch, left)), x, x.new_zeros(batch, k)], dim=1)
            ext = ext.scatter(1, right_pos + left, torch.gather(x, 1, right_idx))
            ext = ext[:, :ext_len]
            frames = ext.unfold(1, win, hop)  # (B, T, win)

        if self.training and cfg.dither > 0.0:
            frames = frames + cfg.dither * torch.randn_like(frames)
        # DC removal and pre-emphasis commute up to a constant: preemph(x - m) = preemph(x) - (1 - c) m,
        # with Kaldi's first-sample rule y[0] = x[0] - c x[0].
        c = cfg.preemph_coeff
        if c != 0.0:
            shifted = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
            y = torch.add(frames, shifted, alpha=-c)
        else:
            y = frames
        if cfg.remove_dc_offset:
            y = y - (1.0 - c) * frames.mean(dim=-1, keepdim=True)
        y = y * self.window
        ri = torch.view_as_real(torch.fft.rfft(y, n=self.n_fft, dim=-1))
        re, im = ri[..., 0], ri[..., 1]
        power = re * re + im * im  # (B, T, n_fft/2 + 1)
        if not cfg.use_power:
            power = power.sqrt()
        feats = torch.matmul(power, self.mel).clamp(min=cfg.log_floor).log()
        t_idx = torch.arange(feats.shape[1], device=feats.device)
        mask = t_idx[None, :] < n_frames[:, None]
        feats = feats * mask[:, :, None].to(feats.dtype)
        return feats, n_frames


def _reflect(idx: Tensor, n: Tensor) -> Tensor:
    """Kaldi's edge reflection of sample indices for a signal of length ``n`` (>= 1), any distance."""
    p = torch.remainder(idx, 2 * n)
    return torch.where(p < n, p, 2 * n - 1 - p)


def _num_frames(num_samples, win: int, hop: int, snip_edges: bool):
    if isinstance(num_samples, Tensor):
        n = num_samples.to(torch.int64)
        out = (n - win) // hop + 1 if snip_edges else (n + hop // 2) // hop
        return out.clamp(min=0)
    n = int(num_samples)
    if snip_edges:
        return 1 + (n - win) // hop if n >= win else 0
    return max((n + hop // 2) // hop, 0)


# ----------------------------------------------------------------------------------------------
# CMVN
# ----------------------------------------------------------------------------------------------


class GlobalCMVN(nn.Module):
    """Global mean/variance normalisation: ``(x - mean) * istd``; ``mean``/``istd`` are saved buffers."""

    def __init__(self, mean: Tensor, istd: Tensor, count: int = 0):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        istd = torch.as_tensor(istd, dtype=torch.float32).reshape(-1)
        if mean.shape != istd.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and istd {tuple(istd.shape)} differ in shape")
        self.register_buffer("mean", mean)
        self.register_buffer("istd", istd)
        self.count = int(count)

    @property
    def num_bins(self) -> int:
        return self.mean.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) * self.istd

    @classmethod
    def identity(cls, num_bins: int) -> "GlobalCMVN":
        return cls(torch.zeros(num_bins), torch.ones(num_bins))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "GlobalCMVN":
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        try:
            return cls(torch.tensor(d["mean"]), torch.tensor(d["istd"]), int(d.get("count", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a CMVN file ({e})") from None

    def to_file(self, path: str | os.PathLike) -> None:
        d = {"mean": self.mean.tolist(), "istd": self.istd.tolist(), "count": self.count}
        from harken.fsutil import atomic_write_text

        atomic_write_text(path, json.dumps(d), fsync=False)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, count={self.count}"


class CmvnAccumulator:
    """Accumulates float64 sum, sum of squares and frame count over valid (unpadded) frames."""

    def __init__(self, num_bins: int | None = None):
        self.sum: Tensor | None = None
        self.sumsq: Tensor | None = None
        self.count = 0
        if num_bins is not None:
            self._init(num_bins)

    def _init(self, num_bins: int) -> None:
        self.sum = torch.zeros(num_bins, dtype=torch.float64)
        self.sumsq = torch.zeros(num_bins, dtype=torch.float64)

    def update(self, feats: Tensor, lens: Tensor | None = None) -> None:
        """``feats`` (B, T, F) or (T, F); ``lens`` (B,) frame counts (None: all frames valid)."""
        feats = feats.detach()
        if feats.dim() == 2:
            feats = feats[None]
            if lens is not None:
                lens = torch.as_tensor(lens).reshape(1)
        b, t, f = feats.shape
        if self.sum is None:
            self._init(f)
        elif self.sum.shape[0] != f:
            raise ValueError(f"feature dim {f} != accumulated dim {self.sum.shape[0]}")
        x = feats.to(torch.float64).cpu()
        if lens is None:
            valid = x.reshape(-1, f)
        else:
            lens = torch.as_tensor(lens).cpu().to(torch.int64)
            mask = torch.arange(t)[None, :] < lens[:, None]
            valid = x[mask]
        self.sum += valid.sum(dim=0)
        self.sumsq += (valid * valid).sum(dim=0)
        self.count += int(valid.shape[0])

    def result(self, floor_std: float = 1e-5) -> GlobalCMVN:
        if self.sum is None or self.count == 0:
            raise ValueError("CmvnAccumulator: no frames accumulated")
        mean = self.sum / self.count
        var = (self.sumsq / self.count - mean * mean).clamp(min=0.0)
        std = var.sqrt().clamp(min=floor_std)
        return GlobalCMVN(mean.to(torch.float32), (1.0 / std).to(torch.float32), self.count)


def compute_cmvn(waves_iter: Iterable, cfg: FbankConfig | None = None, batch_size: int = 1) -> GlobalCMVN:
    """Global CMVN from an iterable of 1-D float32 waveforms (numpy arrays or tensors) in [-1, 1]."""
    fbank = Fbank(cfg).eval()
    acc = CmvnAccumulator(fbank.num_mel_bins)
    with torch.no_grad():
        for w in waves_iter:
            wave = torch.as_tensor(w, dtype=torch.float32).reshape(1, -1)
            feats, n = fbank(wave, torch.tensor([wave.shape[1]]))
            acc.update(feats, n)
    return acc.result()


# ----------------------------------------------------------------------------------------------
# SpecAugment
# ----------------------------------------------------------------------------------------------


@dataclass
class SpecAugmentConfig:
    num_freq_masks: int = 2
    max_freq_width: int = 15
    num_time_masks: int = 2
    max_time_width: int = 30
    max_time_ratio: float = 0.05  # a time mask never exceeds this fraction of the utterance length
    time_warp: int = 0  # 0 disables; warping is not implemented
    # ramp the masking in over the first N optimizer steps (counts and widths grow linearly from
    # 0 to the values above); 0 = full strength from the first step
    ramp_steps: int = 0

    __config_rules__ = {"ramp_steps": {"range": ">=0"}}


class SpecAugment(nn.Module):
    """Frequency and time masking (filled with 0) in training mode; identity in eval mode.

    Widths and positions are drawn per utterance from the torch global RNG (on CPU), so
    ``torch.manual_seed`` / RNG-state restore makes it reproducible. Time masks stay inside each
    utterance's valid frames and are at most ``min(max_time_width, max_time_ratio * len)`` wide.

    Strength ramp: :meth:`set_progress` (the trainer calls it before each step when
    ``ramp_steps > 0``) scales mask counts (rounded) and widths (floored) by a fraction in [0, 1].
    It is a plain attribute, not a buffer: checkpoints, eval mode and exported graphs never see it.
    """

    def __init__(self, cfg: SpecAugmentConfig | None = None):
        super().__init__()
        self.cfg = cfg if cfg is not None else SpecAugmentConfig()
        if self.cfg.time_warp:
            raise NotImplementedError("SpecAugment time_warp is not implemented; set time_warp=0")
        self.strength = 1.0

    def set_progress(self, fraction: float) -> None:
        """Masking strength in [0, 1] (1 = the configured counts and widths)."""
        self.strength = min(1.0, max(0.0, float(fraction)))

    def _scaled(self) -> tuple[int, int, int, int, float]:
        cfg, a = self.cfg, self.strength
        if a >= 1.0:
            return cfg.num_freq_masks, cfg.max_freq_width, cfg.num_time_masks, cfg.max_time_width, cfg.max_time_ratio
        return (int(cfg.num_freq_masks * a + 0.5), int(cfg.max_freq_width * a), int(cfg.num_time_masks * a + 0.5),
                int(cfg.max_time_width * a), cfg.max_time_ratio * a)

    def forward(self, feats: Tensor, lens: Tensor) -> Tensor:
        if not self.training:
            return feats
        n_freq, freq_width, n_time, time_width, time_ratio = self._scaled()
        b, t, f = feats.shape
        mask = torch.zeros(b, t, f, dtype=torch.bool)
        if n_freq > 0 and freq_width > 0:
            fw = torch.randint(0, min(freq_width, f) + 1, (b, n_freq))
            f0 = (torch.rand(b, n_freq) * (f - fw + 1)).floor().long()
            fr = torch.arange(f)[None, None, :]
            fm = ((fr >= f0[..., None]) & (fr < (f0 + fw)[..., None])).any(dim=1)  # (B, F)
            mask |= fm[:, None, :]
        if n_time > 0 and time_width > 0:
            lens_c = lens.detach().cpu().to(torch.int64).clamp(min=0, max=t)
            max_w = torch.minimum(
                torch.full_like(lens_c, time_width),
                (lens_c.to(torch.float64) * time_ratio).floor().long(),
            )  # (B,)
            tw = (torch.rand(b, n_time) * (max_w[:, None] + 1)).floor().long()
            t0 = (torch.rand(b, n_time) * (lens_c[:, None] - tw + 1)).floor().long()
            tr = torch.arange(t)[None, None, :]
            tm = ((tr >= t0[..., None]) & (tr < (t0 + tw)[..., None])).any(dim=1)  # (B, T)
            mask |= tm[:, :, None]
        return feats.masked_fill(mask.to(feats.device), 0.0)


# ----------------------------------------------------------------------------------------------
# Frontend
# ----------------------------------------------------------------------------------------------


class Frontend(nn.Module):
    """wave -> Fbank -> GlobalCMVN -> (zero padded frames) -> SpecAugment (training only)."""

    def __init__(
        self,
        fbank: FbankConfig | None = None,
        specaug: SpecAugmentConfig | None = None,
        cmvn: GlobalCMVN | None = None,
    ):
        super().__init__()
        self.fbank = Fbank(fbank)
        self.cmvn = cmvn if cmvn is not None else GlobalCMVN.identity(self.fbank.num_mel_bins)
        self.specaug = SpecAugment(specaug) if specaug is not None else None

    @property
    def num_mel_bins(self) -> int:
        return self.fbank.num_mel_bins

    def set_cmvn(self, cmvn: GlobalCMVN) -> None:
        if cmvn.num_bins != self.fbank.num_mel_bins:
            raise ValueError(f"CMVN has {cmvn.num_bins} bins, fbank {self.fbank.num_mel_bins}")
        self.cmvn = cmvn.to(self.fbank.mel.device)

    def forward(self, wave: Tensor, lengths: Tensor, precomputed: bool = False) -> tuple[Tensor, Tensor]:
        """``precomputed=True``: ``wave`` already holds fbank features (B, T, F) with frame counts in
        ``lengths`` (a feature cache); CMVN and SpecAugment still run here."""
        feats, n = (wave, lengths) if precomputed else self.fbank(wave, lengths)
        feats = self.cmvn(feats)
        mask = torch.arange(feats.shape[1], device=feats.device)[None, :] < n[:, None]
        feats = feats * mask[:, :, None].to(feats.dtype)
        if self.specaug is not None and self.training:
            feats = self.specaug(feats, n)
        return feats, n
