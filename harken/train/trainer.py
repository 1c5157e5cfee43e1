"""The training loop, as a few explicit functions read top to bottom.

``train(cfg)`` builds everything, resumes from the newest checkpoint in ``exp_dir`` if there is one,
and runs ``train_one_epoch`` until ``max_steps``/``max_epochs``/``max_minutes``. A checkpoint holds
everything that shapes the run (model, optimizer, scheduler, scaler, sampler position, RNG states,
counters, config, tokenizer), so a resumed run continues the same loss curve.

Distributed (``torchrun``; see docs/distributed.md). Each optimizer step consumes, on every rank,
``optim.accum_steps`` micro-batches; the *global batch* of a step is those micro-batches on all
ranks (rank r trains the sampler's global batches r, r+W, r+2W, ...). Two rules make a run with W
processes compute the same update as one process that accumulates the same batches:

- loss normalisation: before the micro-batches run, the ranks agree (one small all_reduce) on the
  number of utterances N in the global batch; each micro-batch contributes ``sum(losses) * W / N``.
  DDP averages gradients over the W ranks, so the update is the gradient of the mean per-utterance
  loss over the whole global batch, whatever the batch sizes on each rank;
- randomness: dropout and SpecAugment draw from torch's RNG, which is reseeded for every
  micro-batch from (seed, epoch, global batch index), so a batch gets the same masks on whichever
  rank (or world size) trains it. Per-rank RNG states are still saved and restored for anything
  else that draws from the global generators.

Only rank 0 logs (other ranks log warnings), evaluates and writes checkpoints; every rank resumes
from the checkpoint rank 0 chose. A collective that fails because a peer is gone raises
``PeerLostError`` with what to do.

Testing hook: ``HARKEN_FAULT_AT_STEP=N`` makes rank ``HARKEN_FAULT_RANK`` (default: the last rank)
SIGKILL itself during optimizer step N (after its first forward), once per exp_dir (a marker file
``.harken-fault-*`` records that it happened, so the restarted job runs through).
``HARKEN_FAULT_PHASE=save`` instead kills rank 0 inside the checkpoint save at step N, after the
temporary file is written and before the rename.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from harken.config import ConfigError, ExperimentConfig, from_dict, save_config, to_dict
from harken.data.augment import WaveAugmenter
from harken.data.dataset import AsrDataset, make_loader
from harken.data.manifest import Record, read_manifest
from harken.data.sampler import BucketSampler, group_weights
from harken.evaluate import decode_records, error_report
from harken.features import GlobalCMVN
from harken.models.build import build_model, find_unused_parameters, param_groups, takes_waveform
from harken.models.ctc import CtcModel, ctc_loss
from harken.text.normalize import normalize_text
from harken.text.tokenizer import build_tokenizer, load_tokenizer, tokenizer_from_dict
from harken.train import checkpoint as ckpt
from harken.train.distributed import (
    DistInfo,
    PeerLostError,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup,
    collective,
    env_world,
    gather_objects,
    init_distributed,
)
from harken.train.schedule import lr_factor

log = logging.getLogger("harken")
CHECKPOINT_VERSION = 1


# ------------------------------------------------------------------------------------ building
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    """fp32 on CPU (bf16 autocast is 6-140x slower on CPUs without bf16 units); on CUDA bf16 where
    the GPU supports it, else fp16 with a GradScaler."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if name not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"train.precision must be auto, fp32, bf16 or fp16, not '{name}'")
    if name == "fp16" and device.type != "cuda":
        raise ValueError("fp16 training needs CUDA (use bf16 or fp32 on CPU)")
    return name


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# build_model (re-exported here for old callers) lives in harken.models.build: every encoder type is
# built through the registry, and the encoder class says how it is fed and how it is optimised


def estimate_cmvn(records: list[Record], cfg: ExperimentConfig, seed: int) -> GlobalCMVN:
    """Global mean/std of fbank features over a random subset of training utterances."""
    from harken.data.dataset import estimate_cmvn as _estimate

    return _estimate(records, cfg.model.fbank, cfg.data.cmvn_utts, seed)


def load_train_records(cfg: ExperimentConfig) -> list[Record]:
    recs: list[Record] = []
    for m in cfg.data.train:
        recs.extend(read_manifest(m))
    if not recs:
        raise ValueError(f"no training utterances in {cfg.data.train}")
    return recs


