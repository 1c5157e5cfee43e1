import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from harken.audio import SAMPLE_RATE, AudioError, audio_duration, load_audio, save_wav

SR = SAMPLE_RATE
has_ffmpeg = shutil.which("ffmpeg") is not None


def tone(freq, seconds, sr, amp=0.5):
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_freq(x, sr=SR):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)])


def test_stereo_to_mono_average(tmp_path):
    left, right = tone(440, 0.5, SR), tone(1000, 0.5, SR, amp=0.25)
    p = tmp_path / "stereo.wav"
    sf.write(str(p), np.stack([left, right], axis=1), SR, subtype="FLOAT")
    wave = load_audio(p)
    assert wave.dtype == np.float32 and wave.ndim == 1
    np.testing.assert_allclose(wave, (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("sr", [8000, 22050, 48000])
def test_resample_to_16k(tmp_path, sr):
    p = tmp_path / f"tone_{sr}.wav"
    sf.write(str(p), tone(1000, 1.0, sr), sr, subtype="PCM_16")
    wave = load_audio(p)
    assert abs(len(wave) - SR) <= 1
    assert peak_freq(wave) == pytest.approx(1000, abs=2)
    assert np.max(np.abs(wave)) == pytest.approx(0.5, abs=0.02)
    assert audio_duration(p) == pytest.approx(1.0)


def test_silence_loads(tmp_path):
    p = tmp_path / "silence.wav"
    save_wav(p, np.zeros(SR // 2, np.float32))
    wave = load_audio(p)
    assert len(wave) == SR // 2 and not np.any(wave)


def test_save_wav_round_trip(tmp_path):
    x = tone(300, 0.25, SR)
    p = tmp_path / "sub" / "x.wav"
    save_wav(p, x * 3)  # clipped to [-1, 1]
    y = load_audio(p)
    assert np.max(np.abs(y)) <= 1.0 and len(y) == len(x)
    assert not list(p.parent.glob(".*tmp*"))


def test_missing_empty_corrupt_raise_naming_file(tmp_path):
    with pytest.raises(AudioError, match=r"nothere\.wav: file not found"):
        load_audio(tmp_path / "nothere.wav")
    with pytest.raises(AudioError, match=r"nothere\.wav: file not found"):
        audio_duration(tmp_path / "nothere.wav")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: file is empty"):
        load_audio(empty)
    with pytest.raises(AudioError, match=r"empty\.wav"):
        audio_duration(empty)
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + np.random.default_rng(0).bytes(200))
    with pytest.raises(AudioError, match=r"corrupt\.wav"):
        load_audio(bad)
    text = tmp_path / "notes.flac"
    text.write_text("this is not audio at all\n" * 20)
    with pytest.raises(AudioError, match=r"notes\.flac"):
        load_audio(text)
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path)


@pytest.mark.parametrize("fmt,ext,subtype,tol", [("FLAC", "flac", "PCM_16", 1e-3),
                                                  ("OGG", "ogg", "VORBIS", 0.1)])
def test_flac_ogg(tmp_path, fmt, ext, subtype, tol):
    x = tone(700, 1.0, SR)
    p = tmp_path / f"x.{ext}"
    sf.write(str(p), x, SR, format=fmt, subtype=subtype)
    wave = load_audio(p)
    assert len(wave) == len(x)
    assert peak_freq(wave) == pytest.approx(700, abs=2)
    assert np.max(np.abs(wave - x)) < tol
    assert load_audio(p.read_bytes()).shape == wave.shape  # raw bytes input


@pytest.mark.skipif(not has_ffmpeg, reason="ffmpeg not installed")
def test_mp3_via_ffmpeg(tmp_path):
    src = tmp_path / "src.wav"
    save_wav(src, tone(1000, 1.0, 44100), 44100)
    mp3 = tmp_path / "x.mp3"
    proc = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(src), str(mp3)],
                          capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"this ffmpeg cannot encode mp3: {proc.stderr.decode()[-200:]}")
    wave = load_audio(mp3)
    assert abs(len(wave) - SR) < 0.05 * SR
    assert peak_freq(wave) == pytest.approx(1000, abs=3)
    assert audio_duration(mp3) == pytest.approx(1.0, abs=0.06)
    seg = load_audio(mp3, offset=0.25, duration=0.5)
    assert abs(len(seg) - SR // 2) <= 2
    bad = tmp_path / "bad.mp3"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(AudioError, match=r"bad\.mp3"):
        load_audio(bad)


@pytest.mark.parametrize("sr", [16000, 8000])
def test_offset_duration(tmp_path, sr):
    ramp = (np.arange(2 * sr) / (2 * sr) - 0.5).astype(np.float32)  # 2 s, value encodes time
    p = tmp_path / "ramp.wav"
    sf.write(str(p), ramp, sr, subtype="FLOAT")
    seg = load_audio(p, offset=0.5, duration=0.75)
    assert abs(len(seg) - int(0.75 * SR)) <= 1
    if sr == SR:
        np.testing.assert_array_equal(seg, ramp[SR // 2: SR // 2 + int(0.75 * SR)])
    else:  # away from the edges the resampled ramp still tells the time
        mid = len(seg) // 2
        assert seg[mid] == pytest.approx((0.5 + 0.375) / 2 - 0.5, abs=2e-3)
    tail = load_audio(p, offset=1.5)
    assert abs(len(tail) - SR // 2) <= 1
    with pytest.raises(AudioError, match="no audio samples"):
        load_audio(p, offset=5.0)
