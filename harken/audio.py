"""Audio in and out: any common file -> float32 mono at 16 kHz, with errors that name the file.

wav/flac/ogg (and anything else libsndfile reads) go through soundfile; mp3, m4a, aac, opus, webm and
whatever else libsndfile refuses go through ffmpeg when it is on PATH. Resampling uses soxr (HQ).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000

# extensions that libsndfile does not decode (or decodes unreliably) and that ffmpeg does
_FFMPEG_EXTS = {".mp3", ".m4a", ".aac", ".mp4", ".opus", ".webm", ".wma", ".amr", ".3gp"}


class AudioError(ValueError):
    """Audio that cannot be used; the message names the file and the reason."""


def _resample(wave: np.ndarray, sr: int, target: int) -> np.ndarray:
    if sr == target:
        return wave
    import soxr

    return soxr.resample(wave, sr, target, quality="HQ").astype(np.float32, copy=False)


def _to_mono(data: np.ndarray) -> np.ndarray:
    if data.ndim == 2:
        data = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return np.ascontiguousarray(data, dtype=np.float32)


def _ffmpeg_decode(path: str, sample_rate: int, offset: float, duration: float | None) -> np.ndarray:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise AudioError(f"{path}: format needs ffmpeg, which is not installed (apt-get install ffmpeg)")
    cmd = [exe, "-nostdin", "-v", "error"]
    if offset:
        cmd += ["-ss", f"{offset:.6f}"]
    cmd += ["-i", path]
    if duration is not None:
        cmd += ["-t", f"{duration:.6f}"]
    cmd += ["-f", "f32le", "-ac", "1", "-ar", str(sample_rate), "-"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise AudioError(f"{path}: ffmpeg could not decode it ({msg[-1] if msg else 'unknown error'})")
    return np.frombuffer(proc.stdout, dtype=np.float32).copy()


def load_audio(
    path: str | os.PathLike | bytes,
    sample_rate: int = SAMPLE_RATE,
    offset: float = 0.0,
    duration: float | None = None,
    allow_empty: bool = False,
) -> np.ndarray:
    """Read audio as float32 mono in [-1, 1] at ``sample_rate``.

    ``path`` may also be the raw bytes of a file. ``offset`` and ``duration`` (seconds) select a
    segment. Raises :class:`AudioError` for a missing, unreadable, unsupported or empty file.
    """
    if offset < 0 or (duration is not None and duration <= 0):
        raise AudioError(f"{path if not isinstance(path, (bytes, bytearray)) else '<bytes>'}: "
                         f"offset must be >= 0 and duration > 0 (got {offset}, {duration})")
    if isinstance(path, (bytes, bytearray)):
        name, src = "<bytes>", io.BytesIO(path)
    else:
        name = str(path)
        src = name
        if not os.path.exists(name):
            raise AudioError(f"{name}: file not found")
        if os.path.isdir(name):
            raise AudioError(f"{name}: is a directory, not an audio file")
        if os.path.getsize(name) == 0:
            raise AudioError(f"{name}: file is empty (0 bytes)")
    ext = Path(name).suffix.lower()
    if ext in _FFMPEG_EXTS and isinstance(src, str):
        wave = _ffmpeg_decode(name, sample_rate, offset, duration)
    else:
        try:
            with sf.SoundFile(src) as f:
                sr = f.samplerate
                start = int(round(offset * sr))
                if start:
                    f.seek(min(start, f.frames))
                frames = -1 if duration is None else int(round(duration * sr))
                data = f.read(frames, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError) as e:
            if isinstance(src, str) and shutil.which("ffmpeg"):
                try:
                    wave = _ffmpeg_decode(name, sample_rate, offset, duration)
                except AudioError as fe:
                    raise AudioError(f"{name}: unreadable or unsupported audio (soundfile: {e}; "
                                     f"{str(fe).split(': ', 1)[-1]})") from None
            else:
                raise AudioError(f"{name}: unreadable or unsupported audio ({e})") from None
        else:
            wave = _resample(_to_mono(data), sr, sample_rate)
    if wave.size == 0 and not allow_empty:
        raise AudioError(f"{name}: no audio samples" + (f" at offset {offset}s" if offset else ""))
    if not np.all(np.isfinite(wave)):
        raise AudioError(f"{name}: audio contains NaN or infinite samples")
    return wave


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds without decoding the whole file (soundfile header, else ffprobe/ffmpeg)."""
    name = str(path)
    if not os.path.exists(name):
        raise AudioError(f"{name}: file not found")
    try:
        info = sf.info(name)
        if info.samplerate <= 0:
            raise AudioError(f"{name}: invalid sample rate {info.samplerate}")
        return info.frames / info.samplerate
    except (sf.LibsndfileError, RuntimeError):
        return len(load_audio(name, allow_empty=True)) / SAMPLE_RATE


def save_wav(path: str | os.PathLike, wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write 16-bit PCM WAV atomically (temp file + rename), clipping to [-1, 1]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    wave = np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0)
    sf.write(str(tmp), wave, sample_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


def as_waveform(audio) -> tuple[np.ndarray, str]:
    """A file path, the raw bytes of a file, or a 1-D float32 waveform at 16 kHz -> (waveform, name
    of its source for messages and results)."""
    if isinstance(audio, np.ndarray):
        if audio.ndim != 1:
            raise AudioError(f"expected a 1-D float waveform at {SAMPLE_RATE} Hz, got shape {audio.shape}")
        return audio.astype(np.float32, copy=False), "<array>"
    if isinstance(audio, (bytes, bytearray)):
        return load_audio(bytes(audio)), "<bytes>"
    return load_audio(audio), str(audio)
