"""The small Python API: ``Recognizer.load("exp/demo/best.pt").transcribe("a.wav")``.

A checkpoint is self-describing (config, tokenizer, CMVN inside the model state), so loading needs
nothing but its path.  :class:`Recognizer` is a thin layer over :class:`harken.runtime.Engine`
(which also runs ONNX files): everything (batching, decoding, word times, VAD segmentation of long
files) lives there.

Word times and confidences come from CTC forced alignment (:mod:`harken.decode.align`) of the
decoded text against the model's log-probs; output frame ``t`` is taken to cover
``[offset + t * step, offset + (t + 1) * step)`` with ``step = frame shift x subsampling`` (40 ms)
and ``offset`` centring that window on the frame's receptive field (22.5 ms for 25 ms / 10 ms
fbank frames and 4x subsampling). Long recordings go through :meth:`Recognizer.transcribe_long`,
which reads the file in blocks, cuts it at pauses (:mod:`harken.vad`) and yields segments lazily.
"""

from __future__ import annotations

import os

import torch

from harken.runtime.blocks import FRAME_SAMPLES, iter_blocks
from harken.runtime.engine import Engine
from harken.runtime.results import AUDIO_EXTS, Segment, Transcript, Word, find_audio

__all__ = ["Recognizer", "Transcript", "Segment", "Word", "find_audio", "iter_blocks", "AUDIO_EXTS",
           "FRAME_SAMPLES"]


class Recognizer(Engine):
    """``Recognizer(model, tokenizer, config)`` over an in-memory model, or
    ``Recognizer.load(path)`` (a ``.pt`` checkpoint, or a harken ``.onnx`` file)."""

    def __init__(self, model, tokenizer, config, device: str | torch.device = "cpu", decode_cfg=None):
        eng = Engine.from_model(model, tokenizer, config, device, decode_cfg=decode_cfg)
        self._setup(eng.backend, tokenizer, eng.info, decode_cfg=decode_cfg, config=config)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", num_threads: int | None = None,
             decode_cfg=None, backend: str = "auto", warmup: bool = True) -> "Recognizer":
        return super().load(path, backend=backend, num_threads=num_threads, decode_cfg=decode_cfg,
                            device=device, warmup=warmup)

    from_checkpoint = load
