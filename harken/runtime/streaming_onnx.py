"""Streaming chunk model as ONNX (caches as inputs and outputs, a dynamic batch of sessions).

    export_streaming_onnx(model, "stream.onnx", chunk_size=16, left_chunks=4, tokenizer=tok)
    sm = StreamingModel.from_onnx("stream.onnx")    # shared by all sessions (harken.runtime.streaming)
    dec = load_onnx_streaming("stream.onnx")        # or one StreamingDecoder on onnxruntime
    for piece in pieces: dec.accept_waveform(piece)
    dec.finish().text

Graph (B dynamic: one row per session; C = chunk_size, R = left_chunks * C, N layers, H heads,
K conv kernel, W = (C-1)*S + right_context + 1 feature frames, S the subsampling factor)::

    inputs   feats (B, W, F) float32      raw fbank frames (CMVN is inside the graph); a row's last
                                          chunk zero-padded
             feat_len (B,) int64          valid frames per row (>= right_context + 1)
             offset (B,) int64            output frames each row decoded before this chunk
             att_cache (N, B, H, R, 2*dk) float32, cnn_cache (N, B, D, K-1) float32 (zeros at start)
    outputs  log_probs (B, C, V), out_len (B,) int64, new_att_cache, new_cnn_cache

Per row, cache slots not yet filled (fewer than R frames seen: ``offset < R``) and padded chunk
frames are masked out, so rows of sessions started at different times run together and each equals
the torch ``forward_chunk`` with a growing/trimmed cache.
Metadata: ``sample_rate``, ``feature_config``, ``vocabulary`` (+ ``tokenizer``),
``subsampling_factor``, ``right_context``, ``model_type``="ctc_streaming", ``encoder_type``,
``frame_shift`` (seconds), ``frame_shift_ms``, ``time_offset_ms``, ``blank_id``, ``streaming_chunk``,
``left_chunks``, ``cache_shapes`` (batch axis 1 as exported; any batch runs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import torch
import torch.nn as nn

from harken.runtime.streaming import StreamingDecoder, StreamingModel, _right_context

__all__ = ["StreamingChunkModel", "export_streaming_onnx", "load_onnx_streaming"]


class StreamingChunkModel(nn.Module):
    """Fixed-size chunk step of a :class:`CtcModel` (CMVN -> encoder.forward_chunk -> CTC head) over a
    batch of sessions with their own offsets."""

    def __init__(self, model, chunk_size: int, left_chunks: int):
        super().__init__()
        if left_chunks < 1:
            raise ValueError("ONNX streaming needs a bounded left context: left_chunks >= 1")
        self.cmvn = model.frontend.cmvn
        self.encoder = model.encoder
        self.output = model.output
        self.chunk = int(chunk_size)
        self.cache = int(left_chunks * chunk_size)
        self.sub = int(model.subsampling_factor)
        self.right = _right_context(model.encoder)
        self.window = (self.chunk - 1) * self.sub + self.right + 1

    def forward(self, feats, feat_len, offset, att_cache, cnn_cache):
        c, r = self.chunk, self.cache
        x = self.cmvn(feats)
        out_len = torch.clamp(self.encoder.output_lengths(feat_len), min=0, max=c)
        cache_valid = torch.arange(r, device=x.device)[None, :] >= (r - offset)[:, None]  # (B,R)
        chunk_valid = torch.arange(c, device=x.device)[None, :] < out_len[:, None]  # (B,C)
        mask = torch.cat([cache_valid, chunk_valid], dim=1)
        h, att, cnn = self.encoder.forward_chunk(x, offset[:, None], att_cache, cnn_cache, att_mask=mask,
                                                 required_cache_size=r)
        lp = torch.log_softmax(self.output(h).float(), dim=-1)
        return lp, out_len, att, cnn

    def example_inputs(self, batch: int = 2):
        enc = self.encoder
        att0, cnn0 = enc.init_cache(batch)
        n, b, h, _, dk2 = att0.shape
        f = enc.cfg.input_dim
        w = self.window
        return (torch.randn(batch, w, f), torch.tensor([w] + [max(self.right + 1, w - 5)] * (batch - 1)),
                torch.tensor([0] + [3 * self.chunk] * (batch - 1)), torch.randn(n, b, h, self.cache, dk2), cnn0)


def export_streaming_onnx(model, path: str | os.PathLike, chunk_size: int = 16, left_chunks: int = 4,
                          tokenizer=None, fbank_cfg=None, opset: int = 18) -> str:
    """Export ``model`` (a streaming-capable :class:`CtcModel` with frontend) chunk step to ONNX with
    the dynamo exporter (dynamic batch axis); returns the path."""
    import onnx

    from harken.decode.align import frame_offset

    model = model.eval()
    m = StreamingChunkModel(model, chunk_size, left_chunks).eval()
    args = m.example_inputs()
    path = str(path)
    batch = torch.export.Dim("batch", min=1, max=4096)
    dyn = {"feats": {0: batch}, "feat_len": {0: batch}, "offset": {0: batch}, "att_cache": {1: batch},
           "cnn_cache": {1: batch}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(m, args, dynamo=True, opset_version=opset, dynamic_shapes=dyn, verbose=False,
                                 input_names=["feats", "feat_len", "offset", "att_cache", "cnn_cache"],
                                 output_names=["log_probs", "out_len", "new_att_cache", "new_cnn_cache"])
    prog.save(path)
    proto = onnx.load(path)
    fb = fbank_cfg or model.frontend.fbank.cfg
    ecfg = model.encoder.cfg
    shift = fb.frame_shift_ms / 1000.0
    meta = {
        "sample_rate": str(fb.sample_rate),
        "feature_config": json.dumps(dataclasses.asdict(fb)),
        "subsampling_factor": str(m.sub),
        "right_context": str(m.right),
        "model_type": "ctc_streaming",
        "encoder_type": ecfg.type,
        "frame_shift": str(shift),
        "frame_shift_ms": f"{fb.frame_shift_ms:g}",
        "time_offset_ms": f"{1000.0 * frame_offset(shift, m.sub, fb.frame_length_ms / 1000.0):g}",
        "blank_id": str(int(getattr(tokenizer, "blank_id", 0))),
        "streaming_chunk": str(chunk_size),
        "left_chunks": str(left_chunks),
        "cache_shapes": json.dumps({"att_cache": [int(v) for v in args[3].shape[:1]] + [1] + list(args[3].shape[2:]),
                                    "cnn_cache": [int(v) for v in args[4].shape[:1]] + [1] + list(args[4].shape[2:])}),
    }
    if tokenizer is not None:
        meta["vocabulary"] = json.dumps(list(tokenizer.tokens), ensure_ascii=False)
        if hasattr(tokenizer, "to_dict"):
            meta["tokenizer"] = json.dumps(tokenizer.to_dict(), ensure_ascii=False)
    del proto.metadata_props[:]
    for k, v in meta.items():
        p = proto.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(proto, path)
    return path


def load_onnx_streaming(path: str | os.PathLike, num_threads: int | None = None, tokenizer=None) -> StreamingDecoder:
    """A single-stream :class:`StreamingDecoder` over an ONNX chunk model exported by
    :func:`export_streaming_onnx` (for many streams share one :meth:`StreamingModel.from_onnx`)."""
    return StreamingDecoder(streaming_model=StreamingModel.from_onnx(path, num_threads=num_threads,
                                                                     tokenizer=tokenizer))
