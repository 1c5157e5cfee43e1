"""Reading audio of any length as a stream of float32 mono blocks (16 kHz unless asked otherwise)."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from harken.audio import SAMPLE_RATE, _check_rate, _is_tensor, array_to_wave, iter_audio_blocks, resample

FRAME_SAMPLES = 160


def iter_blocks(audio, block_seconds: float = 2.0, *, max_seconds: float | None = None,
                timeout_s: float | None = 30.0, sample_rate: int = SAMPLE_RATE,
                input_rate: int | None = None) -> Iterator[np.ndarray]:
    """float32 mono blocks at ``sample_rate`` of about ``block_seconds`` from a path, raw bytes, a
    binary file object, or a 1-D waveform (numpy array / torch tensor at ``input_rate``, default
    ``sample_rate``, scaled by dtype as in :func:`harken.audio.as_waveform` and resampled when the
    two rates differ).

    Memory stays bounded by the block whatever the length or the format: WAV/FLAC/OGG are read and
    resampled block by block with soundfile; M4A/AAC, WebM/Opus, MP3 and the rest stream out of an
    ffmpeg child process (``timeout_s`` bounds each wait for the next block; the child is killed
    when the iterator is closed or dropped). ``max_seconds`` (None: unlimited) refuses longer audio
    once that much was decoded. Errors are :class:`harken.audio.AudioError` with ``.code`` as in
    :func:`harken.audio.load_audio`."""
    sample_rate = _check_rate("<blocks>", sample_rate)
    n = max(FRAME_SAMPLES, int(block_seconds * sample_rate))
    if isinstance(audio, np.ndarray) or _is_tensor(audio):
        rate = _check_rate("<array>", input_rate) if input_rate is not None else sample_rate
        wave = resample(array_to_wave(audio, rate, max_seconds), rate, sample_rate)
        for i in range(0, len(wave), n):
            yield wave[i: i + n]
        return
    yield from iter_audio_blocks(audio, n, sample_rate, max_seconds=max_seconds, timeout_s=timeout_s)
