"""Check exported artifacts against the PyTorch model they came from.

For every artifact: the max absolute difference of log-probs (valid frames only) and the argmax
agreement against PyTorch on a few utterances (batched, so padding is exercised), and, with a
manifest, the greedy WER of the artifact next to PyTorch's greedy WER on the same utterances.

Artifacts: wave ONNX (fp32 or int8) run in onnxruntime on waveforms; sherpa-wenet ONNX run in
onnxruntime on harken's own (dither-free) fbank features; with ``sherpa=True`` and sherpa-onnx
installed, the sherpa-wenet model is also decoded by sherpa-onnx itself (its own front end, with its
built-in dither) for a WER row. TorchScript files are run with ``torch.jit.load``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["OnnxCtc", "verify_artifacts", "format_rows"]


class OnnxCtc:
    """An exported harken ONNX model in onnxruntime: ``__call__(wave (B,S) float32, lens (B,) int64)
    -> (log_probs (B,T',V) np.float32, out_lens (B,) np.int64)`` for either variant (the fbank
    variant gets harken's dither-free fbank computed in torch). Inputs shorter than the model's
    ``min_input`` are zero-padded (their lengths stay true)."""

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None, providers=None):
        from harken.export.onnx import read_metadata
        from harken.runtime.ort import make_session

        self.path = str(path)
        self.session = make_session(self.path, num_threads=num_threads, providers=providers)
        self.meta = read_metadata(self.path)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.kind = self.meta.get("input_kind", "waveform")
        self.min_input = int(self.meta.get("min_input", 1))
        self.vocabulary = self.meta.get("vocabulary")
        self._fbank = None
        if self.kind == "fbank":
            from harken.features import Fbank, FbankConfig

            self._fbank = Fbank(FbankConfig(**self.meta["feature_config"])).eval()

    def __call__(self, wave, lens):
        wave = np.asarray(wave, dtype=np.float32)
        lens = np.asarray(lens, dtype=np.int64)
        if self._fbank is not None:
            with torch.inference_mode():
                x, xl = self._fbank(torch.from_numpy(wave), torch.from_numpy(lens))
            x, lens = x.numpy(), xl.numpy()
        else:
            x = wave
        if x.shape[1] < self.min_input:
            pad = [(0, 0), (0, self.min_input - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
            x = np.pad(x, pad)
        lp, out_lens = self.session.run(None, {self.input_names[0]: x, self.input_names[1]: lens})
        return lp, out_lens


def _probe_waves(n: int, seed: int = 0, sample_rate: int = 16000) -> list[np.ndarray]:
    """Speech-like test signals (harmonic bursts in noise) of different lengths at ``sample_rate``
    (the model's), when no manifest."""
    rng = np.random.default_rng(seed)
    sr = int(sample_rate)
    out = []
    for i in range(n):
        sec = 1.0 + 0.7 * i
        t = np.arange(int(sr * sec)) / sr
        f0 = 110 + 40 * np.sin(2 * np.pi * 0.7 * t)
        ph = 2 * np.pi * np.cumsum(f0) / sr
        x = sum(np.sin(k * ph) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
        x = 0.1 * x / np.abs(x).max() + 0.003 * rng.standard_normal(len(t))
        out.append(x.astype(np.float32))
    return out


def _batches(waves: Sequence[np.ndarray], size: int) -> list[list[int]]:
    order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
    return [order[i: i + size] for i in range(0, len(order), size)]


def _pad(waves: Sequence[np.ndarray]):
    from harken.data.dataset import pad_waves

    w, lens = pad_waves(waves)
    return w.numpy(), lens.numpy()


class _TorchRunner:
    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def __call__(self, wave, lens):
        lp, ol = self.model(torch.from_numpy(wave), torch.from_numpy(lens))
        return lp.float().numpy(), ol.numpy()


class _CompiledRunner:
    """A TorchScript (.ts) or AOTInductor (.pt2) export through the runtime's own backend."""

    def __init__(self, path, num_threads=None):
        from harken.runtime.backends_compiled import open_compiled

        self.backend = open_compiled(path, num_threads)

    def __call__(self, wave, lens):
        lp, ol = self.backend(torch.from_numpy(wave), torch.from_numpy(lens))
        return lp.float().numpy(), ol.numpy()


def _runner(path: Path, num_threads: int | None):
    if path.suffix == ".onnx":
        return OnnxCtc(path, num_threads=num_threads)
    return _CompiledRunner(path, num_threads)


def _greedy_texts(run, waves, tokenizer, batch_size: int = 8) -> list[str]:
    from harken.decode.greedy import greedy_ids

    hyps = [""] * len(waves)
    for b in _batches(waves, batch_size):
        lp, ol = run(*_pad([waves[i] for i in b]))
        for i, ids in zip(b, greedy_ids(torch.from_numpy(np.asarray(lp)), torch.from_numpy(np.asarray(ol)))):
            hyps[i] = tokenizer.decode(ids)
    return hyps


def _compare(ref_run, run, waves, batch_size: int = 2) -> dict:
    diff, agree, total = 0.0, 0, 0
    for b in _batches(waves, batch_size):
        w, lens = _pad([waves[i] for i in b])
        ra, rl = ref_run(w, lens)
        ga, gl = run(w, lens)
        if list(np.asarray(rl)) != list(np.asarray(gl)) or ra.shape != ga.shape:
            return {"max_abs_diff": float("inf"), "argmax_agreement": 0.0,
                    "error": f"shape/length mismatch {ra.shape}/{list(rl)} vs {ga.shape}/{list(gl)}"}
        for j, n in enumerate(np.asarray(rl).tolist()):
            a, g = ra[j, :n], ga[j, :n]
            if n:
                diff = max(diff, float(np.abs(a - g).max()))
                agree += int((a.argmax(-1) == g.argmax(-1)).sum())
                total += n
    return {"max_abs_diff": diff, "argmax_agreement": agree / max(total, 1), "frames": total}


def verify_artifacts(checkpoint: str | os.PathLike, artifacts: Sequence[str | os.PathLike],
                     manifest: str | os.PathLike | None = None, num_utts: int = 4, max_utts: int | None = None,
                     num_threads: int | None = None, sherpa: bool = True) -> list[dict]:
    """One dict per artifact (plus ``torch`` first and, for sherpa models, ``sherpa-onnx``):
    ``artifact, kind, max_abs_diff, argmax_agreement, wer, torch_wer, utts``."""
    from harken.evaluate import error_report
    from harken.export.onnx import load_checkpoint_model, read_metadata
    from harken.text.normalize import normalize_text

    model, tok, cfg = load_checkpoint_model(checkpoint)
    sr = int(cfg.model.fbank.sample_rate)  # the model's rate: audio is read (resampled) at it
    torch_run = _TorchRunner(model)
    records, refs, waves = [], [], []
    if manifest:
        from harken.data.dataset import AsrDataset
        from harken.data.manifest import read_manifest

        records = read_manifest(manifest)[: max_utts or None]
        ds = AsrDataset(records, sample_rate=sr)
        waves = [ds.load(i) for i in range(len(records))]
        refs = [normalize_text(r.text) for r in records]
    probe = waves[:num_utts] if waves else _probe_waves(num_utts, sample_rate=sr)
    rows: list[dict] = []
    torch_hyps = _greedy_texts(torch_run, waves, tok) if waves else []
    torch_wer = error_report(refs, torch_hyps).wer if waves else None
    rows.append({"artifact": "torch", "kind": "pytorch eager", "max_abs_diff": 0.0, "argmax_agreement": 1.0,
                 "wer": torch_wer, "torch_wer": torch_wer, "utts": len(waves)})
    for a in artifacts:
        path = Path(a)
        if not path.exists():
            raise FileNotFoundError(f"artifact not found: {path}")
        run = _runner(path, num_threads)
        if path.suffix == ".onnx":
            md = read_metadata(path)
            kind = md.get("harken_variant", "?") + (" int8" if md.get("quantization") else "")
        else:
            kind = "pt2" if path.suffix == ".pt2" else "torchscript"
        row = {"artifact": str(path), "kind": kind, **_compare(torch_run, run, probe)}
        if waves:
            hyps = _greedy_texts(run, waves, tok)
            row["wer"] = error_report(refs, hyps).wer
            row["text_agreement"] = sum(h == t for h, t in zip(hyps, torch_hyps)) / len(waves)
        row["torch_wer"], row["utts"] = torch_wer, len(waves)
        rows.append(row)
        if sherpa and waves and kind == "sherpa-wenet" and (path.parent / "tokens.txt").exists():
            rows.append(_sherpa_row(path, records, refs, torch_hyps, torch_wer, num_threads))
    return rows


def _sherpa_row(path: Path, records, refs, torch_hyps, torch_wer, num_threads) -> dict:
    from harken.evaluate import error_report

    row = {"artifact": f"{path} (sherpa-onnx)", "kind": "sherpa-onnx runtime", "max_abs_diff": None,
           "argmax_agreement": None, "torch_wer": torch_wer, "utts": len(records)}
    try:
        import sherpa_onnx  # noqa: F401
    except ImportError:
        row["error"] = "sherpa-onnx not installed (pip install sherpa-onnx==2.0.1)"
        return row
    from harken.export.sherpa import SherpaError, transcribe_files

    try:
        out = transcribe_files(path, path.parent / "tokens.txt", [r.audio for r in records],
                               num_threads=num_threads or 1)
    except SherpaError as e:
        row["error"] = str(e)
        return row
    hyps = [o["text"] for o in out]
    row["wer"] = error_report(refs, hyps).wer
    row["text_agreement"] = sum(h == t for h, t in zip(hyps, torch_hyps)) / max(len(hyps), 1)
    return row


def format_rows(rows: Sequence[dict]) -> str:
    """A markdown table of :func:`verify_artifacts` rows."""
    def f(v, pct=False):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{100 * v:.2f}%" if pct else f"{v:.3g}"
        return str(v)

    lines = ["| artifact | kind | max abs diff | argmax agree | WER | torch WER | text = torch |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['artifact']} | {r['kind']} | {f(r.get('max_abs_diff'))} | "
                     f"{f(r.get('argmax_agreement'), True)} | {f(r.get('wer'), True)} | "
                     f"{f(r.get('torch_wer'), True)} | "
                     f"{f(r.get('text_agreement'), True)} |" + (f" error: {r['error']}" if r.get("error") else ""))
    return "\n".join(lines)


if __name__ == "__main__":  # python -m harken.export.verify CKPT ARTIFACT... [--manifest M]
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--manifest", default=None)
    p.add_argument("--max-utts", type=int, default=None)
    a = p.parse_args()
    rs = verify_artifacts(a.checkpoint, a.artifacts, a.manifest, max_utts=a.max_utts)
    print(format_rows(rs))
    for r in rs:
        print("RESULT " + json.dumps(r))
