"""Export a harken checkpoint for deployment: ONNX (waveform in, or sherpa-onnx's WeNet-CTC contract),
dynamic int8 quantization, TorchScript (traced), AOTInductor (pt2), and a verifier that compares
every artifact with PyTorch.

    from harken.export import export_onnx, quantize_int8, export_torchscript, verify_artifacts
"""

from __future__ import annotations

__all__ = ["ExportError", "export_onnx", "quantize_int8", "export_torchscript", "export_pt2", "verify_artifacts",
           "read_metadata"]


def __getattr__(name):  # lazy: importing harken.export must not import torch/onnx
    if name == "export_torchscript":
        from harken.export.torchscript import export_torchscript

        return export_torchscript
    if name == "export_pt2":
        from harken.export.pt2 import export_pt2

        return export_pt2
    if name in ("ExportError", "export_onnx", "read_metadata"):
        from harken.export import onnx as _m

        return getattr(_m, name)
    if name == "quantize_int8":
        from harken.export.quantize import quantize_int8

        return quantize_int8
    if name == "verify_artifacts":
        from harken.export.verify import verify_artifacts

        return verify_artifacts
    raise AttributeError(f"module 'harken.export' has no attribute {name!r}")
