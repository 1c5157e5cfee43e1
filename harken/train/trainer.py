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

Robustness (before any work, in ``setup``): a noise folder that is not there is a one-line
``ConfigError``; every training record's audio file is checked (exists, decodes, lasts what the
record says; too short/long for the data limits) and the records that fail are left out, counted by
reason in one log line and listed in ``exp_dir/excluded.jsonl``; ``exp_dir/cmvn.json`` carries a
fingerprint of what it was computed from and is recomputed (with a warning) when that changed. A
file that turns unreadable during training is skipped with a warning and counted; more than 5 %
of an epoch failing stops the run with a one-line error.

Schedule and budget: ``optim.schedule_clock=progress`` places the LR schedule at
``max(step/max_steps, minutes/max_minutes)`` (see :mod:`harken.train.schedule`), so a host too slow
to reach ``max_steps`` inside ``train.max_minutes`` still anneals fully. The minutes are the run's
budget across restarts (``TrainState.elapsed_seconds`` is checkpointed), and the ranks agree on
rank 0's clock at every step, so their learning rates stay identical.

At the end, ``best.pt`` is chosen by dev WER among the final weights, the average of the last
checkpoints (``avg.pt``), the EMA weights (``ema.pt``, with ``train.ema_decay``) and the best
checkpoint seen during training; ``exp_dir/selection.json`` lists every candidate's WER.

Testing hook: ``HARKEN_FAULT_AT_STEP=N`` makes rank ``HARKEN_FAULT_RANK`` (default: the last rank)
SIGKILL itself during optimizer step N (after its first forward), once per exp_dir (a marker file
``.harken-fault-*`` records that it happened, so the restarted job runs through).
``HARKEN_FAULT_PHASE=save`` instead kills rank 0 inside the checkpoint save at step N, after the
temporary file is written and before the rename.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import signal
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from harken.config import ConfigError, ExperimentConfig, from_dict, save_config, to_dict
from harken.data.augment import WaveAugmenter
from harken.data.dataset import EXCLUDE_REASONS, AsrDataset, check_records, make_loader
from harken.data.manifest import ManifestError, Record, read_manifest
from harken.data.sampler import BucketSampler, group_weights
from harken.evaluate import decode_records, error_report
from harken.features import GlobalCMVN, SpecAugment
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
from harken.train.schedule import lr_factor, run_progress

log = logging.getLogger("harken")
CHECKPOINT_VERSION = 1
#: an epoch stops the run when more than this fraction of its utterances could not be read
MAX_UNREADABLE_FRACTION = 0.05
#: optimizer steps (of this process) after which the measured speed and the expected end are logged
ETA_AFTER_STEPS = 20


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
    repeat = cfg.data.train_repeat or [1] * len(cfg.data.train)
    for m, times in zip(cfg.data.train, repeat):
        part = read_manifest(m)
        recs.extend(part)
        for k in range(1, int(times)):  # data.train_repeat: the copies get their own ids
            recs.extend(replace(r, id=f"{r.id}~{k}") for r in part)
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
    elapsed_seconds: float = 0.0  # the train.max_minutes clock: wall time of all runs so far (rank 0's)
    unreadable_skipped: int = 0  # utterances skipped because their audio could not be read, all ranks
    epoch_unreadable: int = 0  # of them, in the current epoch
    best_cer: float = math.inf  # dev CER at best_step


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
    clock: "ScheduleClock" = None  # the budget minutes the LR schedule reads (agreed by all ranks)
    elapsed_base: float = 0.0  # elapsed_seconds of earlier runs (restored from the checkpoint)
    loader: object = None  # the DataLoader, kept across epochs (persistent workers)
    ema: dict | None = None  # fp32 EMA of the parameters (rank 0; train.ema_decay > 0)
    specaugs: list = field(default_factory=list)  # SpecAugment modules told the ramp's progress
    start_step: int = 0  # state.step when this process started training
    loop_start: float = 0.0
    unreadable_seen: list = field(default_factory=list)  # first few (id, audio, why) met by this rank
    last_report: tuple | None = None  # (step, dev report) of the latest evaluation
    selection: dict | None = None  # what best.pt was chosen from (selection.json)


