"""Scale-out training on CPU with gloo, through torchrun (the product path).

One uninterrupted 2-process run (module fixture) is the reference for three questions:
- does 1 process accumulating the same global batches (optim.accum_steps=2) reach the same
  parameters? (loss normalisation over the global batch, per-batch RNG: dropout, SpecAugment and
  speed/volume augmentation stay ON, so the test compares truly equal work);
- does a run whose rank 1 is SIGKILLed mid-step, restarted by `torchrun --max-restarts 1`, end
  bit-identical? (per-rank RNG, sampler position, optimizer restored exactly);
- does a 2-process checkpoint continue in 1 process (world size 2 -> 1)?
The 1 -> 2 direction and a kill inside the checkpoint save run one more torchrun each. The whole
file takes about 65 s on 2 busy CPU cores (4 torchrun launches; each costs ~5 s of start-up).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from harken.config import load_config
from harken.data.manifest import read_manifest, write_manifest
from harken.train import checkpoint as ckpt
from harken.train.trainer import train

TINY = [
    "model.encoder.d_model=48", "model.encoder.num_layers=2", "model.encoder.num_heads=2",
    "model.encoder.ff_dim=96", "model.encoder.conv_kernel=7", "model.encoder.subsampling_channels=16",
    "data.num_workers=0", "data.max_duration=15", "train.progress=false", "train.tensorboard=false",
    "train.log_every=1", "train.average_last=0", "train.num_threads=1", "data.dev=null",
    "optim.warmup_steps=2", "train.keep_last=10", "train.checkpoint_every=2",
    # randomness stays on: per-batch seeding must make it identical across world sizes
    "model.encoder.dropout=0.1", "data.augment.speed_factors=[0.9,1.0,1.1]", "data.augment.volume_prob=0.5",
    "data.augment.noise_prob=0",
]
STEPS = 5
# 1 process vs 2: the same arithmetic up to summation order (DDP averages two gradients, one
# process accumulates them), i.e. float32 rounding amplified by 5 AdamW steps (lr 1e-3)
TOL = 2e-5


def overrides(man: Path, exp: Path, *extra: str) -> list[str]:
    return TINY + [f"data.train=[{man}]", f"train.exp_dir={exp}", f"train.max_steps={STEPS}", *extra]


def torchrun(args: list[str], env_extra: dict | None = None, nproc: int = 2, restarts: int = 0,
             timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cfg = Path(args[args.index(next(a for a in args if a.startswith("train.exp_dir=")))].split("=", 1)[1])
    cfg = cfg.parent / f"{cfg.name}.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("{}\n")  # defaults; everything else comes as overrides
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}", "--monitor-interval=0.2", "-m", "harken.cli", "train",
           "--config", str(cfg), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def params(path: Path) -> dict:
    return ckpt.load_checkpoint(path)["model"]


def step_ckpt(exp: Path, step: int) -> Path:
    return exp / "checkpoints" / f"step-{step:08d}.pt"


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def ref(tiny_corpus, tmp_path_factory):
    """The uninterrupted 2-process run: (manifest, exp_dir, torchrun output)."""
    corpus, _ = tiny_corpus
    tmp = tmp_path_factory.mktemp("dist")
    man = tmp / "train.jsonl"
    write_manifest(man, read_manifest(corpus / "train.jsonl"))
    exp = tmp / "ref2"
    r = torchrun(overrides(man, exp))
    return man, exp, r


def test_two_processes_match_one_process_accumulating_the_same_batches(ref, tmp_path):
    man, exp2, r = ref
    assert "world 2 (gloo)" in r.stderr
    ck = ckpt.load_checkpoint(step_ckpt(exp2, STEPS))
    assert ck["world_size"] == 2 and len(ck["rng_per_rank"]) == 2
    assert ck["state"]["epoch"] >= 1  # the run crosses an epoch boundary
    one = train(load_config(None, overrides(man, tmp_path / "one", "optim.accum_steps=2")))
    assert one.state.step == STEPS
    p1, p2 = params(step_ckpt(tmp_path / "one", STEPS)), params(step_ckpt(exp2, STEPS))
    d = max_diff(p1, p2)
    assert d < TOL, d
    # the comparison has teeth: different work (no accumulation) lands far away
    other = train(load_config(None, overrides(man, tmp_path / "other", "train.max_steps=2")))
    assert other.state.step == 2
    assert max_diff(params(step_ckpt(tmp_path / "other", 2)), params(step_ckpt(exp2, 2))) > 100 * TOL


def test_sigkill_of_a_worker_restarts_and_resumes_bit_exactly(ref, tmp_path):
    man, exp2, _ = ref
    exp = tmp_path / "fault"
    r = torchrun(overrides(man, exp), {"HARKEN_FAULT_AT_STEP": "3"}, restarts=1)
    assert (exp / ".harken-fault-step-step3-rank1").exists()  # the kill really happened
    assert "resumed from" in r.stderr and "step-00000002.pt" in r.stderr
    pa, pb = params(step_ckpt(exp2, STEPS)), params(step_ckpt(exp, STEPS))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    oa = ckpt.load_checkpoint(step_ckpt(exp2, STEPS))["optimizer"]["state"]
    ob = ckpt.load_checkpoint(step_ckpt(exp, STEPS))["optimizer"]["state"]
    assert all(torch.equal(oa[k]["exp_avg_sq"], ob[k]["exp_avg_sq"]) for k in oa)


def _seed_exp_from(src_exp: Path, step: int, dst: Path) -> None:
    """A new exp_dir holding src's checkpoint at ``step`` (plus tokenizer and CMVN)."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copy(step_ckpt(src_exp, step), step_ckpt(dst, step))
    shutil.copytree(src_exp / "tokenizer", dst / "tokenizer")
    shutil.copy(src_exp / "cmvn.json", dst / "cmvn.json")


