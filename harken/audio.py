"""Audio in and out: any common input -> float32 mono at a chosen rate (16 kHz unless the caller
asks for another, e.g. an 8 kHz model's), with errors that name the input.

Inputs: a path, the raw bytes of a file (``bytes``/``bytearray``/``memoryview``) or a binary file
object. The container is recognised from its first bytes, not from the file name:

* WAV (RIFF/RF64/W64), FLAC, OGG (Vorbis/Opus), AIFF, AU and CAF decode in this process with
  soundfile (libsndfile), read in bounded blocks; a sample rate outside 1000..384000 Hz is refused.
* everything else (WebM/Opus, M4A/AAC, MP3, ...) and anything libsndfile refuses is decoded in a
  child process by the ``ffmpeg`` CLI (``$HARKEN_FFMPEG`` or ``ffmpeg`` on PATH), with a wall-clock
  timeout and a cap on the decoded samples, so a hanging or crashing decoder, or a small file that
  expands into hours of audio, never takes the caller down.

Durations always come from the decoded samples, never from a header. Resampling uses soxr (HQ).
Every failure is an :class:`AudioError` with a stable ``.code``.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000  # the default rate of every reader, and the rate of a model that does not say
#: the rates a model may be trained at (``model.fbank.sample_rate``): wideband and narrowband
#: (telephone) speech. Everything that feeds a model resamples its input to the model's rate.
MODEL_SAMPLE_RATES = (8000, 16000)

#: sample rates accepted from a file header; anything else is a forged or broken header
MIN_SOURCE_RATE, MAX_SOURCE_RATE = 1000, 384000
#: cap on decoded audio when the caller passes ``max_seconds=None`` (4 h = 0.92 GB of float32 at
#: 16 kHz); pass ``max_seconds=math.inf`` to lift it
MAX_DECODE_SECONDS = 4 * 3600.0

ERROR_CODES = frozenset({"empty", "unsupported_format", "corrupt", "too_long", "decode_timeout", "no_ffmpeg",
                         "bad_input"})

# first-bytes kinds that libsndfile decodes in process
_SF_KINDS = {"wav", "flac", "ogg", "aiff", "au", "caf", "w64"}
# kinds that ffmpeg must read from a seekable file (MP4 keeps its index at the end)
_SEEK_KINDS = {"mp4"}
_SF_BLOCK = 1 << 20  # samples per soundfile read (4 MB of float32)


class AudioError(ValueError):
    """Audio that cannot be used. The message names the input (a path, ``<bytes>``,
    ``<file object>`` or ``<array>``) and the reason; ``.code`` is one of :data:`ERROR_CODES`:
    ``empty``, ``unsupported_format``, ``corrupt``, ``too_long``, ``decode_timeout``, ``no_ffmpeg``,
    ``bad_input`` (the default: a missing file, a wrong type or argument)."""

    def __init__(self, message: str, code: str = "bad_input"):
        super().__init__(message)
        if code not in ERROR_CODES:
            raise ValueError(f"unknown AudioError code {code!r} (one of {sorted(ERROR_CODES)})")
        self.code = code
        self.message = message

    def __reduce__(self):  # picklable across worker processes, code included
        return (type(self), (self.message, self.code))


# ------------------------------------------------------------------------------------------ sources
class _Source:
    """One input: ``path`` (a file on disk) or ``data`` (bytes in memory), its display ``name`` and
    the ``kind`` guessed from its first bytes (None: unknown)."""

    __slots__ = ("name", "path", "data", "kind")

    def __init__(self, name: str, path: str | None, data: bytes | None, head: bytes):
        self.name, self.path, self.data, self.kind = name, path, data, _sniff(head)

    def soundfile_arg(self):
        return self.path if self.path is not None else io.BytesIO(self.data)


def _sniff(head: bytes) -> str | None:
    if len(head) < 4:
        return None
    h4 = head[:4]
    if h4 in (b"RIFF", b"RIFX", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "wav"
    if h4 == b"riff" and head[8:12] == b"\x2e\x91\xcf\x11":  # Sony Wave64 GUID
        return "w64"
    if h4 == b"fLaC":
        return "flac"
    if h4 == b"OggS":
        return "ogg"
    if h4 == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if h4 == b".snd":
        return "au"
    if h4 == b"caff":
        return "caf"
    if h4 == b"\x1a\x45\xdf\xa3":
        return "webm"  # Matroska / WebM
    if head[4:8] == b"ftyp":
        return "mp4"  # MP4 / M4A / MOV / 3GP
    if head[:3] == b"ID3":
        return "mp3"
    if head[:6] == b"#!AMR\n":
        return "amr"
    if head[:4] == b"\x30\x26\xb2\x75":
        return "asf"  # WMA
    b0, b1 = head[0], head[1]
    if b0 == 0xFF and (b1 & 0xF6) == 0xF0:
        return "aac"  # ADTS
    if b0 == 0xFF and (b1 & 0xE0) == 0xE0 and (b1 & 0x06):
        return "mp3"  # MPEG audio frame sync, layer I/II/III
    return None


def _source(src) -> _Source:
    """Path / bytes / file object -> :class:`_Source`; AudioError (bad_input / empty) otherwise."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise AudioError("<bytes>: no data (0 bytes)", code="empty")
        return _Source("<bytes>", None, data, data[:16])
    if isinstance(src, (str, os.PathLike)):
        name = os.fspath(src)
        if isinstance(name, bytes):
            name = os.fsdecode(name)
        try:
            with open(name, "rb") as f:
                head = f.read(16)
        except FileNotFoundError:
            raise AudioError(f"{name}: file not found") from None
        except IsADirectoryError:
            raise AudioError(f"{name}: is a directory, not an audio file") from None
        except OSError as e:
            if os.path.isdir(name):
                raise AudioError(f"{name}: is a directory, not an audio file") from None
            raise AudioError(f"{name}: cannot open ({e.strerror or e})") from None
        if not head:
            raise AudioError(f"{name}: file is empty (0 bytes)", code="empty")
        return _Source(name, name, None, head)
    if hasattr(src, "read") and callable(src.read):
        name = "<file object>"
        try:
            data = src.read()
        except Exception as e:  # noqa: BLE001 - whatever the object raises, it is a bad input
            raise AudioError(f"{name}: reading it failed ({type(e).__name__}: {e})") from None
        if isinstance(data, str):
            raise AudioError(f"{name}: opened in text mode; open audio files with 'rb'")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise AudioError(f"{name}: .read() returned {type(data).__name__}, expected bytes")
        data = bytes(data)
        if not data:
            raise AudioError(f"{name}: no data (0 bytes)", code="empty")
        return _Source(name, None, data, data[:16])
    raise AudioError(f"<{type(src).__name__}>: cannot read audio from a {type(src).__name__}; expected a path, "
                     f"bytes or a binary file object")


