"""The training loop, as a few explicit functions read top to bottom.

``train(cfg)`` builds everything, resumes from the newest checkpoint in ``exp_dir`` if there is one,
and runs ``train_one_epoch`` until ``max_steps``/``max_epochs``/``max_minutes``. A checkpoint holds
everything that shapes the run (model, optimizer, scheduler, scaler, sampler position, RNG states,
counters, config, tokenizer), so a resumed run continues the same loss curve.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from harken.config import ExperimentConfig, from_dict, save_config, to_dict
from harken.data.augment import WaveAugmenter
from harken.data.dataset import AsrDataset, make_loader
from harken.data.manifest import Record, read_manifest
from harken.data.sampler import BucketSampler, group_weights
from harken.evaluate import decode_records, error_report
from harken.features import CmvnAccumulator, Fbank, Frontend, GlobalCMVN
from harken.models.ctc import CtcModel, ctc_loss
from harken.text.normalize import normalize_text
from harken.text.tokenizer import build_tokenizer, load_tokenizer, tokenizer_from_dict
from harken.train import checkpoint as ckpt
from harken.train.distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
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


def build_model(cfg: ExperimentConfig, vocab_size: int, cmvn: GlobalCMVN | None = None) -> CtcModel:
    fb = cfg.model.fbank
    frontend = Frontend(fb, cfg.model.specaug, cmvn or GlobalCMVN.identity(fb.num_mel_bins))
    return CtcModel(cfg.model.encoder, vocab_size, frontend=frontend)


def estimate_cmvn(records: list[Record], cfg: ExperimentConfig, seed: int) -> GlobalCMVN:
    """Global mean/std of fbank features over a random subset of training utterances."""
    rng = np.random.default_rng(seed)
    n = min(len(records), cfg.data.cmvn_utts)
    pick = sorted(rng.choice(len(records), size=n, replace=False).tolist())
    ds = AsrDataset(records)
    fbank = Fbank(cfg.model.fbank).eval()
    acc = CmvnAccumulator()
    with torch.inference_mode():
        for i in range(0, n, 16):
            b = ds[(0, pick[i : i + 16])]
            feats, lens = fbank(b.wave, b.wave_lens)
            acc.update(feats, lens)
    return acc.result()


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


def rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------ steps
def compute_loss(run: Run, batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-utterance losses (B,) and the number of valid output frames."""
    with autocast_context(run.precision, run.device):
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


