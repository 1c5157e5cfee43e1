"""Waveform augmentation: speed perturbation, room reverberation, additive noise at a random SNR,
a telephone channel, volume, and a noise floor.

Every random choice is drawn from an explicit ``numpy.random.Generator`` passed by the caller (the
dataset derives one per (seed, epoch, utterance index)), so an utterance is augmented the same way
on any DataLoader worker and after a resume. A transform whose probability is 0 draws nothing, so
turning the newer transforms (reverb, telephone, floor: all off by default) on or off leaves the
random choices of the others as they were.

The noise generators (white, pink, brown, babble) make a noise folder for corpora that ship
without one; :func:`generate_noise_folder` writes them as WAV files that :class:`NoiseSource`
then reads like any recorded noise.

Room reverberation uses synthetic exponential-decay impulse responses (:func:`exp_decay_rir`: a
direct path, then a diffuse Gaussian tail decaying 60 dB in RT60, faster above 2 kHz), not an
image-source model: it costs a few milliseconds per utterance in a DataLoader worker and needs no
extra dependency, and for CTC training the late diffuse tail and the direct-to-reverberant ratio
matter more than the exact early reflections of a shoebox room.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from harken.audio import SAMPLE_RATE, AudioError, load_audio, save_wav

log = logging.getLogger(__name__)

NOISE_EXTS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus")
_EPS_POWER = 1e-10  # mean square below this counts as silence (about -100 dBFS)


# ------------------------------------------------------------------------------------------------
# noise generators
def _scale_rms(x: np.ndarray, rms: float) -> np.ndarray:
    cur = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
    if cur > 0:
        x = x * (rms / cur)
    return x.astype(np.float32, copy=False)


def _shaped_noise(n: int, rng: np.random.Generator, gain_fn) -> np.ndarray:
    """White Gaussian noise shaped in the frequency domain by the amplitude response ``gain_fn``
    (a function of the normalised frequency in cycles/sample, 0..0.5). Circular, so any length."""
    if n <= 0:
        return np.zeros(0, dtype=np.float32)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    return np.fft.irfft(spec * gain_fn(f), n)


def white_noise(n: int, rng: np.random.Generator, rms: float = 1.0) -> np.ndarray:
    """Gaussian white noise (flat spectrum), ``n`` samples at ``rms``."""
    return _scale_rms(rng.standard_normal(max(n, 0)), rms)


def pink_noise(n: int, rng: np.random.Generator, rms: float = 1.0) -> np.ndarray:
    """1/f noise (power falls 3 dB per octave), made by shaping white noise's spectrum by 1/sqrt(f).
    The DC bin is removed."""

    def gain(f):
        g = np.zeros_like(f)
        g[1:] = 1.0 / np.sqrt(f[1:])
        return g

    return _scale_rms(_shaped_noise(n, rng, gain), rms)


def brown_noise(n: int, rng: np.random.Generator, rms: float = 1.0, corner_hz: float = 20.0,
                sr: int = SAMPLE_RATE) -> np.ndarray:
    """1/f^2 (Brownian) noise, power falls 6 dB per octave: white noise through a leaky integrator
    ``y[t] = a*y[t-1] + x[t]`` (an integrator whose leak is a first-order high-pass at
    ``corner_hz``), so it does not drift like a plain cumulative sum. Applied circularly in the
    frequency domain, then the mean is removed."""
    a = float(np.exp(-2 * np.pi * corner_hz / sr))

    def gain(f):
        return 1.0 / np.abs(1.0 - a * np.exp(-2j * np.pi * f))

    y = _shaped_noise(n, rng, gain)
    if y.size:
        y = y - y.mean()
    return _scale_rms(y, rms)


def babble_noise(n: int, speech_waves: Sequence[np.ndarray], rng: np.random.Generator,
                 num_talkers: int = 5, rms: float = 1.0) -> np.ndarray:
    """Babble: the sum of ``num_talkers`` random segments of random utterances (each brought to the
    same level first, so no single talker dominates; short utterances are looped)."""
    waves = [np.asarray(w, dtype=np.float32) for w in speech_waves
             if len(w) and np.mean(np.square(w, dtype=np.float64)) > _EPS_POWER]
    if not waves:
        raise ValueError("babble_noise needs at least one non-silent speech waveform")
    if num_talkers < 1:
        raise ValueError(f"num_talkers must be >= 1, got {num_talkers}")
    out = np.zeros(max(n, 0), dtype=np.float64)
    if n <= 0:
        return out.astype(np.float32)
    for _ in range(num_talkers):
        w = waves[int(rng.integers(len(waves)))]
        seg = _segment(w, n, rng)
        out += _scale_rms(seg, 1.0)
    return _scale_rms(out, rms)


def _segment(w: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``n``-sample stretch of ``w``; if ``w`` is shorter it is looped from a random start."""
    if len(w) >= n:
        start = int(rng.integers(len(w) - n + 1))
        return w[start:start + n]
    start = int(rng.integers(len(w)))
    return np.take(w, (start + np.arange(n)) % len(w))


