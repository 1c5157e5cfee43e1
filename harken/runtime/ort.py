"""The one place onnxruntime sessions are made (engine, streaming, export verification).

Threading follows onnxruntime's documented model: ``intra_op_num_threads`` per session (0: ORT's
default, one per physical core), one inter-op thread (our graphs are sequential), and spinning
off (``session.intra_op.allow_spinning=0``): on shared or over-subscribed CPUs (containers, a
server running several sessions, the trainer beside it) spinning worker threads burn cores that
other work needs, for a latency gain of microseconds.
"""

from __future__ import annotations

import os
from typing import Sequence

__all__ = ["make_session", "default_providers"]


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it (onnxruntime-gpu), then the CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have] or have


def make_session(path: str | os.PathLike, num_threads: int | None = None, providers: Sequence[str] | None = None,
                 spinning: bool = False, optimize: bool = True):
    """An ``onnxruntime.InferenceSession`` for ``path`` with harken's thread settings."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if num_threads:
        so.intra_op_num_threads = int(num_threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    provs = list(providers) if providers else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), so, providers=provs)
