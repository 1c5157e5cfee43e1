import pickle

import numpy as np
import pytest

from harken.audio import load_audio, save_wav
from harken.data.augment import (
    AugmentConfig,
    NoiseSource,
    WaveAugmenter,
    add_noise,
    babble_noise,
    brown_noise,
    generate_noise_folder,
    pink_noise,
    speed_perturb,
    volume_perturb,
    white_noise,
)

SR = 16000


def welch_psd(x: np.ndarray, nfft: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Averaged periodogram of Hann-windowed half-overlapping segments."""
    win = np.hanning(nfft)
    hop = nfft // 2
    segs = [x[i:i + nfft] * win for i in range(0, len(x) - nfft + 1, hop)]
    psd = np.mean([np.abs(np.fft.rfft(s)) ** 2 for s in segs], axis=0)
    return np.fft.rfftfreq(nfft, 1 / SR), psd


def slope_db_per_octave(x: np.ndarray, lo: float = 100.0, hi: float = 4000.0) -> float:
    f, p = welch_psd(x)
    m = (f >= lo) & (f <= hi)
    return float(np.polyfit(np.log2(f[m]), 10 * np.log10(p[m]), 1)[0])


def tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_freq(x: np.ndarray, sr: int = SR) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)])


def rms(x):
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


@pytest.mark.parametrize("fn,expected", [(white_noise, 0.0), (pink_noise, -3.01), (brown_noise, -6.02)])
def test_noise_spectral_slope(fn, expected):
    x = fn(4 * SR, np.random.default_rng(1))
    assert x.dtype == np.float32 and len(x) == 4 * SR
    assert rms(x) == pytest.approx(1.0, rel=1e-4)
    assert slope_db_per_octave(x) == pytest.approx(expected, abs=0.4)


def test_noise_rms_and_no_drift():
    b = brown_noise(10 * SR, np.random.default_rng(0), rms=0.2)
    assert rms(b) == pytest.approx(0.2, rel=1e-4)
    # high-passed: neither half wanders off (mean of each second stays small relative to RMS)
    means = [abs(b[i:i + SR].mean()) for i in range(0, len(b), SR)]
    assert max(means) < 0.2
    assert abs(b.mean()) < 1e-3


def test_babble_from_speech_segments():
    rng = np.random.default_rng(0)
    talkers = [tone(f, 0.3) for f in (300, 700, 1100)]  # shorter than requested -> looped
    b = babble_noise(SR, talkers, rng, num_talkers=4, rms=0.5)
    assert len(b) == SR and rms(b) == pytest.approx(0.5, rel=1e-4)
    with pytest.raises(ValueError):
        babble_noise(100, [np.zeros(50, np.float32)], rng)


@pytest.mark.parametrize("snr", [-5.0, 0.0, 10.0, 30.0])
def test_add_noise_exact_snr(snr):
    rng = np.random.default_rng(3)
    speech = tone(440, 1.0) * np.linspace(0, 1, SR, dtype=np.float32)
    noise = pink_noise(2 * SR, rng)[:SR] * 7.0
    mixed = add_noise(speech, noise, snr)
    got = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean((mixed - speech).astype(np.float64) ** 2))
    assert abs(got - snr) < 0.1
    # shorter noise is looped to the speech length
    assert len(add_noise(speech, noise[:1000], snr)) == SR


def test_add_noise_silent_speech_unchanged():
    silent = np.zeros(SR, np.float32)
    out = add_noise(silent, white_noise(SR, np.random.default_rng(0)), 10.0)
    assert np.array_equal(out, silent)


@pytest.mark.parametrize("factor", [1.1, 0.9])
def test_speed_perturb_direction(factor):
    x = tone(1000, 1.0)
    y = speed_perturb(x, factor)
    assert abs(len(y) - len(x) / factor) <= 2
    assert peak_freq(y) == pytest.approx(1000 * factor, abs=3)
    assert speed_perturb(x, 1.0) is not None and len(speed_perturb(x, 1.0)) == len(x)


def test_volume_perturb_clip_safe():
    x = tone(440, 0.5, amp=0.5)
    assert np.max(np.abs(volume_perturb(x, -6.0))) == pytest.approx(0.5 * 10 ** (-6 / 20), rel=1e-4)
    loud = volume_perturb(x, 12.0)
    assert np.max(np.abs(loud)) <= 1.0
    assert np.max(np.abs(loud)) > 0.99  # gain reduced to full scale, not hard clipped
    assert np.allclose(loud / np.max(np.abs(loud)), x / np.max(np.abs(x)), atol=1e-5)


def test_generate_noise_folder_and_source(tmp_path):
    speech = []
    for i, f in enumerate((200, 500)):
        p = tmp_path / f"s{i}.wav"
        save_wav(p, tone(f, 0.5))
        speech.append(str(p))
    out = tmp_path / "noise"
    paths = generate_noise_folder(out, speech, seconds_each=0.5, count_per_kind=2, seed=0)
    assert len(paths) == 8
    names = sorted(p.split("/")[-1] for p in paths)
    assert names[0] == "babble_00.wav" and "white_01.wav" in names
    w = load_audio(paths[0])
    assert len(w) == SR // 2 and np.max(np.abs(w)) < 1.0
    mtime = (out / "white_00.wav").stat().st_mtime_ns
    assert generate_noise_folder(out, speech, seconds_each=0.5, count_per_kind=2) == paths
    assert (out / "white_00.wav").stat().st_mtime_ns == mtime  # existing files kept

    src = NoiseSource(out)
    assert len(src) == 8
    seg = src.sample(3 * SR, np.random.default_rng(0))  # longer than any file -> looped
    assert len(seg) == 3 * SR and seg.dtype == np.float32
    a = src.sample(1000, np.random.default_rng(5))
    b = src.sample(1000, np.random.default_rng(5))
    assert np.array_equal(a, b)
    assert len(NoiseSource([paths[0]])) == 1


def test_noise_source_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("no audio here")
    with pytest.raises(ValueError, match="no usable audio"):
        NoiseSource(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        NoiseSource(tmp_path / "missing")


def test_wave_augmenter_reproducible(tmp_path):
    noise_dir = tmp_path / "noise"
    save_wav(noise_dir / "n.wav", white_noise(SR, np.random.default_rng(0), rms=0.1))
    cfg = AugmentConfig(noise_dir=str(noise_dir), noise_prob=1.0, volume_prob=1.0)
    aug = WaveAugmenter(cfg)
    x = tone(300, 1.0)
    y1 = aug(x, np.random.default_rng([7, 0, 3]))
    y2 = WaveAugmenter(cfg)(x, np.random.default_rng([7, 0, 3]))
    assert np.array_equal(y1, y2)
    outs = [aug(x, np.random.default_rng([7, 0, i])) for i in range(6)]
    assert any(len(o) != len(outs[0]) or not np.array_equal(o, outs[0]) for o in outs[1:])
    assert all(np.max(np.abs(o)) <= 1.0 for o in outs)
    # pickling (DataLoader workers) drops the loaded noise; it is reloaded on first use
    assert aug._noise is not None
    clone = pickle.loads(pickle.dumps(aug))
    assert clone._noise is None
    assert np.array_equal(clone(x, np.random.default_rng([7, 0, 3])), y1)


def test_wave_augmenter_disabled_is_identity():
    aug = WaveAugmenter(AugmentConfig(speed_factors=(), noise_dir=None, volume_prob=0.0))
    x = tone(300, 0.25)
    assert np.array_equal(aug(x, np.random.default_rng(0)), x)
    with pytest.raises(ValueError):
        WaveAugmenter(AugmentConfig(noise_prob=1.5))
