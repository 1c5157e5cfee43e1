"""``torch.export`` + AOTInductor export: one ``.pt2`` package of compiled CPU code.

The graph is :class:`harken.export.torchscript.WaveCtcCore` (waveform in, fbank + CMVN inside,
log-probs and lengths out; the "wave" ONNX contract) exported with ``torch.export.export`` with a
dynamic batch (1..1024) and a dynamic time axis (``min_input`` samples .. 1 hour), then compiled
ahead of time by AOTInductor (``torch._inductor.aoti_compile_and_package``: generated C++ built
with the system compiler, gcc here) into a package that loads without Python model code::

    runner = torch._inductor.aoti_load_package("model.pt2")
    log_probs, lens = runner(waveform, waveform_lens)     # float32 (B,S), int64 (B,)

``torch.export`` specializes sizes 0 and 1, so the program takes at least 2 rows and enough samples
for 2 output frames: the metadata says how many (``min_batch``, ``min_input``), and
:class:`harken.runtime.backends_compiled.Pt2Backend` pads smaller inputs (a copy of the last row,
zero samples), keeping the true lengths, and drops the padding rows again.

The model facts (the metadata dict of the ONNX export, string values, ``harken_variant=pt2``, plus
``min_batch``) travel inside the package as the extra file ``harken.json`` (the PT2 archive's ``extra/``
folder); :func:`read_pt2_metadata` reads them back without loading the compiled code.  The
package is compiled for the CPU architecture (and torch version) it was built with.

Compilation takes minutes for a real model (tens of seconds for a tiny one).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from harken.export.torchscript import (
    METADATA_FILE,
    WaveCtcCore,
    _parse_metadata,
    check_against_eager,
    example_inputs,
    min_input_samples,
    model_metadata,
)

__all__ = ["export_pt2", "export_model_pt2", "export_program", "read_pt2_metadata"]

MAX_BATCH = 1024
MAX_SECONDS = 3600


def export_program(model: nn.Module, min_input: int, sample_rate: int = 16000) -> torch.export.ExportedProgram:
    """``torch.export.export`` of :class:`WaveCtcCore` around ``model`` with dynamic batch and time."""
    from harken.export.onnx import ExportError

    core = WaveCtcCore(model.eval().cpu()).eval()
    ex = example_inputs(min_input, sample_rate, batch=2, seconds=1.3, seed=0)
    # Dim.DYNAMIC rather than named Dims: the relative-position shift's pad/reshape trick yields
    # guards (e.g. T' % (2 T'^2) != 0) that hold for every length but that the symbolic solver
    # cannot prove; with DYNAMIC they are kept as checks instead of failing the export
    batch = torch.export.Dim.DYNAMIC(min=1, max=MAX_BATCH)
    time = torch.export.Dim.DYNAMIC(min=min_input, max=sample_rate * MAX_SECONDS)
    dyn = {"waveform": {0: batch, 1: time}, "waveform_lens": {0: batch}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(core, ex, dynamic_shapes=dyn, strict=False)
        except Exception as e:
            first = str(e).strip().splitlines()
            raise ExportError(f"torch.export of the model failed ({type(e).__name__}: "
                              f"{first[0] if first else ''})") from e


def input_minimums(ep: torch.export.ExportedProgram, default: tuple[int, int]) -> tuple[int, int]:
    """(smallest batch, smallest waveform length) the exported program accepts (its range
    constraints on the waveform's two dims), or ``default`` where that cannot be read."""
    out = list(default)
    try:
        name = ep.graph_signature.user_inputs[0]
        node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == name)
        for i, size in enumerate(node.meta["val"].shape[:2]):
            if isinstance(size, torch.SymInt):
                vr = ep.range_constraints.get(size.node.expr)
                if vr is not None:
                    out[i] = max(out[i] if i else 1, int(vr.lower))
    except Exception:  # an internal layout that changed: keep the defaults
        return default
    return out[0], out[1]


def export_pt2(checkpoint: str | os.PathLike, out_path: str | os.PathLike, check: bool = True) -> Path:
    """Export ``checkpoint`` to an AOTInductor package at ``out_path`` (must end in ``.pt2``)."""
    from harken.export.onnx import load_checkpoint_model

    model, tok, cfg = load_checkpoint_model(checkpoint)
    return export_model_pt2(model, tok, cfg, out_path, check=check, checkpoint=checkpoint)


def export_model_pt2(model: nn.Module, tokenizer, cfg, out_path: str | os.PathLike, check: bool = True,
                     checkpoint: str | os.PathLike = "", inductor_configs: dict | None = None) -> Path:
    """:func:`export_pt2` for a model already in memory.  ``check``: load the package and compare it
    with eager PyTorch at a batch size and length other than the example's (1e-4)."""
    from harken.export.onnx import ExportError

    out_path = Path(out_path)
    if out_path.suffix != ".pt2":
        raise ValueError(f"{out_path}: an AOTInductor package must be named *.pt2")
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("gcc") is None:
        raise ExportError("AOTInductor needs a C++ compiler (g++/gcc) on PATH")
    model = model.eval().cpu()
    sr = int(cfg.model.fbank.sample_rate)
    # torch.export specializes sizes 0 and 1: the program needs >= 2 output frames (and >= 2 rows)
    min_in = min_input_samples(model, cfg, min_frames=2)
    ep = export_program(model, min_in, sr)
    min_batch, min_time = input_minimums(ep, default=(2, min_in))
    min_in = max(min_in, min_time)
    md = model_metadata(model, tokenizer, cfg, "pt2", min_in, checkpoint)
    md["min_batch"] = str(min_batch)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="harken-pt2-") as td:
        raw = os.path.join(td, "raw.pt2")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch._inductor.aoti_compile_and_package(ep, package_path=raw,
                                                         inductor_configs=dict(inductor_configs or {}))
            except Exception as e:
                first = str(e).strip().splitlines()
                raise ExportError(f"AOTInductor compilation failed ({type(e).__name__}: "
                                  f"{first[0] if first else ''})") from e
        tmp = os.path.join(td, "model.pt2")
        _add_extra_file(raw, tmp, METADATA_FILE, json.dumps(md, sort_keys=True))
        if check:
            runner = torch._inductor.aoti_load_package(tmp)
            check_against_eager(model, runner, min_in, sr, f"{out_path} (AOTInductor)")
            del runner
        shutil.move(tmp, out_path)
    return out_path


def _add_extra_file(src: str, dst: str, name: str, text: str) -> None:
    """Copy the PT2 archive ``src`` to ``dst`` with ``extra/<name>`` added (records copied as they
    are, through torch's own archive writer so alignment and the version record stay right)."""
    from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter
    from torch.export.pt2_archive.constants import EXTRA_DIR

    with PT2ArchiveReader(src) as r, PT2ArchiveWriter(dst) as w:
        for rec in r.get_file_names():
            if rec.startswith(".data/") or w.has_record(rec):
                continue  # the writer's own bookkeeping records
            w.write_bytes(rec, r.read_bytes(rec))
        w.write_string(f"{EXTRA_DIR}{name}", text)


def read_pt2_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``harken.json`` metadata inside a .pt2 package (string values), read with ``zipfile``
    (the compiled code is not loaded).  ValueError naming the file if it has none."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(f"/extra/{METADATA_FILE}") or n == f"extra/{METADATA_FILE}"]
            if not names:
                raise ValueError(f"{path}: no {METADATA_FILE} in this .pt2 package; re-export it with "
                                 "`harken export --format pt2`")
            raw = z.read(names[0])
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not a .pt2 package (not a zip archive)") from None
    return _parse_metadata(raw, path)