def generate_noise_folder(out_dir: str | os.PathLike, speech_paths: Sequence[str],
                          seconds_each: float = 30.0, count_per_kind: int = 2, seed: int = 0,
                          sample_rate: int = SAMPLE_RATE, max_speech_files: int = 200) -> list[str]:
    """Write ``count_per_kind`` WAVs each of white, pink, brown and babble noise into ``out_dir``
    (``white_00.wav`` ...) and return all their paths. Files that already exist are kept (not
    rewritten). Babble is built from (at most ``max_speech_files`` of) ``speech_paths``; without
    any speech, babble is skipped with a warning. Each file's content depends only on ``seed``,
    its kind and its number, so re-running after an interruption gives the same folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = int(round(seconds_each * sample_rate))
    if n <= 0:
        raise ValueError(f"seconds_each must be > 0, got {seconds_each}")
    kinds = {"white": 0, "pink": 1, "brown": 2, "babble": 3}
    speech: list[np.ndarray] | None = None
    paths: list[str] = []
    for kind, kind_id in kinds.items():
        for k in range(count_per_kind):
            path = out / f"{kind}_{k:02d}.wav"
            if path.exists():
                paths.append(str(path))
                continue
            rng = np.random.default_rng([seed, kind_id, k])
            if kind == "white":
                wave = white_noise(n, rng)
            elif kind == "pink":
                wave = pink_noise(n, rng)
            elif kind == "brown":
                wave = brown_noise(n, rng, sr=sample_rate)
            else:
                if speech is None:
                    speech = _load_speech(speech_paths, max_speech_files, seed, sample_rate)
                if not speech:
                    log.warning("generate_noise_folder: no usable speech files, babble noise skipped")
                    break
                wave = babble_noise(n, speech, rng)
            # unit RMS Gaussian noise would clip in 16-bit PCM; -20 dBFS RMS keeps peaks below 1.
            wave = _scale_rms(wave, 0.1)
            peak = float(np.max(np.abs(wave)))
            if peak > 0.99:
                wave = wave * (0.99 / peak)
            save_wav(path, wave, sample_rate)
            paths.append(str(path))
    return paths


def _load_speech(paths: Sequence[str], limit: int, seed: int, sr: int) -> list[np.ndarray]:
    paths = list(paths)
    if len(paths) > limit:
        idx = np.random.default_rng([seed, 99]).choice(len(paths), size=limit, replace=False)
        paths = [paths[i] for i in sorted(idx)]
    waves = []
    for p in paths:
        try:
            waves.append(load_audio(p, sample_rate=sr))
        except AudioError as e:
            log.warning("babble: skipping %s", e)
    return waves


# ------------------------------------------------------------------------------------------------
class NoiseSource:
    """Noise recordings loaded once into memory; :meth:`sample` cuts random segments from them.

    ``source`` is a folder (searched recursively for audio files) or a list of file paths.
    Silent files are dropped with a warning; a folder with no usable audio raises ``ValueError``.
    """

    def __init__(self, source: str | os.PathLike | Sequence[str], sample_rate: int = SAMPLE_RATE):
        if isinstance(source, (str, os.PathLike)):
            folder = Path(source)
            if not folder.is_dir():
                raise ValueError(f"noise folder not found (or not a folder): {folder}")
            paths = sorted(str(p) for p in folder.rglob("*")
                           if p.is_file() and p.suffix.lower() in NOISE_EXTS)
            where = f"noise folder {folder}"
        else:
            paths = [str(p) for p in source]
            where = "noise file list"
        self.paths: list[str] = []
        self.waves: list[np.ndarray] = []
        for p in paths:
            w = load_audio(p, sample_rate=sample_rate)  # AudioError names the file
            if np.mean(np.square(w, dtype=np.float64)) <= _EPS_POWER:
                log.warning("noise: %s is silent, not used", p)
                continue
            self.paths.append(p)
            self.waves.append(w)
        if not self.waves:
            raise ValueError(
                f"{where} has no usable audio (looked for {', '.join(NOISE_EXTS)} files"
                + (f"; {len(paths)} found but all silent" if paths else "") + ")"
            )

    def __len__(self) -> int:
        return len(self.waves)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` samples from a random file at a random position (looped if the file is shorter)."""
        w = self.waves[int(rng.integers(len(self.waves)))]
        return np.ascontiguousarray(_segment(w, n, rng), dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# transforms
def add_noise(wave: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``wave + g*noise`` with ``g`` chosen so that the speech-to-noise power ratio over the whole
    utterance is exactly ``snr_db``. ``noise`` is cut (or looped) to the length of ``wave``.
    Silent speech (or silent noise) returns ``wave`` unchanged. No clipping is done here (it would
    change the SNR); :class:`WaveAugmenter` rescales the sum if it peaks above 1."""
    wave = np.asarray(wave, dtype=np.float32)
    noise = np.asarray(noise, dtype=np.float32)
    n = len(wave)
    if n == 0 or len(noise) == 0:
        return wave
    if len(noise) != n:
        noise = np.take(noise, np.arange(n) % len(noise))
    p_speech = float(np.mean(np.square(wave, dtype=np.float64)))
    p_noise = float(np.mean(np.square(noise, dtype=np.float64)))
    if p_speech <= _EPS_POWER or p_noise <= 0.0:
        return wave
    g = np.sqrt(p_speech / (p_noise * 10.0 ** (snr_db / 10.0)))
    return (wave.astype(np.float64) + g * noise.astype(np.float64)).astype(np.float32)


def speed_perturb(wave: np.ndarray, factor: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Kaldi/sox ``speed`` perturbation: tempo and pitch both change by ``factor``.

    The samples are reinterpreted as having been recorded at ``sr*factor`` and resampled to ``sr``:
    factor 1.1 plays 1.1x faster, the result has ``len/1.1`` samples and a 1 kHz tone becomes 1.1 kHz.
    """
    if factor <= 0:
        raise ValueError(f"speed factor must be > 0, got {factor}")
    wave = np.asarray(wave, dtype=np.float32)
    if factor == 1.0 or wave.size == 0:
        return wave
    import soxr

    return soxr.resample(wave, sr * factor, sr, quality="HQ").astype(np.float32, copy=False)


def volume_perturb(wave: np.ndarray, gain_db: float, peak_limit: float = 0.999) -> np.ndarray:
    """Scale by ``gain_db``; clip-safe: if the result would peak above ``peak_limit`` the gain is
    reduced so it peaks exactly there (no hard clipping, no distortion)."""
    wave = np.asarray(wave, dtype=np.float32)
    g = 10.0 ** (gain_db / 20.0)
    peak = float(np.max(np.abs(wave))) if wave.size else 0.0
    if peak * g > peak_limit:
        g = peak_limit / peak
    return (wave * np.float32(g)).astype(np.float32, copy=False)


def _fft_filter(x: np.ndarray, sr: int, gain_fn) -> np.ndarray:
    """``x`` filtered by the real amplitude response ``gain_fn(freq_hz)`` in the frequency domain
    (zero phase), zero-padded to a power of two so the filter does not wrap around."""
    n = len(x)
    if n == 0:
        return np.asarray(x, dtype=np.float32)
    nfft = 1 << int(np.ceil(np.log2(max(2 * n, 2))))
    spec = np.fft.rfft(np.asarray(x, dtype=np.float64), nfft)
    spec *= gain_fn(np.fft.rfftfreq(nfft, 1.0 / sr))
    return np.fft.irfft(spec, nfft)[:n].astype(np.float32)


def _raised_cosine(f: np.ndarray, f0: float, f1: float) -> np.ndarray:
    """0 below ``f0``, 1 above ``f1``, a half cosine between (``f0 < f1``)."""
    t = np.clip((f - f0) / max(f1 - f0, 1e-9), 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * t)


def exp_decay_rir(rt60: float, drr_db: float, rng: np.random.Generator, sr: int = SAMPLE_RATE) -> np.ndarray:
    """A synthetic room impulse response: a unit direct path at sample 0 (so the speech is not
    delayed) and, after a gap of 1-8 ms (the first reflection), a diffuse tail of Gaussian noise
    whose envelope falls 60 dB in ``rt60`` seconds below 2 kHz and in 0.6 x ``rt60`` above (air and
    wall absorption take the highs first). The tail is scaled so that the direct-to-reverberant
    energy ratio is ``drr_db`` (about +10 dB for a talker near the microphone, 0 dB or less far
    away)."""
    if rt60 <= 0:
        raise ValueError(f"rt60 must be > 0, got {rt60}")
    length = max(2, int(round(1.1 * rt60 * sr)))  # down about 66 dB at the end
    t = np.arange(length) / sr
    noise = rng.standard_normal(length)
    low = _fft_filter(noise, sr, lambda f: 1.0 - _raised_cosine(f, 1500.0, 2500.0)).astype(np.float64)
    high = noise - low
    decay = 3.0 * np.log(10.0)  # 60 dB of amplitude: exp(-6.91 t / rt60)
    tail = low * np.exp(-decay * t / rt60) + high * np.exp(-decay * t / (0.6 * rt60))
    gap = int(round(float(rng.uniform(0.001, 0.008)) * sr))
    tail[: min(gap, length)] = 0.0
    energy = float(np.sum(tail ** 2))
    if energy > 0:
        tail *= np.sqrt(10.0 ** (-drr_db / 10.0) / energy)
    tail[0] += 1.0
    return tail.astype(np.float32)


def reverberate(wave: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """``wave`` convolved with ``rir`` (FFT), cut to the length of ``wave`` and brought back to the
    RMS level it had, so reverberation changes the sound, not the level."""
    wave = np.asarray(wave, dtype=np.float32)
    n = len(wave)
    if n == 0:
        return wave
    nfft = 1 << int(np.ceil(np.log2(n + len(rir) - 1)))
    y = np.fft.irfft(np.fft.rfft(wave.astype(np.float64), nfft) * np.fft.rfft(np.asarray(rir, np.float64), nfft),
                     nfft)[:n]
    p_in = float(np.mean(np.square(wave, dtype=np.float64)))
    p_out = float(np.mean(y ** 2))
    if p_out > 0 and p_in > 0:
        y *= np.sqrt(p_in / p_out)
    return y.astype(np.float32)


def mulaw_roundtrip(x: np.ndarray, bits: int = 8, mu: float = 255.0) -> np.ndarray:
    """μ-law companding to ``bits`` bits and back (G.711 style, the continuous μ-law curve): fine
    steps near zero, coarse ones near full scale, so quiet speech keeps its detail."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    levels = 2 ** bits - 1
    q = np.round((y + 1.0) * 0.5 * levels) / levels * 2.0 - 1.0
    return (np.sign(q) * np.expm1(np.abs(q) * np.log1p(mu)) / mu).astype(np.float32)


TELEPHONE_RATE = 8000


def telephone_channel(wave: np.ndarray, sr: int = SAMPLE_RATE, mulaw: bool = False,
                      band: tuple[float, float] = (300.0, 3400.0)) -> np.ndarray:
    """A narrowband telephone line: resampled to 8 kHz, band-limited to ``band`` (300-3400 Hz, the
    voice channel of the public network; half-cosine skirts of about 100 Hz), optionally μ-law
    companded to 8 bits (G.711), and resampled back to ``sr``. Nothing survives above 4 kHz.
    The result has the length of ``wave``."""
    import soxr

    wave = np.asarray(wave, dtype=np.float32)
    n = len(wave)
    if n == 0:
        return wave
    lo, hi = float(band[0]), float(band[1])
    x = soxr.resample(wave, sr, TELEPHONE_RATE, quality="HQ").astype(np.float32)
    x = _fft_filter(x, TELEPHONE_RATE, lambda f: _raised_cosine(f, lo - 100.0, lo)
                    * (1.0 - _raised_cosine(f, hi, min(hi + 150.0, TELEPHONE_RATE / 2))))
    if mulaw:
        x = mulaw_roundtrip(x)
    y = soxr.resample(x, TELEPHONE_RATE, sr, quality="HQ").astype(np.float32)
    if len(y) >= n:
        return y[:n]
    return np.concatenate([y, np.zeros(n - len(y), np.float32)])


def noise_floor(n: int, rng: np.random.Generator, level_db: float, kind: str = "white") -> np.ndarray:
    """``n`` samples of white or pink noise at ``level_db`` dBFS RMS: the hiss of a microphone
    preamplifier and converter, which real recordings always have and synthetic audio lacks."""
    rms = 10.0 ** (level_db / 20.0)
    if kind == "pink":
        return pink_noise(n, rng, rms)
    if kind == "white":
        return white_noise(n, rng, rms)
    raise ValueError(f"noise floor kind must be 'white' or 'pink', got {kind!r}")


# ------------------------------------------------------------------------------------------------
def _pair_ok(r) -> bool:
    return r is not None and len(r) == 2 and r[0] <= r[1]


@dataclass
class AugmentConfig:
    speed_factors: tuple[float, ...] | None = (0.9, 1.0, 1.1)  # empty or None disables speed
    noise_dir: str | None = None  # folder of noise recordings; None disables noise
    noise_prob: float = 0.5
    snr_db: tuple[float, float] = (5.0, 25.0)  # uniform range; (0, 20) is a realistic spread
    volume_db: tuple[float, float] = (-6.0, 6.0)  # uniform range; e.g. (-15, 15) for a wide gain
    volume_prob: float = 0.5
    sample_rate: int = SAMPLE_RATE
    # room reverberation (exp_decay_rir): RT60 and direct-to-reverberant ratio drawn uniformly
    reverb_prob: float = field(default=0.0, metadata={"range": "[0,1]"})
    rt60: tuple[float, float] = field(default=(0.2, 0.8), metadata={"range": ">0"})  # seconds
    drr_db: tuple[float, float] = (0.0, 15.0)
    # telephone line (telephone_channel): 300-3400 Hz through 8 kHz, μ-law for a share of those
    telephone_prob: float = field(default=0.0, metadata={"range": "[0,1]"})
    telephone_mulaw_prob: float = field(default=0.5, metadata={"range": "[0,1]"})
    # noise floor (noise_floor): white or pink (even odds) at a uniform dBFS RMS level, added last
    floor_prob: float = field(default=0.0, metadata={"range": "[0,1]"})
    floor_db: tuple[float, float] = field(default=(-75.0, -55.0), metadata={"range": "<=0"})

    def __post_init__(self) -> None:
        for name in ("rt60", "drr_db", "floor_db"):
            r = getattr(self, name)
            if not _pair_ok(r):
                raise ValueError(f"{name} must be [low, high] with low <= high, got {r}")


class WaveAugmenter:
    """``augmenter(wave, rng) -> wave``: speed (uniform choice among ``speed_factors``), then room
    reverberation with probability ``reverb_prob``, noise at a uniform random SNR with probability
    ``noise_prob``, a telephone line with probability ``telephone_prob``, volume with probability
    ``volume_prob``, and a noise floor with probability ``floor_prob``: the order in which a room, a
    noisy place, a phone line, a gain stage and a converter act on speech. The noise folder is read
    on first use, once per process (it is not pickled into DataLoader workers)."""

    def __init__(self, cfg: AugmentConfig | None = None):
        self.cfg = cfg if cfg is not None else AugmentConfig()
        for name in ("noise_prob", "volume_prob", "reverb_prob", "telephone_prob", "telephone_mulaw_prob",
                     "floor_prob"):
            p = getattr(self.cfg, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1], got {p}")
        for name in ("snr_db", "volume_db", "rt60", "drr_db", "floor_db"):
            r = getattr(self.cfg, name)
            if not _pair_ok(r):
                raise ValueError(f"augment.{name} must be a (low, high) pair, got {r}")
        if any(f <= 0 for f in (self.cfg.speed_factors or ())):
            raise ValueError(f"augment.speed_factors must be > 0, got {self.cfg.speed_factors}")
        if self.cfg.rt60[0] <= 0:
            raise ValueError(f"augment.rt60 must be > 0, got {self.cfg.rt60}")
        self._noise: NoiseSource | None = None

    @property
    def active(self) -> bool:
        """Whether this augmenter can change a waveform at all."""
        c = self.cfg
        speed = any(f != 1.0 for f in (c.speed_factors or ()))
        return (speed or (c.noise_dir is not None and c.noise_prob > 0) or c.volume_prob > 0
                or c.reverb_prob > 0 or c.telephone_prob > 0 or c.floor_prob > 0)

    @property
    def noise(self) -> NoiseSource | None:
        if self.cfg.noise_dir is None:
            return None
        if self._noise is None:
            self._noise = NoiseSource(self.cfg.noise_dir, sample_rate=self.cfg.sample_rate)
        return self._noise

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_noise"] = None  # each worker process loads the folder itself, once
        return state

    def __call__(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        cfg = self.cfg
        sr = cfg.sample_rate
        wave = np.asarray(wave, dtype=np.float32)
        factors = tuple(cfg.speed_factors or ())
        if factors:
            factor = float(factors[int(rng.integers(len(factors)))])
            wave = speed_perturb(wave, factor, sr)
        if cfg.reverb_prob > 0 and rng.random() < cfg.reverb_prob:
            rir = exp_decay_rir(float(rng.uniform(*cfg.rt60)), float(rng.uniform(*cfg.drr_db)), rng, sr)
            wave = reverberate(wave, rir)
        if cfg.noise_dir is not None and cfg.noise_prob > 0 and rng.random() < cfg.noise_prob:
            snr = float(rng.uniform(*cfg.snr_db))
            noise = self.noise.sample(len(wave), rng)
            wave = add_noise(wave, noise, snr)
        if cfg.telephone_prob > 0 and rng.random() < cfg.telephone_prob:
            mulaw = bool(rng.random() < cfg.telephone_mulaw_prob)
            wave = telephone_channel(wave, sr, mulaw=mulaw)
        if cfg.volume_prob > 0 and rng.random() < cfg.volume_prob:
            wave = volume_perturb(wave, float(rng.uniform(*cfg.volume_db)))
        if cfg.floor_prob > 0 and rng.random() < cfg.floor_prob:
            kind = "pink" if rng.random() < 0.5 else "white"
            floor = noise_floor(len(wave), rng, float(rng.uniform(*cfg.floor_db)), kind)
            wave = (wave + floor).astype(np.float32)
        peak = float(np.max(np.abs(wave))) if wave.size else 0.0
        if peak > 1.0:  # noise can push the sum over full scale; rescale (keeps the SNR)
            wave = wave * np.float32(0.999 / peak)
        return wave
