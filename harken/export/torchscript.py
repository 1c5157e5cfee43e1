"""TorchScript export: one ``.ts`` file that ``torch.jit.load`` runs without harken installed.

    waveform       float32 (batch, samples) mono in [-1, 1] at the model's sample_rate, right-padded
    waveform_lens  int64   (batch,)          valid samples per row
    ->  log_probs  float32 (batch, T', V)    log-softmax over the vocabulary
        lens       int64   (batch,)          valid output frames per row

The same contract as the "wave" ONNX (fbank and CMVN inside).  The model facts (the metadata dict
of :func:`harken.export.onnx.build_metadata`, every value a string, with ``harken_variant`` =
``torchscript``) are stored in the archive as the extra file ``harken.json``::

    files = {"harken.json": ""}
    m = torch.jit.load("model.ts", _extra_files=files)
    meta = json.loads(files["harken.json"])
    log_probs, lens = m(waveform, waveform_lens)

How it is made: ``torch.jit.trace`` of :class:`WaveCtcCore` (the eval-mode model behind a
two-tensor signature).  ``torch.jit.script`` cannot compile the model (the fbank keeps its
settings in a dataclass attribute, the relative-position attention passes an optional tensor that
TorchScript cannot type, and the training-only paths use Python RNG draws and
``torch.utils.checkpoint``), so the file is a trace.  A trace keeps shapes dynamic only where they
flow through tensor ops: every time-axis size in the model is read from ``x.shape``/``x.size()``
and used in tensor ops (``arange``, ``view``/``flatten``, slicing), never turned into a Python
number, so the trace holds for any batch and any length from ``min_input`` samples up.  The only
Python branches on shapes (the fbank's "fewer samples than one window" early returns) are decided
the same way for every input of at least ``min_input`` samples (the metadata says how many: pad
shorter inputs, keeping their true lengths).  With torch 2.13 the tracer's own check
(``check_inputs`` at other batch sizes and lengths) passes for conformer/transformer, rel/abs
positions, chunked causal models and both fbank edge modes; it re-traces per input and costs ~10x
the trace, so export compares outputs instead: it traces at one size (batch 2, 1.3 s), runs the
trace at two other batch sizes and lengths (3 x 2.1 s, 1 x 0.6 s) against eager PyTorch and, with
``check=True``, reloads the saved file and compares again at a third size (max abs log-prob
difference over valid frames within 1e-4 each time, else :class:`ExportError`).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

METADATA_FILE = "harken.json"
TOLERANCE = 1e-4

__all__ = ["WaveCtcCore", "export_torchscript", "export_model_torchscript", "trace_model",
           "read_torchscript_metadata", "model_metadata", "example_inputs", "min_input_samples", "jit_load",
           "METADATA_FILE"]


class WaveCtcCore(nn.Module):
    """The exported graph: an eval-mode CTC model behind ``(waveform, waveform_lens) -> (log_probs,
    lens)`` with float32 log-probs and int64 lengths."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, waveform: Tensor, waveform_lens: Tensor) -> tuple[Tensor, Tensor]:
        lp, lens = self.model(waveform, waveform_lens.to(torch.int64))
        return lp.float(), lens.to(torch.int64)


