"""Configuration checked at load: keys, types, choices, ranges, the sample rate, fbank geometry and
``model.encoder.input_dim`` following ``model.fbank.num_mel_bins``; every message is one line."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from harken.config import (
    RULES,
    ConfigError,
    ExperimentConfig,
    from_dict,
    load_config,
    save_config,
    to_dict,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIGS = {"serve.yaml"}  # server configs (harken.serve.config), not experiments
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name not in SERVE_CONFIGS)
EXE = [sys.executable, "-m", "harken.cli"]
TINY = ["model.encoder.d_model=32", "model.encoder.num_layers=1", "model.encoder.num_heads=2",
        "model.encoder.ff_dim=64", "model.encoder.conv_kernel=7", "model.encoder.subsampling_channels=16"]


def error(overrides: list[str], path: str | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------ shipped configs
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_reload_identically(path, tmp_path):
    cfg = load_config(str(path))
    assert cfg.model.encoder.input_dim == cfg.model.fbank.num_mel_bins
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg and to_dict(again) == to_dict(cfg)


def test_shipped_serve_config_loads():
    from harken.serve.config import load_serve_config

    cfg = load_serve_config(str(ROOT / "configs" / "serve.yaml"), [])
    assert cfg.port > 0


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "medium.yaml", "streaming.yaml", "transformer.yaml"}


# ------------------------------------------------------------------------------------ keys
def test_misspelled_key_in_file_names_file_key_and_suggestion(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("optim:\n  shedule: cosine\n")
    msg = error([], str(p))
    assert msg == f"{p}: unknown key 'optim.shedule'; did you mean 'optim.schedule'?"


def test_misspelled_section_and_nested_key():
    assert "unknown key 'model.encodr'; did you mean 'model.encoder'?" in error(["model.encodr.d_model=64"])
    msg = error(["model.encoder.num_layer=4"])
    assert msg.startswith("override 'model.encoder.num_layer=4': ")
    assert msg.endswith("unknown key 'model.encoder.num_layer'; did you mean 'model.encoder.num_layers'?")
    # the right name in the wrong section
    assert "did you mean 'train.max_steps'?" in error(["optim.max_steps=10"])


def test_unknown_key_without_a_near_one_lists_the_section():
    msg = error(["tokenizer.zzzz=1"])
    assert "unknown key 'tokenizer.zzzz'; valid keys in 'tokenizer': kind, vocab_size, path" in msg


def test_override_into_a_value_is_refused():
    demo = str(ROOT / "configs" / "demo.yaml")  # sets optim.lr
    assert error(["optim.lr.x=1"], demo) == "override 'optim.lr.x=1': 'optim.lr' is not a section"
    assert "optim.lr: expected float, got {'x': 1} (dict)" in error(["optim.lr.x=1"])
    assert "must look like key.path=value" in error(["optim.lr"])


# ------------------------------------------------------------------------------------ types
@pytest.mark.parametrize("override, expect", [
    ("optim.lr=fast", "optim.lr: expected float, got 'fast' (str)"),
    ("train.max_steps=1.5", "train.max_steps: expected int, got 1.5 (float)"),
    ("train.progress=maybe", "train.progress: expected true/false, got 'maybe' (str)"),
    ("optim.betas=[0.9]", "optim.betas: expected a list of 2 (float, float)"),
    ("data.dev=[a, b]", "data.dev: expected str, got ['a', 'b'] (list)"),
    ("model.encoder=5", "model.encoder: expected a mapping"),
    ("data.max_batch_size=lots", "data.max_batch_size: expected int, got 'lots' (str)"),
])
def test_wrong_type_names_key_value_and_type(override, expect):
    assert expect in error([override])


def test_values_convert_to_the_declared_types():
    cfg = load_config(None, ["train.max_steps=1e3", "optim.lr=1e-3", "data.train=one.jsonl", "optim.betas=[0.8, 0.9]"])
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == 1e-3 and cfg.data.train == ["one.jsonl"] and cfg.optim.betas == (0.8, 0.9)


# ------------------------------------------------------------------------------------ choices
@pytest.mark.parametrize("key, bad, allowed", [
    ("optim.schedule", "cosin", ["noam", "cosine", "constant"]),
    ("tokenizer.kind", "wordpiece", ["char", "bpe", "unigram"]),
    ("data.group_weighting", "sqrt", ["none", "sqrt_inverse", "inverse"]),
    ("train.precision", "fp8", ["auto", "fp32", "bf16", "fp16"]),
    ("train.device", "gpu", ["auto", "cpu", "cuda"]),
    ("model.encoder.pos_enc", "relative", ["rel", "abs"]),
    ("model.encoder.conv_norm", "group_norm", ["layer_norm", "batch_norm"]),
    ("model.encoder.subsampling", "conv2d8", ["conv2d4"]),
    ("model.fbank.window_type", "hannn", ["povey", "hann", "hanning", "hamming", "rectangular"]),
    ("model.encoder.type", "conformr", ["conformer", "transformer"]),
])
def test_bad_choice_lists_the_allowed_values(key, bad, allowed):
    msg = error([f"{key}={bad}"])
    assert f"{key}: {bad!r} is not allowed; choose one of " in msg
    for a in allowed:
        assert repr(a) in msg


def test_bad_choice_suggests_the_nearest():
    assert error(["optim.schedule=cosin"]).endswith("(did you mean 'cosine'?)")


def test_encoder_types_come_from_the_registry():
    from harken.models.registry import encoder_names

    msg = error(["model.encoder.type=nope"])
    for name in encoder_names():
        assert repr(name) in msg


def test_device_accepts_an_indexed_cuda_device():
    assert load_config(None, ["train.device=cuda:1"]).train.device == "cuda:1"
    assert "not allowed" in error(["train.device=cuda:x"])


def test_every_declared_choice_is_accepted_by_its_consumer():
    """The table's choices are the values the code that reads them really takes."""
    from harken.config import DataConfig, OptimConfig, TrainConfig
    from harken.data.sampler import group_weights
    from harken.features import FbankConfig, kaldi_window
    from harken.train.schedule import lr_factor
    from harken.train.trainer import pick_precision

    for w in RULES[FbankConfig]["window_type"]["choices"]:
        assert torch.isfinite(kaldi_window(w, 400)).all()
    for s in RULES[OptimConfig]["schedule"]["choices"]:
        assert 0 < lr_factor(500, s, 100, 1000, 0.1) <= 1
    for g in RULES[DataConfig]["group_weighting"]["choices"]:
        assert group_weights(["a", "a", "b"], g).shape == (3,)
    for p in RULES[TrainConfig]["precision"]["choices"]:
        if p != "fp16":  # fp16 needs CUDA (refused for train.device=cpu at load, see below)
            assert pick_precision(p, torch.device("cpu")) in ("fp32", "bf16")
    assert "needs CUDA" in error(["train.precision=fp16", "train.device=cpu"])


