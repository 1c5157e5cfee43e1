"""Dynamic int8 quantization of an exported harken ONNX model (onnxruntime's quantizer).

Weights of the encoder's and the output layer's linear layers (``MatMul`` with a constant weight)
become uint8 (``QUInt8``; ``QInt8`` weights lost accuracy on these models), activations are quantized
per call. The fbank's mel-filter ``MatMul`` is left in float: a power spectrum spans many orders of
magnitude and 8 bits of it would wreck the features. ``quant_pre_process`` runs first, with
``skip_symbolic_shape=True`` (its symbolic shape inference fails on the dynamo graph).

The metadata of the float model is copied, plus ``quantization=dynamic_uint8_weights``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from harken.fsutil import atomic_write_bytes

__all__ = ["quantize_int8", "quantizable_nodes"]


def quantizable_nodes(model, exclude_shapes: set[tuple[int, ...]] = frozenset()) -> list[str]:
    """Names of ``MatMul`` nodes whose second input is a 2-D initializer (a weight), except those whose
    weight shape is in ``exclude_shapes``."""
    from onnx import numpy_helper  # noqa: F401  (keeps the import cost where it is used)

    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    consts = {}
    for n in model.graph.node:  # weights folded into Constant nodes
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = tuple(a.t.dims)
    shapes = {**consts, **inits}
    out = []
    for n in model.graph.node:
        if n.op_type != "MatMul" or len(n.input) < 2:
            continue
        shp = shapes.get(n.input[1])
        if shp is None or len(shp) != 2 or shp in exclude_shapes:
            continue
        out.append(n.name)
    return out


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write a dynamically quantized copy of the ONNX model ``src`` to ``dst``; returns ``dst``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from harken.export.onnx import read_metadata, set_metadata

    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"ONNX model not found: {src}")
    md = read_metadata(src, decode=False)
    exclude: set[tuple[int, ...]] = set()
    if md.get("input_kind") == "waveform":
        import json

        fc = json.loads(md.get("feature_config", "{}"))
        win = int(fc.get("sample_rate", 16000) * 0.001 * fc.get("frame_length_ms", 25.0))
        n_fft = 1 << (win - 1).bit_length() if fc.get("round_to_power_of_two", True) else win
        exclude.add((n_fft // 2 + 1, int(fc.get("num_mel_bins", 80))))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as td:
        pre = Path(td) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        nodes = quantizable_nodes(onnx.load(str(pre)), exclude)
        if not nodes:
            raise RuntimeError(f"{src}: no MatMul with a constant weight to quantize")
        q = Path(td) / "q.onnx"
        quantize_dynamic(str(pre), str(q), weight_type=QuantType.QUInt8, nodes_to_quantize=nodes,
                         op_types_to_quantize=["MatMul"], per_channel=False, reduce_range=False)
        proto = onnx.load(str(q))
    md["quantization"] = "dynamic_uint8_weights"
    md["quantized_nodes"] = str(len(nodes))
    set_metadata(proto, md)
    atomic_write_bytes(dst, proto.SerializeToString())
    return dst
