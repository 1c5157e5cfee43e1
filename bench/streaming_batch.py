"""Streaming: N concurrent sessions advanced in ONE batched step vs N separate steps.

Every session of one shared :class:`harken.runtime.streaming.StreamingModel` is given the same
amount of audio up front (the incremental fbank runs then, outside the timed part); the timed part
is the chunk steps only (encoder chunk + CTC head + greedy partial), either

* ``batched``: ``model.step(all sessions)`` until every session is done (one forward per round), or
* ``separate``: ``model.step([s])`` for each session in turn, round after round,

from fresh sessions each time.  Reported per chunk of one session: CPU time
(``time.process_time``, all threads of this process) and wall time, in ms; ``speedup`` is separate
over batched.  Torch and ONNX (the streaming graph, exported here into a temporary directory).
The model is an untrained causal conformer built in the script (timing does not depend on the
weights), or ``--checkpoint``.  An SGEMM probe before and after shows how busy the host was.

    python bench/streaming_batch.py                       # 16 sessions, 8 s each, chunk 16, 1 thread
    python bench/streaming_batch.py --sessions 16 --seconds 4 --chunk 8 --backends torch
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, sgemm_gflops  # noqa: E402

SIZES = {  # encoder overrides of the built-in model
    "tiny": ["model.encoder.d_model=64", "model.encoder.num_layers=2", "model.encoder.num_heads=2",
             "model.encoder.ff_dim=128", "model.encoder.subsampling_channels=16"],
    "small": ["model.encoder.num_layers=8"],
}


def build(size: str, checkpoint: str | None):
    if checkpoint:
        from harken.export.onnx import load_checkpoint_model

        model, tok, _ = load_checkpoint_model(checkpoint)
        return model, tok
    from harken.config import load_config
    from harken.text.tokenizer import CharTokenizer
    from harken.train.trainer import build_model

    cfg = load_config(None, SIZES[size] + ["model.encoder.causal=true", "model.encoder.dynamic_chunk=true"])
    tok = CharTokenizer.build(["abcdefghijklmnopqrstuvwxyz'"])
    torch.manual_seed(0)
    return build_model(cfg, tok.vocab_size).eval(), tok


def run_mode(sm, waves, batched: bool) -> tuple[float, float, int]:
    """(cpu seconds, wall seconds, chunks) of stepping fresh sessions over ``waves`` to the end."""
    sessions = [sm.new_session() for _ in waves]
    for s, w in zip(sessions, waves):
        s.accept_waveform(w)
        s.input_finished()
    chunks = 0
    c0, t0 = time.process_time(), time.perf_counter()
    while not all(s.done for s in sessions):
        groups = [sessions] if batched else [[s] for s in sessions]
        for g in groups:
            for res in sm.step(g):
                chunks += sum(1 for r in res if not r.is_final)
    return time.process_time() - c0, time.perf_counter() - t0, chunks


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a harken checkpoint with a causal encoder (default: built here)")
    ap.add_argument("--size", choices=sorted(SIZES), default="small", help="built-in model size")
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8.0, help="audio per session")
    ap.add_argument("--chunk", type=int, default=16, help="output frames per chunk (40 ms each)")
    ap.add_argument("--left-chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch / onnxruntime intra-op threads")
    ap.add_argument("--backends", default="torch,onnx")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per mode")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from harken.runtime.streaming import StreamingModel

    model, tok = build(a.size, a.checkpoint)
    rng = np.random.default_rng(0)
    n = int(a.seconds * 16000)
    # different lengths (+-10 %), so the last chunks of the sessions do not line up
    waves = [(0.05 * rng.standard_normal(int(n * (0.9 + 0.2 * i / max(1, a.sessions - 1))))).astype(np.float32)
             for i in range(a.sessions)]
    models = {}
    for b in [x for x in a.backends.split(",") if x]:
        if b == "torch":
            models[b] = StreamingModel.from_torch(model, tok, chunk_size=a.chunk, left_chunks=a.left_chunks)
        elif b == "onnx":
            from harken.runtime.streaming_onnx import export_streaming_onnx

            tmp = tempfile.mkdtemp(prefix="harken-sbatch-")
            path = export_streaming_onnx(model, os.path.join(tmp, "stream.onnx"), chunk_size=a.chunk,
                                         left_chunks=a.left_chunks, tokenizer=tok)
            models[b] = StreamingModel.from_onnx(path, num_threads=a.threads)
        else:
            raise SystemExit(f"unknown backend {b!r} (torch, onnx)")

    gf_before = sgemm_gflops()
    result: dict = {"sessions": a.sessions, "seconds_per_session": a.seconds, "chunk": a.chunk,
                    "chunk_ms": a.chunk * 40, "left_chunks": a.left_chunks, "threads": a.threads,
                    "model": a.checkpoint or f"untrained-{a.size}-causal-conformer"}
    rows = []
    for b, sm in models.items():
        run_mode(sm, waves[:2], True)  # warm-up (allocations, kernel choice)
        per = {}
        for mode in ("batched", "separate"):
            best = None
            for _ in range(a.repeats):
                cpu, wall, chunks = run_mode(sm, waves, mode == "batched")
                if best is None or cpu < best[0]:
                    best = (cpu, wall, chunks)
            cpu, wall, chunks = best
            per[mode] = (1000 * cpu / chunks, 1000 * wall / chunks, chunks)
            result[f"{b}_{mode}_cpu_ms_per_chunk"] = round(per[mode][0], 3)
            result[f"{b}_{mode}_wall_ms_per_chunk"] = round(per[mode][1], 3)
        sp_cpu = per["separate"][0] / per["batched"][0]
        sp_wall = per["separate"][1] / per["batched"][1]
        result[f"{b}_speedup_cpu"] = round(sp_cpu, 2)
        result[f"{b}_speedup_wall"] = round(sp_wall, 2)
        for mode in ("batched", "separate"):
            cpu, wall, chunks = per[mode]
            rows.append((b, mode, chunks, cpu, wall, sp_cpu if mode == "batched" else 1.0))
    result["sgemm_gflops_before_after"] = [round(gf_before, 1), round(sgemm_gflops(), 1)]

    print(f"{a.sessions} sessions x {a.seconds:g} s, chunk {a.chunk} ({a.chunk * 40} ms), "
          f"left_chunks {a.left_chunks}, {a.threads} thread(s); per chunk of one session:")
    print(f"{'backend':8} {'mode':9} {'chunks':>7} {'cpu ms':>9} {'wall ms':>9} {'cpu speedup':>12}")
    for b, mode, chunks, cpu, wall, sp in rows:
        print(f"{b:8} {mode:9} {chunks:7d} {cpu:9.3f} {wall:9.3f} {sp:11.2f}x")
    emit("streaming_batch", result)
    return result


if __name__ == "__main__":
    main()