class ScheduleClock:
    """The budget minutes the LR schedule's ``LambdaLR`` reads (set once per step from the value
    all ranks agreed on); a plain holder, so the scheduler's state_dict does not pickle the run."""

    def __init__(self) -> None:
        self.minutes = 0.0


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
    """Per-utterance losses (B,) and the number of valid output frames.

    With ``model.interctc_weight`` w > 0 (intermediate CTC), each utterance's loss is
    ``(1 - w) * CTC(final) + w * mean_k CTC(layer k)`` over ``model.encoder.interctc_layers``."""
    w = run.cfg.model.interctc_weight
    kw = {"intermediate": True} if w > 0 else {}  # through forward (DDP hooks); inference never asks
    with autocast_context(run.precision, run.device):
        if batch.feats is not None:  # from the feature cache
            out = run.model(batch.feats, batch.feat_lens, precomputed_features=True, **kw)
        else:
            out = run.model(batch.wave, batch.wave_lens, **kw)
    log_probs, out_lens = out[0], out[1]
    inter: list[torch.Tensor] = list(out[2]) if w > 0 else []

    def loss(lp: torch.Tensor) -> torch.Tensor:
        return ctc_loss(lp.float(), out_lens, batch.targets, batch.target_lens,
                        label_smoothing=run.cfg.model.label_smoothing, reduction="none")

    per_utt = loss(log_probs)
    if inter:
        per_utt = (1.0 - w) * per_utt + w * torch.stack([loss(lp) for lp in inter]).mean(0)
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
    failed = [f for b in window for f in b.failed]
    for uid, audio, why in failed:  # named on the rank that met it (other ranks log warnings too)
        log.warning("step %d: skipping unreadable utterance %s (%s): %s", st.step + 1, uid, audio, why)
        if len(run.unreadable_seen) < 5:
            run.unreadable_seen.append((uid, audio, why))
    # agree on the global batch: utterance count (for the loss), audio seconds (for logs), rank 0's
    # budget clock (the LR schedule's time, identical on all ranks), whether any rank ran out of wall
    # time (so all ranks stop at the same step) and the utterances skipped as unreadable
    local = torch.tensor([sum(len(b.ids) for b in window), sum(b.seconds for b in window),
                          elapsed_minutes(run) if info.is_main else 0.0, float(time_is_up(run)), len(failed)],
                         dtype=torch.float64)
    n_utts, seconds, minutes, out_of_time, n_failed = all_reduce_sum(
        local, info, f"step {st.step + 1}: agree on the global batch").tolist()
    run.clock.minutes = minutes
    st.elapsed_seconds = minutes * 60.0
    time_up = out_of_time > 0 or (cfg.train.max_minutes is not None and minutes >= cfg.train.max_minutes)
    if time_up:  # the last step: the schedule ends with it, whichever rank's clock said so
        run.clock.minutes = max(minutes, cfg.train.max_minutes)
    if n_failed:
        st.unreadable_skipped += int(n_failed)
        st.epoch_unreadable += int(n_failed)
        check_unreadable(run)
    if cfg.model.specaug.ramp_steps > 0:
        strength = min(1.0, st.step / cfg.model.specaug.ramp_steps)
        for m in run.specaugs:
            m.set_progress(strength)
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
    if run.ema is not None:
        update_ema(run)
    if time_up:
        run.time_up = True
    return norm, seconds, loss_sum, n_ok_sum


def check_unreadable(run: Run) -> None:
    """Stop (on every rank: the counts are agreed) once more than MAX_UNREADABLE_FRACTION of the
    epoch's utterances could not be read: the data is broken, not a file or two."""
    st = run.state
    total = run.sampler.epoch_items()
    if st.epoch_unreadable <= MAX_UNREADABLE_FRACTION * total:
        return
    first = "; ".join(f"{uid} ({audio}: {why})" for uid, audio, why in run.unreadable_seen[:3])
    raise ManifestError(
        f"epoch {st.epoch}: {st.epoch_unreadable} of its {total} utterances could not be read (more than "
        f"{MAX_UNREADABLE_FRACTION:.0%}); first: {first or 'named in the warnings of the other ranks'}; fix the "
        "audio files or remove their records from the training manifests")


# ------------------------------------------------------------------------------------ EMA
def ema_decay_at(decay: float, step: int) -> float:
    """The EMA decay after ``step`` updates: ``min(decay, (1+step)/(10+step))``, so the average
    follows the fast-moving weights of the first steps instead of holding on to the random init."""
    return min(decay, (1.0 + step) / (10.0 + step))


def init_ema(run: Run) -> dict:
    return {n: p.detach().float().clone() for n, p in run.core.named_parameters()}


