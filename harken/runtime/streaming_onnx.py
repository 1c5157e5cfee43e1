"""Streaming chunk model as ONNX (caches as inputs and outputs), and an onnxruntime chunker.

    export_streaming_onnx(model, "stream.onnx", chunk_size=16, left_chunks=4)
    dec = load_onnx_streaming("stream.onnx")        # a StreamingDecoder on onnxruntime
    for piece in pieces: dec.accept_waveform(piece)
    dec.finish().text

Graph (all shapes static; C = chunk_size, R = left_chunks * C, N layers, H heads, K conv kernel)::

    inputs   feats (1, 4C+3, F) float32   raw fbank frames (CMVN is inside the graph); the last
                                          chunk zero-padded
             feat_len (1,) int64          valid frames in ``feats`` (>= 7)
             offset (1,) int64            output frames decoded before this chunk
             att_cache (N, 1, H, R, 2*dk) float32, cnn_cache (N, 1, D, K-1) float32 (zeros at start)
    outputs  log_probs (1, C, V), out_len (1,) int64, new_att_cache, new_cnn_cache

Cache slots not yet filled (fewer than R frames seen: ``offset < R``) and padded chunk frames are
masked out, so the graph equals the torch ``forward_chunk`` with a growing/trimmed cache.
Metadata: the wave model's keys (``sample_rate``, ``feature_config``, ``vocabulary``,
``subsampling_factor``, ``model_type``="ctc_streaming", ``encoder_type``, ``frame_shift``,
``blank_id``, ``streaming_chunk``) plus ``left_chunks``, ``cache_shapes``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import torch
import torch.nn as nn

from harken.runtime.streaming import StreamingDecoder, StreamingFeatures

__all__ = ["StreamingChunkModel", "export_streaming_onnx", "OnnxChunker", "load_onnx_streaming"]


class StreamingChunkModel(nn.Module):
    """Fixed-size chunk step of a :class:`CtcModel` (CMVN -> encoder.forward_chunk -> CTC head)."""

    def __init__(self, model, chunk_size: int, left_chunks: int):
        super().__init__()
        if left_chunks < 1:
            raise ValueError("ONNX streaming needs a bounded left context: left_chunks >= 1")
        self.cmvn = model.frontend.cmvn
        self.encoder = model.encoder
        self.output = model.output
        self.chunk = int(chunk_size)
        self.cache = int(left_chunks * chunk_size)

    def forward(self, feats, feat_len, offset, att_cache, cnn_cache):
        c, r = self.chunk, self.cache
        x = self.cmvn(feats)
        out_len = torch.clamp(((feat_len - 1) // 2 - 1) // 2, min=0, max=c)
        cache_valid = torch.arange(r, device=x.device)[None, :] >= (r - offset)[:, None]  # (1,R)
        chunk_valid = torch.arange(c, device=x.device)[None, :] < out_len[:, None]  # (1,C)
        mask = torch.cat([cache_valid, chunk_valid], dim=1)
        h, att, cnn = self.encoder.forward_chunk(x, offset, att_cache, cnn_cache, att_mask=mask,
                                                 required_cache_size=r)
        lp = torch.log_softmax(self.output(h).float(), dim=-1)
        return lp, out_len, att, cnn

    def example_inputs(self):
        enc = self.encoder
        att0, cnn0 = enc.init_cache(1)
        n, b, h, _, dk2 = att0.shape
        f = enc.cfg.input_dim
        return (torch.randn(1, 4 * self.chunk + 3, f), torch.tensor([4 * self.chunk + 3]),
                torch.tensor([0]), torch.zeros(n, b, h, self.cache, dk2), cnn0)


def export_streaming_onnx(model, path: str | os.PathLike, chunk_size: int = 16, left_chunks: int = 4,
                          tokenizer=None, fbank_cfg=None, opset: int = 18) -> str:
    """Export ``model`` (a streaming-capable :class:`CtcModel` with frontend) chunk step to ONNX with
    the dynamo exporter; returns the path."""
    import onnx

    model = model.eval()
    m = StreamingChunkModel(model, chunk_size, left_chunks).eval()
    args = m.example_inputs()
    path = str(path)
    with torch.no_grad():
        prog = torch.onnx.export(m, args, dynamo=True, opset_version=opset,
                                 input_names=["feats", "feat_len", "offset", "att_cache", "cnn_cache"],
                                 output_names=["log_probs", "out_len", "new_att_cache", "new_cnn_cache"])
    prog.save(path)
    proto = onnx.load(path)
    fb = fbank_cfg or model.frontend.fbank.cfg
    ecfg = model.encoder.cfg
    meta = {
        "sample_rate": str(fb.sample_rate),
        "feature_config": json.dumps(dataclasses.asdict(fb)),
        "subsampling_factor": str(model.subsampling_factor),
        "model_type": "ctc_streaming",
        "encoder_type": ecfg.type,
        "frame_shift": str(fb.frame_shift_ms / 1000.0),
        "blank_id": "0",
        "streaming_chunk": str(chunk_size),
        "left_chunks": str(left_chunks),
        "cache_shapes": json.dumps({"att_cache": list(args[3].shape), "cnn_cache": list(args[4].shape)}),
    }
    if tokenizer is not None:
        meta["vocabulary"] = json.dumps(list(tokenizer.tokens), ensure_ascii=False)
        meta["tokenizer"] = json.dumps(tokenizer.to_dict(), ensure_ascii=False)
    del proto.metadata_props[:]
    for k, v in meta.items():
        p = proto.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(proto, path)
    return path


class OnnxChunker:
    """The :class:`StreamingDecoder` chunk step on onnxruntime."""

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if num_threads:
            so.intra_op_num_threads = int(num_threads)
            so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.chunk = int(self.meta["streaming_chunk"])
        self.left_chunks = int(self.meta["left_chunks"])
        shapes = json.loads(self.meta["cache_shapes"])
        self.att_shape, self.cnn_shape = shapes["att_cache"], shapes["cnn_cache"]
        self.window = 4 * self.chunk + 3
        self.reset()

    def reset(self) -> None:
        self.att = np.zeros(self.att_shape, np.float32)
        self.cnn = np.zeros(self.cnn_shape, np.float32)
        self.offset = 0

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        """Raw fbank window (T <= 4C+3, F) -> log-probs (C', V)."""
        t, f = window.shape
        x = np.zeros((1, self.window, f), np.float32)
        x[0, :t] = window.numpy()
        lp, n, self.att, self.cnn = self.session.run(None, {
            "feats": x, "feat_len": np.array([t], np.int64), "offset": np.array([self.offset], np.int64),
            "att_cache": self.att, "cnn_cache": self.cnn})
        n = int(np.asarray(n).reshape(-1)[0])
        self.offset += n
        return torch.from_numpy(lp[0, :n]).float()


def load_onnx_streaming(path: str | os.PathLike, num_threads: int | None = None, tokenizer=None) -> StreamingDecoder:
    """A :class:`StreamingDecoder` running an ONNX chunk model exported by :func:`export_streaming_onnx`."""
    from harken.features import FbankConfig
    from harken.runtime.engine import VocabTokenizer
    from harken.text.tokenizer import tokenizer_from_dict

    ch = OnnxChunker(path, num_threads)
    meta = ch.meta
    fb = FbankConfig(**json.loads(meta["feature_config"]))
    if tokenizer is None:
        tokenizer = (tokenizer_from_dict(json.loads(meta["tokenizer"])) if meta.get("tokenizer")
                     else VocabTokenizer(json.loads(meta["vocabulary"])))
    # CMVN is inside the graph: the features here are raw fbank
    return StreamingDecoder(tokenizer=tokenizer, chunk_size=ch.chunk, left_chunks=ch.left_chunks, chunker=ch,
                            features=StreamingFeatures(fb, None))
