"""A/B of training-recipe changes, each alone against one base, at a fixed step count.

    python bench/ab_recipe.py --base configs/demo.yaml --steps 600 --out exp/ab \\
        --variant base= --variant lr1.5e-3="optim.lr=1.5e-3" --variant clip50="optim.clip_grad_norm=50" \\
        --parallel 2 --eval dev=data/demo/dev.jsonl --eval realdev=data/realdev/realdev.jsonl

Every variant trains from the same seed for exactly ``--steps`` optimizer steps (no time cap, so the
result does not depend on how busy the host is), ``--parallel`` runs at a time with
``cores / parallel`` threads each, then each run's final checkpoint (``last``: no averaging, no
EMA unless the variant turns it on and names it) is decoded greedily on every ``--eval`` set. Prints a
Markdown table (dev WER per variant, its difference to ``base``, steps/s) and writes ``results.json``.
A variant already finished in ``--out`` is not retrained (delete its folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def train_cmd(base: str, steps: int, exp: Path, threads: int, overrides: list[str]) -> list[str]:
    run = "import sys; from harken.cli import main; sys.exit(main())"
    return [sys.executable, "-c", run, "train", "--config", base,
            f"train.exp_dir={exp}", f"train.max_steps={steps}", "train.max_minutes=null",
            f"train.num_threads={threads}", "train.eval_every=0", "train.average_last=0",
            "train.progress=false", "train.tensorboard=false", f"train.checkpoint_every={steps}",
            *overrides]


def pick_checkpoint(exp: Path, which: str) -> Path:
    if which == "best":
        return exp / "best.pt"
    if which in ("ema", "avg"):
        p = exp / f"{which}.pt"
        if p.exists():
            return p
    steps = sorted((exp / "checkpoints").glob("step-*.pt"))
    if not steps:
        raise SystemExit(f"{exp}: no checkpoint written")
    return steps[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant", action="append", required=True,
                    help='NAME=overrides (space separated dotted overrides; NAME= alone is the base); '
                         'append @ema or @avg to NAME to score that checkpoint')
    ap.add_argument("--eval", action="append", required=True, help="NAME=manifest")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = []
    for v in args.variant:
        name, _, ov = v.partition("=")
        name, _, which = name.partition("@")
        variants.append((name, which or "last", shlex.split(ov)))
    threads = max(1, args.cores // args.parallel)
    pending = [v for v in variants if not (out / v[0] / "done.json").exists()]
    running: list[tuple] = []
    while pending or running:
        while pending and len(running) < args.parallel:
            name, which, ov = pending.pop(0)
            exp = out / name
            exp.mkdir(parents=True, exist_ok=True)
            log = open(exp / "train.log", "w")
            cmd = train_cmd(args.base, args.steps, exp, threads, ov)
            print("start", name, " ".join(ov), file=sys.stderr, flush=True)
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT),
                            time.time(), log))
        time.sleep(5)
        for item in list(running):
            name, proc, t0, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            dt = time.time() - t0
            if proc.returncode != 0:
                print(f"{name}: train failed (rc {proc.returncode}); see {out / name / 'train.log'}",
                      file=sys.stderr, flush=True)
                continue
            (out / name / "done.json").write_text(json.dumps({"seconds": dt, "steps": args.steps}))
            print(f"done {name} in {dt / 60:.1f} min", file=sys.stderr, flush=True)

    from harken.data.manifest import read_manifest
    from harken.evaluate import decode_records, error_report
    from harken.runtime import Engine

    sets = [(n, read_manifest(p)) for n, p in (e.split("=", 1) for e in args.eval)]
    results = {}
    for name, which, ov in variants:
        exp = out / name
        if not (exp / "done.json").exists():
            continue
        done = json.loads((exp / "done.json").read_text())
        eng = Engine.load(pick_checkpoint(exp, which), num_threads=args.cores)
        row = {"overrides": ov, "checkpoint": which, "train_seconds": done["seconds"],
               "steps_per_s": done["steps"] / done["seconds"]}
        for sname, recs in sets:
            hyps = decode_records(eng, recs)
            row[sname] = error_report([r.text for r in recs], hyps).wer
        results[name] = row
        print(name, {k: v for k, v in row.items() if k != "overrides"}, file=sys.stderr, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    base = results.get("base")
    names = [n for n, _ in sets]
    print("| variant | overrides | " + " | ".join(f"{n} WER" for n in names) + " | dev vs base | steps/s |")
    print("|---|---|" + "---:|" * (len(names) + 2))
    for name, row in results.items():
        first = names[0]
        delta = f"{(row[first] - base[first]) * 100:+.1f}" if base and name != "base" else ""
        print(f"| {name} | `{' '.join(row['overrides']) or '(base)'}` | "
              + " | ".join(f"{row[n]:.1%}" for n in names) + f" | {delta} | {row['steps_per_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
