"""Elastic fault recovery: kill a worker at random points, let torchrun restart, compare with an
uninterrupted run.

A reference 2-process run (torchrun, gloo) trains a tiny Conformer-CTC for ``--steps`` steps with a
checkpoint every ``--every`` steps. Each trial repeats the same run under
``torchrun --max-restarts 1`` with the trainer's testing hook: a random rank SIGKILLs itself during a
random optimizer step (HARKEN_FAULT_AT_STEP, phase "step"), or rank 0 dies inside a checkpoint save
after the temporary file is written and before the rename (phase "save", about one trial in four).
torchrun restarts both workers, they resume from the newest complete checkpoint, and the trial
passes when the final parameters and optimizer moments are bit-identical to the reference's.

    python bench/fault_recovery.py [--trials 10] [--steps 8] [--every 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

from harken.data.manifest import read_manifest, write_manifest  # noqa: E402
from harken.train import checkpoint as ckpt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.encoder.d_model=48", "model.encoder.num_layers=2", "model.encoder.num_heads=2",
        "model.encoder.ff_dim=96", "model.encoder.conv_kernel=7", "model.encoder.subsampling_channels=16",
        "data.num_workers=0", "data.max_duration=15", "train.progress=false", "train.tensorboard=false",
        "train.average_last=0", "train.num_threads=1", "data.dev=null", "optim.warmup_steps=2",
        "train.keep_last=20", "model.encoder.dropout=0.1", "data.augment.speed_factors=[0.9,1.0,1.1]",
        "data.augment.volume_prob=0.5", "data.augment.noise_prob=0", "data.cmvn_utts=50"]


def torchrun(args: list[str], env_extra: dict, restarts: int) -> tuple[int, str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--max-restarts={restarts}", "--monitor-interval=0.2", "-m", "harken.cli", "train", *args]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    return r.returncode, r.stderr, time.time() - t


def final_state(exp: Path, steps: int):
    obj = ckpt.load_checkpoint(exp / "checkpoints" / f"step-{steps:08d}.pt")
    return obj["model"], obj["optimizer"]["state"]


def same(a, b) -> bool:
    (pa, oa), (pb, ob) = a, b
    return all(torch.equal(pa[k], pb[k]) for k in pa) and all(
        torch.equal(oa[k]["exp_avg"], ob[k]["exp_avg"]) and torch.equal(oa[k]["exp_avg_sq"], ob[k]["exp_avg_sq"])
        for k in oa)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="data/corpus/train.jsonl")
    ap.add_argument("--utts", type=int, default=40)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory(prefix="harken-fault-") as tmp:
        tmp = Path(tmp)
        man = tmp / "train.jsonl"
        corpus = Path(a.corpus) if Path(a.corpus).is_absolute() else ROOT / a.corpus
        write_manifest(man, read_manifest(corpus)[: a.utts])
        (tmp / "empty.yaml").write_text("{}\n")
        base = ["--config", str(tmp / "empty.yaml"), *TINY, f"data.train=[{man}]", f"train.max_steps={a.steps}",
                f"train.checkpoint_every={a.every}"]
        rc, err, secs = torchrun(base + [f"train.exp_dir={tmp / 'ref'}"], {}, 0)
        if rc != 0:
            raise RuntimeError(err[-4000:])
        ref = final_state(tmp / "ref", a.steps)
        print(json.dumps({"reference_s": round(secs, 1)}), flush=True)
        trials = []
        save_steps = [s for s in range(a.every, a.steps, a.every)]
        for i in range(a.trials):
            if save_steps and rng.random() < 0.25:
                phase, step, rank = "save", rng.choice(save_steps), 0
            else:
                phase, step, rank = "step", rng.randint(1, a.steps), rng.randint(0, 1)
            exp = tmp / f"trial{i}"
            env = {"HARKEN_FAULT_AT_STEP": str(step), "HARKEN_FAULT_PHASE": phase, "HARKEN_FAULT_RANK": str(rank)}
            rc, err, secs = torchrun(base + [f"train.exp_dir={exp}"], env, 1)
            killed = (exp / f".harken-fault-{phase}-step{step}-rank{rank}").exists()
            ok = rc == 0 and killed and same(ref, final_state(exp, a.steps))
            resumed = [ln.split("resumed from ")[1].split()[0].rsplit("/", 1)[-1]
                       for ln in err.splitlines() if "resumed from" in ln]
            t = {"trial": i, "phase": phase, "step": step, "rank": rank, "killed": killed, "rc": rc,
                 "resumed_from": resumed[:1], "identical": ok, "seconds": round(secs, 1)}
            trials.append(t)
            print(json.dumps(t), flush=True)
            if rc != 0:
                print(err[-3000:], file=sys.stderr)
    emit("fault_recovery", {"trials": len(trials), "identical": sum(t["identical"] for t in trials),
                            "steps": a.steps, "checkpoint_every": a.every,
                            "kill_points": [(t["phase"], t["step"], t["rank"]) for t in trials]})


if __name__ == "__main__":
    main()