def test_two_process_checkpoint_continues_in_one_process(ref, tmp_path, caplog):
    man, exp2, _ = ref
    exp = tmp_path / "2to1"
    _seed_exp_from(exp2, 2, exp)
    with caplog.at_level("WARNING", logger="harken"):
        run = train(load_config(None, overrides(man, exp, "optim.accum_steps=2")))
    assert "world_size=2 checkpoint with world_size=1" in caplog.text
    assert run.state.step == STEPS
    d = max_diff(params(step_ckpt(exp, STEPS)), params(step_ckpt(exp2, STEPS)))
    assert d < TOL, d


def test_one_process_checkpoint_continues_in_two_processes(ref, tmp_path):
    man, exp2, _ = ref
    one = tmp_path / "one"
    train(load_config(None, overrides(man, one, "optim.accum_steps=2", "train.max_steps=2")))
    exp = tmp_path / "1to2"
    _seed_exp_from(one, 2, exp)
    r = torchrun(overrides(man, exp))
    assert "world_size=1 checkpoint with world_size=2" in r.stderr
    d = max_diff(params(step_ckpt(exp, STEPS)), params(step_ckpt(exp2, STEPS)))
    assert d < TOL, d


def test_kill_inside_checkpoint_save_resumes_from_the_previous_one(ref, tmp_path):
    man, exp2, _ = ref
    exp = tmp_path / "savefault"
    r = torchrun(overrides(man, exp), {"HARKEN_FAULT_AT_STEP": "4", "HARKEN_FAULT_PHASE": "save"}, restarts=1)
    assert "step-00000002.pt" in r.stderr and "removed 1 temporary file" in r.stderr
    pa, pb = params(step_ckpt(exp2, STEPS)), params(step_ckpt(exp, STEPS))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


# ------------------------------------------------------------------------------ process-level faults
SAVER = textwrap.dedent("""
    import sys, torch
    from harken.train.checkpoint import atomic_save
    big = {"model": {"w%d" % i: torch.full((4_000_000,), float(i)) for i in range(24)}}  # ~384 MB
    atomic_save(big, sys.argv[1])
""")


def test_checkpoint_killed_mid_save_is_never_picked_up(tmp_path):
    d = tmp_path / "checkpoints"
    ckpt.atomic_save({"model": {"w": torch.ones(3)}, "v": "old"}, d / "step-00000010.pt")
    ckpt.atomic_save({"model": {"w": torch.ones(3)}, "v": "old20"}, d / "step-00000020.pt")
    # a real process overwriting step 20 with a big object, killed while it writes
    p = subprocess.Popen([sys.executable, "-c", SAVER, str(d / "step-00000020.pt")])
    tmp = None
    t0 = time.time()
    while time.time() - t0 < 60 and p.poll() is None:
        tmps = [q for q in d.iterdir() if q.name.startswith(".step-00000020.pt.tmp")]
        if tmps and tmps[0].stat().st_size > 1_000_000:
            tmp = tmps[0]
            break
        time.sleep(0.001)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert tmp is not None and tmp.exists(), "the save finished before the kill; nothing was tested"
    # the real name still holds the complete old checkpoint, and it is the one picked
    latest = ckpt.latest_checkpoint(d)
    assert latest.name == "step-00000020.pt" and ckpt.load_checkpoint(latest)["v"] == "old20"
    assert ckpt.remove_stale_temps(d) == [tmp] and not tmp.exists()
    # a first save killed mid-write leaves no new name at all
    p = subprocess.Popen([sys.executable, "-c", SAVER, str(d / "step-00000030.pt")])
    t0 = time.time()
    while time.time() - t0 < 60 and p.poll() is None:
        if any(q.name.startswith(".step-00000030") and q.stat().st_size > 1_000_000 for q in d.iterdir()):
            break
        time.sleep(0.001)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (d / "step-00000030.pt").exists()
    assert ckpt.latest_checkpoint(d).name == "step-00000020.pt"


PEER = textwrap.dedent("""
    import os, sys, torch
    from harken.train.distributed import PeerLostError, all_reduce_sum, init_distributed
    info = init_distributed(torch.device("cpu"), timeout_s=20)
    if info.rank == 1:
        os._exit(0)  # a peer that vanishes without a word
    try:
        all_reduce_sum(torch.ones(1), info, "step 7: agree on the global batch")
    except PeerLostError as e:
        print("PEERLOST", e)
        sys.exit(3)
    print("NO ERROR")
""")


def test_a_vanished_peer_gives_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", PEER], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out0, err0 = procs[0].communicate(timeout=60)
    procs[1].communicate(timeout=60)
    assert procs[0].returncode == 3, out0 + err0
    assert "rank 0/2" in out0 and "step 7: agree on the global batch" in out0
    assert "train.dist_timeout_s" in out0 and "--max-restarts" in out0
