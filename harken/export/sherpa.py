"""Running an exported ``sherpa-wenet`` model in sherpa-onnx (``pip install sherpa-onnx==2.0.1``).

sherpa-onnx ends the whole process (C ``exit``, status 255) when a model breaks its contract, so a
model is always *probed* in a child process first (:func:`probe`); :func:`transcribe_files` also
decodes in a child process. After a successful probe, :func:`recognizer` may be used in-process.

Text from sherpa is built from the tokens (``▁`` -> space); :func:`clean_text` collapses spaces and
drops ``<unk>`` the way harken's own tokenizers decode, so texts compare directly.

    python -m harken.export.sherpa MODEL.onnx TOKENS.txt [WAV ...] [--threads N]
      -> one JSON line per file {"file", "text", "tokens"}; no files: load only (a probe)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["SherpaError", "probe", "recognizer", "model_rate", "transcribe_files", "transcribe_waves", "clean_text"]


class SherpaError(RuntimeError):
    pass


def clean_text(text: str) -> str:
    return " ".join(text.replace("<unk>", "").split())


def model_rate(model: str | os.PathLike) -> tuple[int, int]:
    """``(sample_rate, feature_dim)`` of an exported model, from its metadata (harken writes both;
    sherpa's defaults 16000 and 80 where a key is missing)."""
    from harken.export.onnx import read_metadata

    md = read_metadata(model)
    try:
        return int(md.get("sample_rate", 16000)), int(md.get("feature_dim", 80))
    except (TypeError, ValueError):
        return 16000, 80


def recognizer(model: str | os.PathLike, tokens: str | os.PathLike, num_threads: int = 1,
               sample_rate: int | None = None, feature_dim: int | None = None):
    """An in-process ``sherpa_onnx.OfflineRecognizer`` for a WeNet-CTC model (probe it first).
    ``sample_rate`` / ``feature_dim``: of sherpa's front end; None: the model's own (its metadata),
    so an 8 kHz model gets 8 kHz features."""
    import sherpa_onnx

    if sample_rate is None or feature_dim is None:
        sr, dim = model_rate(model)
        sample_rate = sr if sample_rate is None else sample_rate
        feature_dim = dim if feature_dim is None else feature_dim
    return sherpa_onnx.OfflineRecognizer.from_wenet_ctc(model=str(model), tokens=str(tokens),
                                                         num_threads=int(num_threads), sample_rate=int(sample_rate),
                                                         feature_dim=int(feature_dim), decoding_method="greedy_search")


def transcribe_waves(rec, waves: Sequence, sample_rate: int = 16000) -> list[str]:
    """Decode float32 waveforms in [-1, 1] at ``sample_rate`` with an in-process recognizer, one
    stream each (sherpa resamples to its front end's rate)."""
    out = []
    for w in waves:
        s = rec.create_stream()
        s.accept_waveform(sample_rate, w)
        rec.decode_stream(s)
        out.append(clean_text(s.result.text))
    return out


def _run_child(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "harken.export.sherpa", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _explain(r: subprocess.CompletedProcess, model) -> str:
    tail = (r.stderr or "").strip().splitlines()[-3:]
    why = "a contract violation (sherpa-onnx exits with 255)" if r.returncode == 255 else f"exit status {r.returncode}"
    return f"sherpa-onnx could not run {model}: {why}: {' | '.join(tail)}"


def probe(model: str | os.PathLike, tokens: str | os.PathLike, timeout: float = 300.0) -> None:
    """Load the model in sherpa-onnx in a child process; raises :class:`SherpaError` if that fails."""
    r = _run_child([str(model), str(tokens)], timeout)
    if r.returncode != 0:
        raise SherpaError(_explain(r, model))


def transcribe_files(model: str | os.PathLike, tokens: str | os.PathLike, files: Sequence[str | os.PathLike],
                     num_threads: int = 1, timeout: float = 600.0) -> list[dict]:
    """Decode audio files with sherpa-onnx in a child process; ``[{"file", "text", "tokens"}]``."""
    r = _run_child([str(model), str(tokens), *map(str, files), "--threads", str(num_threads)], timeout)
    if r.returncode != 0:
        raise SherpaError(_explain(r, model))
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m harken.export.sherpa")
    p.add_argument("model")
    p.add_argument("tokens")
    p.add_argument("files", nargs="*")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    rate, _ = model_rate(a.model)
    rec = recognizer(a.model, a.tokens, a.threads)
    if not a.files:
        print(json.dumps({"loaded": a.model}))
        return 0
    from harken.audio import load_audio

    for f in a.files:
        w = load_audio(f, sample_rate=rate)  # any file rate: resampled to the model's
        s = rec.create_stream()
        s.accept_waveform(rate, w)
        rec.decode_stream(s)
        print(json.dumps({"file": f, "text": clean_text(s.result.text), "tokens": list(s.result.tokens)},
                         ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