@pytest.mark.parametrize("pos_enc", ["rel", "abs"])
@pytest.mark.parametrize("conv_norm", ["layer_norm", "batch_norm"])
def test_encoder_choices_build(pos_enc, conv_norm):
    from harken.train.trainer import build_model

    cfg = load_config(None, TINY + [f"model.encoder.pos_enc={pos_enc}", f"model.encoder.conv_norm={conv_norm}"])
    model = build_model(cfg, vocab_size=10).eval()
    with torch.no_grad():
        lp, n = model(torch.randn(1, 16000) * 0.1, torch.tensor([16000]))
    assert lp.shape[0] == 1 and lp.shape[-1] == 10 and int(n[0]) == lp.shape[1]


# ------------------------------------------------------------------------------------ ranges
@pytest.mark.parametrize("override, expect", [
    ("optim.lr=0", "optim.lr: must be > 0, got 0.0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps: must be >= 0, got -1"),
    ("train.max_steps=0", "train.max_steps: must be >= 1, got 0"),
    ("model.encoder.dropout=1.0", "model.encoder.dropout: must be in [0,1), got 1.0"),
    ("data.max_duration=0", "data.max_duration: must be > 0, got 0.0"),
    ("data.augment.noise_prob=1.5", "data.augment.noise_prob: must be in [0,1], got 1.5"),
    ("data.augment.speed_factors=[0.9, 0, 1.1]", "data.augment.speed_factors[1]: must be > 0, got 0.0"),
    ("optim.betas=[0.9, 1.0]", "optim.betas[1]: must be in [0,1), got 1.0"),
    ("train.log_every=0", "train.log_every: must be >= 1, got 0"),
])
def test_out_of_range_values_are_refused(override, expect):
    assert expect in error([override])


def test_cross_field_checks():
    assert "model.encoder.d_model=144 is not divisible by model.encoder.num_heads=5" in error(
        ["model.encoder.num_heads=5"])
    assert "data.min_utt_duration=20.0 must be below data.max_utt_duration=15.0" in error(
        ["data.min_utt_duration=20"])
    assert "low <= high" in error(["data.augment.snr_db=[30, 5]"])
    assert "time warping is not implemented" in error(["model.specaug.time_warp=3"])
    assert "must be odd" in error(["model.encoder.conv_kernel=8"])
    load_config(None, ["model.encoder.conv_kernel=8", "model.encoder.causal=true"])  # causal: any kernel


