"""Typed configuration: dataclasses, YAML load/save, dotted command-line overrides.

Each component owns its config dataclass (``FbankConfig`` in features, ``EncoderConfig`` in models,
``AugmentConfig`` in data.augment); this module composes them into one ``ExperimentConfig`` that is
saved next to every checkpoint, so a run can be rebuilt without the original YAML.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harken.data.augment import AugmentConfig
from harken.features import FbankConfig, SpecAugmentConfig
from harken.models.registry import EncoderConfig


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=lambda: ["data/corpus/train.jsonl"])
    dev: str | None = "data/corpus/dev.jsonl"
    max_duration: float = 160.0  # seconds of padded audio per batch (per rank)
    max_batch_size: int | None = None
    num_buckets: int = 20
    max_utt_duration: float = 15.0  # longer utterances are dropped from training
    min_utt_duration: float = 0.2
    num_workers: int = 1
    group_weighting: str = "none"  # none | sqrt_inverse | inverse (balances rare `group`s)
    cmvn: str | None = None  # path to cmvn.json; None = computed from train data at start
    cmvn_utts: int = 500  # utterances used to estimate CMVN when it is computed
    feature_cache: str | None = None  # folder for cached fbank features (only without waveform augmentation)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TokenizerConfig:
    kind: str = "char"  # char | bpe
    vocab_size: int = 500  # bpe only
    path: str | None = None  # an existing tokenizer dir/file; None = build from train text


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    fbank: FbankConfig = field(default_factory=FbankConfig)
    specaug: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    label_smoothing: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    schedule: str = "noam"  # noam | cosine | constant
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.05  # cosine floor as a fraction of lr
    clip_grad_norm: float = 5.0
    accum_steps: int = 1


@dataclass
class TrainConfig:
    exp_dir: str = "exp/run"
    seed: int = 42
    max_steps: int = 10000  # optimizer steps
    max_epochs: int = 1000
    max_minutes: float | None = None  # wall-clock budget; stops cleanly with a checkpoint
    precision: str = "auto"  # auto | fp32 | bf16 | fp16  (auto: fp32 on CPU, bf16/fp16 on CUDA)
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    checkpoint_every: int = 500
    keep_last: int = 3
    log_every: int = 50
    eval_every: int = 1000  # dev WER every N steps (and at the end); 0 = only at the end
    dev_max_utts: int = 400
    average_last: int = 3  # average the last N checkpoints into avg.pt at the end (0 = off)
    progress: bool = True
    tensorboard: bool = True
    dist_timeout_s: float = 1800.0  # torchrun runs: a collective waiting longer for a peer fails with a clear error


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------
def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except (ConfigError, TypeError, ValueError):
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and origin is list:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls, d: dict, where: str = "config"):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(names)}"
        )
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in d.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' must look like key.path=value")
        key, raw = ov.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{ov}': '{p}' is not a section")
        node[parts[-1]] = value
    return d


def load_config(path: str | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    d: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {path}")
        d = yaml.safe_load(p.read_text()) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    base = to_dict(ExperimentConfig())

    def merge(a: dict, b: dict) -> dict:
        for k, v in b.items():
            if isinstance(v, dict) and isinstance(a.get(k), dict):
                merge(a[k], v)
            else:
                a[k] = v
        return a

    d = merge(base, d)
    apply_overrides(d, overrides or [])
    return from_dict(ExperimentConfig, d, where=path or "config")


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
