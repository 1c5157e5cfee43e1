"""``ModelInfo``: the facts about a model that inference needs besides its weights, in one schema.

A checkpoint (``.pt``) and every exported artifact (ONNX ``metadata_props``, the TorchScript and
pt2 sidecars) carry the same facts under the same keys, written by :meth:`ModelInfo.to_metadata`
and read back by :meth:`ModelInfo.from_metadata`. Nothing here imports training code or torch.

Keys (all values are strings in the metadata map; JSON for lists and dicts):

=====================  =====================================================================
``sample_rate``        Hz of the audio the model takes
``feature_config``     the fbank settings (JSON; ``{}`` for encoders with their own frontend)
``feature_dim``        mel bins (0 for waveform encoders)
``frame_shift_ms``     feature frame step
``frame_length_ms``    feature window
``subsampling_factor`` feature frames per output frame
``right_context``      feature frames the subsampling looks ahead of its last output frame
``output_frame_shift_ms``  seconds per output frame x 1000 (wav2vec2: 20, not 10 x sub)
``time_offset_ms``     where output frame 0 is centred
``vocabulary``         JSON list of token strings, blank first
``tokenizer``          optional: the tokenizer's ``to_dict()`` (JSON), for BPE encoding
``blank_id``           CTC blank id
``streaming_chunk``    output frames per chunk the model streams with (0: not streaming)
``left_chunks``        chunks of left context (-1: all)
``max_input_seconds``  longest input the model accepts in one forward (0: no hard limit)
``encoder_type``       registry name of the encoder
``model_type``         ``ctc`` (harken) or the sherpa variant's name
``harken_version``     version that wrote it
``model_id``           content hash of the weights (``sha256:<16 hex>``)
=====================  =====================================================================
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelInfo", "file_model_id", "state_dict_model_id"]

_INT = ("sample_rate", "feature_dim", "subsampling_factor", "right_context", "blank_id", "streaming_chunk",
        "left_chunks", "min_input")
_FLOAT = ("frame_shift_ms", "frame_length_ms", "output_frame_shift_ms", "time_offset_ms", "max_input_seconds")
_JSON = ("feature_config", "vocabulary", "tokenizer", "encoder_config")


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime knows about a model besides its weights (immutable)."""

    sample_rate: int = 16000
    feature_config: dict = field(default_factory=dict)
    feature_dim: int = 80
    frame_shift: float = 0.01  # seconds per feature frame (before subsampling)
    frame_length: float = 0.025  # seconds per feature window
    subsampling: int = 4  # feature frames per output frame
    right_context: int = 6  # feature frames seen beyond the first of an output frame's window
    output_frame_shift: float = 0.04  # seconds per output frame
    time_offset: float = 0.0225  # centre of output frame 0, seconds
    vocabulary: tuple = ()
    tokenizer: dict | None = None
    blank_id: int = 0
    streaming_chunk: int = 0
    left_chunks: int = -1
    max_input_seconds: float = 0.0  # 0: no hard limit
    min_input: int = 0  # smallest waveform (samples) the graph accepts
    encoder_type: str = "conformer"
    model_type: str = "ctc"
    harken_version: str = ""
    model_id: str = ""
    extra: dict = field(default_factory=dict)  # anything else the artifact carried (strings)

    # -------------------------------------------------------------------------------- derived
    @property
    def frame_seconds(self) -> float:
        """Seconds per output frame."""
        return self.output_frame_shift

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def replace(self, **kw) -> "ModelInfo":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for ``/v1/models``, logs and the recognition log)."""
        d = dataclasses.asdict(self)
        d["vocabulary"] = list(self.vocabulary)
        d["vocab_size"] = self.vocab_size
        d.pop("tokenizer", None)
        d.pop("extra", None)
        return d

    # ------------------------------------------------------------------------------- metadata
    def to_metadata(self) -> dict[str, str]:
        """The string map written into artifacts (see the module docstring for the keys)."""
        md = {
            "sample_rate": str(int(self.sample_rate)),
            "feature_config": json.dumps(self.feature_config, sort_keys=True),
            "feature_dim": str(int(self.feature_dim)),
            "frame_shift_ms": f"{1000.0 * self.frame_shift:g}",
            "frame_length_ms": f"{1000.0 * self.frame_length:g}",
            "subsampling_factor": str(int(self.subsampling)),
            "right_context": str(int(self.right_context)),
            "output_frame_shift_ms": f"{1000.0 * self.output_frame_shift:g}",
            "time_offset_ms": f"{1000.0 * self.time_offset:g}",
            "vocabulary": json.dumps(list(self.vocabulary), ensure_ascii=False),
            "vocab_size": str(self.vocab_size),
            "blank_id": str(int(self.blank_id)),
            "streaming_chunk": str(int(self.streaming_chunk)),
            "left_chunks": str(int(self.left_chunks)),
            "max_input_seconds": f"{float(self.max_input_seconds):g}",
            "min_input": str(int(self.min_input)),
            "encoder_type": self.encoder_type,
            "model_type": self.model_type,
            "harken_version": self.harken_version,
            "model_id": self.model_id,
        }
        if self.tokenizer:
            md["tokenizer"] = json.dumps(self.tokenizer, ensure_ascii=False)
        for k, v in self.extra.items():
            md.setdefault(k, str(v))
        return md

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str = "model") -> "ModelInfo":
        """Read the map written by :meth:`to_metadata` (also files written before ``right_context``,
        ``frame_length_ms`` and ``model_id`` existed). Raises ValueError naming ``where`` and the
        missing or malformed key."""

        def need(key: str) -> str:
            if key not in meta or meta[key] == "":
                raise ValueError(f"{where}: metadata has no '{key}'; re-export it with `harken export`")
            return meta[key]

        def num(key: str, kind, default=None):
            if key not in meta or meta[key] == "":
                if default is None:
                    need(key)
                return default
            try:
                return kind(float(meta[key])) if kind is int else kind(meta[key])
            except ValueError:
                raise ValueError(f"{where}: metadata '{key}' is {meta[key]!r}, not a number") from None

        def js(key: str, default):
            if not meta.get(key):
                return default
            try:
                return json.loads(meta[key])
            except json.JSONDecodeError:
                raise ValueError(f"{where}: metadata '{key}' is not valid JSON") from None

        vocab = js("vocabulary", None)
        if not isinstance(vocab, list) or not vocab:
            need("vocabulary")
            raise ValueError(f"{where}: metadata 'vocabulary' is not a non-empty list")
        feat = js("feature_config", {})
        shift = num("frame_shift_ms", float, None) if meta.get("frame_shift_ms") else None
        if shift is None:  # very old files: frame_shift in seconds or ms
            s = float(meta.get("frame_shift") or feat.get("frame_shift_ms", 10.0))
            shift = s if s >= 1.0 else s * 1000.0
        sub = num("subsampling_factor", int)
        out_shift = num("output_frame_shift_ms", float, shift * sub)
        length = num("frame_length_ms", float, float(feat.get("frame_length_ms", 25.0)))
        if "time_offset_ms" in meta and meta["time_offset_ms"] != "":
            offset = num("time_offset_ms", float) / 1000.0
        else:
            offset = length / 2000.0 + (sub - 1) * shift / 1000.0 - out_shift / 2000.0
        known = set(_INT) | set(_FLOAT) | set(_JSON) | {"vocab_size", "encoder_type", "model_type",
                                                        "harken_version", "model_id", "frame_shift"}
        return cls(
            sample_rate=num("sample_rate", int, 16000),
            feature_config=feat,
            feature_dim=num("feature_dim", int, int(feat.get("num_mel_bins", 0) or 0)),
            frame_shift=round(shift / 1000.0, 9),
            frame_length=round(length / 1000.0, 9),
            subsampling=sub,
            right_context=num("right_context", int, 6 if sub == 4 else 0),
            output_frame_shift=round(out_shift / 1000.0, 9),
            time_offset=round(offset, 9),
            vocabulary=tuple(vocab),
            tokenizer=js("tokenizer", None),
            blank_id=num("blank_id", int, 0),
            streaming_chunk=num("streaming_chunk", int, 0),
            left_chunks=num("left_chunks", int, -1),
            max_input_seconds=num("max_input_seconds", float, 0.0),
            min_input=num("min_input", int, 0),
            encoder_type=meta.get("encoder_type", "conformer"),
            model_type=meta.get("model_type", "ctc"),
            harken_version=meta.get("harken_version", ""),
            model_id=meta.get("model_id", ""),
            extra={k: v for k, v in meta.items() if k not in known},
        )

    @classmethod
    def from_model(cls, model, tokenizer, config, model_id: str = "") -> "ModelInfo":
        """The facts of an in-memory :class:`harken.models.ctc.CtcModel` built from ``config``
        (an ``ExperimentConfig``)."""
        import harken

        fb = config.model.fbank
        enc = config.model.encoder
        encoder = getattr(model, "encoder", None)
        waveform_in = bool(getattr(encoder, "takes_waveform", False)) or getattr(model, "frontend", 1) is None
        frame_seconds = getattr(encoder, "frame_seconds", None)
        # the geometry comes from the model's subsampling module (CtcModel.subsampling_factor/right_context)
        sub = int(model.subsampling_factor)
        right = int(getattr(model, "right_context", 0) or 0)
        shift, length = fb.frame_shift_ms / 1000.0, fb.frame_length_ms / 1000.0
        if frame_seconds:  # encoders on raw waveforms: their own output step
            out_shift, offset = float(frame_seconds), 0.0
            feat, dim = {}, 0
        else:
            out_shift = shift * sub
            offset = length / 2 + (sub - 1) * shift - out_shift / 2
            feat, dim = dataclasses.asdict(fb), int(fb.num_mel_bins)
        if waveform_in and not frame_seconds:
            feat, dim = {}, 0
        max_frames = getattr(encoder, "max_input_frames", None)
        max_s = float(max_frames) * out_shift if max_frames else float(getattr(encoder, "max_input_seconds", 0.0) or 0)
        return cls(
            sample_rate=int(fb.sample_rate), feature_config=feat, feature_dim=dim, frame_shift=round(shift, 9),
            frame_length=round(length, 9), subsampling=sub, right_context=right,
            output_frame_shift=round(out_shift, 9), time_offset=round(offset, 9), vocabulary=tuple(tokenizer.tokens),
            tokenizer=tokenizer.to_dict() if hasattr(tokenizer, "to_dict") else None,
            blank_id=int(getattr(tokenizer, "blank_id", 0)),
            streaming_chunk=int(getattr(enc, "chunk_size", 0) or 0),
            left_chunks=int(getattr(enc, "left_chunks", -1)),
            max_input_seconds=max_s, encoder_type=str(enc.type), model_type="ctc",
            harken_version=str(harken.__version__), model_id=model_id,
        )


def file_model_id(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """``sha256:<first 16 hex digits>`` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return "sha256:" + h.hexdigest()[:16]


def state_dict_model_id(state_dict) -> str:
    """A content hash of a model's weights (names, shapes and bytes), independent of the file."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = state_dict[k]
        h.update(k.encode())
        if hasattr(v, "detach"):
            t = v.detach().cpu().contiguous()
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()[:16]