# ------------------------------------------------------------------------------------ sample rate, fbank
def test_sample_rate_8000_or_16000_and_other_rates_refused_with_the_reason():
    cfg = load_config(None, ["model.fbank.sample_rate=8000"])
    assert cfg.model.fbank.sample_rate == 8000 and cfg.data.augment.sample_rate == 8000  # it follows
    msg = error(["model.fbank.sample_rate=22050"])
    assert msg.startswith("override 'model.fbank.sample_rate=22050': model.fbank.sample_rate: 22050 is not allowed; "
                          "choose one of 8000, 16000")
    assert "resampled to the model's rate" in msg
    assert "disagrees with model.fbank.sample_rate=16000" in error(["data.augment.sample_rate=8000"])


def test_sample_rate_in_a_file_names_the_file(tmp_path):
    p = tmp_path / "odd.yaml"
    p.write_text("model:\n  fbank:\n    sample_rate: 11025\n")
    assert error([], str(p)).startswith(f"{p}: model.fbank.sample_rate: 11025 is not allowed")


def test_fbank_geometry():
    from harken.features import Fbank, FbankConfig

    # 128 mel bins do not fit a 25 ms window (512-point FFT): one filter would get no FFT bin at all,
    # as the filterbank matrix itself shows
    assert (Fbank(FbankConfig(num_mel_bins=128)).mel.sum(dim=0) == 0).any()
    msg = error(["model.fbank.num_mel_bins=128"])
    assert "model.fbank.num_mel_bins=128 is too many for a 400-sample window" in msg
    cfg = load_config(None, ["model.fbank.num_mel_bins=128", "model.fbank.frame_length_ms=50"])
    assert (Fbank(cfg.model.fbank).mel.sum(dim=0) > 0).all() and cfg.model.encoder.input_dim == 128
    assert "frames would skip audio" in error(["model.fbank.frame_shift_ms=30"])
    assert "must be > 0" in error(["model.fbank.frame_length_ms=0"])
    assert "shorter than one sample" in error(["model.fbank.frame_length_ms=0.01", "model.fbank.frame_shift_ms=0.01"])
    assert "it must lie within 0..8000 Hz" in error(["model.fbank.high_freq=9000"])
    assert "too few for conv2d4" in error(["model.fbank.num_mel_bins=5"])


# ------------------------------------------------------------------------------------ num_mel_bins, once
def test_input_dim_follows_num_mel_bins(tiny_corpus):
    from harken.audio import load_audio
    from harken.data.manifest import read_manifest
    from harken.train.trainer import build_model

    corpus, _ = tiny_corpus
    cfg = load_config(None, TINY + ["model.fbank.num_mel_bins=40"])
    assert cfg.model.encoder.input_dim == 40
    model = build_model(cfg, vocab_size=12).eval()
    wave = torch.from_numpy(load_audio(read_manifest(corpus / "dev.jsonl")[0].audio))[None]
    with torch.no_grad():
        lp, n = model(wave, torch.tensor([wave.shape[1]]))
    assert lp.shape[-1] == 12 and int(n[0]) == lp.shape[1] > 0


def test_empty_section_takes_the_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("optim:\n  # lr: 1.0\ntrain:\n  max_steps: 7\n")
    cfg = load_config(str(p))
    assert cfg.optim == ExperimentConfig().optim and cfg.train.max_steps == 7


def test_input_dim_in_a_file_follows(tmp_path):
    p = tmp_path / "mel40.yaml"
    p.write_text("model:\n  fbank:\n    num_mel_bins: 40\n")
    cfg = load_config(str(p))
    assert cfg.model.encoder.input_dim == 40
    save_config(cfg, tmp_path / "saved.yaml")  # both keys written, equal: reloads as it was
    assert load_config(str(tmp_path / "saved.yaml")) == cfg


def test_input_dim_conflict_names_both_keys(tmp_path):
    msg = error(["model.fbank.num_mel_bins=40", "model.encoder.input_dim=64"])
    assert "model.encoder.input_dim=64 disagrees with model.fbank.num_mel_bins=40" in msg
    p = tmp_path / "both.yaml"
    p.write_text("model:\n  fbank: {num_mel_bins: 40}\n  encoder: {input_dim: 80}\n")
    assert f"{p}: model.encoder.input_dim=80 disagrees with model.fbank.num_mel_bins=40" in error([], str(p))
    assert "disagrees" in error(["model.encoder.input_dim=64"])  # against the default 80 bins