def _check_args(name: str, offset: float, duration: float | None, max_seconds: float | None,
                timeout_s: float | None) -> float:
    """Validated arguments -> the decoded-samples cap in seconds (inf: none)."""
    if not offset >= 0 or (duration is not None and not duration > 0):
        raise AudioError(f"{name}: offset must be >= 0 and duration > 0 (got {offset}, {duration})")
    if timeout_s is not None and not timeout_s > 0:
        raise AudioError(f"{name}: timeout_s must be > 0 (got {timeout_s})")
    cap = MAX_DECODE_SECONDS if max_seconds is None else float(max_seconds)
    if not cap > 0:
        raise AudioError(f"{name}: max_seconds must be > 0 (got {max_seconds})")
    return cap


def _check_rate(name: str, sample_rate) -> int:
    ok = isinstance(sample_rate, (int, float, np.integer, np.floating)) and float(sample_rate).is_integer()
    if not ok or not MIN_SOURCE_RATE <= sample_rate <= MAX_SOURCE_RATE:
        raise AudioError(f"{name}: sample_rate must be an integer in {MIN_SOURCE_RATE}..{MAX_SOURCE_RATE} Hz "
                         f"(got {sample_rate!r})")
    return int(sample_rate)


def _too_long(name: str, cap: float) -> AudioError:
    hint = "" if cap != MAX_DECODE_SECONDS else " (the default cap; pass max_seconds to change it)"
    return AudioError(f"{name}: longer than the limit of {cap:g} s{hint}", code="too_long")


