"""Reading audio of any length as a stream of float32 mono 16 kHz blocks."""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from harken.audio import SAMPLE_RATE, AudioError


def iter_blocks(audio, block_seconds: float = 2.0) -> Iterator[np.ndarray]:
    """float32 mono 16 kHz blocks of about ``block_seconds`` from a path (soundfile, streamed and
    resampled on the fly; ffmpeg streamed for other formats), raw bytes or a waveform."""
    n = max(FRAME_SAMPLES, int(block_seconds * SAMPLE_RATE))
    if isinstance(audio, np.ndarray):
        if audio.ndim != 1:
            raise AudioError(f"expected a 1-D float waveform at {SAMPLE_RATE} Hz, got shape {audio.shape}")
        for i in range(0, len(audio), n):
            yield np.asarray(audio[i: i + n], dtype=np.float32)
        return
    if isinstance(audio, (bytes, bytearray)):
        import io

        src, name = io.BytesIO(bytes(audio)), "<bytes>"
    else:
        src = name = str(audio)
        if not os.path.exists(name):
            raise AudioError(f"{name}: no such file")
    import soundfile as sf

    try:
        f = sf.SoundFile(src)
    except Exception as e:  # not a libsndfile format: decode through ffmpeg, streamed
        if isinstance(src, str):
            yield from _ffmpeg_blocks(name, n)
            return
        raise AudioError(f"{name}: cannot read audio ({e})") from e
    with f:
        sr = f.samplerate
        rs = None
        if sr != SAMPLE_RATE:
            import soxr

            rs = soxr.ResampleStream(sr, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        per = max(1, int(round(n * sr / SAMPLE_RATE)))
        total = 0
        while True:
            data = f.read(per, dtype="float32", always_2d=True)
            last = len(data) < per
            x = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
            x = np.ascontiguousarray(x, dtype=np.float32)
            if rs is not None:
                x = rs.resample_chunk(x, last=last)
            if len(x):
                total += len(x)
                yield x
            if last:
                break
    if total == 0:
        raise AudioError(f"{name}: contains no audio")


def _ffmpeg_blocks(path: str, n: int) -> Iterator[np.ndarray]:
    import shutil
    import subprocess

    exe = shutil.which("ffmpeg")
    if exe is None:
        raise AudioError(f"{path}: format needs ffmpeg, which is not installed (apt-get install ffmpeg)")
    proc = subprocess.Popen([exe, "-nostdin", "-v", "error", "-i", path, "-f", "f32le", "-ac", "1", "-ar",
                             str(SAMPLE_RATE), "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        total, carry = 0, b""
        while True:
            buf = proc.stdout.read(n * 4)
            if not buf:
                break
            buf = carry + buf
            cut = len(buf) // 4 * 4
            buf, carry = buf[:cut], buf[cut:]
            if buf:
                total += len(buf) // 4
                yield np.frombuffer(buf, dtype=np.float32).copy()
        err = proc.stderr.read().decode(errors="replace").strip().splitlines()
        if proc.wait() != 0 or total == 0:
            raise AudioError(f"{path}: ffmpeg could not decode it ({err[-1] if err else 'no audio'})")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


FRAME_SAMPLES = 160
