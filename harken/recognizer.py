"""The small Python API: ``Recognizer.load("exp/demo/best.pt").transcribe("a.wav")``.

A checkpoint is self-describing (config, tokenizer, CMVN inside the model state), so loading needs
nothing but its path. :class:`Recognizer` is :class:`harken.runtime.Engine` under its public
name (which also runs ONNX files): batching, decoding, word times and VAD segmentation of long
files live there.

Word times and confidences come from CTC forced alignment (:mod:`harken.decode.align`) of the
decoded text against the model's log-probs, on request (``DecodeOptions(word_timestamps=True)``);
output frame ``t`` is taken to cover ``[offset + t * step, offset + (t + 1) * step)`` with
``step`` the output frame shift (40 ms for 10 ms fbank frames and 4x subsampling) and ``offset``
centring that window on the frame's receptive field. Long recordings go through
:meth:`Recognizer.transcribe_segments`, which reads the file in blocks, cuts it at pauses
(:mod:`harken.vad`) and yields segments lazily.
"""

from __future__ import annotations

import torch

from harken.runtime.blocks import FRAME_SAMPLES, iter_blocks
from harken.runtime.engine import Engine, TorchBackend
from harken.runtime.options import DecodeOptions, ItemError
from harken.runtime.results import AUDIO_EXTS, Segment, Transcript, Word, find_audio

__all__ = ["Recognizer", "DecodeOptions", "ItemError", "Transcript", "Segment", "Word", "find_audio", "iter_blocks",
           "AUDIO_EXTS", "FRAME_SAMPLES"]


class Recognizer(Engine):
    """``Recognizer(model, tokenizer, config)`` over an in-memory model, or
    ``Recognizer.load(path)`` (a ``.pt`` checkpoint, or a harken ``.onnx`` file)."""

    def __init__(self, model, tokenizer, config, device: str | torch.device = "cpu", decode_cfg=None,
                 *, options: DecodeOptions | None = None, **kw):
        from harken.models.info import ModelInfo

        info = ModelInfo.from_model(model, tokenizer, config)
        super().__init__(TorchBackend(model, device), tokenizer, info, options=options, decode_cfg=decode_cfg,
                         config=config, **kw)


    @classmethod
    def from_checkpoint(cls, path, **kw) -> "Recognizer":
        return cls.load(path, **kw)
