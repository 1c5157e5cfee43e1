"""Training on real synthesized speech: overfitting, exact resume, checkpoint safety, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harken.config import load_config
from harken.data.manifest import read_manifest, write_manifest
from harken.evaluate import decode_records, error_report
from harken.recognizer import Recognizer
from harken.text.normalize import normalize_text
from harken.train import checkpoint as ckpt
from harken.train.trainer import train

TINY = [
    "model.encoder.d_model=64", "model.encoder.num_layers=2", "model.encoder.num_heads=2",
    "model.encoder.ff_dim=128", "model.encoder.conv_kernel=7", "model.encoder.subsampling_channels=32",
    "data.num_workers=0", "data.max_duration=40", "train.progress=false", "train.tensorboard=false",
    "train.log_every=1", "train.average_last=0", "data.augment.speed_factors=[]",
    "data.augment.noise_prob=0", "data.augment.volume_prob=0",
]


def subset(corpus: Path, n: int, tmp: Path) -> Path:
    recs = read_manifest(corpus / "train.jsonl")[:n]
    out = tmp / f"train{n}.jsonl"
    write_manifest(out, recs)
    return out


def cfg_for(train_manifest, exp_dir, *extra):
    return load_config(None, TINY + [f"data.train=[{train_manifest}]", "data.dev=null",
                                     f"train.exp_dir={exp_dir}", *extra])


def params(path):
    return ckpt.load_checkpoint(path)["model"]


def test_tiny_model_overfits_synthesized_speech_to_wer_zero(tiny_corpus, tmp_path):
    corpus, _ = tiny_corpus
    man = subset(corpus, 6, tmp_path)
    cfg = cfg_for(man, tmp_path / "exp", "train.max_steps=600", "optim.lr=3e-3", "optim.warmup_steps=50",
                  "optim.schedule=constant", "model.encoder.dropout=0.0", "model.specaug.num_time_masks=0",
                  "model.specaug.num_freq_masks=0", "train.checkpoint_every=600", "data.max_duration=100",
                  "model.encoder.d_model=96", "model.encoder.ff_dim=256")
    run = train(cfg)
    recs = read_manifest(man)
    rec = Recognizer.load(ckpt.latest_checkpoint(tmp_path / "exp" / "checkpoints"))
    hyps = decode_records(rec, recs)
    refs = [normalize_text(r.text) for r in recs]
    rep = error_report(refs, hyps)
    assert rep.wer == 0.0, list(zip(refs, hyps))
    assert run.state.nonfinite_skipped == 0
    # the Python API agrees with batch decoding, and gives word times inside the audio
    from harken.runtime import DecodeOptions

    t = rec.transcribe(recs[0].audio, options=DecodeOptions(word_timestamps=True))
    assert t.text == refs[0]
    assert [w.word for w in t.words] == refs[0].split()
    assert all(0 <= w.start < w.end <= t.duration + 0.05 for w in t.words)


def test_resume_equals_straight_training(tiny_corpus, tmp_path):
    corpus, _ = tiny_corpus
    man = subset(corpus, 24, tmp_path)
    common = ["optim.warmup_steps=4", "train.checkpoint_every=3", "data.max_duration=30",
              "data.augment.speed_factors=[0.9,1.0,1.1]", "data.augment.volume_prob=0.5",
              "model.encoder.dropout=0.1", "train.keep_last=10"]
    straight = train(cfg_for(man, tmp_path / "a", "train.max_steps=8", *common))
    assert straight.state.epoch >= 1  # the run crosses an epoch boundary
    train(cfg_for(man, tmp_path / "b", "train.max_steps=3", *common))
    resumed = train(cfg_for(man, tmp_path / "b", "train.max_steps=8", *common))
    assert resumed.state.step == 8
    pa = params(tmp_path / "a" / "checkpoints" / "step-00000008.pt")
    pb = params(tmp_path / "b" / "checkpoints" / "step-00000008.pt")
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    oa = ckpt.load_checkpoint(tmp_path / "a" / "checkpoints" / "step-00000008.pt")["optimizer"]
    ob = ckpt.load_checkpoint(tmp_path / "b" / "checkpoints" / "step-00000008.pt")["optimizer"]
    for k in oa["state"]:
        assert torch.equal(oa["state"][k]["exp_avg_sq"], ob["state"][k]["exp_avg_sq"])


def test_resume_with_dataloader_workers(tiny_corpus, tmp_path):
    corpus, _ = tiny_corpus
    man = subset(corpus, 24, tmp_path)
    common = ["optim.warmup_steps=4", "train.checkpoint_every=2", "data.max_duration=15",
              "data.num_workers=1", "data.augment.speed_factors=[0.9,1.0,1.1]"]
    train(cfg_for(man, tmp_path / "a", "train.max_steps=4", *common))
    train(cfg_for(man, tmp_path / "b", "train.max_steps=2", *common))
    train(cfg_for(man, tmp_path / "b", "train.max_steps=4", *common))
    pa = params(tmp_path / "a" / "checkpoints" / "step-00000004.pt")
    pb = params(tmp_path / "b" / "checkpoints" / "step-00000004.pt")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_half_written_checkpoint_is_never_picked(tmp_path):
    d = tmp_path / "checkpoints"
    ckpt.atomic_save({"x": torch.ones(3)}, d / "step-00000010.pt")
    (d / ".step-00000020.pt.tmp123").write_bytes(b"\x80\x02partial")  # a save killed mid-write
    (d / "step-00000030.pt").write_bytes(b"garbage")  # damaged after the rename
    assert ckpt.latest_checkpoint(d).name == "step-00000010.pt"


def test_changed_model_config_refuses_to_resume(tiny_corpus, tmp_path):
    corpus, _ = tiny_corpus
    man = subset(corpus, 8, tmp_path)
    train(cfg_for(man, tmp_path / "e", "train.max_steps=1", "train.checkpoint_every=1"))
    with pytest.raises(ValueError, match="model config differs"):
        train(cfg_for(man, tmp_path / "e", "train.max_steps=2", "model.encoder.num_layers=3"))


def test_cli_train_eval_transcribe(tiny_corpus, tmp_path):
    corpus, _ = tiny_corpus
    exe = [sys.executable, "-m", "harken.cli"]
    exp = tmp_path / "cli"
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text("train:\n  max_steps: 3\n  checkpoint_every: 2\n")
    r = subprocess.run(exe + ["train", "--config", str(cfgfile), *TINY, f"data.train=[{corpus}/train.jsonl]",
                              f"data.dev={corpus}/dev.jsonl", f"train.exp_dir={exp}", "train.average_last=2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["best_step"] == 3
    assert (exp / "best.pt").exists() and (exp / "avg.pt").exists() and (exp / "config.yaml").exists()
    r = subprocess.run(exe + ["eval", "--checkpoint", str(exp / "best.pt"), str(corpus / "test_seen.jsonl"),
                              "--out", str(tmp_path / "ev"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert rows[0]["set"] == "test_seen" and rows[0]["num_utts"] == 6
    assert len((tmp_path / "ev" / "errors-test_seen.jsonl").read_text().splitlines()) == 6
    r = subprocess.run(exe + ["transcribe", "--checkpoint", str(exp / "avg.pt"), "--format", "json",
                              str(corpus / "wav" / "test_unseen")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 6
    # user mistakes: one clear line, exit 2
    r = subprocess.run(exe + ["train", "--config", str(cfgfile), "model.encoder.nlayers=3"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown key" in r.stderr and "nlayers" in r.stderr
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEfmt garbage")
    r = subprocess.run(exe + ["transcribe", "--checkpoint", str(exp / "best.pt"), str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "bad.wav" in r.stderr


def test_feature_cache_trains_like_the_waveform_path(tiny_corpus, tmp_path):
    """With no waveform augmentation, cached fbank features give the same training as the waveform
    path (features are stored as float16, hence the tolerance), and the cache is reused."""
    corpus, _ = tiny_corpus
    man = subset(corpus, 12, tmp_path)
    common = ["train.max_steps=3", "train.checkpoint_every=3", "model.encoder.dropout=0.0",
              "model.specaug.num_time_masks=0", "model.specaug.num_freq_masks=0", "data.max_duration=30"]
    train(cfg_for(man, tmp_path / "wave", *common))
    cache = tmp_path / "cache"
    train(cfg_for(man, tmp_path / "cached", f"data.feature_cache={cache}", *common))
    files = list(cache.rglob("*.npy"))
    assert len(files) == 12
    pa = params(tmp_path / "wave" / "checkpoints" / "step-00000003.pt")
    pb = params(tmp_path / "cached" / "checkpoints" / "step-00000003.pt")
    worst = max(float((pa[k] - pb[k]).abs().max()) for k in pa if pa[k].is_floating_point())
    assert worst < 1e-3, worst
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    train(cfg_for(man, tmp_path / "again", f"data.feature_cache={cache}", *common))
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items())  # read, not recomputed
    with pytest.raises(ValueError, match="feature_cache"):
        train(cfg_for(man, tmp_path / "aug", f"data.feature_cache={cache}", "data.augment.speed_factors=[0.9,1.1]"))
