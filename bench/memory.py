"""Peak training memory with and without activation checkpointing (configs/medium.yaml).

Each measurement runs in its own subprocess (peak RSS never goes down within a process): build the
medium Conformer-CTC (vocab 500), one warm-up training step on a small batch, then record RSS, then
one training step (forward, CTC, backward) on a batch of 8 x 10 s random audio, and report the peak
RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and the peak minus the RSS before the step
(activations and gradients). The two settings alternate over ``--rounds``.

    python bench/memory.py [--rounds 2] [--batch 8] [--seconds 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, median  # noqa: E402

CHILD = r"""
import json, resource, sys, time, torch
from harken.config import load_config
from harken.models.ctc import ctc_loss
from harken.train.trainer import build_model
ckpt, batch, seconds, threads = sys.argv[1] == "1", int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = load_config("configs/medium.yaml", [f"model.encoder.activation_checkpointing={str(ckpt).lower()}"])
model = build_model(cfg, 500).train()
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
def step(b, s):
    n = int(s * 16000)
    wave = 0.1 * torch.randn(b, n)
    lens = torch.full((b,), n, dtype=torch.int64)
    tl = torch.full((b,), int(s * 12), dtype=torch.int64)  # ~12 tokens per second
    tgt = torch.randint(1, 500, (b, int(tl.max())))
    lp, ol = model(wave, lens)
    loss = ctc_loss(lp, ol, tgt, tl, reduction="sum") / b
    loss.backward()
    model.zero_grad(set_to_none=True)
step(1, 1.0)  # warm-up: allocator pools, oneDNN primitives, grads allocated once
base = rss_mb()
t = time.perf_counter()
step(batch, seconds)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"ckpt": ckpt, "base_mb": base, "peak_mb": peak, "step_s": dt,
                  "params_m": sum(p.numel() for p in model.parameters()) / 1e6}))
"""


def measure(ckpt: bool, batch: int, seconds: float, threads: int) -> dict:
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", CHILD, "1" if ckpt else "0", str(batch), str(seconds), str(threads)],
                       capture_output=True, text=True, cwd=root)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    res = {False: [], True: []}
    for _ in range(a.rounds):
        for ck in (False, True):
            m = measure(ck, a.batch, a.seconds, a.threads)
            res[ck].append(m)
            print(json.dumps(m), flush=True)
    out = {}
    for ck, name in ((False, "plain"), (True, "checkpointing")):
        out[name] = {"peak_rss_mb": round(median([m["peak_mb"] for m in res[ck]])),
                     "step_increase_mb": round(median([m["peak_mb"] - m["base_mb"] for m in res[ck]])),
                     "step_s": round(median([m["step_s"] for m in res[ck]]), 2)}
    out["params_m"] = round(res[False][0]["params_m"], 2)
    out["peak_ratio"] = round(out["checkpointing"]["peak_rss_mb"] / out["plain"]["peak_rss_mb"], 3)
    out["step_increase_ratio"] = round(out["checkpointing"]["step_increase_mb"] / out["plain"]["step_increase_mb"], 3)
    out["batch"] = f"{a.batch} x {a.seconds:g} s"
    emit("memory_activation_checkpointing", out)


if __name__ == "__main__":
    main()
