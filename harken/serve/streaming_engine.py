"""Offline routes over a streaming-only model (a streaming ONNX export): an engine-shaped adapter
whose ``infer_batch`` runs each waveform through its own :class:`StreamSession` of the shared
:class:`~harken.runtime.streaming.StreamingModel`, all sessions stepped together (one batched
forward per chunk), and joins the finals into a :class:`Transcript`.

    sm = StreamingModel.from_onnx("stream.onnx")
    engine = StreamingOfflineEngine(sm, path="stream.onnx")   # what harken serve uses for such files
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Sequence

import numpy as np

__all__ = ["StreamingOfflineEngine", "is_streaming_onnx"]


def is_streaming_onnx(path: str) -> bool:
    """True for an ONNX file written by :func:`harken.runtime.streaming_onnx.export_streaming_onnx`."""
    if not str(path).endswith(".onnx") or not os.path.isfile(path):
        return False
    try:
        from harken.runtime.engine import read_onnx_metadata

        return read_onnx_metadata(path).get("model_type") == "ctc_streaming"
    except Exception:  # noqa: BLE001 - not readable as ONNX: let Engine.load say why
        return False


class _Info:
    def __init__(self, sr: int, model_id: str):
        self.sample_rate = sr
        self.model_id = model_id


class StreamingOfflineEngine:
    backend_name = "onnx-streaming"
    max_item_seconds = None

    def __init__(self, sm, path: str = ""):
        self.sm = sm
        self.path = path
        self.sample_rate = int(sm.sample_rate)
        mid = ""
        if path and os.path.isfile(path):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            mid = "sha256:" + h.hexdigest()[:16]
        self.info = _Info(self.sample_rate, mid)

    def infer_batch(self, waves: Sequence[np.ndarray], options=None, **_kw) -> list:
        from harken.runtime.results import Transcript

        wts = bool(getattr(options, "word_timestamps", False))
        sessions = []
        for w in waves:
            s = self.sm.new_session(endpoint=None, word_timestamps=wts)
            s.accept_waveform(np.asarray(w, np.float32))
            s.input_finished()
            sessions.append(s)
        finals: list[list] = [[] for _ in sessions]
        t0 = time.perf_counter()
        live = list(range(len(sessions)))
        while live:
            outs = self.sm.step([sessions[i] for i in live])
            for i, res in zip(live, outs):
                finals[i].extend(r for r in res if r.is_final)
            live = [i for i in live if not sessions[i].done]
        dt = time.perf_counter() - t0
        total = sum(len(w) for w in waves) or 1
        out = []
        for w, fs in zip(waves, finals):
            text = " ".join(f.text for f in fs if f.text)
            words = [x for f in fs for x in f.words]
            t = Transcript(text=text, words=words, confidence=float(np.mean([x.confidence for x in words]))
                           if words else 0.0, duration=len(w) / self.sample_rate)
            t.timings["frontend_encoder"] = dt * len(w) / total
            out.append(t)
        return out

    def transcribe(self, wave, options=None):
        return self.infer_batch([wave], options)[0]
