"""Inference runtime: the :class:`Engine` (torch or onnxruntime; batched, long-file segments) and
streaming decoding (:mod:`harken.runtime.streaming`)."""

from harken.runtime.engine import Engine, ModelInfo
from harken.runtime.results import Segment, Transcript, Word

__all__ = ["Engine", "ModelInfo", "Segment", "Transcript", "Word"]
