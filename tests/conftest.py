"""Shared fixtures: a tiny corpus synthesized once per test session with espeak-ng voices (pip only)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """About 40 short utterances: train/dev/test splits, espeak voices only (fast, pip-only)."""
    from harken.data.corpus.synth import CorpusConfig, synthesize_corpus

    out = tmp_path_factory.mktemp("corpus")
    cfg = CorpusConfig(seed=7, train_utts=24, dev_utts=6, test_seen_utts=6, test_unseen_utts=6,
                       piper_fraction=0.0, voices=["espeak"])
    summary = synthesize_corpus(cfg, str(out), jobs=2, progress=False)
    return out, summary