def ema_step_(ema: dict, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * weights, in fp32, for the parameters ``ema`` holds (all of them in
    the ordinary loop, the trained ones in the feature store), after optimizer step ``step``."""
    d = ema_decay_at(decay, step)
    named = dict(model.named_parameters())
    with torch.no_grad():
        keys = list(ema)
        torch._foreach_lerp_([ema[k] for k in keys], [named[k].detach().float() for k in keys], 1.0 - d)


def update_ema(run: Run) -> None:
    """:func:`ema_step_` on the run's model after every optimizer step (rank 0)."""
    ema_step_(run.ema, run.core, run.cfg.train.ema_decay, run.state.step)


def with_ema(model: torch.nn.Module, ema: dict) -> dict:
    """The model's state dict with every parameter ``ema`` holds replaced by its EMA."""
    return {k: (ema[k].to(v.dtype) if k in ema else v) for k, v in model.state_dict().items()}


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
        log.info("step %d epoch %d loss/utt %.3f lr %.2e grad-norm %.2f %.1f audio-s/s%s", st.step, st.epoch,
                 loss, lr, norm, seconds / max(1e-9, elapsed),
                 f" unreadable-skipped {st.unreadable_skipped}" if st.unreadable_skipped else "")
    if run.writer is not None:
        run.writer.add_scalar("train/loss_per_utt", loss, st.step)
        run.writer.add_scalar("train/lr", lr, st.step)
        run.writer.add_scalar("train/grad_norm", norm, st.step)
        run.writer.add_scalar("train/audio_seconds_per_second", seconds / max(1e-9, elapsed), st.step)
        run.writer.add_scalar("train/nonfinite_skipped", st.nonfinite_skipped, st.step)
        run.writer.add_scalar("train/unreadable_skipped", st.unreadable_skipped, st.step)


def steps_per_epoch(run: Run) -> int:
    return max(1, len(run.sampler) // max(1, run.cfg.optim.accum_steps))


def log_plan(run: Run) -> None:
    """The work expected, before the first step: steps, epochs, budget, schedule clock."""
    cfg, st = run.cfg, run.state
    plan_message(cfg, st, steps_per_epoch(run))


def plan_message(cfg: ExperimentConfig, st: TrainState, epoch_steps: int, unit: str = "steps") -> None:
    """Log the work a run expects (both trainers): ``epoch_steps`` optimizer steps make an epoch."""
    tc = cfg.train
    budget = f"{tc.max_minutes:g} min" if tc.max_minutes is not None else "no time limit"
    used = f" ({st.elapsed_seconds / 60:.1f} min used by earlier runs)" if st.elapsed_seconds > 0 else ""
    clock = cfg.optim.schedule_clock if tc.max_minutes is not None else "steps"
    log.info("max_steps %d (about %.1f epochs of %d %s), max_epochs %d, budget %s%s; LR schedule %s by the %s "
             "clock%s", tc.max_steps, tc.max_steps / max(1, epoch_steps), epoch_steps, unit, tc.max_epochs, budget,
             used, cfg.optim.schedule, clock, f"; resuming at step {st.step}" if st.step else "")


def maybe_log_eta(run: Run) -> None:
    """Once, ETA_AFTER_STEPS steps into this process: the measured speed and where the run will stop."""
    st = run.state
    if st.step - run.start_step != ETA_AFTER_STEPS or not run.dist.is_main:
        return
    eta_message(run.cfg, st, ETA_AFTER_STEPS, time.time() - run.loop_start, elapsed_minutes(run),
                steps_per_epoch(run), st.audio_seconds / max(1e-9, st.train_seconds))


def eta_message(cfg: ExperimentConfig, st: TrainState, done: int, wall: float, minutes_used: float,
                epoch_steps: int, audio_per_second: float) -> None:
    """Log the measured speed (``done`` steps in ``wall`` seconds) and which limit will stop the run,
    at which step and when (both trainers)."""
    tc = cfg.train
    rate = done / max(1e-9, wall)
    ends = {"max_steps": tc.max_steps, "max_epochs": st.step + (tc.max_epochs - st.epoch) * epoch_steps}
    if tc.max_minutes is not None:
        ends["max_minutes"] = st.step + int(rate * max(0.0, (tc.max_minutes - minutes_used) * 60))
    which = min(ends, key=lambda k: ends[k])
    final = max(st.step, min(ends[which], tc.max_steps))
    secs = (final - st.step) / rate
    log.info("speed %.2f steps/s (%.1f audio-s/s) over %d steps: expect to stop at step %d of max_steps %d (by %s) "
             "in about %.1f min, around %s", rate, audio_per_second, done, final,
             tc.max_steps, which, secs / 60, time.strftime("%H:%M:%S", time.localtime(time.time() + secs)))


def train_one_epoch(run: Run, progress=None) -> bool:
    """Train until the epoch's batches run out or a stop condition holds; True when training is done.

    Every rank gets the same number of batches (the sampler truncates), so all ranks run the same
    number of steps. A tail of fewer than ``accum_steps`` batches at the end of the epoch is not
    trained on (it would leak half-accumulated gradients into the next epoch's first step)."""
    cfg, st = run.cfg, run.state
    accum = max(1, cfg.optim.accum_steps)
    run.sampler.set_epoch(st.epoch)
    steps_left = (len(run.sampler) - st.batch_in_epoch) // accum
    if run.sampler.in_curriculum() and st.batch_in_epoch == 0 and run.dist.is_main:
        log.info("epoch %d: curriculum (data.curriculum_epochs=%d), short utterances first", st.epoch,
                 cfg.data.curriculum_epochs)
    run.model.train()
    window: list = []
    run.step_clock = time.time()
    if run.loader is None:  # one loader for the whole run: with workers, they persist across epochs
        run.loader = make_loader(run.dataset, run.sampler, cfg.data.num_workers, cfg.data.prefetch_factor)
    if steps_left > 0:
        for batch in run.loader:
            window.append(batch)
            if len(window) < accum:
                continue
            norm, seconds, loss_sum, n_ok = train_step(run, window)
            window = []
            steps_left -= 1
            now = time.time()
            st.train_seconds += now - run.step_clock
            log_step(run, norm, seconds, loss_sum, n_ok, now - run.step_clock, progress)
            maybe_log_eta(run)
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
    st.epoch_unreadable = 0
    return stop_reason(run) is not None


def elapsed_minutes(run: Run) -> float:
    """The train.max_minutes clock: this process's wall time since setup plus earlier runs' time."""
    return (run.elapsed_base + time.time() - run.start_wall) / 60.0


def time_is_up(run: Run) -> bool:
    tc = run.cfg.train
    return tc.max_minutes is not None and elapsed_minutes(run) >= tc.max_minutes


def schedule_position(run: Run) -> tuple[float, str]:
    """(the LR schedule's position in [0, 1], the clock that sets it) at the current step."""
    oc, tc = run.cfg.optim, run.cfg.train
    return run_progress(run.state.step, tc.max_steps, run.clock.minutes, tc.max_minutes, oc.schedule_clock)


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
            run.last_report = (st.step, rep)
            if run.writer is not None:
                run.writer.add_scalar("dev/wer", rep["wer"], st.step)
                run.writer.add_scalar("dev/cer", rep["cer"], st.step)
            if rep["wer"] < st.best_wer:
                st.best_wer, st.best_step, st.best_cer = rep["wer"], st.step, rep["cer"]
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
        if run.ema is not None:
            obj["ema"] = run.ema
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
    try:
        run.sampler.load_state_dict(obj["sampler"])
    except ValueError as e:
        raise ManifestError(f"{path}: cannot resume: {e}; the training data changed since this checkpoint (records "
                            f"left out by the data check are in {run.exp_dir / 'excluded.jsonl'}): restore the data "
                            "or start in a new train.exp_dir") from None
    run.state = TrainState(**obj["state"])
    if run.dist.is_main and run.cfg.train.ema_decay > 0:
        if obj.get("ema") is not None:
            run.ema = {k: v.to(run.device).float() for k, v in obj["ema"].items()}
        else:
            log.warning("%s has no EMA of the weights (train.ema_decay was 0): the EMA starts from the resumed "
                        "weights", path)
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


def write_average(exp_dir: Path, n: int, model_obj) -> Path | None:
    """exp_dir/avg.pt: the mean of the last ``n`` step checkpoints, as ``model_obj(state_dict)``
    makes a model checkpoint; None when there are fewer than 2."""
    cks = ckpt.list_checkpoints(exp_dir / "checkpoints")[-n:] if n > 1 else []
    if len(cks) < 2:
        return None
    obj = model_obj(ckpt.average_checkpoints([p for _, p in cks]))
    obj["averaged"] = [s for s, _ in cks]
    out = exp_dir / "avg.pt"
    ckpt.atomic_save(obj, out)
    log.info("averaged the last %d checkpoints (steps %s) into %s", len(cks), ", ".join(str(s) for s, _ in cks), out)
    return out


def write_ema_file(exp_dir: Path, model: torch.nn.Module, ema: dict | None, decay: float, model_obj) -> Path | None:
    """exp_dir/ema.pt: the EMA weights as a normal model checkpoint (like avg.pt); None without EMA."""
    if ema is None:
        return None
    obj = model_obj(with_ema(model, ema))
    obj["ema_decay"] = decay
    out = exp_dir / "ema.pt"
    ckpt.atomic_save(obj, out)
    log.info("wrote the EMA of the weights (decay %g) to %s", decay, out)
    return out


#: the order that breaks a tie in dev WER and CER: averaged weights generalise best, then the EMA,
#: then the newest weights
SELECTION_ORDER = ("avg", "ema", "final", "best_step")


def choose_best(run: Run, written: dict[str, Path | None]) -> dict | None:
    """Rank 0: :func:`select_best` over this run's final weights, its best step checkpoint and
    ``written`` (name -> file, e.g. avg.pt and ema.pt), each scored on dev by :func:`validate`."""
    st = run.state
    if run.last_report is None or run.last_report[0] != st.step:
        return None  # no dev set
    return select_best(run.exp_dir, st, run.last_report[1], written, run.core, lambda: validate(run),
                       lambda: model_only(run), len(run.dev_records))


def select_best(exp_dir: Path, st: TrainState, final_rep: dict, written: dict[str, Path | None],
                model: torch.nn.Module, evaluate, final_obj, dev_utts: int, extra: dict | None = None) -> dict:
    """Evaluate on dev every model a run wrote and keep the winner as exp_dir/best.pt.

    Candidates: the final weights (``final_rep``: their dev report, ``final_obj()``: their checkpoint
    object; ``model`` holds them), the best step checkpoint already in best.pt
    (``st.best_step``/``best_wer``), and ``written`` (name -> file: each loaded into ``model`` and
    scored by ``evaluate() -> {"wer", "cer"}``; the final weights are put back). The lowest dev WER
    wins, then CER, then :data:`SELECTION_ORDER`; a losing best step checkpoint is kept as
    best_step.pt. Writes exp_dir/selection.json (plus ``extra``) and returns it. Shared by the
    ordinary loop and the feature-store trainer."""
    final_path = exp_dir / "checkpoints" / f"step-{st.step:08d}.pt"
    cands = [{"name": "final", "path": str(final_path), "step": st.step, "wer": final_rep["wer"],
              "cer": final_rep["cer"]}]
    best_file = exp_dir / "best.pt"
    if st.best_step >= 0 and st.best_step != st.step and best_file.exists():
        cands.append({"name": "best_step", "path": str(best_file), "step": st.best_step, "wer": st.best_wer,
                      "cer": st.best_cer})
    if any(p is not None for p in written.values()):
        keep = {k: v.detach().clone() for k, v in model.state_dict().items()}
        try:
            for name, path in written.items():
                if path is None:
                    continue
                model.load_state_dict(ckpt.load_checkpoint(path)["model"])
                rep = evaluate()
                log.info("%s dev WER %.2f%% CER %.2f%%", path.name, 100 * rep["wer"], 100 * rep["cer"])
                cands.append({"name": name, "path": str(path), "step": st.step, "wer": rep["wer"], "cer": rep["cer"]})
        finally:
            model.load_state_dict(keep)
    win = min(cands, key=lambda c: (c["wer"], c["cer"], SELECTION_ORDER.index(c["name"])))
    if win["name"] != "best_step":
        if any(c["name"] == "best_step" for c in cands):  # keep the best step's weights beside it
            moved = exp_dir / "best_step.pt"
            ckpt.atomic_save(ckpt.load_checkpoint(best_file), moved)
            for c in cands:
                if c["name"] == "best_step":
                    c["path"] = str(moved)
        obj = final_obj() if win["name"] == "final" else ckpt.load_checkpoint(win["path"])
        obj["selected"] = win["name"]
        ckpt.atomic_save(obj, best_file)
    sel = {"chosen": win["name"], "chosen_path": win["path"], "best": str(best_file), "metric": "dev WER",
           "dev_utts": dev_utts, "candidates": cands, **(extra or {})}
    from harken.fsutil import atomic_write_text

    atomic_write_text(exp_dir / "selection.json", json.dumps(sel, indent=2) + "\n", fsync=False)
    log.info("best.pt <- %s (dev WER %.2f%%); candidates: %s; see %s", win["name"], 100 * win["wer"],
             ", ".join(f"{c['name']} {100 * c['wer']:.2f}%" for c in cands), exp_dir / "selection.json")
    return sel


# ------------------------------------------------------------------------------------ checks before any work
def check_noise_dir(cfg: ExperimentConfig) -> None:
    """data.augment.noise_dir must be a folder holding audio when noise is on (checked up front: a
    relative path is read from the working directory, and a worker that finds nothing dies)."""
    from harken.data.augment import NOISE_EXTS

    a = cfg.data.augment
    if a.noise_dir is None or a.noise_prob <= 0:
        return
    folder = Path(a.noise_dir)
    where = "" if folder.is_absolute() else f" (a relative path is read from the working directory, {os.getcwd()})"
    fix = (f"generate one with `harken synth --out <corpus> --noise-dir {a.noise_dir}`, point it at your own noise "
           "recordings, or set data.augment.noise_prob=0")
    if not folder.is_dir():
        raise ConfigError(f"data.augment.noise_dir={a.noise_dir}: no such folder{where}; {fix}",
                          "data.augment.noise_dir")
    if not any(p.suffix.lower() in NOISE_EXTS and p.is_file() for p in folder.rglob("*")):
        raise ConfigError(f"data.augment.noise_dir={a.noise_dir}: the folder holds no audio ({', '.join(NOISE_EXTS)})"
                          f"{where}; {fix}", "data.augment.noise_dir")


def check_training_data(cfg: ExperimentConfig, records: list[Record], exp_dir: Path, info: DistInfo) -> list[Record]:
    """Rank 0 checks every record (:func:`harken.data.dataset.check_records`), writes the ones left
    out to exp_dir/excluded.jsonl and logs one summary line; every rank then leaves out the same
    records. Every record left out is a one-line ManifestError."""
    dc = cfg.data
    result = None
    if info.is_main:
        from harken.fsutil import atomic_write_text

        t0 = time.time()
        kept, excluded = check_records(records, min_duration=dc.min_utt_duration,
                                       max_duration=min(dc.max_utt_duration, dc.max_duration),
                                       check_audio=dc.check_audio, cache_path=exp_dir / ".audio-check.json")
        out = exp_dir / "excluded.jsonl"
        atomic_write_text(out, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in excluded), fsync=False)
        counts = dict.fromkeys(EXCLUDE_REASONS, 0)
        for e in excluded:
            counts[e["reason"]] += 1
        summary = ", ".join(f"{k} {v}" for k, v in counts.items())
        first = "; ".join(f"{Path(e['audio']).name} [{e['id']}] ({e['reason']}: {e['detail']})" for e in excluded[:3])
        error = None
        if not kept:
            error = (f"every one of the {len(records)} training records was left out by the data check ({summary}); "
                     f"first: {first}; all in {out}")
        else:
            bad = counts["missing"] + counts["unreadable"] + counts["duration_mismatch"]
            (log.warning if bad else log.info)(
                "data check: %d training records, %d kept, %d left out (%s)%s [%.1f s]", len(records), len(kept),
                len(excluded), summary, f"; first: {first}; all in {out}" if excluded else "", time.time() - t0)
        keep_ids = {id(r) for r in kept}
        result = ([i for i, r in enumerate(records) if id(r) not in keep_ids], error)
    dropped, error = broadcast_object(result, info, "share the data check")
    if error:
        raise ManifestError(error)
    drop = set(dropped)
    return [r for i, r in enumerate(records) if i not in drop]


def group_values(records: list[Record], name: str) -> list[str]:
    """Each record's value of field ``name``: a Record field (group, speaker, ...) or a key of its
    extra fields (e.g. engine); "" where a record has none."""
    import dataclasses

    if name in {f.name for f in dataclasses.fields(Record)} - {"extra"}:
        return [str(getattr(r, name) or "") for r in records]
    return ["" if r.extra.get(name) is None else str(r.extra.get(name)) for r in records]


def sampling_weights(cfg: ExperimentConfig, records: list[Record], info: DistInfo):
    """Per-record sampling weights balancing the values of data.group_by (None: no weighting)."""
    dc = cfg.data
    if dc.group_weighting == "none":
        return None
    groups = group_values(records, dc.group_by)
    if not any(groups):
        seen = sorted({k for r in records[:1000] for k in r.extra})
        raise ConfigError(f"data.group_by={dc.group_by}: no training record has a value for it, so "
                          f"data.group_weighting={dc.group_weighting} has nothing to balance; use group, speaker or "
                          f"a field of the manifests{' (' + ', '.join(seen) + ')' if seen else ''}", "data.group_by")
    weights = group_weights(groups, dc.group_weighting)
    if info.is_main:
        count: dict[str, int] = {}
        wof: dict[str, float] = {}
        for g, w in zip(groups, weights):
            count[g] = count.get(g, 0) + 1
            wof[g] = float(w)
        top = sorted(count, key=lambda g: -count[g])
        log.info("group weighting (%s) by %s, %d values: %s%s", dc.group_weighting, dc.group_by, len(count),
                 ", ".join(f"{g or '<none>'} {count[g]} x{wof[g]:.2f}" for g in top[:12]),
                 f", ... ({len(top) - 12} more)" if len(top) > 12 else "")
    return weights


def cmvn_fingerprint(cfg: ExperimentConfig) -> dict:
    """What a computed CMVN depends on: the training manifests (path, size, mtime), the fbank
    settings, data.cmvn_utts and the seed (which picks the utterances)."""
    mans = []
    for m in cfg.data.train:
        stat = os.stat(m)
        mans.append({"path": os.path.abspath(m), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {"manifests": mans, "fbank": to_dict(cfg.model.fbank), "cmvn_utts": cfg.data.cmvn_utts,
            "seed": cfg.train.seed}


def _fingerprint_change(old, new: dict) -> str:
    if not isinstance(old, dict):
        return "it has no fingerprint (written by hand or by an older harken)"
    why = []
    if old.get("manifests") != new["manifests"]:
        why.append("the training manifests changed (paths, sizes or modification times)")
    if old.get("fbank") != new["fbank"]:
        why.append("model.fbank changed")
    if old.get("cmvn_utts") != new["cmvn_utts"]:
        why.append("data.cmvn_utts changed")
    if old.get("seed") != new["seed"]:
        why.append("train.seed changed")
    return "; ".join(why) or "its fingerprint differs"


def _read_json(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def check_user_cmvn(path: Path, cfg: ExperimentConfig) -> GlobalCMVN:
    """A data.cmvn file must fit the model's fbank: its bins, and the fbank settings it stores
    (files written by harken train do; dither, which hardly moves the statistics, is not compared)."""
    try:
        cmvn = GlobalCMVN.from_file(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.cmvn={path}: not a CMVN file ({e})", "data.cmvn") from None
    fb = to_dict(cfg.model.fbank)
    if cmvn.num_bins != fb["num_mel_bins"]:
        raise ConfigError(f"data.cmvn={path}: has {cmvn.num_bins} bins but model.fbank.num_mel_bins is "
                          f"{fb['num_mel_bins']}; recompute it (harken prepare cmvn) or drop data.cmvn", "data.cmvn")
    stored = (_read_json(path) or {}).get("fbank")
    if isinstance(stored, dict):
        diff = [f"{k} {stored[k]!r} vs {fb[k]!r}" for k in stored if k in fb and k != "dither" and stored[k] != fb[k]]
        if diff:
            raise ConfigError(f"data.cmvn={path}: computed with other fbank settings than the model's "
                              f"({', '.join(diff)}); recompute it with this model.fbank or drop data.cmvn to have "
                              "training compute it",
                              "data.cmvn")
    return cmvn


def write_cmvn(cmvn: GlobalCMVN, path: Path, cfg: ExperimentConfig, fingerprint: dict) -> None:
    from harken.fsutil import atomic_write_text

    d = {"mean": cmvn.mean.tolist(), "istd": cmvn.istd.tolist(), "count": cmvn.count,
         "fbank": to_dict(cfg.model.fbank), "fingerprint": fingerprint}
    atomic_write_text(path, json.dumps(d), fsync=False)


def prepare_cmvn(cfg: ExperimentConfig, records: list[Record], exp_dir: Path, info: DistInfo,
                 resuming: bool) -> GlobalCMVN | None:
    """The CMVN the model starts from. A given data.cmvn file is used as it is (after
    :func:`check_user_cmvn`). Otherwise rank 0 keeps exp_dir/cmvn.json only if its fingerprint
    matches (:func:`cmvn_fingerprint`), else recomputes it with a warning. A resumed model keeps
    the CMVN in its checkpoint; a stale cmvn.json then only draws a warning."""
    user = cfg.data.cmvn is not None
    path = Path(cfg.data.cmvn) if user else exp_dir / "cmvn.json"
    if takes_waveform(cfg.model.encoder):
        return GlobalCMVN.from_file(path) if path.exists() else None
    if user and path.exists():
        cmvn = check_user_cmvn(path, cfg)
        old = (_read_json(path) or {}).get("fingerprint")
        if info.is_main and old is not None and old != cmvn_fingerprint(cfg):
            log.warning("data.cmvn=%s was computed by harken train for other data (%s); using it as given", path,
                        _fingerprint_change(old, cmvn_fingerprint(cfg)))
        return cmvn
    if info.is_main:
        fp = cmvn_fingerprint(cfg)
        stored = _read_json(path) if path.exists() else None
        old = None if stored is None else stored.get("fingerprint")
        if resuming:
            if stored is not None and old != fp:
                log.warning("%s is stale (%s); the resumed model keeps the CMVN it was trained with (in its "
                            "checkpoint)", path, _fingerprint_change(old, fp))
        elif stored is not None and old == fp:
            log.info("reusing %s (its fingerprint matches the training manifests and fbank settings)", path)
        else:
            if path.exists():
                log.warning("%s is stale (%s): recomputing it", path, _fingerprint_change(old, fp))
            t0 = time.time()
            write_cmvn(estimate_cmvn(records, cfg, cfg.train.seed), path, cfg, fp)
            log.info("computed CMVN from %d utterances into %s [%.1f s]", min(len(records), cfg.data.cmvn_utts),
                     path, time.time() - t0)
    barrier(info, "wait for rank 0 to write the CMVN")
    return GlobalCMVN.from_file(path) if path.exists() else None


# ------------------------------------------------------------------------------------ main
def make_tokenizer(cfg: ExperimentConfig, records: list[Record], exp_dir: Path, resume_obj: dict | None,
                   info: DistInfo):
    """From the checkpoint when resuming, else from ``tokenizer.path``, else built from the training text
    by rank 0 into exp_dir/tokenizer (the other ranks wait and read it)."""
    if resume_obj is not None:
        return tokenizer_from_dict(resume_obj["tokenizer"])
    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    if info.is_main:
        build_tokenizer(cfg.tokenizer.kind, [normalize_text(r.text) for r in records],
                        cfg.tokenizer.vocab_size, exp_dir / "tokenizer")
    barrier(info)
    return load_tokenizer(exp_dir / "tokenizer")


def setup(cfg: ExperimentConfig) -> Run:
    from harken.config import validate

    cfg = validate(cfg)  # configs built in code get the checks load_config does, before any work
    check_noise_dir(cfg)
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

    records = check_training_data(cfg, load_train_records(cfg), exp_dir, info)
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

    tokenizer = make_tokenizer(cfg, records, exp_dir, resume_obj, info)

    # CMVN: from a given file, else estimated (rank 0 writes it, others read it), never stale
    cmvn = prepare_cmvn(cfg, records, exp_dir, info, resuming=resume_obj is not None)

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
    clock = ScheduleClock()

    def lr_at(k: int) -> float:  # k optimizer steps done; the position from the steps or the budget
        p, by = run_progress(k + 1, cfg.train.max_steps, clock.minutes, cfg.train.max_minutes, oc.schedule_clock)
        return lr_factor(k, oc.schedule, oc.warmup_steps, cfg.train.max_steps, oc.min_lr_ratio,
                         progress=p if by == "time" else None)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    dc = cfg.data
    weights = sampling_weights(cfg, records, info)
    sampler = BucketSampler([r.duration for r in records], dc.max_duration, num_buckets=dc.num_buckets,
                            shuffle=True, seed=cfg.train.seed, max_utt_duration=dc.max_utt_duration,
                            min_utt_duration=dc.min_utt_duration, weights=weights,
                            world_size=info.world_size, rank=info.rank, max_batch_size=dc.max_batch_size,
                            group_size=info.world_size * max(1, cfg.optim.accum_steps),
                            curriculum_epochs=dc.curriculum_epochs)
    if len(sampler) < max(1, cfg.optim.accum_steps):
        raise ValueError(f"an epoch gives each of the {info.world_size} rank(s) {len(sampler)} batch(es), fewer "
                         f"than optim.accum_steps={cfg.optim.accum_steps}: lower data.max_duration or "
                         "accum_steps, or add data")
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
                         feature_cache=cache, skip_unreadable=True)

    run = Run(cfg=cfg, model=model, core=core, tokenizer=tokenizer, optimizer=optimizer,
              scheduler=scheduler, scaler=scaler, sampler=sampler, dataset=dataset, device=device,
              precision=precision, dist=info, exp_dir=exp_dir, clock=clock)
    run.specaugs = [m for m in core.modules() if isinstance(m, SpecAugment)]
    if dc.dev and info.is_main:
        run.dev_records = read_manifest(dc.dev)[: cfg.train.dev_max_utts]
    if resume_obj is not None:
        saved = from_dict(ExperimentConfig, resume_obj["config"])
        if to_dict(saved.model) != to_dict(cfg.model):
            raise ValueError(f"{resume_path}: the model config differs from the checkpoint's; "
                             f"use a new train.exp_dir or the same model settings")
        del resume_obj
        restore(run, resume_path)
    if cfg.train.ema_decay > 0 and info.is_main and run.ema is None:
        run.ema = init_ema(run)
    # the budget clock continues from earlier runs of this exp_dir
    run.elapsed_base = run.state.elapsed_seconds
    run.clock.minutes = run.elapsed_base / 60.0
    run.start_wall = time.time()
    if info.is_main:
        save_config(cfg, exp_dir / "config.yaml")
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            run.writer = SummaryWriter(str(exp_dir / "tensorboard"))
    return run


def train(cfg: ExperimentConfig) -> Run:
    """Build, resume if possible, train, save, evaluate. Under torchrun, failures are also written to
    torchrun's error file so its summary names the rank that failed first."""
    if cfg.train.feature_store:  # the frozen lower layers run once (harken.train.feature_store)
        from harken.train.feature_store import train_feature_store

        return train_feature_store(cfg)
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
    if run.dist.is_main:
        log_plan(run)
    run.start_step, run.loop_start = st.step, time.time()
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
        run.loader = None  # shuts the persistent workers down
    st = run.state
    if run.dist.is_main:
        pos, by = schedule_position(run)
        tc = cfg.train
        log.info("training stopped: %s; %d steps, %.0f audio-seconds in %.0f s (%.1f audio-s/s), "
                 "%d non-finite skipped, %d unreadable skipped; LR schedule at %.3f of its course, set by the %s "
                 "clock (steps %d/%d, minutes %.2f/%s)", reason, st.step, st.audio_seconds, st.train_seconds,
                 st.audio_seconds / max(1e-9, st.train_seconds), st.nonfinite_skipped, st.unreadable_skipped,
                 pos, by, st.step, tc.max_steps, run.clock.minutes,
                 "-" if tc.max_minutes is None else f"{tc.max_minutes:g}")
        if st.unreadable_skipped:
            log.warning("%d utterance(s) were skipped as unreadable during training; first: %s", st.unreadable_skipped,
                        "; ".join(f"{u} ({a}: {w})" for u, a, w in run.unreadable_seen[:3]) or "see the warnings")
    if run.last_saved_step != st.step:
        save_checkpoint(run)
    validate_and_track(run)
    if run.dist.is_main:
        obj = functools.partial(model_only, run)
        written = {"avg": write_average(run.exp_dir, cfg.train.average_last, obj),
                   "ema": write_ema_file(run.exp_dir, run.core, run.ema, cfg.train.ema_decay, obj)}
        run.selection = choose_best(run, written)
    if run.writer is not None:
        run.writer.close()
    cleanup(run.dist)
    return run
