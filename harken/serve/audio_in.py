"""Uploads -> waveforms, off the event loop: size and header checks, decoding through
:func:`harken.audio.load_audio` (in-process libsndfile for WAV/FLAC/OGG, an ffmpeg child with a
timeout and a decoded-samples cap for everything else), and VAD cutting of long audio into pieces
that batch well. Every failure becomes an :class:`~harken.serve.errors.ApiError` with its status."""

from __future__ import annotations

import numpy as np

from harken.audio import AudioError, load_audio
from harken.serve.errors import ApiError

__all__ = ["sniff_format", "decode_upload", "split_long", "pcm_to_wave", "AUDIO_ERROR_STATUS"]

# AudioError.code -> (HTTP status, OpenAI error code, metrics reason)
AUDIO_ERROR_STATUS = {
    "empty": (400, "empty_audio", "decode_error"),
    "unsupported_format": (415, "unsupported_format", "decode_error"),
    "corrupt": (400, "corrupt_audio", "decode_error"),
    "too_long": (413, "audio_too_long", "too_long"),
    "decode_timeout": (422, "decode_timeout", "timeout"),
    "no_ffmpeg": (415, "unsupported_format", "decode_error"),
    "bad_input": (400, "invalid_audio", "decode_error"),
}


def sniff_format(data: bytes) -> str:
    """A coarse container name from the first bytes (for the decode-failure metric label)."""
    h = bytes(data[:12])
    if h[:4] in (b"RIFF", b"RF64", b"BW64") and h[8:12] == b"WAVE":
        return "wav"
    if h[:4] == b"fLaC":
        return "flac"
    if h[:4] == b"OggS":
        return "ogg"
    if h[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if h[4:8] == b"ftyp":
        return "mp4"
    if h[:3] == b"ID3" or (len(h) > 1 and h[0] == 0xFF and (h[1] & 0xE0) == 0xE0):
        return "mp3"
    return "other"


def decode_upload(data: bytes, sample_rate: int, max_seconds: float, timeout_s: float, metrics=None,
                  param: str = "file") -> np.ndarray:
    """Decode an uploaded file (blocking: run it in an executor). Raises ApiError."""
    if not data:
        raise ApiError(400, f"{param}: the audio is empty (0 bytes)", code="empty_audio", param=param,
                       reason="decode_error")
    try:
        wave = load_audio(bytes(data), sample_rate=sample_rate, max_seconds=max_seconds, timeout_s=timeout_s)
    except AudioError as e:
        code = getattr(e, "code", "bad_input")
        status, api_code, reason = AUDIO_ERROR_STATUS.get(code, (400, "invalid_audio", "decode_error"))
        if metrics is not None and reason == "decode_error":
            metrics.decode_failed(sniff_format(data))
        msg = str(e).replace("<bytes>", param, 1)
        if code == "too_long":
            msg = f"{param}: the decoded audio is longer than the limit of {max_seconds:g} s"
        raise ApiError(status, msg, code=api_code, param=param, reason=reason) from None
    return wave


def pcm_to_wave(data: bytes, encoding: str, rate: int, channels: int, sample_rate: int, max_seconds: float,
                param: str = "body") -> np.ndarray:
    """Raw PCM (``pcm_s16le`` / ``pcm_f32le``) -> float32 mono at ``sample_rate``."""
    if encoding not in ("pcm_s16le", "pcm_f32le"):
        raise ApiError(415, f"{param}: unknown PCM encoding {encoding!r} (pcm_s16le or pcm_f32le)",
                       code="unsupported_format", param="encoding", reason="decode_error")
    if not (1000 <= rate <= 384000) or not (1 <= channels <= 32):
        raise ApiError(400, f"{param}: sample_rate must be 1000..384000 and channels 1..32 "
                       f"(got {rate}, {channels})", code="invalid_value", param="sample_rate")
    width = 2 if encoding == "pcm_s16le" else 4
    if not data:
        raise ApiError(400, f"{param}: the audio is empty (0 bytes)", code="empty_audio", param=param)
    if len(data) % (width * channels):
        raise ApiError(400, f"{param}: {len(data)} bytes is not a whole number of {encoding} frames of "
                       f"{channels} channel(s)", code="corrupt_audio", param=param, reason="decode_error")
    if len(data) / (width * channels * rate) > max_seconds:
        raise ApiError(413, f"{param}: the audio is longer than the limit of {max_seconds:g} s",
                       code="audio_too_long", param=param, reason="too_long")
    if width == 2:
        x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    else:
        x = np.frombuffer(data, dtype="<f4").astype(np.float32)
        if not np.isfinite(x).all():
            raise ApiError(400, f"{param}: the audio contains NaN or infinite samples", code="corrupt_audio",
                           param=param, reason="decode_error")
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    if rate != sample_rate:
        import soxr

        x = soxr.resample(x, rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(x, dtype=np.float32)


def split_long(wave: np.ndarray, max_segment: float, sample_rate: int = 16000) -> list[tuple[int, np.ndarray]]:
    """(start sample, piece) pieces of at most ``max_segment`` seconds, cut at pauses by the energy
    VAD; audio no longer than ``max_segment`` is one piece (silence included). ``wave`` and the
    pieces are at ``sample_rate`` (the model's); the VAD itself works at 16 kHz, so at other rates
    the cuts are found on a 16 kHz copy and the pieces are cut from ``wave`` itself. Blocking."""
    if len(wave) <= max_segment * sample_rate:
        return [(0, wave)]
    from harken.audio import resample
    from harken.vad import SAMPLE_RATE as VAD_RATE
    from harken.vad import Segmenter

    sr = int(sample_rate)
    x = resample(wave, sr, VAD_RATE)
    seg = Segmenter(max_segment=max_segment)
    block = 2 * VAD_RATE
    out: list[tuple[int, np.ndarray]] = []
    for i in range(0, len(x), block):
        out.extend(seg.push(x[i: i + block]))
    out.extend(seg.flush())
    if sr != VAD_RATE:
        scale = sr / VAD_RATE
        out = [(s0, wave[s0: s0 + int(round(len(piece) * scale))])
               for s0, piece in ((int(round(start * scale)), piece) for start, piece in out)]
    return out