def test_waveform_encoder_ignores_input_dim():
    cfg = load_config(None, ["model.encoder.type=wav2vec2", "model.encoder.pretrained=/models/w2v",
                             "model.fbank.num_mel_bins=40", "model.encoder.input_dim=64"])
    assert cfg.model.encoder.input_dim == 64
    assert "needs model.encoder.pretrained" in error(["model.encoder.type=wav2vec2"])
    assert "pretrained on 16000 Hz" in error(["model.encoder.type=wav2vec2", "model.encoder.pretrained=/m",
                                              "model.fbank.sample_rate=8000"])


# ------------------------------------------------------------------------------------ validate(), from_dict()
def test_validate_an_already_built_config():
    cfg = ExperimentConfig()
    cfg.model.fbank.num_mel_bins = 40
    assert validate(cfg) is cfg and cfg.model.encoder.input_dim == 40
    cfg.optim.schedule = "cosin"
    with pytest.raises(ConfigError, match="optim.schedule: 'cosin' is not allowed"):
        validate(cfg)
    cfg = ExperimentConfig()
    cfg.model.encoder.input_dim, cfg.model.fbank.num_mel_bins = 64, 40
    with pytest.raises(ConfigError, match="input_dim=64 disagrees"):
        validate(cfg)
    cfg = ExperimentConfig()
    cfg.optim.lr = "fast"
    with pytest.raises(ConfigError, match="expected float"):
        validate(cfg)


def test_from_dict_validates_saved_checkpoint_configs():
    d = to_dict(load_config(None, ["model.fbank.num_mel_bins=40"]))
    assert from_dict(ExperimentConfig, d).model.encoder.input_dim == 40
    d["optim"]["schedule"] = "cosin"
    with pytest.raises(ConfigError, match="optim.schedule"):
        from_dict(ExperimentConfig, d)


@dataclass
class _Serve:  # how another component declares its own rules
    __config_rules__ = {"workers": {"range": ">=1"}}
    host: str = "127.0.0.1"
    port: int = field(default=8000, metadata={"range": "[1,65535]"})
    mode: str = field(default="batch", metadata={"choices": ("batch", "stream")})
    workers: int = 1
    max_queue: int = 8
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.max_queue < self.workers:
            raise ValueError("max_queue must be at least workers")


def test_from_dict_is_generic():
    s = from_dict(_Serve, {"port": "9000", "mode": "stream", "tags": "a"}, "serve")
    assert (s.port, s.mode, s.tags) == (9000, "stream", ["a"])
    for d, expect in [
        ({"prot": 1}, "unknown key 'serve.prot'; did you mean 'serve.port'?"),
        ({"port": 0}, "serve.port: must be in [1,65535], got 0"),
        ({"mode": "strem"}, "serve.mode: 'strem' is not allowed; choose one of 'batch', 'stream'"),
        ({"workers": 0}, "serve.workers: must be >= 1, got 0"),
        ({"workers": 4, "max_queue": 2}, "serve: max_queue must be at least workers"),
        ({"host": ["a"]}, "serve.host: expected str, got ['a'] (list)"),
    ]:
        with pytest.raises(ConfigError) as e:
            from_dict(_Serve, d, "serve")
        assert expect in str(e.value)
    assert isinstance(ConfigError("x"), ValueError)
    # a label (a file name) instead of a key prefix
    for label in ("serve.yaml", "/etc/harken/serve.yaml", "serve config"):
        with pytest.raises(ConfigError) as e:
            from_dict(_Serve, {"prot": 1}, label)
        assert str(e.value) == f"{label}: unknown key 'prot'; did you mean 'port'?"


def test_rules_name_real_fields():
    for cls, rules in RULES.items():
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(rules) <= names, (cls.__name__, set(rules) - names)
        for name, rule in rules.items():
            assert set(rule) <= {"choices", "range", "why"}, (cls.__name__, name)
            value = to_dict(cls())[name]  # the defaults obey the rules
            assert getattr(from_dict(cls, {name: value}), name) == getattr(cls(), name)


# ------------------------------------------------------------------------------------ the command line
def test_cli_refuses_a_bad_override_before_anything_runs(tmp_path):
    exp = tmp_path / "exp"
    t0 = time.monotonic()
    r = subprocess.run(EXE + ["train", "--config", str(ROOT / "configs" / "demo.yaml"), "optim.schedule=cosin",
                              f"train.exp_dir={exp}"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == ["harken train: error: override 'optim.schedule=cosin': optim.schedule: 'cosin' is not allowed; "
                     "choose one of 'noam', 'cosine', 'constant' (did you mean 'cosine'?)"]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not exp.exists()  # no experiment folder, no data read
    assert took < 30, took  # python + torch start-up only (a few seconds; generous for a loaded CI machine)
