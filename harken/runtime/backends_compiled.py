"""Engine backends for compiled exports: TorchScript (``.ts``) and AOTInductor packages (``.pt2``).

Both have the call signature of :class:`harken.runtime.engine.TorchBackend`::

    backend(wave (B,S) float32 tensor, lens (B,) int64) -> (log_probs (B,T',V) float32, out_lens (B,) int64)

plus ``.name`` ("torchscript" / "pt2"), ``.metadata`` (the "wave" ONNX metadata keys, string values,
read from the file: ``harken.json`` inside the TorchScript archive / the .pt2 package) and
``.min_input`` (inputs shorter than this many samples are zero-padded up to it, lengths kept, as the
ONNX backend does; a .pt2 program also has a smallest batch, ``min_batch``, filled up with copies of
the last row that are dropped from the output).  Neither needs the checkpoint:
``ModelInfo.from_metadata(backend.metadata)`` has everything to decode.

A backend instance may be called from several threads at once: a TorchScript module is
thread-safe for inference, and a .pt2 package loads one runner per ``num_runners``, guarded here by
a lock when there is only one.
"""

from __future__ import annotations

import os
import threading

import torch

__all__ = ["TorchScriptBackend", "Pt2Backend", "open_compiled"]


def _pad(wave: torch.Tensor, min_input: int) -> torch.Tensor:
    if wave.shape[1] < min_input:  # the graph's smallest input; lengths stay true
        wave = torch.nn.functional.pad(wave, (0, min_input - wave.shape[1]))
    return wave


def _first_line(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return msg[0][:200] if msg else type(e).__name__


class TorchScriptBackend:
    """A ``.ts`` file from ``harken export --format torchscript`` (``torch.jit.load``)."""

    name = "torchscript"

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        from harken.export.torchscript import METADATA_FILE, _parse_metadata, jit_load

        self.path = str(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path}: no such model file")
        if num_threads:
            torch.set_num_threads(int(num_threads))  # torch's pool is process-wide
        files = {METADATA_FILE: ""}
        self.module = jit_load(self.path, files).eval()
        self.metadata: dict[str, str] = _parse_metadata(files[METADATA_FILE], self.path)
        self.min_input = int(float(self.metadata.get("min_input") or 0))

    @torch.inference_mode()
    def __call__(self, wave: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wave = _pad(wave.to(torch.float32), self.min_input)
        lp, n = self.module(wave, lens.to(torch.int64))
        return lp.float(), n.long().reshape(-1)


class Pt2Backend:
    """A ``.pt2`` AOTInductor package from ``harken export --format pt2``
    (``torch._inductor.aoti_load_package``; compiled for the CPU it was exported on)."""

    name = "pt2"

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        from harken.export.pt2 import read_pt2_metadata

        self.path = str(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path}: no such model file")
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.metadata: dict[str, str] = read_pt2_metadata(self.path)
        try:
            self.runner = torch._inductor.aoti_load_package(self.path)
        except Exception as e:
            raise ValueError(f"{self.path}: not a loadable AOTInductor package ({_first_line(e)})") from None
        self.min_input = int(float(self.metadata.get("min_input") or 0))
        self.min_batch = int(float(self.metadata.get("min_batch") or 1))
        self._lock = threading.Lock()

    @torch.inference_mode()
    def __call__(self, wave: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wave = _pad(wave.to(torch.float32), self.min_input)
        lens = lens.to(torch.int64).reshape(-1)
        b = wave.shape[0]
        if b < self.min_batch:  # torch.export specialized batch 1: add copies of the last row
            extra = self.min_batch - b
            wave = torch.cat([wave, wave[-1:].expand(extra, -1)])
            lens = torch.cat([lens, lens[-1:].expand(extra)])
        with self._lock:
            lp, n = self.runner(wave.contiguous(), lens.contiguous())
        return lp[:b].float(), n[:b].long().reshape(-1)


def open_compiled(path: str | os.PathLike, num_threads: int | None = None):
    """The backend for ``path`` by its suffix: ``.ts`` -> TorchScript, ``.pt2`` -> AOTInductor."""
    p = str(path)
    if p.endswith(".ts"):
        return TorchScriptBackend(p, num_threads)
    if p.endswith(".pt2"):
        return Pt2Backend(p, num_threads)
    raise ValueError(f"{p}: not a compiled harken export (.ts or .pt2)")