def train_one_epoch(run: Run, progress=None) -> bool:
    """Train until the epoch's batches run out or a stop condition holds; True when training is done."""
    cfg, st = run.cfg, run.state
    accum = max(1, cfg.optim.accum_steps)
    run.sampler.set_epoch(st.epoch)
    loader = make_loader(run.dataset, run.sampler, cfg.data.num_workers)
    run.model.train()
    micro = 0
    acc_loss = acc_utts = acc_frames = 0.0
    t_step = time.time()
    seconds_in_step = 0.0
    for batch in loader:
        batch = batch.to(run.device)
        last_micro = micro == accum - 1
        sync = contextlib.nullcontext() if (last_micro or not run.dist.enabled) else run.model.no_sync()
        with sync:
            per_utt, out_lens, frames = compute_loss(run, batch)
            # a non-finite loss, or too few output frames for the labels (CTC would be infinite;
            # zero_infinity hides it), is skipped and counted, never fatal
            finite = torch.isfinite(per_utt) & (out_lens >= batch.target_lens)
            n_ok = int(finite.sum())
            if n_ok < len(per_utt):
                st.nonfinite_skipped += len(per_utt) - n_ok
                log.warning("step %d: %d utterance losses skipped as non-finite or infeasible (%s)", st.step,
                            len(per_utt) - n_ok, [i for i, f in zip(batch.ids, finite.tolist()) if not f])
            loss = torch.where(finite, per_utt, torch.zeros_like(per_utt)).sum() / max(1, len(per_utt))
            run.scaler.scale(loss / accum).backward()
        acc_loss += float(loss.detach()) * len(per_utt)
        acc_utts += n_ok
        acc_frames += frames
        seconds_in_step += batch.seconds
        st.batch_in_epoch += 1
        micro += 1
        if micro < accum:
            continue
        micro = 0
        norm = optimizer_step(run)
        if not math.isfinite(norm):
            st.nonfinite_skipped += 1
            log.warning("step %d: non-finite gradient norm, update skipped", st.step)
        st.step += 1
        sec = all_reduce_sum(torch.tensor([seconds_in_step], dtype=torch.float64), run.dist).item()
        st.audio_seconds += sec
        now = time.time()
        st.train_seconds += now - t_step
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{acc_loss / max(1, acc_utts):.2f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}",
                                 ep=st.epoch)
        if run.dist.is_main and progress is None and st.step % cfg.train.log_every == 0:
            log.info("step %d epoch %d loss/utt %.3f lr %.2e grad-norm %.2f %.1f audio-s/s", st.step, st.epoch,
                     acc_loss / max(1, acc_utts), run.scheduler.get_last_lr()[0], norm,
                     sec / max(1e-9, now - t_step))
        if run.dist.is_main and run.writer is not None and st.step % cfg.train.log_every == 0:
            run.writer.add_scalar("train/loss_per_utt", acc_loss / max(1, acc_utts), st.step)
            run.writer.add_scalar("train/loss_per_frame", acc_loss / max(1, acc_frames), st.step)
            run.writer.add_scalar("train/lr", run.scheduler.get_last_lr()[0], st.step)
            run.writer.add_scalar("train/grad_norm", norm, st.step)
            run.writer.add_scalar("train/audio_seconds_per_second", sec / max(1e-9, now - t_step), st.step)
            run.writer.add_scalar("train/nonfinite_skipped", st.nonfinite_skipped, st.step)
        acc_loss = acc_utts = acc_frames = 0.0
        seconds_in_step = 0.0
        done = stop_reason(run) is not None
        if cfg.train.eval_every and st.step % cfg.train.eval_every == 0 and not done:
            validate_and_track(run)
        if st.step % cfg.train.checkpoint_every == 0 or done:
            save_checkpoint(run)
        t_step = time.time()
        if done:
            return True
    # the epoch is over
    st.epoch += 1
    st.batch_in_epoch = 0
    return stop_reason(run) is not None


def stop_reason(run: Run) -> str | None:
    st, tc = run.state, run.cfg.train
    if st.step >= tc.max_steps:
        return f"reached max_steps={tc.max_steps}"
    if st.epoch >= tc.max_epochs:
        return f"reached max_epochs={tc.max_epochs}"
    if tc.max_minutes is not None and (time.time() - run.start_wall) / 60 >= tc.max_minutes:
        return f"reached max_minutes={tc.max_minutes}"
    return None


# ------------------------------------------------------------------------------------ eval
def validate(run: Run) -> dict | None:
    if not run.dev_records:
        return None
    hyps = decode_records(run.core, run.dev_records, run.tokenizer, run.device,
                          max_duration=run.cfg.data.max_duration)
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
    barrier(run.dist)


# ------------------------------------------------------------------------------------ checkpoints
def model_only(run: Run, state_dict: dict | None = None) -> dict:
    return {"version": CHECKPOINT_VERSION, "config": to_dict(run.cfg),
            "model": state_dict if state_dict is not None else run.core.state_dict(),
            "tokenizer": run.tokenizer.to_dict(), "step": run.state.step}


