"""Inference runtime: the :class:`Engine` (torch or onnxruntime; immutable, thread-safe, per-call
:class:`DecodeOptions`, :meth:`Engine.infer_batch` with per-item :class:`ItemError`) and streaming
(:mod:`harken.runtime.streaming`). Imports nothing from :mod:`harken.train`."""

from harken.models.info import ModelInfo
from harken.runtime.engine import Engine
from harken.runtime.options import DecodeOptions, ItemError
from harken.runtime.results import Segment, Transcript, Word

__all__ = ["Engine", "ModelInfo", "DecodeOptions", "ItemError", "Segment", "Transcript", "Word"]
