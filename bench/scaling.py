"""Data-parallel scaling on this machine: 1 process x 1 thread vs 2 processes x 1 thread (torchrun, gloo).

Both runs use the same config (a small Conformer-CTC on the built-in corpus, the same per-rank
``data.max_duration``), so 2 processes train twice the audio per step. Throughput is the trainer's own
figure: audio-seconds trained per second of step wall time (startup, checkpoints and evaluation
excluded). Runs are interleaved (1, 2, 1, 2, ...) so that the shared host's speed swings hit both;
the ratio of medians is the speed-up (ideal 2.0).

    python bench/scaling.py [--corpus data/corpus/train.jsonl] [--steps 12] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, median  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["model.encoder.d_model=96", "model.encoder.num_layers=4", "model.encoder.num_heads=4",
         "model.encoder.ff_dim=384", "model.encoder.conv_kernel=15", "model.encoder.subsampling_channels=32"]


def ensure_corpus(path: str) -> str:
    if Path(path).exists():
        return path
    from harken.data.corpus.synth import CorpusConfig, synthesize_corpus

    out = Path(tempfile.mkdtemp(prefix="harken-scaling-corpus-"))
    synthesize_corpus(CorpusConfig(seed=3, train_utts=200, dev_utts=4, test_seen_utts=4, test_unseen_utts=4,
                                   piper_fraction=0.0, voices=["espeak"]), str(out), jobs=2, progress=False)
    return str(out / "train.jsonl")


def run_once(nproc: int, corpus: str, steps: int, max_duration: float, work: Path) -> dict:
    exp = work / f"exp-{nproc}-{len(list(work.glob('exp-*')))}"
    empty = work / "empty.yaml"
    empty.write_text("{}\n")
    args = ["train", "--config", str(empty), *MODEL, f"data.train=[{corpus}]", "data.dev=null", f"train.exp_dir={exp}",
            f"train.max_steps={steps}", f"train.checkpoint_every={steps}", "train.num_threads=1",
            "data.num_workers=0", f"data.max_duration={max_duration}", "data.cmvn_utts=50",
            "train.progress=false", "train.tensorboard=false", "train.average_last=0", "train.log_every=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "harken.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "harken.cli", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-4000:])
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    return {"nproc": nproc, "audio_s_per_s": summary["audio_seconds_per_second"], "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="data/corpus/train.jsonl")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-duration", type=float, default=40.0)
    a = ap.parse_args()
    corpus = ensure_corpus(str(ROOT / a.corpus) if not Path(a.corpus).is_absolute() else a.corpus)
    res: dict[int, list[float]] = {1: [], 2: []}
    loads = []
    with tempfile.TemporaryDirectory(prefix="harken-scaling-") as tmp:
        work = Path(tmp)
        for _ in range(a.rounds):
            for n in (1, 2):
                m = run_once(n, corpus, a.steps, a.max_duration, work)
                res[n].append(m["audio_s_per_s"])
                loads.append(m["load"])
                print(json.dumps(m), flush=True)
    one, two = median(res[1]), median(res[2])
    emit("scaling_1x1_vs_2x1", {"one_process_audio_s_per_s": one, "two_processes_audio_s_per_s": two,
                                "speedup": round(two / one, 3), "efficiency": round(two / one / 2, 3),
                                "runs": {str(k): v for k, v in res.items()}, "steps": a.steps,
                                "max_duration_per_rank": a.max_duration, "load_avg_1min": loads})


if __name__ == "__main__":
    main()
