"""The CLI's data commands and the trainer's guards, on real synthesized speech."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from harken.config import load_config
from harken.data.importers import export_kaldi
from harken.data.manifest import Record, read_manifest, write_manifest
from harken.features import GlobalCMVN
from harken.train.trainer import train

EXE = [sys.executable, "-m", "harken.cli"]


def test_prepare_kaldi_dir_with_cmvn(tiny_corpus, tmp_path):
    corpus, _ = tiny_corpus
    recs = read_manifest(corpus / "train.jsonl")[:5]
    export_kaldi(recs, tmp_path / "kaldi")
    out = tmp_path / "m.jsonl"
    r = subprocess.run(EXE + ["prepare", "kaldi", str(tmp_path / "kaldi"), "-o", str(out), "--cmvn",
                              str(tmp_path / "cmvn.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = read_manifest(out)
    assert [g.id for g in got] == sorted(x.id for x in recs)
    cmvn = GlobalCMVN.from_file(tmp_path / "cmvn.json")
    assert cmvn.mean.shape == (80,) and torch.all(cmvn.istd > 0)
    # log-mel of real speech: the mean sits well above the log floor
    assert float(cmvn.mean.mean()) > 0


def test_prepare_reports_missing_source(tmp_path):
    r = subprocess.run(EXE + ["prepare", "kaldi", str(tmp_path / "nope"), "-o", str(tmp_path / "m.jsonl")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr


def test_infeasible_utterances_are_skipped_and_counted(tiny_corpus, tmp_path):
    corpus, _ = tiny_corpus
    recs = read_manifest(corpus / "train.jsonl")[:6]
    # a transcript far longer than its audio can hold under CTC: infeasible, must not kill training
    bad = Record(id="bad", audio=recs[0].audio, duration=recs[0].duration, text="a b c d e f g " * 40)
    man = tmp_path / "t.jsonl"
    write_manifest(man, recs + [bad])
    cfg = load_config(None, [
        f"data.train=[{man}]", "data.dev=null", f"train.exp_dir={tmp_path / 'e'}", "train.max_steps=4",
        "model.encoder.d_model=64", "model.encoder.num_layers=1", "model.encoder.num_heads=2",
        "model.encoder.ff_dim=64", "data.max_duration=200", "data.num_workers=0", "train.progress=false",
        "train.tensorboard=false", "train.average_last=0"])
    run = train(cfg)
    assert run.state.step == 4
    assert run.state.nonfinite_skipped >= 1
    assert all(torch.isfinite(p).all() for p in run.core.parameters())


def test_synth_cli_is_resumable(tmp_path):
    args = EXE + ["synth", "--out", str(tmp_path / "c"), "--train-utts", "3", "--dev-utts", "1", "--test-utts", "1",
                  "--piper-fraction", "0", "--voices", "espeak", "--jobs", "1", "--quiet"]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout[r.stdout.index("{"):])
    assert info["counts"]["train"] == 3 and info["vocab_size"] > 0
    first = (tmp_path / "c" / "train.jsonl").read_text()
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "c" / "train.jsonl").read_text() == first