# ---------------------------------------------------------------------------------------- soundfile
def _resample(wave: np.ndarray, sr: int, target: int) -> np.ndarray:
    if sr == target:
        return wave
    import soxr

    return soxr.resample(wave, sr, target, quality="HQ").astype(np.float32, copy=False)


def resample(wave: np.ndarray, sample_rate: int, target: int) -> np.ndarray:
    """A float32 mono waveform at ``sample_rate`` -> the same audio at ``target`` Hz (soxr HQ, the
    resampler every reader uses); returned as is when the rates are equal."""
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if int(sample_rate) == int(target) or wave.size == 0:
        return wave
    return _resample(wave, int(sample_rate), int(target))


def _to_mono(data: np.ndarray) -> np.ndarray:
    if data.ndim == 2:
        data = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return np.ascontiguousarray(data, dtype=np.float32)


class _SoundfileRefused(Exception):
    """libsndfile could not open or read the input (the caller may try ffmpeg)."""


def _sf_open(src: _Source) -> sf.SoundFile:
    try:
        f = sf.SoundFile(src.soundfile_arg())
    except Exception as e:  # noqa: BLE001 - libsndfile's errors vary (LibsndfileError, RuntimeError, ...)
        msg = str(e)
        if msg.startswith("Error opening "):  # drop soundfile's "Error opening <_io.BytesIO ...>: "
            msg = msg.split(": ", 1)[-1]
        raise _SoundfileRefused(msg.strip()) from None
    sr = f.samplerate
    if not MIN_SOURCE_RATE <= sr <= MAX_SOURCE_RATE:
        f.close()
        raise AudioError(f"{src.name}: header claims a sample rate of {sr} Hz, outside "
                         f"{MIN_SOURCE_RATE}..{MAX_SOURCE_RATE} Hz (broken or forged header)", code="corrupt")
    if f.channels < 1:
        f.close()
        raise AudioError(f"{src.name}: header claims {f.channels} channels", code="corrupt")
    return f


