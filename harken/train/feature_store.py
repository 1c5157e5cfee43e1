"""Fine-tuning the top of a pretrained encoder on a feature store (``train.feature_store: true``).

A frozen pretrained encoder gives the same hidden states for an utterance at every step, so
recomputing them each epoch is waste.  Here the frozen lower layers run **once** over the training
set (and once more per augmented view, ``train.feature_store_views``); their outputs are kept in
memory as float16, and only the top ``model.encoder.trainable_layers`` layers, the final norm and the
CTC output layer train, at the speed of a tiny model.  ``trainable_layers: 0`` trains the CTC head
alone on the frozen encoder's output.

It is an ordinary harken run otherwise: the same config file, data check, tokenizer, optimizer
groups (``WhisperEncoder.param_groups``: encoder layers at ``optim.lr x encoder_lr_scale x
layer_lr_decay ** depth``), LR schedule and clock (``optim.schedule_clock``), dev WER through the
Engine every ``train.eval_every`` steps, resumable checkpoints in ``exp_dir/checkpoints`` (the
store is rebuilt on resume: it is a cache, never state), and the same choice of ``best.pt`` at the
end (``trainer.select_best``): the final weights, the best step checkpoint, the average of the last
``train.average_last`` checkpoints and the EMA of the trained weights (``train.ema_decay``), each
scored on dev. The checkpoints hold every encoder weight, so ``harken eval / export / serve`` read
them unchanged.

Time masking on the stored states replaces SpecAugment on the input (the input is gone once
stored): ``model.encoder.mask_time_prob`` x T / 10 spans of up to 10 frames per utterance, the
wav2vec2 rule.  Waveform augmentation (``data.augment``) applies to the extra views only; view 0 is
the unaugmented audio.

Encoders that can be split declare ``lower(wave, lens, n)`` / ``upper(h, lens, n)`` (Whisper's do);
one that cannot is refused with a clear error.  Single process only (a store per rank is not worth
it at this size: the whole point is that the expensive part runs once).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from harken.config import ConfigError, ExperimentConfig, from_dict, save_config, to_dict
from harken.data.augment import WaveAugmenter
from harken.data.manifest import Record, read_manifest
from harken.models.build import build_model, param_groups
from harken.models.ctc import ctc_loss
from harken.text.normalize import normalize_text
from harken.train import checkpoint as ckpt
from harken.train.distributed import DistInfo, env_world
from harken.train.schedule import lr_factor, run_progress

log = logging.getLogger("harken")

MASK_SPAN = 10  # frames per time-mask span on the stored states


class StoreRun:
    """What ``harken train`` reports at the end (the fields the CLI reads from a trainer Run)."""

    def __init__(self, exp_dir: Path, state) -> None:
        self.exp_dir, self.state, self.dist = exp_dir, state, DistInfo()
        self.selection = None


def check_config(cfg: ExperimentConfig) -> tuple[int, int]:
    """(layers stored, layers trained); a ConfigError naming the setting otherwise."""
    from harken.models.registry import encoder_class

    ec = cfg.model.encoder
    _, world, _ = env_world()
    if world > 1:
        raise ConfigError("train.feature_store runs in one process (the frozen layers run once); start it "
                          "without torchrun, or set train.feature_store=false for distributed fine-tuning")
    cls = encoder_class(ec.type)
    if not (hasattr(cls, "lower") and hasattr(cls, "upper")):
        raise ConfigError(f"train.feature_store needs an encoder that can be split into stored lower layers and "
                          f"trained upper ones (type=whisper); the {ec.type} encoder cannot")
    if ec.trainable_layers < 0:
        raise ConfigError("train.feature_store needs model.encoder.trainable_layers >= 0: how many top layers "
                          "train (0 = the CTC head alone); the layers below are run once and stored")
    if cfg.optim.accum_steps != 1:
        raise ConfigError("train.feature_store does not accumulate gradients: set optim.accum_steps=1 and "
                          "size the batch with data.max_duration")
    return ec.num_layers - min(ec.trainable_layers, ec.num_layers), min(ec.trainable_layers, ec.num_layers)


def build_store(encoder, records: list[Record], n_frozen: int, augmenter: WaveAugmenter | None, seed: int,
                batch_seconds: float = 60.0, sample_rate: int = 16000) -> list[torch.Tensor | None]:
    """Hidden states after the first ``n_frozen`` layers, (T', D) float16, per record (None where the
    audio could not be read: counted by the caller).  Records run in batches of similar length;
    the encoder is exact under batching (padding is masked), so batching changes nothing. Without
    an augmenter, records of the same audio span (``data.train_repeat`` copies) share one tensor."""
    from harken.audio import AudioError, load_audio

    out: list[torch.Tensor | None] = [None] * len(records)
    same: dict[int, int] = {}  # record -> the earlier record with the same audio span (clean view only)
    if augmenter is None:
        first: dict[tuple, int] = {}
        for k, r in enumerate(records):
            same_as = first.setdefault((r.audio, r.offset, r.duration), k)
            if same_as != k:
                same[k] = same_as
    order = sorted((k for k in range(len(records)) if k not in same), key=lambda i: records[i].duration)
    i = 0
    with torch.inference_mode():
        while i < len(order):
            j, secs = i, 0.0
            while j < len(order) and (j == i or secs + records[order[j]].duration <= batch_seconds):
                secs += records[order[j]].duration
                j += 1
            idx, waves = [], []
            for k in order[i:j]:
                r = records[k]
                try:
                    w = load_audio(r.audio, sample_rate=sample_rate, offset=r.offset, duration=r.duration)
                except (AudioError, OSError, ValueError) as e:
                    log.warning("feature store: skipped %s (%s)", r.audio, e)
                    continue
                if augmenter is not None:
                    w = augmenter(w, np.random.default_rng([seed, k]))
                idx.append(k)
                waves.append(np.asarray(w, dtype=np.float32))
            i = j
            if not waves:
                continue
            x = torch.zeros(len(waves), max(len(w) for w in waves))
            for r, w in enumerate(waves):
                x[r, :len(w)] = torch.from_numpy(w)
            h, ol = encoder.lower(x, torch.tensor([len(w) for w in waves]), n_frozen)
            for r, k in enumerate(idx):
                out[k] = h[r, :int(ol[r])].to(torch.float16).clone()
    for k, src in same.items():
        out[k] = out[src]
    return out


def time_mask_(h: torch.Tensor, lens: torch.Tensor, prob: float, gen: torch.Generator) -> None:
    """Zero ``prob * T / MASK_SPAN`` random spans of up to MASK_SPAN frames in each row, in place."""
    if prob <= 0:
        return
    for r in range(h.shape[0]):
        t = int(lens[r])
        for _ in range(int(math.ceil(prob * t / MASK_SPAN))):
            w = int(torch.randint(1, MASK_SPAN + 1, (), generator=gen))
            s = int(torch.randint(0, max(1, t - w + 1), (), generator=gen))
            h[r, s:s + w] = 0


def make_batches(lengths: list[int], max_frames: int, max_batch: int, rng: random.Random) -> list[list[int]]:
    """Indices in batches of similar length whose padded size stays within ``max_frames``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i] + rng.random() * 20)
    batches, cur, cur_max = [], [], 0
    for i in order:
        t = lengths[i]
        if cur and (max(cur_max, t) * (len(cur) + 1) > max_frames or len(cur) >= max_batch):
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, t)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def train_feature_store(cfg: ExperimentConfig) -> StoreRun:
    from harken.config import validate
    from harken.evaluate import as_engine, decode_records, error_report
    from harken.train.trainer import (
        ETA_AFTER_STEPS,
        TrainState,
        check_training_data,
        ema_step_,
        eta_message,
        load_train_records,
        make_tokenizer,
        plan_message,
        seed_everything,
        select_best,
        write_average,
        write_ema_file,
    )

    cfg = validate(cfg)
    n_frozen, n_train = check_config(cfg)
    tc, oc, dc = cfg.train, cfg.optim, cfg.data
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    if tc.device not in ("auto", "cpu"):
        log.warning("train.feature_store runs on the CPU (train.device=%s is ignored)", tc.device)
    exp_dir = Path(tc.exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(tc.seed)
    records = check_training_data(cfg, load_train_records(cfg), exp_dir, DistInfo())
    ckpt.remove_stale_temps(exp_dir / "checkpoints")
    resume_path = ckpt.latest_checkpoint(exp_dir / "checkpoints")
    resume = ckpt.load_checkpoint(resume_path) if resume_path else None
    if resume is not None and to_dict(from_dict(ExperimentConfig, resume["config"]).model) != to_dict(cfg.model):
        raise ValueError(f"{resume_path}: the model config differs from the checkpoint's; use a new "
                         "train.exp_dir or the same model settings")
    tokenizer = make_tokenizer(cfg, records, exp_dir, resume, DistInfo())
    core = build_model(cfg, tokenizer.vocab_size)
    enc = core.encoder
    sr = int(getattr(enc, "sample_rate", 16000))
    st = TrainState()
    if resume is not None:
        core.load_state_dict(resume["model"])
        st = TrainState(**resume["state"])
    save_config(cfg, exp_dir / "config.yaml")

    # -- the store
    t0 = time.time()
    core.eval()
    views = [None] + [WaveAugmenter(dc.augment) for _ in range(tc.feature_store_views - 1)]
    feats: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    dropped = {"unreadable": 0, "too_short_for_ctc": 0, "no_tokens": 0}
    for v, aug in enumerate(views):
        store = build_store(enc, records, n_frozen, aug if aug is not None and aug.active else None,
                            tc.seed + 7919 * v, sample_rate=sr)
        for r, h in zip(records, store):
            if h is None:
                dropped["unreadable"] += 1
                continue
            ids = tokenizer.encode(normalize_text(r.text))
            if not ids:
                dropped["no_tokens"] += 1
            elif h.shape[0] < len(ids):
                dropped["too_short_for_ctc"] += 1
            else:
                feats.append(h)
                targets.append(torch.tensor(ids, dtype=torch.long))
    if not feats:
        raise ValueError(f"the feature store holds no usable utterance ({dropped})")
    frames = sum(f.shape[0] for f in feats)
    stored_mb = sum(f.numel() for f in {id(f): f for f in feats}.values()) * 2 / 1e6  # shared copies once
    log.info("feature store: %d view(s) x %d utterances -> %d kept (%s), %d frames, %.0f MB, %d of %d layers "
             "stored, %.1f s", len(views), len(records), len(feats), ", ".join(f"{k} {n}" for k, n in dropped.items()),
             frames, stored_mb, n_frozen, len(enc.layers), time.time() - t0)

    # -- optimizer, schedule
    groups = param_groups(core, oc.lr, oc.weight_decay)
    opt = torch.optim.AdamW(groups, lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps)
    base_lrs = [g["lr"] for g in groups]
    if resume is not None and "optimizer" in resume:
        opt.load_state_dict(resume["optimizer"])
    trainable = [p for p in core.parameters() if p.requires_grad]
    # EMA of the trained weights (train.ema_decay > 0), fp32, kept in the step checkpoints for resuming
    ema: dict[str, torch.Tensor] | None = None
    if tc.ema_decay > 0:
        ema = {n: p.detach().float().clone() for n, p in core.named_parameters() if p.requires_grad}
        if resume is not None and resume.get("ema") is not None:
            ema = {k: v.float() for k, v in resume["ema"].items()}
        elif resume is not None:
            log.warning("%s has no EMA of the weights (train.ema_decay was 0): the EMA starts from the resumed "
                        "weights", resume_path)
    log.info("training %d of %d layers + the CTC head: %.2fM of %.2fM parameters", n_train, len(enc.layers),
             sum(p.numel() for p in trainable) / 1e6, sum(p.numel() for p in core.parameters()) / 1e6)
    fps = 1.0 / float(enc.frame_seconds)
    max_frames = int(dc.max_duration * fps)
    lengths = [f.shape[0] for f in feats]
    gen = torch.Generator().manual_seed(tc.seed + st.step)
    rng = random.Random(tc.seed + st.epoch)
    dev = read_manifest(dc.dev)[: tc.dev_max_utts] if dc.dev else []
    elapsed_base, t_start = st.elapsed_seconds, time.time()
    epoch_batches = len(make_batches(lengths, max_frames, dc.max_batch_size or 10 ** 9, random.Random(0)))
    plan_message(cfg, st, epoch_batches, unit="batches")
    start_step, start_audio = st.step, st.audio_seconds

    def minutes() -> float:
        return (elapsed_base + time.time() - t_start) / 60.0

    last_dev: dict = {"step": -1, "rep": None}  # the newest dev report, so the final step is scored once

    def dev_report() -> dict:
        hyps = decode_records(as_engine(core.eval(), tokenizer, cfg), dev, max_duration=dc.max_duration)
        return error_report([normalize_text(r.text) for r in dev], hyps).as_dict()

    def evaluate() -> dict | None:
        if not dev:
            return None
        rep = dev_report()
        last_dev.update(step=st.step, rep=rep)
        log.info("step %d dev WER %.2f%% CER %.2f%%", st.step, 100 * rep["wer"], 100 * rep["cer"])
        if rep["wer"] < st.best_wer:
            st.best_wer, st.best_cer, st.best_step = rep["wer"], rep["cer"], st.step
            ckpt.atomic_save(model_only(), exp_dir / "best.pt")
        return rep

    def model_only(state_dict: dict | None = None) -> dict:
        from harken.train.trainer import CHECKPOINT_VERSION

        return {"version": CHECKPOINT_VERSION, "config": to_dict(cfg),
                "model": core.state_dict() if state_dict is None else state_dict,
                "tokenizer": tokenizer.to_dict(), "step": st.step}

    def save() -> None:
        st.elapsed_seconds = elapsed_base + time.time() - t_start
        obj = model_only()
        obj.update({"optimizer": opt.state_dict(), "state": asdict(st)})
        if ema is not None:
            obj["ema"] = ema
        path = exp_dir / "checkpoints" / f"step-{st.step:08d}.pt"
        ckpt.atomic_save(obj, path)
        ckpt.prune_checkpoints(path.parent, tc.keep_last)
        log.info("saved %s", path)

    def done() -> str | None:
        if st.step >= tc.max_steps:
            return f"max_steps={tc.max_steps} reached"
        if tc.max_minutes is not None and minutes() >= tc.max_minutes:
            return f"max_minutes={tc.max_minutes:g} reached"
        if st.epoch >= tc.max_epochs:
            return f"max_epochs={tc.max_epochs} reached"
        return None

    reason = done()
    last_saved = st.step
    loss_sum, loss_n, t_log = 0.0, 0, time.time()
    while reason is None:
        core.train()
        if n_train < len(enc.layers):  # the stored part is frozen: keep its dropout off too
            for layer in list(enc.layers)[:n_frozen]:
                layer.eval()
        for b in make_batches(lengths, max_frames, dc.max_batch_size or 10 ** 9, rng):
            p, by = run_progress(st.step + 1, tc.max_steps, minutes(), tc.max_minutes, oc.schedule_clock)
            f = lr_factor(st.step, oc.schedule, oc.warmup_steps, tc.max_steps, oc.min_lr_ratio,
                          progress=p if by == "time" else None)
            for g, lr0 in zip(groups, base_lrs):
                g["lr"] = lr0 * f
            t_max = max(lengths[i] for i in b)
            h = torch.zeros(len(b), t_max, feats[b[0]].shape[1])
            for r, i in enumerate(b):
                h[r, :lengths[i]] = feats[i].float()
            ol = torch.tensor([lengths[i] for i in b])
            time_mask_(h, ol, enc.cfg.mask_time_prob, gen)
            hid, _ = enc.upper(h, ol, n_frozen)
            lp = torch.log_softmax(core.output(enc.out_dropout(hid)).float(), dim=-1)
            tg = torch.nn.utils.rnn.pad_sequence([targets[i] for i in b], batch_first=True)
            tl = torch.tensor([len(targets[i]) for i in b])
            loss = ctc_loss(lp, ol, tg, tl, reduction="sum") / len(b)
            if not torch.isfinite(loss):
                st.nonfinite_skipped += 1
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if oc.clip_grad_norm and oc.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, oc.clip_grad_norm)
            opt.step()
            st.step += 1
            if ema is not None:
                ema_step_(ema, core, tc.ema_decay, st.step)
            st.audio_seconds += float(ol.sum()) / fps
            if st.step - start_step == ETA_AFTER_STEPS:
                wall = time.time() - t_start
                eta_message(cfg, st, ETA_AFTER_STEPS, wall, minutes(), epoch_batches,
                            (st.audio_seconds - start_audio) / max(1e-9, wall))
            loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
            if st.step % tc.log_every == 0:
                log.info("step %d loss %.3f lr %.2e (%.2f steps/s, %.1f min)", st.step, loss_sum / loss_n,
                         groups[0]["lr"], loss_n / max(1e-9, time.time() - t_log), minutes())
                loss_sum, loss_n, t_log = 0.0, 0, time.time()
            if tc.checkpoint_every and st.step % tc.checkpoint_every == 0:
                save()
                last_saved = st.step
            if tc.eval_every and st.step % tc.eval_every == 0:
                evaluate()
                core.train()
                for layer in list(enc.layers)[:n_frozen]:
                    layer.eval()
            reason = done()
            if reason is not None:
                break
        else:
            st.epoch += 1
            reason = reason or done()
    st.train_seconds = st.elapsed_seconds = elapsed_base + time.time() - t_start
    log.info("training stopped: %s; %d steps, %d epochs, %.1f min", reason, st.step, st.epoch, minutes())
    if last_saved != st.step:
        save()
    info = {"feature_store": {"views": len(views), "utterances": len(feats), "frames": frames, "dropped": dropped,
                              "stored_layers": n_frozen, "trained_layers": n_train}}
    run = StoreRun(exp_dir, st)
    # the written candidates, as in the ordinary loop: the average of the last step checkpoints, the EMA
    written = {"avg": write_average(exp_dir, tc.average_last, model_only),
               "ema": write_ema_file(exp_dir, core, ema, tc.ema_decay, model_only)}
    if not dev:  # nothing to choose by: the final weights
        ckpt.atomic_save(model_only(), exp_dir / "best.pt")
        sel = {"chosen": "final", "step": st.step, "dev_wer": None, "metric": None, **info}
        (exp_dir / "selection.json").write_text(json.dumps(sel, indent=2) + "\n")
        run.selection = sel
        return run
    final_rep = last_dev["rep"] if last_dev["step"] == st.step else evaluate()
    run.selection = select_best(exp_dir, st, final_rep, written, core, dev_report, model_only, len(dev), info)
    return run
