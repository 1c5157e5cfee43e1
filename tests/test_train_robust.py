"""Training that does not depend on the host or on clean data: the schedule anneals inside a time
budget, bad records are found before any work, unreadable files met later are skipped and counted,
a stale cmvn.json is never reused, persistent loader workers still reshuffle, EMA weights resume
exactly, and best.pt is chosen among everything the run wrote. Real synthesized speech throughout."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from harken.audio import AudioError, load_audio, save_wav
from harken.config import ConfigError, load_config
from harken.data.dataset import AsrDataset, check_records, make_loader
from harken.data.manifest import ManifestError, Record, read_manifest, write_manifest
from harken.data.sampler import BucketSampler
from harken.features import SpecAugment, SpecAugmentConfig
from harken.train import checkpoint as ckpt
from harken.train.distributed import init_distributed
from harken.train.schedule import lr_factor, run_progress
from harken.train.trainer import (
    ema_decay_at,
    group_values,
    prepare_cmvn,
    sampling_weights,
    setup,
    stop_reason,
    train,
    train_one_epoch,
)

TINY = [
    "model.encoder.d_model=32", "model.encoder.num_layers=1", "model.encoder.num_heads=2",
    "model.encoder.ff_dim=64", "model.encoder.conv_kernel=7", "model.encoder.subsampling_channels=8",
    "data.num_workers=0", "data.max_duration=12", "train.progress=false", "train.tensorboard=false",
    "train.log_every=1", "train.average_last=0", "data.augment.speed_factors=[]", "data.augment.noise_prob=0",
    "data.augment.volume_prob=0", "data.cmvn_utts=4", "train.num_threads=1", "data.dev=null",
]


def copy_corpus(corpus: Path, n: int, tmp: Path) -> list[Record]:
    """The first ``n`` training records with their audio copied under ``tmp`` (the session corpus is
    shared: tests that damage files damage copies)."""
    out = []
    (tmp / "wav").mkdir(parents=True, exist_ok=True)
    for r in read_manifest(corpus / "train.jsonl")[:n]:
        dst = tmp / "wav" / Path(r.audio).name
        shutil.copyfile(r.audio, dst)
        out.append(Record(**{**r.__dict__, "audio": str(dst)}))
    return out


def cfg_for(man, exp, *extra):
    return load_config(None, TINY + [f"data.train=[{man}]", f"train.exp_dir={exp}", *extra])


# ------------------------------------------------------------------------------------ schedule
def test_progress_schedule_anneals_inside_the_time_budget():
    # the step clock is the plain step schedule
    for s in (0, 5, 50, 99, 150):
        p, by = run_progress(s + 1, 100, 0.0, None, "progress")
        assert by == "steps" and lr_factor(s, "cosine", 10, 100, 0.05, progress=p) == pytest.approx(
            lr_factor(s, "cosine", 10, 100, 0.05))
    # a slow host: 30 of 1000 steps done when the 10-minute budget is spent -> the floor all the same
    p, by = run_progress(30, 1000, 10.0, 10.0, "progress")
    assert (p, by) == (1.0, "time")
    assert lr_factor(29, "cosine", 10, 1000, 0.05, progress=p) == pytest.approx(0.05)
    assert lr_factor(29, "cosine", 10, 1000, 0.05) > 0.9  # by steps it would hardly have decayed
    # "steps" ignores the clock; the time term counts only with a budget
    assert run_progress(30, 1000, 10.0, 10.0, "steps") == (0.03, "steps")
    assert run_progress(30, 1000, 10.0, None, "progress") == (0.03, "steps")
    # time runs ahead during warmup: warmup x cosine, continuous and never above the warmup ramp
    f = [lr_factor(s, "cosine", 10, 1000, 0.05, progress=min(1.0, s / 8)) for s in range(12)]
    assert all(a <= min(1.0, (s + 1) / 10) + 1e-12 for s, a in enumerate(f))
    assert f[-1] == pytest.approx(0.05)
    after = [lr_factor(20, "cosine", 10, 1000, 0.0, progress=q) for q in np.linspace(0.02, 1, 50)]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))  # monotone down after warmup


def test_time_budget_run_ends_at_the_lr_floor_and_the_clock_survives_resume(tiny_corpus, tmp_path, caplog):
    corpus, _ = tiny_corpus
    man = tmp_path / "train.jsonl"
    write_manifest(man, read_manifest(corpus / "train.jsonl")[:12])
    common = ["train.max_steps=100000", "optim.schedule=cosine", "optim.warmup_steps=2", "optim.lr=1e-3",
              "optim.min_lr_ratio=0.05", "train.max_minutes=0.04", "train.checkpoint_every=1000"]
    with caplog.at_level(logging.INFO, logger="harken"):
        run = train(cfg_for(man, tmp_path / "e", *common))
    assert 1 <= run.state.step < 1000
    assert run.scheduler.get_last_lr()[0] == pytest.approx(1e-3 * 0.05)
    assert "reached max_minutes" in caplog.text and "set by the time clock" in caplog.text
    assert "max_steps 100000 (about" in caplog.text and "budget 0.04 min" in caplog.text
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "e" / "checkpoints"))["state"]
    assert saved["elapsed_seconds"] >= 0.04 * 60
    # the budget is the run's, across restarts: a resumed run agrees at its first step that time is up
    again = train(cfg_for(man, tmp_path / "e", *common))
    assert again.state.step == run.state.step + 1
    assert again.state.elapsed_seconds > saved["elapsed_seconds"]
    assert again.scheduler.get_last_lr()[0] == pytest.approx(1e-3 * 0.05)


# ------------------------------------------------------------------------------------ the data check
def test_bad_records_are_reported_and_left_out_before_any_work(tiny_corpus, tmp_path, caplog):
    corpus, _ = tiny_corpus
    recs = copy_corpus(corpus, 8, tmp_path)
    w = load_audio(recs[0].audio)
    save_wav(tmp_path / "trunc.wav", w[:28])  # a 2.5 s record whose file holds 28 samples
    save_wav(tmp_path / "short.wav", w[:1600])
    save_wav(tmp_path / "long.wav", np.concatenate([w, w, w, w]))
    (tmp_path / "garbage.wav").write_bytes(b"RIFF....WAVEfmt garbage" * 20)
    long_s = 4 * len(w) / 16000
    bad = [Record("missing", str(tmp_path / "nope.wav"), 2.0, "a b"),
           Record("trunc", str(tmp_path / "trunc.wav"), 2.5, "a b"),
           Record("garbage", str(tmp_path / "garbage.wav"), 2.0, "a b"),
           Record("short", str(tmp_path / "short.wav"), 0.1, "a"),
           Record("long", str(tmp_path / "long.wav"), long_s, "a b c"),
           # a segment that runs past the end of its file
           Record("seg", recs[1].audio, 1.0, "a", offset=recs[1].duration)]
    man = tmp_path / "train.jsonl"
    write_manifest(man, recs + bad)
    exp = tmp_path / "e"
    with caplog.at_level(logging.INFO, logger="harken"):
        run = setup(cfg_for(man, exp, f"data.max_utt_duration={long_s - 1:.2f}", "train.max_steps=1"))
    assert sorted(r.id for r in run.dataset.records) == sorted(r.id for r in recs)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data check:")]
    assert len(lines) == 1
    assert ("14 training records, 8 kept, 6 left out (missing 1, unreadable 1, duration_mismatch 2, too_short 1, "
            "too_long 1)") in lines[0] and "nope.wav" in lines[0]
    rows = [json.loads(x) for x in (exp / "excluded.jsonl").read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in rows} == {"missing": "missing", "trunc": "duration_mismatch",
                                                   "garbage": "unreadable", "short": "too_short",
                                                   "long": "too_long", "seg": "duration_mismatch"}
    assert next(r for r in rows if r["id"] == "trunc")["audio_duration"] == pytest.approx(28 / 16000, abs=1e-4)
    # two records on one file at offset 0 are segments; a whole-file record must match its file
    kept, ex = check_records([Record("x", recs[2].audio, recs[2].duration * 0.5),
                              Record("y", recs[2].audio, recs[2].duration * 0.5)])
    assert len(kept) == 2 and not ex
    kept, ex = check_records([Record("z", recs[2].audio, recs[2].duration * 0.5)])
    assert not kept and ex[0]["reason"] == "duration_mismatch"
    # nothing left: one line
    write_manifest(man, bad)
    with pytest.raises(ManifestError, match="every one of the 6 training records was left out") as e:
        setup(cfg_for(man, tmp_path / "e2", f"data.max_utt_duration={long_s - 1:.2f}"))
    assert "\n" not in str(e.value)


def test_missing_noise_folder_is_one_clear_line(tiny_corpus, tmp_path):
    corpus, _ = tiny_corpus
    man = tmp_path / "train.jsonl"
    write_manifest(man, read_manifest(corpus / "train.jsonl")[:4])
    with pytest.raises(ConfigError, match=r"data.augment.noise_dir=nowhere/noise: no such folder .*working "
                                          r"directory.*noise_prob=0") as e:
        setup(cfg_for(man, tmp_path / "e", "data.augment.noise_dir=nowhere/noise", "data.augment.noise_prob=0.3"))
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no audio"):
        setup(cfg_for(man, tmp_path / "e", f"data.augment.noise_dir={tmp_path / 'empty'}",
                      "data.augment.noise_prob=0.3"))


# ------------------------------------------------------------------------------------ bad audio mid-training
def test_a_file_broken_during_training_is_skipped_counted_and_too_many_stop(tiny_corpus, tmp_path, caplog):
    corpus, _ = tiny_corpus
    recs = copy_corpus(corpus, 24, tmp_path)  # one bad file is 4 % of an epoch
    man = tmp_path / "train.jsonl"
    write_manifest(man, recs)
    # a loader worker meets the damaged file: the worker lives on, the utterance is skipped and named
    run = setup(cfg_for(man, tmp_path / "e", "data.num_workers=1", "train.max_epochs=2", "train.max_steps=1000",
                        "train.checkpoint_every=1000", "train.log_every=1000"))
    Path(recs[3].audio).write_bytes(b"RIFF....WAVEfmt garbage" * 20)  # overwritten after the check
    pids = []
    with caplog.at_level(logging.WARNING, logger="harken"):
        while stop_reason(run) is None:
            train_one_epoch(run)
            pids.append([w.pid for w in run.loader._iterator._workers])
    assert run.state.epoch == 2 and run.state.unreadable_skipped == 2  # once per epoch
    assert pids[0] == pids[1]  # the trainer's loader worker lives through both epochs
    assert recs[3].id in caplog.text
    assert any("skipping unreadable utterance" in r.getMessage() and recs[3].audio in r.getMessage()
               for r in caplog.records)
    run.loader = None
    # a batch of nothing but unreadable utterances gets the next readable one (no rank gets an empty batch)
    ds = AsrDataset(recs, skip_unreadable=True)
    b = ds[(0, [3])]
    assert b.ids == [recs[4].id] and b.failed[0][0] == recs[3].id
    with pytest.raises(AudioError, match="unreadable WAV"):  # evaluation paths still raise
        AsrDataset(recs)[(0, [3])]
    # more than 5 % of an epoch unreadable: the data is broken, one line
    run = setup(cfg_for(man, tmp_path / "f", "train.max_steps=1000"))
    for r in recs[4:6]:  # with recs[3], 3 of 24
        Path(r.audio).write_bytes(b"RIFF....WAVEfmt garbage" * 20)
    with pytest.raises(ManifestError, match=r"could not be read \(more than 5%\)") as e:
        while stop_reason(run) is None:
            train_one_epoch(run)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ CMVN
def test_stale_cmvn_is_recomputed_and_a_mismatched_one_refused(tiny_corpus, tmp_path, caplog):
    corpus, _ = tiny_corpus
    man = tmp_path / "train.jsonl"
    recs = read_manifest(corpus / "train.jsonl")[:8]
    write_manifest(man, recs)
    info = init_distributed(torch.device("cpu"))
    exp = tmp_path / "e"
    exp.mkdir()
    cfg = cfg_for(man, exp)
    with caplog.at_level(logging.INFO, logger="harken"):
        first = prepare_cmvn(cfg, recs, exp, info, resuming=False)
        stored = json.loads((exp / "cmvn.json").read_text())
        assert stored["fingerprint"]["manifests"][0]["path"] == os.path.abspath(man)
        assert stored["fbank"]["num_mel_bins"] == 80
        caplog.clear()
        again = prepare_cmvn(cfg, recs, exp, info, resuming=False)
        assert "reusing" in caplog.text and torch.equal(first.mean, again.mean)
        # the training data changed: recomputed, with a warning
        write_manifest(man, recs[:4])
        caplog.clear()
        fresh = prepare_cmvn(cfg, recs[:4], exp, info, resuming=False)
        assert "stale" in caplog.text and "training manifests changed" in caplog.text
        assert not torch.equal(first.mean, fresh.mean)
        # other fbank settings stale it too; a resumed model only warns (its CMVN is in the checkpoint)
        caplog.clear()
        prepare_cmvn(cfg_for(man, exp, "model.fbank.frame_length_ms=20"), recs[:4], exp, info, resuming=True)
        assert "model.fbank changed" in caplog.text and "keeps the CMVN" in caplog.text
    # a user-supplied CMVN computed with another fbank: one line
    with pytest.raises(ConfigError, match=r"data.cmvn=.*other fbank settings.*frame_length_ms 25.0 vs 20.0"):
        prepare_cmvn(cfg_for(man, exp, f"data.cmvn={exp / 'cmvn.json'}", "model.fbank.frame_length_ms=20"),
                     recs, exp, info, resuming=False)
    with pytest.raises(ConfigError, match="has 80 bins but model.fbank.num_mel_bins is 40"):
        prepare_cmvn(cfg_for(man, exp, f"data.cmvn={exp / 'cmvn.json'}", "model.fbank.num_mel_bins=40"),
                     recs, exp, info, resuming=False)


# ------------------------------------------------------------------------------------ loader, sampler, masks
def test_persistent_workers_stay_and_every_epoch_reshuffles(tiny_corpus):
    corpus, _ = tiny_corpus
    recs = read_manifest(corpus / "train.jsonl")[:12]
    sampler = BucketSampler([r.duration for r in recs], 8, seed=3, num_buckets=1)
    loader = make_loader(AsrDataset(recs), sampler, num_workers=1, prefetch_factor=2)
    orders, pids = [], []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append([b.ids for b in loader])
        pids.append([w.pid for w in loader._iterator._workers])
    assert pids[0] == pids[1] == pids[2]  # started once, not once per epoch
    assert len({json.dumps(o) for o in orders}) == 3  # yet a new order every epoch
    assert all(sorted(sum(o, [])) == sorted(r.id for r in recs) for o in orders)
    del loader


def test_curriculum_goes_short_to_long_then_shuffles_and_resumes():
    d = np.random.default_rng(0).uniform(0.5, 12.0, 400)
    s = BucketSampler(d, 40, seed=5, curriculum_epochs=1, num_buckets=10)
    first = list(s)  # epoch 0: curriculum
    second = list(s)  # epoch 1: shuffled
    means0 = [d[b].mean() for b in first]
    means1 = [d[b].mean() for b in second]
    rank = np.argsort(np.argsort(means0))
    assert np.corrcoef(rank, np.arange(len(rank)))[0, 1] > 0.95
    assert abs(np.corrcoef(np.argsort(np.argsort(means1)), np.arange(len(means1)))[0, 1]) < 0.5
    plain = BucketSampler(d, 40, seed=5, num_buckets=10)
    plain.set_epoch(1)
    assert list(plain) == second  # later epochs as without a curriculum
    # mid-epoch resume inside the curriculum continues with the same batches
    a = BucketSampler(d, 40, seed=5, curriculum_epochs=1, num_buckets=10)
    it = iter(a)
    head = [next(it) for _ in range(5)]
    b = BucketSampler(d, 40, seed=5, curriculum_epochs=1, num_buckets=10)
    b.load_state_dict(a.state_dict())
    assert head + list(b) == first


def test_specaugment_ramp_scales_masks_and_leaves_inference_alone():
    x = torch.randn(4, 200, 80) + 5.0
    lens = torch.full((4,), 200)
    cfg = SpecAugmentConfig(num_freq_masks=2, max_freq_width=20, num_time_masks=2, max_time_width=40,
                            max_time_ratio=0.2, ramp_steps=100)
    sa = SpecAugment(cfg).train()

    def masked(strength: float) -> float:
        sa.set_progress(strength)
        torch.manual_seed(0)
        return sum(float((sa(x, lens) == 0).float().mean()) for _ in range(20)) / 20

    none, half, full = masked(0.0), masked(0.5), masked(1.0)
    assert none == 0.0 and 0 < half < full
    sa.set_progress(0.0)
    ref = SpecAugment(SpecAugmentConfig(num_freq_masks=2, max_freq_width=20, num_time_masks=2, max_time_width=40,
                                        max_time_ratio=0.2)).train()
    torch.manual_seed(1)
    a = ref(x, lens)
    sa.set_progress(1.0)
    torch.manual_seed(1)
    assert torch.equal(a, sa(x, lens))  # at full strength exactly the unramped masks
    assert sa.state_dict() == {} and torch.equal(sa.eval()(x, lens), x)


def test_group_weighting_by_any_manifest_field():
    recs = [Record(f"u{i}", "a.wav", 1.0, "a", speaker=f"s{i % 2}", extra={"engine": "espeak" if i < 9 else "piper"})
            for i in range(12)]
    assert group_values(recs, "engine") == ["espeak"] * 9 + ["piper"] * 3
    assert group_values(recs, "speaker")[:3] == ["s0", "s1", "s0"]
    info = init_distributed(torch.device("cpu"))
    w = sampling_weights(load_config(None, ["data.group_weighting=inverse", "data.group_by=engine"]), recs, info)
    assert w[0] == pytest.approx(1.0) and w[-1] == pytest.approx(3.0)
    with pytest.raises(ConfigError, match="data.group_by=accent: no training record has a value.*engine"):
        sampling_weights(load_config(None, ["data.group_weighting=inverse", "data.group_by=accent"]), recs, info)


# ------------------------------------------------------------------------------------ EMA and best.pt
def test_ema_resumes_exactly_and_best_is_chosen_among_all_candidates(tiny_corpus, tmp_path):
    corpus, _ = tiny_corpus
    man = tmp_path / "train.jsonl"
    write_manifest(man, read_manifest(corpus / "train.jsonl")[:12])
    common = ["train.ema_decay=0.9", "train.checkpoint_every=2", "train.keep_last=5",
              "model.specaug.ramp_steps=3", "data.curriculum_epochs=1", "optim.warmup_steps=2"]
    # a straight run and a resumed one: the same EMA (the EMA, the ramp and the curriculum all resume)
    train(cfg_for(man, tmp_path / "a", "train.max_steps=4", *common))
    train(cfg_for(man, tmp_path / "b", "train.max_steps=2", *common))
    train(cfg_for(man, tmp_path / "b", "train.max_steps=4", *common))
    ea = ckpt.load_checkpoint(tmp_path / "a" / "checkpoints" / "step-00000004.pt")
    eb = ckpt.load_checkpoint(tmp_path / "b" / "checkpoints" / "step-00000004.pt")
    assert ea["ema"].keys() == eb["ema"].keys()
    assert all(torch.equal(ea["ema"][k], eb["ema"][k]) for k in ea["ema"])
    assert any(not torch.equal(ea["ema"][k], ea["model"][k].float()) for k in ea["ema"])
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1) and ema_decay_at(0.9, 10**6) == 0.9
    # with a dev set: final, avg, EMA and the best step compete for best.pt
    run = train(cfg_for(man, tmp_path / "c", "train.max_steps=4", "train.average_last=2", "train.eval_every=2",
                        f"data.dev={corpus / 'dev.jsonl'}", "train.dev_max_utts=4", *common))
    exp = tmp_path / "c"
    sel = json.loads((exp / "selection.json").read_text())
    names = {c["name"] for c in sel["candidates"]}
    assert {"final", "avg", "ema"} <= names
    win = min(sel["candidates"], key=lambda c: (c["wer"], c["cer"]))
    assert (win["wer"], win["cer"]) == next((c["wer"], c["cer"]) for c in sel["candidates"]
                                            if c["name"] == sel["chosen"])
    best = ckpt.load_checkpoint(exp / "best.pt")
    assert best.get("selected", "best_step") == sel["chosen"]  # the best step's best.pt is already in place
    chosen = ckpt.load_checkpoint(sel["chosen_path"])["model"]
    assert all(torch.equal(best["model"][k], chosen[k]) for k in chosen)
    if sel["chosen"] != "best_step" and any(c["name"] == "best_step" for c in sel["candidates"]):
        assert (exp / "best_step.pt").exists()  # the loser is kept beside it
    assert run.selection == sel
    from harken.recognizer import Recognizer

    rec = Recognizer.load(exp / "ema.pt")  # a normal checkpoint, like avg.pt
    assert isinstance(rec.transcribe(read_manifest(corpus / "dev.jsonl")[0].audio).text, str)