# ------------------------------------------------------------------------------------ state
@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` this rank has consumed
    nonfinite_skipped: int = 0
    best_wer: float = math.inf
    best_step: int = -1
    audio_seconds: float = 0.0  # trained audio, all ranks
    train_seconds: float = 0.0  # wall time spent in training steps


@dataclass
class Run:
    """Everything a training run holds; passed to the loop functions explicitly."""

    cfg: ExperimentConfig
    model: torch.nn.Module  # possibly DDP-wrapped
    core: CtcModel  # the bare model
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    sampler: BucketSampler
    dataset: AsrDataset
    device: torch.device
    precision: str
    dist: DistInfo
    exp_dir: Path
    state: TrainState = field(default_factory=TrainState)
    writer: object = None
    dev_records: list = field(default_factory=list)
    start_wall: float = field(default_factory=time.time)
    time_up: bool = False  # max_minutes reached on some rank (agreed on by all ranks)
    last_saved_step: int = -1
    step_clock: float = field(default_factory=time.time)  # start of the current step's wall time


def rng_state() -> dict:
    """Every RNG state, as tensors and plain data only, so that checkpoints load with
    ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"python": random.getstate(),
         "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                   float(cached)],
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    ns = s["numpy"]
    if isinstance(ns, (list, tuple)) and hasattr(ns[1], "numpy"):
        ns = (ns[0], ns[1].numpy().astype(np.uint32), ns[2], ns[3], ns[4])
    np.random.set_state(ns)
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def seed_for_batch(seed: int, epoch: int, global_index: int) -> None:
    """Reseed torch's RNG (dropout, SpecAugment) for one micro-batch from its global identity."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, global_index]).generate_state(1, np.uint64)[0]))


# ------------------------------------------------------------------------------------ steps
def compute_loss(run: Run, batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-utterance losses (B,) and the number of valid output frames."""
    with autocast_context(run.precision, run.device):
        if batch.feats is not None:  # from the feature cache
            log_probs, out_lens = run.model(batch.feats, batch.feat_lens, precomputed_features=True)
        else:
            log_probs, out_lens = run.model(batch.wave, batch.wave_lens)
    per_utt = ctc_loss(log_probs.float(), out_lens, batch.targets, batch.target_lens,
                       label_smoothing=run.cfg.model.label_smoothing, reduction="none")
    return per_utt, out_lens, int(out_lens.sum())


def optimizer_step(run: Run) -> float:
    """Unscale, clip, step; returns the gradient norm (inf/nan when the step was skipped)."""
    if run.scaler.is_enabled():
        run.scaler.unscale_(run.optimizer)
    clip = run.cfg.optim.clip_grad_norm
    norm = torch.nn.utils.clip_grad_norm_(run.core.parameters(), clip if clip > 0 else float("inf"))
    if run.scaler.is_enabled():
        run.scaler.step(run.optimizer)  # skips the update itself when grads are not finite
        run.scaler.update()
    elif torch.isfinite(norm):
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return float(norm)


def maybe_inject_fault(run: Run, phase: str) -> bool:
    """Testing hook (see the module docstring): True when this process should die now (phase
    'save' kills inside the save), else False; for phase 'step' it kills right away."""
    at = os.environ.get("HARKEN_FAULT_AT_STEP")
    if not at or os.environ.get("HARKEN_FAULT_PHASE", "step") != phase or run.state.step + (phase == "step") != int(at):
        return False
    victim = 0 if phase == "save" else int(os.environ.get("HARKEN_FAULT_RANK", run.dist.world_size - 1))
    if run.dist.rank != victim:
        return False
    marker = run.exp_dir / f".harken-fault-{phase}-step{at}-rank{victim}"
    if marker.exists():
        return False
    with open(marker, "w") as f:
        f.write(f"{time.time()}\n")
        f.flush()
        os.fsync(f.fileno())
    log.warning("HARKEN_FAULT_AT_STEP=%s: rank %d kills itself (%s phase)", at, run.dist.rank, phase)
    if phase == "step":
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def train_step(run: Run, window: list) -> tuple[float, float, float, int]:
    """One optimizer step over this rank's ``accum_steps`` micro-batches ``window``.

    Returns (gradient norm, audio seconds of the global batch, summed loss of this rank's finite
    utterances, number of those utterances)."""
    cfg, st, info = run.cfg, run.state, run.dist
    w = info.world_size
    # agree on the global batch: utterance count (for the loss), audio seconds (for logs), and
    # whether any rank ran out of wall time (so all ranks stop at the same step)
    local = torch.tensor([sum(len(b.ids) for b in window), sum(b.seconds for b in window),
                          float(time_is_up(run))], dtype=torch.float64)
    n_utts, seconds, time_up = all_reduce_sum(local, info, f"step {st.step + 1}: agree on the global batch").tolist()
    scale = w / max(1.0, n_utts)  # DDP divides the summed gradients by w
    loss_sum, n_ok_sum = 0.0, 0
    with collective(info, f"step {st.step + 1}: forward/backward with the DDP gradient all-reduce"):
        for i, batch in enumerate(window):
            batch = batch.to(run.device)
            seed_for_batch(cfg.train.seed, st.epoch, st.batch_in_epoch * w + info.rank)
            last = i == len(window) - 1
            sync = contextlib.nullcontext() if (last or not info.enabled) else run.model.no_sync()
            with sync:
                per_utt, out_lens, _ = compute_loss(run, batch)
                if i == 0:
                    maybe_inject_fault(run, "step")
                # a non-finite loss, or too few output frames for the labels (CTC would be infinite;
                # zero_infinity hides it), is skipped and counted, never fatal
                finite = torch.isfinite(per_utt) & (out_lens >= batch.target_lens)
                n_ok = int(finite.sum())
                if n_ok < len(per_utt):
                    st.nonfinite_skipped += len(per_utt) - n_ok
                    log.warning("step %d: %d utterance losses skipped as non-finite or infeasible (%s)", st.step,
                                len(per_utt) - n_ok, [u for u, f in zip(batch.ids, finite.tolist()) if not f])
                total = torch.where(finite, per_utt, torch.zeros_like(per_utt)).sum()
                run.scaler.scale(total * scale).backward()
            loss_sum += float(total.detach())
            n_ok_sum += n_ok
            st.batch_in_epoch += 1
    norm = optimizer_step(run)
    if not math.isfinite(norm):
        st.nonfinite_skipped += 1
        log.warning("step %d: non-finite gradient norm, update skipped", st.step)
    st.step += 1
    st.audio_seconds += seconds
    if time_up:
        run.time_up = True
    return norm, seconds, loss_sum, n_ok_sum


def log_step(run: Run, norm: float, seconds: float, loss_sum: float, n_ok: int, elapsed: float, progress) -> None:
    """Progress bar / log line / TensorBoard on rank 0, with the loss averaged over all ranks."""
    cfg, st = run.cfg, run.state
    if st.step % cfg.train.log_every and progress is None:
        return
    if st.step % cfg.train.log_every == 0:  # every rank reaches this step: a safe place for a collective
        t = all_reduce_sum(torch.tensor([loss_sum, n_ok], dtype=torch.float64), run.dist,
                           f"step {st.step}: average the loss for logging")
        loss_sum, n_ok = t.tolist()
    if not run.dist.is_main:
        return
    loss = loss_sum / max(1, n_ok)
    lr = run.scheduler.get_last_lr()[0]
    if progress is not None:
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.2f}", lr=f"{lr:.2e}", ep=st.epoch)
    if st.step % cfg.train.log_every:
        return
    if progress is None:
        log.info("step %d epoch %d loss/utt %.3f lr %.2e grad-norm %.2f %.1f audio-s/s", st.step, st.epoch,
                 loss, lr, norm, seconds / max(1e-9, elapsed))
    if run.writer is not None:
        run.writer.add_scalar("train/loss_per_utt", loss, st.step)
        run.writer.add_scalar("train/lr", lr, st.step)
        run.writer.add_scalar("train/grad_norm", norm, st.step)
        run.writer.add_scalar("train/audio_seconds_per_second", seconds / max(1e-9, elapsed), st.step)
        run.writer.add_scalar("train/nonfinite_skipped", st.nonfinite_skipped, st.step)


def train_one_epoch(run: Run, progress=None) -> bool:
    """Train until the epoch's batches run out or a stop condition holds; True when training is done.

    Every rank gets the same number of batches (the sampler truncates), so all ranks run the same
    number of steps. A tail of fewer than ``accum_steps`` batches at the end of the epoch is not
    trained on (it would leak half-accumulated gradients into the next epoch's first step)."""
    cfg, st = run.cfg, run.state
    accum = max(1, cfg.optim.accum_steps)
    run.sampler.set_epoch(st.epoch)
    steps_left = (len(run.sampler) - st.batch_in_epoch) // accum
    run.model.train()
    window: list = []
    run.step_clock = time.time()
    if steps_left > 0:
        for batch in make_loader(run.dataset, run.sampler, cfg.data.num_workers):
            window.append(batch)
            if len(window) < accum:
                continue
            norm, seconds, loss_sum, n_ok = train_step(run, window)
            window = []
            steps_left -= 1
            now = time.time()
            st.train_seconds += now - run.step_clock
            log_step(run, norm, seconds, loss_sum, n_ok, now - run.step_clock, progress)
            done = stop_reason(run) is not None
            if cfg.train.eval_every and st.step % cfg.train.eval_every == 0 and not done:
                validate_and_track(run)
            if st.step % cfg.train.checkpoint_every == 0 or done:
                save_checkpoint(run)
            run.step_clock = time.time()
            if done:
                return True
            if steps_left == 0:
                break
    # the epoch is over
    st.epoch += 1
    st.batch_in_epoch = 0
    return stop_reason(run) is not None


def time_is_up(run: Run) -> bool:
    tc = run.cfg.train
    return tc.max_minutes is not None and (time.time() - run.start_wall) / 60 >= tc.max_minutes


def stop_reason(run: Run) -> str | None:
    """Why training stops now, or None. Depends only on state all ranks agree on."""
    st, tc = run.state, run.cfg.train
    if st.step >= tc.max_steps:
        return f"reached max_steps={tc.max_steps}"
    if st.epoch >= tc.max_epochs:
        return f"reached max_epochs={tc.max_epochs}"
    if run.time_up:
        return f"reached max_minutes={tc.max_minutes}"
    return None


# ------------------------------------------------------------------------------------ eval
def validate(run: Run) -> dict | None:
    if not run.dev_records:
        return None
    from harken.evaluate import as_engine

    was_training = run.core.training
    try:
        engine = as_engine(run.core, run.tokenizer, run.cfg, run.device)
        hyps = decode_records(engine, run.dev_records, max_duration=run.cfg.data.max_duration)
    finally:
        run.core.train(was_training)
    refs = [normalize_text(r.text) for r in run.dev_records]
    return error_report(refs, hyps).as_dict()


def validate_and_track(run: Run) -> None:
    """Dev WER on rank 0; keeps best.pt (model only) by dev WER."""
    if run.dist.is_main:
        rep = validate(run)
        if rep is not None:
            st = run.state
            log.info("step %d dev WER %.2f%% CER %.2f%%", st.step, 100 * rep["wer"], 100 * rep["cer"])
            if run.writer is not None:
                run.writer.add_scalar("dev/wer", rep["wer"], st.step)
                run.writer.add_scalar("dev/cer", rep["cer"], st.step)
            if rep["wer"] < st.best_wer:
                st.best_wer, st.best_step = rep["wer"], st.step
                ckpt.atomic_save(model_only(run), run.exp_dir / "best.pt")
    barrier(run.dist, f"step {run.state.step}: wait for rank 0 to evaluate")


# ------------------------------------------------------------------------------------ checkpoints
def model_only(run: Run, state_dict: dict | None = None) -> dict:
    return {"version": CHECKPOINT_VERSION, "config": to_dict(run.cfg),
            "model": state_dict if state_dict is not None else run.core.state_dict(),
            "tokenizer": run.tokenizer.to_dict(), "step": run.state.step}


def save_checkpoint(run: Run) -> Path | None:
    """Rank 0 writes everything that shapes the run, including every rank's RNG state (gathered,
    a few KB per rank); all ranks wait for the write to finish."""
    st = run.state
    path = run.exp_dir / "checkpoints" / f"step-{st.step:08d}.pt"
    rngs = gather_objects(rng_state(), run.dist, f"step {st.step}: gather RNG states for the checkpoint")
    if run.dist.is_main:
        obj = model_only(run)
        obj.update({
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "sampler": {**run.sampler.state_dict(), "epoch": st.epoch, "consumed": st.batch_in_epoch},
            "rng": rngs[0],
            "rng_per_rank": rngs,
            "state": asdict(st),
            "world_size": run.dist.world_size,
            "accum_steps": run.cfg.optim.accum_steps,
        })
        ckpt.atomic_save(obj, path, _kill_before_rename=maybe_inject_fault(run, "save"))
        ckpt.prune_checkpoints(path.parent, run.cfg.train.keep_last)
        log.info("saved %s", path)
    barrier(run.dist, f"step {st.step}: wait for rank 0 to write {path.name}")
    run.last_saved_step = st.step
    return path


def restore(run: Run, path: Path) -> None:
    """Load a checkpoint into ``run`` on every rank. Same world size: each rank gets back exactly its
    RNG state and sampler position. Other world size: see ``BucketSampler.load_state_dict`` (the
    same global position in the epoch, rounded down to a whole number of batches per rank)."""
    obj = ckpt.load_checkpoint(path)
    info = run.dist
    run.core.load_state_dict(obj["model"])
    run.optimizer.load_state_dict(obj["optimizer"])
    run.scheduler.load_state_dict(obj["scheduler"])
    run.scaler.load_state_dict(obj["scaler"])
    run.sampler.load_state_dict(obj["sampler"])
    run.state = TrainState(**obj["state"])
    run.state.batch_in_epoch = run.sampler.state_dict()["consumed"]
    run.last_saved_step = run.state.step
    rngs = obj.get("rng_per_rank") or [obj["rng"]]
    old_ws = obj.get("world_size", 1)
    if info.rank < len(rngs):
        set_rng_state(rngs[info.rank])
    else:  # a new rank: a fresh stream of its own (training randomness is per batch anyway)
        seed_everything(run.cfg.train.seed + 1_000_003 * info.rank + run.state.step)
    if old_ws != info.world_size and info.is_main:
        old_consumed = int(obj["sampler"]["consumed"])
        old_accum = int(obj.get("accum_steps", run.cfg.optim.accum_steps))
        new_accum = max(1, run.cfg.optim.accum_steps)
        log.warning(
            "resuming a world_size=%d checkpoint with world_size=%d: epoch %d position %d batches x %d ranks = "
            "global batch %d becomes %d batches per rank (global %d; %d batch(es) seen again); the global batch "
            "per optimizer step changes from %d to %d micro-batches (set optim.accum_steps=%s to keep it); RNG "
            "states restored for ranks < %d, fresh seeds for the others; the LR schedule continues at step %d",
            old_ws, info.world_size, run.state.epoch, old_consumed, old_ws, old_consumed * old_ws,
            run.state.batch_in_epoch, run.state.batch_in_epoch * info.world_size,
            old_consumed * old_ws - run.state.batch_in_epoch * info.world_size,
            old_ws * old_accum, info.world_size * new_accum,
            f"{old_ws * old_accum / info.world_size:g}" if (old_ws * old_accum) % info.world_size == 0
            else "(not possible exactly)", len(rngs), run.state.step)
    log.info("resumed from %s at step %d (epoch %d, batch %d)", path, run.state.step, run.state.epoch,
             run.state.batch_in_epoch)


def average_last(run: Run, n: int) -> Path | None:
    cks = ckpt.list_checkpoints(run.exp_dir / "checkpoints")[-n:]
    if len(cks) < 2:
        return None
    avg = ckpt.average_checkpoints([p for _, p in cks])
    out = run.exp_dir / "avg.pt"
    obj = model_only(run, avg)
    obj["averaged"] = [s for s, _ in cks]
    ckpt.atomic_save(obj, out)
    return out


# ------------------------------------------------------------------------------------ main
def setup(cfg: ExperimentConfig) -> Run:
    from harken.config import validate

    cfg = validate(cfg)  # configs built in code get the checks load_config does, before any work
    device = pick_device(cfg.train.device)
    rank, world, local_rank = env_world()
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible on "
                               f"{socket.gethostname()}: use --nproc-per-node <= the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # before joining, so NCCL binds this rank's GPU
    info = init_distributed(device, cfg.train.dist_timeout_s)
    if not info.is_main:  # only rank 0 logs; the others still report warnings and errors
        log.setLevel(logging.WARNING)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    precision = pick_precision(cfg.train.precision, device)
    exp_dir = Path(cfg.train.exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)

    records = load_train_records(cfg)
    # rank 0 chooses the checkpoint to resume from and tells the others (their view of a shared
    # directory may lag behind, and they must all load the same one)
    resume_path = None
    if info.is_main:
        stale = ckpt.remove_stale_temps(exp_dir / "checkpoints")
        if stale:
            log.warning("removed %d temporary file(s) of interrupted checkpoint saves: %s", len(stale),
                        ", ".join(p.name for p in stale))
        resume_path = ckpt.latest_checkpoint(exp_dir / "checkpoints")
    resume_path = broadcast_object(None if resume_path is None else str(resume_path), info, "choose the checkpoint")
    if resume_path is not None:
        resume_path = ckpt.wait_for_file(resume_path)
    resume_obj = ckpt.load_checkpoint(resume_path) if resume_path else None

    # tokenizer: from the checkpoint when resuming, else from a given path, else built from the text
    if resume_obj is not None:
        tokenizer = tokenizer_from_dict(resume_obj["tokenizer"])
    elif cfg.tokenizer.path:
        tokenizer = load_tokenizer(cfg.tokenizer.path)
    else:
        if info.is_main:
            build_tokenizer(cfg.tokenizer.kind, [normalize_text(r.text) for r in records],
                            cfg.tokenizer.vocab_size, exp_dir / "tokenizer")
        barrier(info)
        tokenizer = load_tokenizer(exp_dir / "tokenizer")

    # CMVN: from a file, else estimated (rank 0 writes it, others read it)
    cmvn_path = Path(cfg.data.cmvn) if cfg.data.cmvn else exp_dir / "cmvn.json"
    if resume_obj is None and not cmvn_path.exists() and not takes_waveform(cfg.model.encoder):
        if info.is_main:
            estimate_cmvn(records, cfg, cfg.train.seed).to_file(cmvn_path)
        barrier(info)
    cmvn = GlobalCMVN.from_file(cmvn_path) if cmvn_path.exists() else None

    core = build_model(cfg, tokenizer.vocab_size, cmvn).to(device)
    model: torch.nn.Module = core
    if info.enabled:
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in core.modules()):
            if device.type == "cuda":  # batch statistics over the global batch, not each rank's slice
                core = torch.nn.SyncBatchNorm.convert_sync_batchnorm(core)
            elif info.is_main:  # torch's SyncBatchNorm runs on GPUs only
                log.warning("batch norm on CPU ranks keeps per-rank batch statistics (SyncBatchNorm needs CUDA); "
                            "model.encoder.conv_norm=layer_norm avoids the difference")
        # DDP broadcasts rank 0's parameters and buffers here, so all ranks start identical; gradients
        # are averaged in 25 MB buckets while the backward pass is still running
        model = torch.nn.parallel.DistributedDataParallel(
            core, device_ids=[device.index] if device.type == "cuda" else None,
            # e.g. wav2vec2's layer drop leaves some parameters without gradients in some steps
            find_unused_parameters=find_unused_parameters(core))
    if info.rank:  # a distinct stream per rank for anything outside the per-batch seeding
        seed_everything(cfg.train.seed + 1_000_003 * info.rank)

    oc = cfg.optim
    # the encoder class declares its groups (wav2vec2: the pretrained encoder at a lower learning rate)
    groups = param_groups(core, oc.lr, oc.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps,
                                  fused=device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, oc.schedule, oc.warmup_steps, cfg.train.max_steps, oc.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    dc = cfg.data
    weights = None if dc.group_weighting == "none" else group_weights([r.group for r in records],
                                                                       dc.group_weighting)
    sampler = BucketSampler([r.duration for r in records], dc.max_duration, num_buckets=dc.num_buckets,
                            shuffle=True, seed=cfg.train.seed, max_utt_duration=dc.max_utt_duration,
                            min_utt_duration=dc.min_utt_duration, weights=weights,
                            world_size=info.world_size, rank=info.rank, max_batch_size=dc.max_batch_size,
                            group_size=info.world_size * max(1, cfg.optim.accum_steps))
    if len(sampler) < max(1, cfg.optim.accum_steps):
        raise ValueError(f"an epoch gives each of the {info.world_size} rank(s) {len(sampler)} batch(es), fewer "
                         f"than optim.accum_steps={cfg.optim.accum_steps}: lower data.max_duration or "
                         "accum_steps, or add data")
    if sampler.num_filtered and info.is_main:
        log.info("%d utterances outside [%.1f, %.1f] s are not trained on", sampler.num_filtered,
                 dc.min_utt_duration, dc.max_utt_duration)
    augmenter = WaveAugmenter(dc.augment)
    cache = None
    if dc.feature_cache:
        from harken.data.dataset import FeatureCache

        if augmenter.active:
            raise ConfigError("data.feature_cache stores fbank features of the unaugmented audio: disable "
                              "waveform augmentation (data.augment.speed_factors=[] noise_prob=0 volume_prob=0) "
                              "or drop the cache; SpecAugment still applies")
        if takes_waveform(cfg.model.encoder):
            raise ConfigError(f"data.feature_cache is for fbank models; the {cfg.model.encoder.type} encoder "
                              "reads the waveform")
        cache = FeatureCache(dc.feature_cache, cfg.model.fbank)
    dataset = AsrDataset(records, tokenizer, augmenter, seed=cfg.train.seed, normalize=normalize_text,
                         feature_cache=cache)

    run = Run(cfg=cfg, model=model, core=core, tokenizer=tokenizer, optimizer=optimizer,
              scheduler=scheduler, scaler=scaler, sampler=sampler, dataset=dataset, device=device,
              precision=precision, dist=info, exp_dir=exp_dir)
    if dc.dev and info.is_main:
        run.dev_records = read_manifest(dc.dev)[: cfg.train.dev_max_utts]
    if resume_obj is not None:
        saved = from_dict(ExperimentConfig, resume_obj["config"])
        if to_dict(saved.model) != to_dict(cfg.model):
            raise ValueError(f"{resume_path}: the model config differs from the checkpoint's; "
                             f"use a new train.exp_dir or the same model settings")
        del resume_obj
        restore(run, resume_path)
    if info.is_main:
        save_config(cfg, exp_dir / "config.yaml")
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            run.writer = SummaryWriter(str(exp_dir / "tensorboard"))
    return run


def train(cfg: ExperimentConfig) -> Run:
    """Build, resume if possible, train, save, evaluate. Under torchrun, failures are also written to
    torchrun's error file so its summary names the rank that failed first."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_train)(cfg)
    return _train(cfg)


def _train(cfg: ExperimentConfig) -> Run:
    run = setup(cfg)
    st = run.state
    nparams = sum(p.numel() for p in run.core.parameters())
    if run.dist.is_main:
        log.info("model: %s, %.2fM parameters, vocab %d, device %s, precision %s, world %d (%s)",
                 cfg.model.encoder.type, nparams / 1e6, run.tokenizer.vocab_size, run.device,
                 run.precision, run.dist.world_size, run.dist.backend)
    progress = None
    if cfg.train.progress and run.dist.is_main:
        from tqdm import tqdm

        progress = tqdm(total=cfg.train.max_steps, initial=st.step, desc="train", unit="step",
                        dynamic_ncols=True)
    try:
        reason = stop_reason(run)
        while reason is None:
            train_one_epoch(run, progress)
            reason = stop_reason(run)
    except PeerLostError as e:
        log.error("%s", e)
        raise
    finally:
        if progress is not None:
            progress.close()
    st = run.state
    if run.dist.is_main:
        log.info("training stopped: %s; %d steps, %.0f audio-seconds in %.0f s (%.1f audio-s/s), "
                 "%d non-finite skipped", reason, st.step, st.audio_seconds, st.train_seconds,
                 st.audio_seconds / max(1e-9, st.train_seconds), st.nonfinite_skipped)
    if run.last_saved_step != st.step:
        save_checkpoint(run)
    validate_and_track(run)
    if run.dist.is_main and cfg.train.average_last > 1:
        out = average_last(run, cfg.train.average_last)
        if out:
            log.info("averaged the last %d checkpoints into %s", cfg.train.average_last, out)
    if run.writer is not None:
        run.writer.close()
    cleanup(run.dist)
    return run
