"""Throughput of ``Engine.infer_batch`` at batch 1, 4 and 16 against one-at-a-time calls.

The same utterances (the first ``--max-utts`` of the manifest, in manifest order, as a server
would receive them) are transcribed in calls of B consecutive utterances (``infer_batch`` sorts
each call by length and pads), greedy, no word times. One-at-a-time is B = 1. Passes are
interleaved (B = 1, 4, 16, 1, 4, 16, ...) ``--repeats`` times and the median throughput of each B
is reported, with the ratio to B = 1 measured in the same run. Throughput = audio seconds /
wall seconds. Audio is decoded before timing.

    python bench/batch_infer.py [--checkpoint exp/demo/best.pt] [--manifest data/corpus/test_unseen.jsonl]
                                [--threads 2] [--max-utts 100] [--batches 1,4,16] [--backend torch|onnx]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, sgemm_gflops  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="exp/demo/best.pt")
    p.add_argument("--manifest", default="data/corpus/test_unseen.jsonl")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-utts", type=int, default=100)
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    a = p.parse_args(argv)
    for path, what in ((a.checkpoint, "checkpoint"), (a.manifest, "manifest")):
        if not Path(path).is_file():
            print(f"bench/batch_infer.py: error: {what} not found: {path}", file=sys.stderr)
            return 2

    from harken.audio import load_audio
    from harken.data.manifest import read_manifest
    from harken.runtime import Engine, ItemError

    torch.set_num_threads(a.threads)
    recs = read_manifest(a.manifest)[: a.max_utts]
    waves = [load_audio(r.audio, offset=r.offset, duration=r.duration) for r in recs]
    audio_s = sum(len(w) for w in waves) / 16000.0
    model = a.checkpoint
    tmp = None
    if a.backend == "onnx":
        from harken.export.onnx import export_onnx

        tmp = tempfile.TemporaryDirectory(prefix="harken-bench-")
        model = export_onnx(a.checkpoint, Path(tmp.name) / "model.onnx", "wave")
    eng = Engine.load(model, num_threads=a.threads)
    sizes = [int(x) for x in a.batches.split(",") if x]
    eng.infer_batch(waves[:max(sizes)])  # warm-up at the largest shape
    gemm = [sgemm_gflops(1024)]
    thr: dict[int, list[float]] = {b: [] for b in sizes}
    texts: dict[int, list[str]] = {}
    for _ in range(a.repeats):
        for b in sizes:
            t0 = time.perf_counter()
            out = []
            for i in range(0, len(waves), b):
                out.extend(eng.infer_batch(waves[i: i + b]))
            dt = time.perf_counter() - t0
            assert not any(isinstance(r, ItemError) for r in out)
            thr[b].append(audio_s / dt)
            texts[b] = [r.text for r in out]
    gemm.append(sgemm_gflops(1024))
    base = statistics.median(thr[sizes[0]])
    print(f"\n{len(waves)} utterances, {audio_s:.1f} s of audio; {a.backend} backend, {a.threads} threads; "
          f"SGEMM {gemm[0]:.0f} -> {gemm[1]:.0f} GFLOP/s\n")
    print("| batch | audio-s/s (median) | min..max | vs batch 1 | same text as batch 1 |")
    print("|---|---|---|---|---|")
    for b in sizes:
        m = statistics.median(thr[b])
        same = sum(x == y for x, y in zip(texts[b], texts[sizes[0]])) / len(waves)
        print(f"| {b} | {m:.1f} | {min(thr[b]):.1f}..{max(thr[b]):.1f} | {m / base:.2f}x | {100 * same:.0f}% |")
        emit("batch_infer", {"backend": a.backend, "threads": a.threads, "batch": b, "audio_s_per_s": round(m, 2),
                             "vs_batch1": round(m / base, 3), "utts": len(waves), "same_text": same,
                             "sgemm_gflops": [round(g, 1) for g in gemm]})
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