def min_input_samples(model: nn.Module, cfg, min_frames: int = 1) -> int:
    """Smallest waveform length (samples) the model turns into at least ``min_frames`` output
    frames (the fbank's frame rule, then the encoder's ``output_lengths``)."""
    frontend = getattr(model, "frontend", None)
    if frontend is None:  # waveform encoders: output_lengths counts samples
        def out(s: int) -> int:
            return int(model.output_lengths(torch.tensor([s]))[0])
        step = 160
    else:
        fbank = frontend.fbank

        def out(s: int) -> int:
            return int(model.output_lengths(fbank.num_frames(torch.tensor([s])))[0])
        step = max(1, fbank.hop // 2)
    s = step
    while out(s) < min_frames:
        s += step
        if s > 3600 * 16000:
            from harken.export.onnx import ExportError

            raise ExportError(f"the model gives fewer than {min_frames} output frame(s) for any input up to 1 hour")
    # the exact boundary within the last step
    while s > 1 and out(s - 1) >= min_frames:
        s -= 1
    return s


def model_metadata(model: nn.Module, tokenizer, cfg, variant: str, min_input: int,
                   checkpoint: str | os.PathLike = "") -> dict[str, str]:
    """The "wave" ONNX metadata (same keys, string values) with ``harken_variant=variant``."""
    from harken.export.onnx import build_metadata

    md = dict(build_metadata(model, tokenizer, cfg, "wave", min_input, checkpoint))
    md["harken_variant"] = variant
    md.setdefault("right_context", str(int(getattr(model, "right_context", 0))))
    return {k: str(v) for k, v in md.items()}


def example_inputs(min_input: int, sample_rate: int = 16000, batch: int = 2, seconds: float = 1.3,
                   seed: int = 0) -> tuple[Tensor, Tensor]:
    """A padded batch of noise: row 0 full length, the others shorter (but >= ``min_input``)."""
    g = torch.Generator().manual_seed(seed)
    n = max(min_input, int(seconds * sample_rate))
    x = torch.randn(batch, n, generator=g) * 0.1
    lens = torch.tensor([max(min_input, n - i * (n // (batch + 1))) for i in range(batch)], dtype=torch.int64)
    return x, lens


def trace_model(model: nn.Module, min_input: int, sample_rate: int = 16000) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of :class:`WaveCtcCore` around ``model``, checked at two other batch
    sizes and lengths.  Raises :class:`harken.export.onnx.ExportError` when tracing fails or the
    trace does not generalise."""
    from harken.export.onnx import ExportError

    core = WaveCtcCore(model).eval()
    ex = example_inputs(min_input, sample_rate, batch=2, seconds=1.3, seed=0)
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns about the fbank's shape-only branch; it is the same for every valid input
        warnings.simplefilter("ignore")
        try:
            # the tracer's own check (a re-trace per input, graph comparison) costs ~10x the trace
            # itself; the outputs at other sizes are compared below instead
            traced = torch.jit.trace(core, ex, check_trace=False, strict=True)
        except Exception as e:
            first = str(e).strip().splitlines()
            raise ExportError(f"TorchScript export failed: torch.jit.trace raised {type(e).__name__}: "
                              f"{first[0] if first else ''}. Use --format onnx.") from e
    for batch, seconds, seed in ((3, 2.1, 1), (1, 0.6, 2)):
        check_against_eager(model, traced, min_input, sample_rate, "the TorchScript trace", batch=batch,
                            seconds=seconds, seed=seed)
    return traced


def check_against_eager(model: nn.Module, run, min_input: int, sample_rate: int, what: str,
                        tolerance: float = TOLERANCE, batch: int = 3, seconds: float = 2.3, seed: int = 7) -> float:
    """Run ``run`` (an exported program) and the eager model on a batch of a size and length not
    used for export; raise ExportError unless shapes and lengths agree and log-probs (valid frames)
    are within ``tolerance``.  Returns the max abs difference."""
    from harken.export.onnx import ExportError

    x, lens = example_inputs(min_input, sample_rate, batch=batch, seconds=seconds, seed=seed)
    with torch.no_grad():
        ref, ref_lens = WaveCtcCore(model)(x, lens)
        got, got_lens = run(x, lens)
    if tuple(got.shape) != tuple(ref.shape) or got_lens.tolist() != ref_lens.tolist():
        raise ExportError(f"{what}: output {tuple(got.shape)}/{got_lens.tolist()} differs from PyTorch's "
                          f"{tuple(ref.shape)}/{ref_lens.tolist()} at another input size")
    diff = 0.0
    for i, n in enumerate(ref_lens.tolist()):
        if n:
            diff = max(diff, float((got[i, :n] - ref[i, :n]).abs().max()))
    if not diff <= tolerance:
        raise ExportError(f"{what}: differs from PyTorch by {diff:.3g} (max abs log-prob; tolerance {tolerance:g})")
    return diff


def export_torchscript(checkpoint: str | os.PathLike, out_path: str | os.PathLike, check: bool = True) -> Path:
    """Trace the waveform-in model of ``checkpoint`` into one TorchScript file at ``out_path``
    (metadata inside as ``harken.json``); returns the path.  Nothing is written when tracing or the
    check fails (:class:`harken.export.onnx.ExportError`)."""
    from harken.export.onnx import load_checkpoint_model

    model, tok, cfg = load_checkpoint_model(checkpoint)
    return export_model_torchscript(model, tok, cfg, out_path, check=check, checkpoint=checkpoint)


def export_model_torchscript(model: nn.Module, tokenizer, cfg, out_path: str | os.PathLike, check: bool = True,
                             checkpoint: str | os.PathLike = "") -> Path:
    """:func:`export_torchscript` for a model already in memory."""
    model = model.eval().cpu()
    sr = int(cfg.model.fbank.sample_rate)
    min_in = min_input_samples(model, cfg)
    md = model_metadata(model, tokenizer, cfg, "torchscript", min_in, checkpoint)
    traced = trace_model(model, min_in, sr)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated; it still works
        torch.jit.save(traced, str(tmp), _extra_files={METADATA_FILE: json.dumps(md, sort_keys=True)})
    try:
        if check:
            loaded = jit_load(tmp)
            check_against_eager(model, loaded, min_in, sr, f"{out_path} (TorchScript)")
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path


def read_torchscript_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``harken.json`` metadata of a TorchScript file written by :func:`export_torchscript`
    (string values, like ONNX ``metadata_props``).  ValueError naming the file if it has none."""
    files = {METADATA_FILE: ""}
    jit_load(path, files)
    return _parse_metadata(files[METADATA_FILE], path)


def jit_load(path: str | os.PathLike, extra_files: dict | None = None) -> torch.jit.ScriptModule:
    """``torch.jit.load`` on the CPU (without its deprecation warning); ValueError naming the file
    when it is not a loadable TorchScript archive."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            if extra_files is None:
                return torch.jit.load(str(path), map_location="cpu")
            return torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files)
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise ValueError(f"{path}: not a loadable TorchScript file ({msg[0][:200] if msg else type(e).__name__})") \
            from None


def _parse_metadata(raw: str | bytes, path) -> dict[str, str]:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    if not raw:
        raise ValueError(f"{path}: no {METADATA_FILE} inside; re-export it with `harken export`")
    try:
        md = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"{path}: {METADATA_FILE} is not valid JSON") from None
    if not isinstance(md, dict):
        raise ValueError(f"{path}: {METADATA_FILE} is not a JSON object")
    return {str(k): str(v) for k, v in md.items()}