def _sf_blocks(f: sf.SoundFile, name: str, frames_per_block: int, want: int | None, cap: float
               ) -> Iterator[np.ndarray]:
    """Mono float32 blocks at the file's rate, at most ``want`` frames, refusing past ``cap`` seconds.
    Never trusts the header length: reads until libsndfile gives no more."""
    per = max(1, min(frames_per_block, _SF_BLOCK // f.channels))
    cap_frames = cap * f.samplerate
    got = 0
    while want is None or got < want:
        k = per if want is None else min(per, want - got)
        try:
            data = f.read(k, dtype="float32", always_2d=True)
        except Exception as e:  # noqa: BLE001
            raise _SoundfileRefused(str(e)) from None
        if len(data) == 0:
            break
        got += len(data)
        if got > cap_frames:
            raise _too_long(name, cap)
        yield _to_mono(data)
        if len(data) < k:
            break


def _sf_decode(src: _Source, sample_rate: int, offset: float, duration: float | None, cap: float) -> np.ndarray:
    with _sf_open(src) as f:
        sr = f.samplerate
        start = int(round(offset * sr))
        if start:
            try:
                f.seek(min(start, f.frames))
            except Exception as e:  # noqa: BLE001
                raise _SoundfileRefused(str(e)) from None
        want = None if duration is None else int(round(duration * sr))
        chunks = list(_sf_blocks(f, src.name, _SF_BLOCK, want, cap))
    wave = chunks[0] if len(chunks) == 1 else (np.concatenate(chunks) if chunks else np.zeros(0, np.float32))
    return _resample(wave, sr, sample_rate)


# ------------------------------------------------------------------------------------------- ffmpeg
def ffmpeg_path() -> str | None:
    """The ffmpeg executable: ``$HARKEN_FFMPEG`` if set, else ``ffmpeg`` on PATH (None: missing)."""
    exe = os.environ.get("HARKEN_FFMPEG")
    if exe:
        return exe if os.path.isfile(exe) and os.access(exe, os.X_OK) else shutil.which(exe)
    return shutil.which("ffmpeg")


class _FFmpegStream:
    """ffmpeg decoding one input to raw float32 mono in a child process.

    ``read(nbytes)`` returns up to ``nbytes`` of PCM (b"" at the end). ``timeout_s`` is a deadline
    for the whole decode (``idle=False``) or for each wait on the child (``idle=True``, for
    consumers that stop between reads). More than ``cap_samples`` decoded -> too_long. The child is
    killed on timeout, on the cap, on :meth:`close` and on garbage collection of the consumer."""

    def __init__(self, src: _Source, sample_rate: int, offset: float, duration: float | None,
                 cap_samples: float, cap_seconds: float, timeout_s: float | None, idle: bool):
        exe = ffmpeg_path()
        if exe is None:
            what = f"{src.kind.upper()} audio" if src.kind else "this format (not WAV/FLAC/OGG)"
            raise AudioError(f"{src.name}: decoding {what} needs ffmpeg, which is not installed "
                             f"(apt-get install ffmpeg, or set HARKEN_FFMPEG)", code="no_ffmpeg")
        self.src, self.cap_samples, self.cap_seconds = src, cap_samples, cap_seconds
        self.timeout_s, self.idle = timeout_s, idle
        self.total = 0  # bytes of PCM handed out
        self._tmp = None
        self._inp = None
        feed = None
        if src.path is not None:  # "file:" so that a name like "concat:..." or "http:..." stays a local file
            inp = "file:" + os.path.abspath(src.path)
        elif src.kind in _SEEK_KINDS:  # needs a seekable input: spill to a private temp file
            fd, self._tmp = tempfile.mkstemp(prefix="harken-audio-", suffix=".bin")
            with os.fdopen(fd, "wb") as t:
                t.write(src.data)
            inp = "file:" + self._tmp
        else:
            inp, feed = "pipe:0", src.data
        self._inp = inp
        cmd = [exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "1"]
        if offset:
            cmd += ["-ss", f"{offset:.6f}"]
        cmd += ["-i", inp, "-map", "0:a:0"]
        if duration is not None:
            cmd += ["-t", f"{duration:.6f}"]
        cmd += ["-f", "f32le", "-acodec", "pcm_f32le", "-ac", "1", "-ar", str(sample_rate), "pipe:1"]
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if feed is not None else subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        except OSError as e:
            self._cleanup_tmp()
            raise AudioError(f"{src.name}: cannot run ffmpeg ({exe}: {e.strerror or e})", code="no_ffmpeg") from None
        self._err = bytearray()
        self._timed_out = False
        self._killed = False
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._waiting = not idle
        self._threads = [threading.Thread(target=self._drain_stderr, daemon=True),
                         threading.Thread(target=self._watchdog, daemon=True)]
        if feed is not None:
            self._threads.append(threading.Thread(target=self._feed, args=(feed,), daemon=True))
        for t in self._threads:
            t.start()

    # -- helper threads
    def _feed(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            for i in range(0, len(view), 1 << 16):
                if self._done.is_set():
                    break
                self.proc.stdin.write(view[i: i + (1 << 16)])
        except (BrokenPipeError, OSError, ValueError):
            pass  # the child stopped reading (error, cap or kill): its exit status tells why
        finally:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def _drain_stderr(self) -> None:
        try:
            while True:
                buf = self.proc.stderr.read(4096)
                if not buf:
                    break
                self._err += buf
                if len(self._err) > 16384:
                    del self._err[:-8192]
        except (OSError, ValueError):
            pass

    def _watchdog(self) -> None:
        while not self._done.wait(0.02):
            with self._lock:
                late = self._waiting and self._deadline is not None and time.monotonic() > self._deadline
            if late:
                self._timed_out = True
                self._kill()
                return

    def _kill(self) -> None:
        self._killed = True
        try:
            self.proc.kill()
        except OSError:
            pass

    # -- reading
    def read(self, nbytes: int) -> bytes:
        if self.idle and self.timeout_s is not None:
            with self._lock:
                self._deadline = time.monotonic() + self.timeout_s
                self._waiting = True
        try:
            buf = self.proc.stdout.read(nbytes)
        except (OSError, ValueError):
            buf = b""
        finally:
            if self.idle:
                with self._lock:
                    self._waiting = False
        if self._timed_out:
            raise self._timeout_error()
        if buf:
            self.total += len(buf)
            if self.total > self.cap_samples * 4:
                self._kill()
                raise _too_long(self.src.name, self.cap_seconds)
            return buf
        self._finish()
        return b""

    def read_exact(self, nbytes: int) -> bytes:
        """Up to ``nbytes``, fewer only at the end of the stream."""
        parts, have = [], 0
        while have < nbytes:
            buf = self.read(nbytes - have)
            if not buf:
                break
            parts.append(buf)
            have += len(buf)
        return b"".join(parts)

    def read_all(self) -> np.ndarray:
        out = bytearray()
        while True:
            buf = self.read(1 << 20)
            if not buf:
                break
            out += buf
        del out[len(out) // 4 * 4:]
        return np.frombuffer(out, dtype=np.float32)

    def _timeout_error(self) -> AudioError:
        how = "waiting for the next block" if self.idle else "decoding"
        return AudioError(f"{self.src.name}: ffmpeg took longer than {self.timeout_s:g} s {how}; killed it",
                          code="decode_timeout")

    def _finish(self) -> None:
        """At the end of stdout: reap the child and raise if it failed."""
        try:
            remaining = None if self._deadline is None else max(0.1, self._deadline - time.monotonic())
            rc = self.proc.wait(timeout=remaining if not self.idle else self.timeout_s)
        except subprocess.TimeoutExpired:
            self._timed_out = True
            self._kill()
            self.proc.wait()
            raise self._timeout_error() from None
        finally:
            self.close()
        if self._timed_out:
            raise self._timeout_error()
        if rc == 0:
            return
        lines = [ln.strip() for ln in bytes(self._err).decode(errors="replace").splitlines() if ln.strip()]
        why = lines[-1] if lines else "no message"
        if why.startswith(f"{self._inp}: "):  # ffmpeg names its input (a pipe or our temp file): drop that
            why = why[len(self._inp) + 2:]
        if rc < 0:
            raise AudioError(f"{self.src.name}: the decoder (ffmpeg) crashed with signal {-rc} ({why})",
                             code="corrupt")
        code = "corrupt" if self.src.kind else "unsupported_format"
        what = "could not decode it" if self.src.kind else "does not recognise it as audio"
        raise AudioError(f"{self.src.name}: ffmpeg {what} ({why})", code=code)

    def close(self) -> None:
        self._done.set()
        if self.proc.poll() is None:
            self._kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - kill -9 is not ignored
            pass
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=1)
        for p in (self.proc.stdout, self.proc.stderr):
            try:
                p.close()
            except OSError:
                pass
        self._cleanup_tmp()

    def _cleanup_tmp(self) -> None:
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
            self._tmp = None


def _ffmpeg_decode(src: _Source, sample_rate: int, offset: float, duration: float | None, cap: float,
                   timeout_s: float | None) -> np.ndarray:
    stream = _FFmpegStream(src, sample_rate, offset, duration, cap * sample_rate, cap, timeout_s, idle=False)
    try:
        return stream.read_all()
    finally:
        stream.close()


def _decode(src: _Source, sample_rate: int, offset: float, duration: float | None, cap: float,
            timeout_s: float | None) -> np.ndarray:
    if src.kind in _SF_KINDS:
        try:
            return _sf_decode(src, sample_rate, offset, duration, cap)
        except _SoundfileRefused as e:
            sf_err = str(e)
        if ffmpeg_path() is None:  # nothing else to try: libsndfile's word stands
            raise AudioError(f"{src.name}: unreadable {src.kind.upper()} audio ({sf_err})", code="corrupt")
        try:
            return _ffmpeg_decode(src, sample_rate, offset, duration, cap, timeout_s)
        except AudioError as fe:
            if fe.code not in ("corrupt", "unsupported_format"):
                raise
            why = fe.message.split(": ", 1)[-1]
            raise AudioError(f"{src.name}: unreadable {src.kind.upper()} audio (soundfile: {sf_err}; {why})",
                             code="corrupt") from None
    return _ffmpeg_decode(src, sample_rate, offset, duration, cap, timeout_s)


# ----------------------------------------------------------------------------------------- public
def load_audio(
    src,
    sample_rate: int = SAMPLE_RATE,
    offset: float = 0.0,
    duration: float | None = None,
    allow_empty: bool = False,
    max_seconds: float | None = None,
    timeout_s: float | None = 30.0,
) -> np.ndarray:
    """Read audio as float32 mono in [-1, 1] at ``sample_rate``.

    ``src``: a path (str / PathLike), the raw bytes of a file (bytes / bytearray / memoryview) or a
    binary file object (read from its current position). ``offset`` and ``duration`` (seconds)
    select a segment. ``max_seconds`` caps the decoded audio, checked while decoding (None: the
    module cap :data:`MAX_DECODE_SECONDS`, 4 h; ``math.inf``: none). ``timeout_s`` is the wall-clock
    limit for an ffmpeg decode (None: none).

    Raises :class:`AudioError` naming the input, with ``.code``: ``bad_input`` (missing file,
    directory, wrong type or argument), ``empty`` (no data or no samples), ``unsupported_format``
    (nothing recognises it), ``corrupt`` (a known format that fails to decode, an implausible
    header sample rate, NaN/Inf samples, a decoder crash), ``too_long``, ``decode_timeout`` or
    ``no_ffmpeg`` (the format needs ffmpeg and it is not installed).
    """
    s = _source(src)
    cap = _check_args(s.name, offset, duration, max_seconds, timeout_s)
    sample_rate = _check_rate(s.name, sample_rate)
    wave = _decode(s, sample_rate, offset, duration, cap, timeout_s)
    if wave.size == 0 and not allow_empty:
        raise AudioError(f"{s.name}: no audio samples" + (f" at offset {offset}s" if offset else ""), code="empty")
    if not np.isfinite(wave).all():
        raise AudioError(f"{s.name}: audio contains NaN or infinite samples", code="corrupt")
    return wave


def iter_audio_blocks(src, block_samples: int, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None,
                      timeout_s: float | None = 30.0) -> Iterator[np.ndarray]:
    """float32 mono blocks of about ``block_samples`` at ``sample_rate`` from a path, bytes or a file
    object, decoded incrementally (memory stays bounded by the block, whatever the length).

    libsndfile formats are read and resampled block by block in process; other formats stream out
    of an ffmpeg child, where ``timeout_s`` bounds each wait for the next block (time the consumer
    spends between blocks does not count). ``max_seconds`` (None: no limit, since memory is
    bounded anyway) refuses longer audio with code ``too_long`` once that much came out. Errors are
    :class:`AudioError` as in :func:`load_audio`; an empty input raises code ``empty`` at the end."""
    s = _source(src)
    cap = _check_args(s.name, 0.0, None, math.inf if max_seconds is None else max_seconds, timeout_s)
    sample_rate = _check_rate(s.name, sample_rate)
    block_samples = max(1, int(block_samples))
    total = 0
    f = None
    if s.kind in _SF_KINDS:
        try:
            f = _sf_open(s)
        except _SoundfileRefused as e:
            if ffmpeg_path() is None:
                raise AudioError(f"{s.name}: unreadable {s.kind.upper()} audio ({e})", code="corrupt") from None
    if f is not None:
        with f:
            sr = f.samplerate
            rs = None
            if sr != sample_rate:
                import soxr

                rs = soxr.ResampleStream(sr, sample_rate, 1, dtype="float32", quality="HQ")
            per = max(1, int(round(block_samples * sr / sample_rate)))
            blocks = _sf_blocks(f, s.name, per, None, cap)
            while True:
                try:
                    x = next(blocks, None)
                except _SoundfileRefused as e:
                    raise AudioError(f"{s.name}: unreadable {s.kind.upper()} audio after {total / sample_rate:.2f} s "
                                     f"({e})", code="corrupt") from None
                last = x is None or len(x) < per
                if x is None:
                    x = np.zeros(0, np.float32)
                if rs is not None:
                    x = rs.resample_chunk(x, last=last)
                if not np.isfinite(x).all():
                    raise AudioError(f"{s.name}: audio contains NaN or infinite samples", code="corrupt")
                if len(x):
                    total += len(x)
                    yield x
                if last:
                    break
    else:
        stream = _FFmpegStream(s, sample_rate, 0.0, None, cap * sample_rate, cap, timeout_s, idle=True)
        try:
            carry = b""
            while True:
                buf = stream.read_exact(block_samples * 4 - len(carry))
                if not buf:
                    break
                buf = carry + buf
                cut = len(buf) // 4 * 4
                buf, carry = buf[:cut], buf[cut:]
                if buf:
                    x = np.frombuffer(buf, dtype=np.float32)
                    if not np.isfinite(x).all():
                        raise AudioError(f"{s.name}: audio contains NaN or infinite samples", code="corrupt")
                    total += len(x)
                    yield x
        finally:
            stream.close()
    if total == 0:
        raise AudioError(f"{s.name}: no audio samples", code="empty")


def audio_duration(path, max_seconds: float | None = None, timeout_s: float | None = 120.0) -> float:
    """Duration in seconds. WAV/FLAC/OGG: from libsndfile's frame count (for WAV that is the data
    actually present, not what the header claims), after the same header checks as
    :func:`load_audio`; other formats: by decoding through ffmpeg and counting the samples (streamed,
    memory bounded). ``path`` may also be bytes or a file object."""
    s = _source(path)
    if s.kind in _SF_KINDS:
        try:
            with _sf_open(s) as f:
                return f.frames / f.samplerate
        except _SoundfileRefused as e:
            if ffmpeg_path() is None:
                raise AudioError(f"{s.name}: unreadable {s.kind.upper()} audio ({e})", code="corrupt") from None
    n = 0
    for block in iter_audio_blocks(s.data if s.path is None else s.path, 1 << 18, SAMPLE_RATE, max_seconds,
                                   timeout_s):
        n += len(block)
    return n / SAMPLE_RATE


def save_wav(path: str | os.PathLike, wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write 16-bit PCM WAV atomically (temp file + rename), clipping to [-1, 1]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    wave = np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0)
    sf.write(str(tmp), wave, sample_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- arrays
def _is_tensor(x) -> bool:
    return type(x).__module__.split(".", 1)[0] == "torch" and hasattr(x, "detach")


def array_to_wave(x, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None,
                  name: str = "<array>") -> np.ndarray:
    """A 1-D numpy array or torch tensor -> float32 waveform, scaled by dtype: float kept as is
    (float16/64 cast to float32), int8 /128, int16 /32768, int32 /2**31, int64 /2**63, unsigned
    (x - midpoint) / midpoint (uint8: (x-128)/128). Refuses other shapes and dtypes, empty arrays
    (code ``empty``), NaN/Inf samples (code ``corrupt``) and more than ``max_seconds`` at
    ``sample_rate`` (code ``too_long``)."""
    if _is_tensor(x):
        t = x.detach()
        if t.is_complex():
            raise AudioError(f"{name}: got a complex tensor; expected a real 1-D waveform")
        if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        x = t.cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise AudioError(f"{name}: got a {type(x).__name__}; expected a 1-D numpy array or torch tensor")
    what = f"a {x.ndim}-D array of shape {tuple(x.shape)}"
    if x.ndim != 1:
        hint = " (mix the channels to mono first, e.g. x.mean(axis=...))" if x.ndim == 2 else ""
        raise AudioError(f"{name}: got {what}; expected a 1-D mono waveform at {sample_rate} Hz{hint}")
    kind = x.dtype.kind
    if kind == "f":
        wave = x.astype(np.float32, copy=False)
    elif kind == "i":
        wave = (x.astype(np.float64) / float(2 ** (8 * x.dtype.itemsize - 1))).astype(np.float32)
    elif kind == "u":
        mid = float(2 ** (8 * x.dtype.itemsize - 1))
        wave = ((x.astype(np.float64) - mid) / mid).astype(np.float32)
    else:
        raise AudioError(f"{name}: got an array of dtype {x.dtype}; expected float or integer samples")
    if wave.size == 0:
        raise AudioError(f"{name}: no audio samples (empty array)", code="empty")
    if max_seconds is not None and len(wave) > max_seconds * sample_rate:
        raise AudioError(f"{name}: {len(wave) / sample_rate:.2f} s is longer than the limit of {max_seconds:g} s",
                         code="too_long")
    if not np.isfinite(wave).all():
        raise AudioError(f"{name}: waveform contains NaN or infinite samples", code="corrupt")
    return np.ascontiguousarray(wave)


def as_waveform(audio, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> tuple[np.ndarray, str]:
    """Any supported audio input -> (float32 1-D waveform at ``sample_rate``, name of its source for
    messages and results).

    ``audio``: a path (str / PathLike), bytes / bytearray / memoryview of a file, a binary file
    object (decoded by :func:`load_audio`), or a 1-D numpy array / torch tensor already at
    ``sample_rate`` (scaled by dtype as in :func:`array_to_wave`: int16 /32768, int32 /2**31,
    uint8 (x-128)/128, floats kept). Arrays and tensors with NaN or Inf samples are refused (code
    ``corrupt``), as are 2-D arrays, lists, dicts, None and other types (code ``bad_input``, the
    message says what was given and what is expected). ``max_seconds`` caps the length (code
    ``too_long``; for files, None means :data:`MAX_DECODE_SECONDS`)."""
    if isinstance(audio, np.ndarray) or _is_tensor(audio):
        return array_to_wave(audio, sample_rate, max_seconds), "<array>"
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return load_audio(audio, sample_rate=sample_rate, max_seconds=max_seconds), "<bytes>"
    if isinstance(audio, (str, os.PathLike)):
        return load_audio(audio, sample_rate=sample_rate, max_seconds=max_seconds), os.fsdecode(os.fspath(audio))
    if hasattr(audio, "read") and callable(audio.read):
        return load_audio(audio, sample_rate=sample_rate, max_seconds=max_seconds), "<file object>"
    kind = type(audio).__name__
    hint = " (convert it: np.asarray(x, dtype=np.float32))" if isinstance(audio, (list, tuple)) else ""
    raise AudioError(f"<{kind}>: cannot use a {kind} as audio; expected a path, bytes, a binary file object, or a "
                     f"1-D numpy array / torch tensor of samples at {sample_rate} Hz{hint}")