def save_checkpoint(run: Run) -> Path | None:
    st = run.state
    path = run.exp_dir / "checkpoints" / f"step-{st.step:08d}.pt"
    if run.dist.is_main:
        obj = model_only(run)
        obj.update({
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "sampler": {**run.sampler.state_dict(), "epoch": st.epoch, "consumed": st.batch_in_epoch},
            "rng": rng_state(),
            "state": asdict(st),
            "world_size": run.dist.world_size,
        })
        ckpt.atomic_save(obj, path)
        ckpt.prune_checkpoints(path.parent, run.cfg.train.keep_last)
        log.info("saved %s", path)
    barrier(run.dist)
    return path


def restore(run: Run, path: Path) -> None:
    obj = ckpt.load_checkpoint(path)
    run.core.load_state_dict(obj["model"])
    run.optimizer.load_state_dict(obj["optimizer"])
    run.scheduler.load_state_dict(obj["scheduler"])
    run.scaler.load_state_dict(obj["scaler"])
    run.sampler.load_state_dict(obj["sampler"])
    run.state = TrainState(**obj["state"])
    run.state.batch_in_epoch = run.sampler.state_dict()["consumed"]
    set_rng_state(obj["rng"])
    old_ws = obj.get("world_size", 1)
    if old_ws != run.dist.world_size and run.dist.is_main:
        log.warning("resumed a world_size=%d run with world_size=%d: the sampler continues from the same "
                    "global position, batches are dealt anew", old_ws, run.dist.world_size)
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
    device = pick_device(cfg.train.device)
    info = init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    precision = pick_precision(cfg.train.precision, device)
    exp_dir = Path(cfg.train.exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)

    records = load_train_records(cfg)
    resume_path = ckpt.latest_checkpoint(exp_dir / "checkpoints")
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
    if resume_obj is None and not cmvn_path.exists():
        if info.is_main:
            estimate_cmvn(records, cfg, cfg.train.seed).to_file(cmvn_path)
        barrier(info)
    cmvn = GlobalCMVN.from_file(cmvn_path) if cmvn_path.exists() else None

    core = build_model(cfg, tokenizer.vocab_size, cmvn).to(device)
    model: torch.nn.Module = core
    if info.enabled:
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in core.modules()):
            core = torch.nn.SyncBatchNorm.convert_sync_batchnorm(core)
        model = torch.nn.parallel.DistributedDataParallel(
            core, device_ids=[device.index] if device.type == "cuda" else None)

    oc = cfg.optim
    decay, no_decay = [], []
    for n, p in core.named_parameters():
        (no_decay if p.ndim <= 1 or n.endswith(".bias") else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": oc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps,
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
                            world_size=info.world_size, rank=info.rank, max_batch_size=dc.max_batch_size)
    if sampler.num_filtered and info.is_main:
        log.info("%d utterances outside [%.1f, %.1f] s are not trained on", sampler.num_filtered,
                 dc.min_utt_duration, dc.max_utt_duration)
    augmenter = WaveAugmenter(dc.augment)
    dataset = AsrDataset(records, tokenizer, augmenter, seed=cfg.train.seed, normalize=normalize_text)

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
    run = setup(cfg)
    st = run.state
    nparams = sum(p.numel() for p in run.core.parameters())
    if run.dist.is_main:
        log.info("model: %s, %.2fM parameters, vocab %d, device %s, precision %s, world %d",
                 cfg.model.encoder.type, nparams / 1e6, run.tokenizer.vocab_size, run.device,
                 run.precision, run.dist.world_size)
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
    finally:
        if progress is not None:
            progress.close()
    if run.dist.is_main:
        log.info("training stopped: %s; %d steps, %.0f audio-seconds in %.0f s (%.1f audio-s/s), "
                 "%d non-finite skipped", reason, st.step, st.audio_seconds, st.train_seconds,
                 st.audio_seconds / max(1e-9, st.train_seconds), st.nonfinite_skipped)
    latest = ckpt.latest_checkpoint(run.exp_dir / "checkpoints")
    if latest is None or ckpt.CKPT_RE.match(latest.name) and int(ckpt.CKPT_RE.match(latest.name).group(1)) != st.step:
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
