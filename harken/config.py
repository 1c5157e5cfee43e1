"""Typed configuration: dataclasses, YAML load/save, dotted command-line overrides, validation.

Each component owns its config dataclass (``FbankConfig`` in features, ``EncoderConfig`` in models,
``AugmentConfig`` in data.augment); this module composes them into one ``ExperimentConfig`` that is
saved next to every checkpoint, so a run can be rebuilt without the original YAML.

Validation happens at load, before any data is read or any model is built: :func:`load_config`
and :func:`from_dict` (so every entry point, including checkpoint loading) check

* keys: an unknown key names its full dotted path and the nearest valid one
  (``unknown key 'optim.shedule'; did you mean 'optim.schedule'?``);
* types: ``optim.lr: expected float, got 'fast' (str)``;
* choices and ranges, declared once in :data:`RULES` (or by the dataclass itself, see below);
* facts that span sections (:func:`validate`): the sample rate, the fbank geometry, and
  ``model.encoder.input_dim``, which follows ``model.fbank.num_mel_bins`` (stated once).

Declaring rules for a dataclass (any dataclass built with :func:`from_dict`, e.g. a server's
``ServeConfig``).  A field's rules are a dict with any of

* ``"choices"``: a tuple of allowed values, or a zero-argument callable returning one (evaluated at
  check time; e.g. the encoder registry).  A string choice may contain ``<N>`` for a non-negative
  integer (``"cuda:<N>"`` admits ``cuda:0``, ``cuda:1``, ...);
* ``"range"``: ``">0"``, ``">=0"``, ``"<=1"``, ``"[0,1)"``, ``"(0,1]"``, ...; for a list/tuple field
  it applies to every element; ``None`` values are never range-checked;
* ``"why"``: a reason appended to the message when a choice is refused.

and they are looked up, first match wins, in

1. the field's metadata: ``port: int = field(default=8000, metadata={"range": "[1,65535]"})``
   or ``mode: str = field(default="a", metadata={"choices": ("a", "b")})``;
2. a ``__config_rules__`` class attribute: ``__config_rules__ = {"mode": {"choices": ("a", "b")}}``;
3. the :data:`RULES` table here, keyed by the class (used for classes defined in other modules).

Checks across fields of one dataclass go in its ``__post_init__``: a ``ValueError`` raised there
reaches the user as a :class:`ConfigError` prefixed with the section's dotted name.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harken.audio import MODEL_SAMPLE_RATES, SAMPLE_RATE  # readers resample to the model's rate (8 or 16 kHz)
from harken.data.augment import AugmentConfig
from harken.features import FbankConfig, SpecAugmentConfig
from harken.models.registry import EncoderConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "TokenizerConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "ExperimentConfig",
    "RULES",
    "SAMPLE_RATE",
    "from_dict",
    "to_dict",
    "validate",
    "apply_overrides",
    "load_config",
    "save_config",
]


class ConfigError(ValueError):
    """A user mistake in a configuration; ``key`` is the dotted key it concerns (when one does)."""

    def __init__(self, message: str, key: str | tuple[str, ...] | None = None):
        super().__init__(message)
        self.keys: tuple[str, ...] = (key,) if isinstance(key, str) else tuple(key or ())
        self.key = self.keys[0] if self.keys else None


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=lambda: ["data/corpus/train.jsonl"])
    # how many times each manifest of `train` is used per epoch, in the same order (empty: once each);
    # e.g. [1, 1, 10] for a few minutes of real speech beside hours of synthetic (its copies are augmented
    # apart where augmentation is on)
    train_repeat: list[int] = field(default_factory=list)
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
    # the Record field data.group_weighting balances: group, speaker, or a key of the record's extra
    # fields (e.g. engine)
    group_by: str = "group"
    # the first N epochs go from short to long utterances (still bucketed); later epochs are shuffled
    curriculum_epochs: int = field(default=0, metadata={"range": ">=0"})
    prefetch_factor: int = field(default=4, metadata={"range": ">=1"})  # batches each loader worker prepares ahead
    # before training: every audio file exists, decodes, and lasts what its record says (false: only
    # that the files exist; for huge corpora already checked by harken prepare)
    check_audio: bool = True


@dataclass
class TokenizerConfig:
    kind: str = "char"  # char | bpe | unigram
    vocab_size: int = 500  # bpe/unigram only
    path: str | None = None  # an existing tokenizer dir/file; None = build from train text


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    fbank: FbankConfig = field(default_factory=FbankConfig)
    specaug: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    label_smoothing: float = 0.0
    # intermediate CTC (harken.train.trainer.compute_loss): loss = (1 - w) * final CTC + w * the mean
    # CTC of model.encoder.interctc_layers through the same head; 0 = off (inference never changes)
    interctc_weight: float = field(default=0.0, metadata={"range": "[0,1)"})

    def __post_init__(self) -> None:
        if self.interctc_weight > 0 and not self.encoder.interctc_layers:
            raise ValueError(f"interctc_weight={self.interctc_weight} needs model.encoder.interctc_layers "
                             "(1-based layers whose outputs feed the CTC head too), e.g. [3]")


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    schedule: str = "noam"  # noam | cosine | constant
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.05  # cosine floor as a fraction of lr
    clip_grad_norm: float = 5.0  # 0 = no clipping
    accum_steps: int = 1
    # what sets the schedule's position: progress = max(step/max_steps, minutes/train.max_minutes),
    # so a run stopped by its time budget still anneals fully; steps = step/max_steps only
    schedule_clock: str = field(default="progress", metadata={"choices": ("steps", "progress")})


@dataclass
class TrainConfig:
    exp_dir: str = "exp/run"
    seed: int = 42
    max_steps: int = 10000  # optimizer steps
    max_epochs: int = 1000
    max_minutes: float | None = None  # wall-clock budget; stops cleanly with a checkpoint
    precision: str = "auto"  # auto | fp32 | bf16 | fp16  (auto: fp32 on CPU, bf16/fp16 on CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
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
    # exponential moving average of the weights (e.g. 0.999), kept in fp32, written as ema.pt; 0 = off
    ema_decay: float = field(default=0.0, metadata={"range": "[0,1)"})
    # fine-tune the top model.encoder.trainable_layers of a pretrained encoder on stored outputs of the
    # frozen layers below (harken.train.feature_store); views: 1 unaugmented pass + N-1 augmented ones
    feature_store: bool = False
    feature_store_views: int = field(default=1, metadata={"range": ">=1"})


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------
# The rules: every closed set of values and every certain range, in one place.
def _encoder_types() -> tuple[str, ...]:
    from harken.models.registry import encoder_names

    return tuple(encoder_names())


RULES: dict[type, dict[str, dict[str, Any]]] = {
    DataConfig: {
        "max_duration": {"range": ">0"},
        "max_batch_size": {"range": ">=1"},
        "num_buckets": {"range": ">=1"},
        "max_utt_duration": {"range": ">0"},
        "min_utt_duration": {"range": ">=0"},
        "num_workers": {"range": ">=0"},
        # harken.data.sampler.group_weights
        "group_weighting": {"choices": ("none", "sqrt_inverse", "inverse")},
        "cmvn_utts": {"range": ">=1"},
    },
    AugmentConfig: {  # harken.data.augment.WaveAugmenter
        "speed_factors": {"range": ">0"},
        "noise_prob": {"range": "[0,1]"},
        "volume_prob": {"range": "[0,1]"},
        # the rate the data loader reads speech and noise at; validate() ties it to model.fbank.sample_rate
        "sample_rate": {"choices": MODEL_SAMPLE_RATES,
                        "why": "it follows model.fbank.sample_rate (set that one, or leave both out)"},
    },
    TokenizerConfig: {
        # harken.text.tokenizer.build_tokenizer
        "kind": {"choices": ("char", "bpe", "unigram")},
        "vocab_size": {"range": ">=1"},
    },
    ModelConfig: {
        "label_smoothing": {"range": "[0,1)"},
    },
    EncoderConfig: {
        # harken.models.registry: the registered encoders
        "type": {"choices": _encoder_types},
        "input_dim": {"range": ">=1"},
        "d_model": {"range": ">=1"},
        "num_layers": {"range": ">=1"},
        "num_heads": {"range": ">=1"},
        "ff_dim": {"range": ">=1"},
        "conv_kernel": {"range": ">=1"},
        "dropout": {"range": "[0,1)"},
        "attn_dropout": {"range": "[0,1)"},
        # harken.models.subsampling.SUBSAMPLINGS
        "subsampling": {"choices": ("conv2d4", "dwconv4", "dwconv8")},
        "subsampling_channels": {"range": ">=0"},
        # harken.models.conformer (_EncoderBase, ConvModule)
        "pos_enc": {"choices": ("rel", "abs")},
        "conv_norm": {"choices": ("layer_norm", "batch_norm")},
        "chunk_size": {"range": ">=0"},
        "left_chunks": {"range": ">=-1"},
        "max_dynamic_chunk": {"range": ">=1"},
        "layerdrop": {"range": "[0,1)"},
        "mask_time_prob": {"range": "[0,1)"},
        "encoder_lr_scale": {"range": ">0"},
        "trainable_layers": {"range": ">=-1"},
        "layer_lr_decay": {"range": ">0"},
    },
    FbankConfig: {
        "sample_rate": {"choices": MODEL_SAMPLE_RATES,  # harken.audio.MODEL_SAMPLE_RATES
                        "why": "models are trained at 16000 (wideband) or 8000 (telephone); other recordings "
                               "are resampled to the model's rate"},
        "num_mel_bins": {"range": ">=1"},
        "frame_length_ms": {"range": ">0"},
        "frame_shift_ms": {"range": ">0"},
        "dither": {"range": ">=0"},
        "preemph_coeff": {"range": "[0,1]"},
        # harken.features.kaldi_window
        "window_type": {"choices": ("povey", "hann", "hanning", "hamming", "rectangular")},
        "low_freq": {"range": ">=0"},
        "input_scale": {"range": ">0"},
        "log_floor": {"range": ">0"},
    },
    SpecAugmentConfig: {
        "num_freq_masks": {"range": ">=0"},
        "max_freq_width": {"range": ">=0"},
        "num_time_masks": {"range": ">=0"},
        "max_time_width": {"range": ">=0"},
        "max_time_ratio": {"range": "[0,1]"},
    },
    OptimConfig: {
        "lr": {"range": ">0"},
        "weight_decay": {"range": ">=0"},
        "betas": {"range": "[0,1)"},
        "eps": {"range": ">0"},
        # harken.train.schedule.lr_factor
        "schedule": {"choices": ("noam", "cosine", "constant")},
        "warmup_steps": {"range": ">=0"},
        "min_lr_ratio": {"range": "[0,1]"},
        "clip_grad_norm": {"range": ">=0"},
        "accum_steps": {"range": ">=1"},
    },
    TrainConfig: {
        "max_steps": {"range": ">=1"},
        "max_epochs": {"range": ">=1"},
        "max_minutes": {"range": ">0"},
        # harken.train.trainer.pick_precision / pick_device
        "precision": {"choices": ("auto", "fp32", "bf16", "fp16")},
        "device": {"choices": ("auto", "cpu", "cuda", "cuda:<N>")},
        "num_threads": {"range": ">=0"},
        "checkpoint_every": {"range": ">=1"},
        "keep_last": {"range": ">=1"},
        "log_every": {"range": ">=1"},
        "eval_every": {"range": ">=0"},
        "dev_max_utts": {"range": ">=0"},
        "average_last": {"range": ">=0"},
        "dist_timeout_s": {"range": ">0"},
    },
}


def _rules_for(cls: type, f: dataclasses.Field) -> dict[str, Any]:
    if "choices" in f.metadata or "range" in f.metadata:
        return dict(f.metadata)
    own = getattr(cls, "__config_rules__", None)
    if isinstance(own, dict) and f.name in own:
        return own[f.name]
    return RULES.get(cls, {}).get(f.name, {})


_NUM = r"(-?[\d.eE+-]+)"
_RANGE_RE = re.compile(rf"^\s*(?:(>=|>|<=|<)\s*{_NUM}|([\[(])\s*{_NUM}\s*,\s*{_NUM}\s*([\])]))\s*$")


def _in_range(value: float, spec: str) -> bool:
    m = _RANGE_RE.match(spec)
    if not m:
        raise ValueError(f"bad range rule {spec!r}")  # a bug in a rules table, not a user mistake
    if m.group(1):
        op, b = m.group(1), float(m.group(2))
        return {">": value > b, ">=": value >= b, "<": value < b, "<=": value <= b}[op]
    lo, hi = float(m.group(4)), float(m.group(5))
    ok_lo = value >= lo if m.group(3) == "[" else value > lo
    ok_hi = value <= hi if m.group(6) == "]" else value < hi
    return ok_lo and ok_hi


def _range_text(spec: str) -> str:
    spec = spec.replace(" ", "")
    return f"be in {spec}" if spec[0] in "[(" else f"be {spec[:-len(spec.lstrip('<>='))]} {spec.lstrip('<>=')}"


def _choice_ok(value: Any, choices: tuple) -> bool:
    for c in choices:
        if isinstance(c, str) and "<N>" in c:
            if isinstance(value, str) and re.fullmatch(re.escape(c).replace("<N>", r"\d+"), value):
                return True
        elif value == c and type(value) is type(c):
            return True
    return False


def _check_rules(cls: type, f: dataclasses.Field, value: Any, key: str) -> None:
    rules = _rules_for(cls, f)
    if not rules or value is None:
        return
    choices = rules.get("choices")
    if choices is not None:
        allowed = tuple(choices() if callable(choices) else choices)
        if not _choice_ok(value, allowed):
            shown = ", ".join(repr(c) if isinstance(c, str) else str(c) for c in allowed)
            hint = ""
            if isinstance(value, str):
                close = difflib.get_close_matches(value, [c for c in allowed if isinstance(c, str)], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
            why = f"; {rules['why']}" if rules.get("why") else ""
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {shown}{hint}{why}", key)
    spec = rules.get("range")
    if spec is not None:
        items = value if isinstance(value, (list, tuple)) else [value]
        for i, v in enumerate(items):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not _in_range(v, spec):
                where = f"{key}[{i}]" if isinstance(value, (list, tuple)) else key
                raise ConfigError(f"{where}: must {_range_text(spec)}, got {v!r}", key)


# ---------------------------------------------------------------------------------------------
# Conversion of plain (YAML) values to the annotated types.
_UNION_TYPES = (typing.Union, types.UnionType)


def _type_text(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION_TYPES:
        return " or ".join(_type_text(a) for a in args)
    if origin is list or tp is list:
        return f"a list of {_type_text(args[0])}" if args else "a list"
    if origin is tuple or tp is tuple:
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {_type_text(args[0])}" if args else "a list"
        return f"a list of {len(args)} ({', '.join(_type_text(a) for a in args)})"
    if origin is dict or tp is dict:
        return "a mapping"
    if tp is bool:
        return "true/false"
    return getattr(tp, "__name__", str(tp))


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _convert(tp: Any, value: Any, key: str, ctx: "_Ctx") -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # an empty YAML section (`optim:` with every key commented out)
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (a section of keys), got {_got(value)}", key)
        return _build(tp, value, key, ctx)
    if origin in _UNION_TYPES:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key, ctx)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # X | None: the one real alternative says best what is wrong
            raise errors[0]
        raise ConfigError(f"{key}: expected {_type_text(tp)}, got {_got(value)}", key)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and origin is list:
            value = [value]  # a single path where a list of paths is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_text(tp)}, got {_got(value)}", key)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {_type_text(tp)}, got {len(value)} values {list(value)!r}", key)
            items = [_convert(a, v, f"{key}[{i}]", ctx) for i, (a, v) in enumerate(zip(args, value))]
        else:
            inner = args[0] if args else Any
            items = [_convert(inner, v, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_got(value)}", key)
        return dict(value)
    if tp is Any or not isinstance(tp, type):
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {_got(value)}", key)
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {_got(value)}", key)
        try:
            out = tp(value) if not (tp is int and isinstance(value, str)) else int(value.strip())
        except (TypeError, ValueError, OverflowError):
            try:  # "1e3" for an int field, written by YAML 1.1 as a string
                f = float(value)
                out = int(f) if tp is int and f.is_integer() else None
            except (TypeError, ValueError, OverflowError):
                out = None
            if out is None:
                raise ConfigError(f"{key}: expected {tp.__name__}, got {_got(value)}", key) from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{key}: expected int, got {_got(value)}", key)
        if tp is float and (out != out or out in (float("inf"), float("-inf"))):
            raise ConfigError(f"{key}: expected a finite number, got {_got(value)}", key)
        return out
    if tp is str:
        if isinstance(value, (dict, list, tuple, bool)) or value is None:
            raise ConfigError(f"{key}: expected str, got {_got(value)}", key)
        return str(value)
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_text(tp)}, got {_got(value)}", key)
    return value


def _dotted_keys(cls: type, prefix: str) -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        k = f"{prefix}.{f.name}" if prefix else f.name
        out.append(k)
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(_dotted_keys(hints[f.name], k))
    return out


@dataclass
class _Ctx:
    root: type
    root_prefix: str
    explicit: set[str] = field(default_factory=set)  # dotted keys present in the input


def _unknown_key(key: str, section_names: list[str], ctx: _Ctx) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    section = key[: -len(leaf) - 1] if "." in key else ""
    everywhere = _dotted_keys(ctx.root, ctx.root_prefix)
    by_leaf: dict[str, list[str]] = {}
    for k in everywhere:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    guess = None
    if leaf in by_leaf:  # the right name in the wrong section (optim.max_steps -> train.max_steps)
        guess = by_leaf[leaf][0]
    elif close := difflib.get_close_matches(leaf, section_names, n=1, cutoff=0.6):  # a typo
        guess = (section + "." if section else "") + close[0]
    elif close := difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75):  # both
        guess = by_leaf[close[0]][0]
    if guess:
        return ConfigError(f"unknown key {key!r}; did you mean {guess!r}?", key)
    where = f"in {section!r}" if section else "at the top level"
    return ConfigError(f"unknown key {key!r}; valid keys {where}: {', '.join(section_names)}", key)


def _build(cls: type, d: dict, where: str, ctx: _Ctx):
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    for k in d:
        if not isinstance(k, str) or k not in names:
            raise _unknown_key(f"{where}.{k}" if where else str(k), names, ctx)
    kwargs = {}
    for f in fields:
        if f.name not in d:
            continue
        key = f"{where}.{f.name}" if where else f.name
        ctx.explicit.add(key)
        value = _convert(hints[f.name], d[f.name], key, ctx)
        _check_rules(cls, f, value, key)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a dataclass's own __post_init__ checks
        raise ConfigError(f"{where}: {e}" if where else str(e), where or None) from None


def from_dict(cls, d: dict, where: str = ""):
    """Build dataclass ``cls`` from a plain nested dict (as read from YAML), converting and checking
    every value; keys missing from ``d`` take the dataclass defaults.

    ``where``: a dotted key prefix (``"serve"``: keys read ``serve.port``; ``""``, the default: the
    keys as they are, ``optim.lr``), or else a label put in front of every message: a file name or
    a phrase (``"serve config"``); a name ending in .yaml/.yml/.json counts as a file name
    (``serve.yaml: unknown key 'prot'; did you mean 'port'?``).
    An :class:`ExperimentConfig` at the top level is also run through the checks of :func:`validate`
    (the keys present in ``d`` count as set by the user).  Raises :class:`ConfigError`."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict needs a dataclass, not {cls!r}")
    label = ""
    if where and (not _DOTTED.fullmatch(where) or where.endswith((".yaml", ".yml", ".json"))):
        label, where = where, ""
    try:
        if not isinstance(d, dict):
            raise ConfigError(f"{where or 'config'}: expected a mapping, got {_got(d)}", where or None)
        ctx = _Ctx(cls, where)
        obj = _build(cls, d, where, ctx)
        if cls is ExperimentConfig and not where:
            _validate_experiment(obj, ctx.explicit)
        return obj
    except ConfigError as e:
        if not label:
            raise
        raise ConfigError(f"{label}: {e}", e.keys) from None


_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


# ---------------------------------------------------------------------------------------------
# Facts that span sections.
def _fbank_geometry(fb: FbankConfig) -> None:
    if fb.sample_rate not in MODEL_SAMPLE_RATES:
        raise ConfigError(
            f"model.fbank.sample_rate={fb.sample_rate} is not supported: models are trained at 16000 Hz "
            f"(wideband) or 8000 Hz (telephone), and recordings at any other rate are resampled to it; set "
            f"model.fbank.sample_rate to 16000 or 8000", "model.fbank.sample_rate")
    if fb.win_length < 1:
        raise ConfigError(f"model.fbank.frame_length_ms={fb.frame_length_ms} is shorter than one sample "
                          f"at {fb.sample_rate} Hz", "model.fbank.frame_length_ms")
    if fb.hop_length < 1:
        raise ConfigError(f"model.fbank.frame_shift_ms={fb.frame_shift_ms} is shorter than one sample "
                          f"at {fb.sample_rate} Hz", "model.fbank.frame_shift_ms")
    if fb.frame_shift_ms > fb.frame_length_ms:
        raise ConfigError(f"model.fbank.frame_shift_ms={fb.frame_shift_ms} is longer than model.fbank.frame_length_ms="
                          f"{fb.frame_length_ms}: the frames would skip audio",
                          ("model.fbank.frame_shift_ms", "model.fbank.frame_length_ms"))
    nyquist = 0.5 * fb.sample_rate
    high = fb.high_freq if fb.high_freq > 0 else nyquist + fb.high_freq
    if not (0.0 <= fb.low_freq < nyquist and 0.0 < high <= nyquist and fb.low_freq < high):
        raise ConfigError(
            f"model.fbank.low_freq={fb.low_freq} / model.fbank.high_freq={fb.high_freq} give the mel range "
            f"{fb.low_freq:g}..{high:g} Hz; it must lie within 0..{nyquist:g} Hz with low < high "
            f"(high_freq <= 0 means nyquist + high_freq)", ("model.fbank.high_freq", "model.fbank.low_freq"))
    from harken.features import kaldi_mel_banks

    banks = kaldi_mel_banks(fb)
    empty = (banks.sum(dim=0) <= 0).nonzero().flatten().tolist()
    if empty:
        raise ConfigError(
            f"model.fbank.num_mel_bins={fb.num_mel_bins} is too many for a {fb.win_length}-sample window "
            f"(n_fft {fb.n_fft}, {fb.n_fft // 2} FFT bins over {fb.low_freq:g}..{high:g} Hz): "
            f"{len(empty)} mel filter(s) get no FFT bin; use fewer mel bins or a longer frame_length_ms",
            ("model.fbank.num_mel_bins", "model.fbank.frame_length_ms"))


def _takes_waveform(enc: EncoderConfig) -> bool:
    """Whether the encoder reads the raw waveform (wav2vec2): then it has no fbank and no input_dim.
    Asks the encoder class (importing its module, not its optional dependencies)."""
    from harken.models.registry import encoder_class

    try:
        cls = encoder_class(enc.type)
    except ImportError as e:  # listed by the registry, but its module does not import here
        raise ConfigError(f"model.encoder.type={enc.type}: its module cannot be imported ({e})",
                          "model.encoder.type") from None
    return bool(getattr(cls, "takes_waveform", False))


def _validate_experiment(cfg: ExperimentConfig, explicit: set[str] | None) -> None:
    """Cross-section checks of an already converted config; ``explicit``: the dotted keys the user set
    (``None``: unknown, so a value that differs from its default counts as set)."""
    m, enc, fb = cfg.model, cfg.model.encoder, cfg.model.fbank
    rep = cfg.data.train_repeat
    if rep and (len(rep) != len(cfg.data.train) or any(int(k) != k or k < 1 for k in rep)):
        raise ConfigError(f"data.train_repeat={list(rep)} must give a whole number >= 1 for each of the "
                          f"{len(cfg.data.train)} data.train manifest(s), in order (or be left out)",
                          ("data.train_repeat", "data.train"))
    waveform = _takes_waveform(enc)
    if not waveform:
        _fbank_geometry(fb)
    else:
        if fb.sample_rate != SAMPLE_RATE:  # pretrained waveform encoders (wav2vec2, Whisper) hear 16 kHz
            raise ConfigError(f"model.fbank.sample_rate={fb.sample_rate} is not supported by the {enc.type} encoder: "
                              f"it was pretrained on {SAMPLE_RATE} Hz audio (8 kHz recordings are resampled up); "
                              f"set model.fbank.sample_rate={SAMPLE_RATE} (or leave it out)", "model.fbank.sample_rate")
        if enc.type == "wav2vec2" and not enc.pretrained:
            raise ConfigError(f"model.encoder.type={enc.type} needs model.encoder.pretrained=<local Hugging Face "
                              "model dir>", ("model.encoder.type", "model.encoder.pretrained"))

    # num_mel_bins is stated once: the encoder reads the fbank features
    if not waveform and enc.input_dim != fb.num_mel_bins:
        if explicit is None:
            set_input_dim = enc.input_dim != EncoderConfig().input_dim
        else:
            set_input_dim = "model.encoder.input_dim" in explicit
        if set_input_dim:
            raise ConfigError(
                f"model.encoder.input_dim={enc.input_dim} disagrees with model.fbank.num_mel_bins={fb.num_mel_bins}: "
                "the encoder reads the fbank features, so set only model.fbank.num_mel_bins (input_dim follows it)",
                ("model.encoder.input_dim", "model.fbank.num_mel_bins"))
        enc.input_dim = fb.num_mel_bins

    if not waveform:
        if enc.d_model % enc.num_heads:
            raise ConfigError(f"model.encoder.d_model={enc.d_model} is not divisible by model.encoder.num_heads="
                              f"{enc.num_heads}", ("model.encoder.d_model", "model.encoder.num_heads"))
        if enc.d_model % 2:
            raise ConfigError(f"model.encoder.d_model={enc.d_model} must be even (sinusoidal position encoding)",
                              "model.encoder.d_model")
        if enc.type == "conformer" and not enc.causal and enc.conv_kernel % 2 == 0:
            raise ConfigError(f"model.encoder.conv_kernel={enc.conv_kernel} must be odd for a non-causal conformer "
                              "(or set model.encoder.causal=true)",
                              ("model.encoder.conv_kernel", "model.encoder.causal"))
        from harken.models.subsampling import subsampling_class

        need = int(subsampling_class(enc.subsampling).receptive_field)  # one output bin along frequency
        if enc.input_dim < need:
            raise ConfigError(f"model.fbank.num_mel_bins={fb.num_mel_bins} is too few for {enc.subsampling} "
                              f"subsampling (needs at least {need})",
                              ("model.fbank.num_mel_bins", "model.encoder.input_dim"))
    if m.specaug.time_warp:
        raise ConfigError(f"model.specaug.time_warp={m.specaug.time_warp}: time warping is not implemented; "
                          "set it to 0", "model.specaug.time_warp")
    d = cfg.data
    # the data loader reads speech and noise at the model's rate: data.augment.sample_rate follows
    # model.fbank.sample_rate (stated once, like input_dim)
    if d.augment.sample_rate != fb.sample_rate:
        if explicit is None:
            set_rate = d.augment.sample_rate != SAMPLE_RATE
        else:
            set_rate = "data.augment.sample_rate" in explicit
        if set_rate:
            raise ConfigError(
                f"data.augment.sample_rate={d.augment.sample_rate} disagrees with model.fbank.sample_rate="
                f"{fb.sample_rate}: audio is read at the model's rate, so set only model.fbank.sample_rate "
                "(data.augment.sample_rate follows it)", ("data.augment.sample_rate", "model.fbank.sample_rate"))
        d.augment.sample_rate = fb.sample_rate
    if d.min_utt_duration >= d.max_utt_duration:
        raise ConfigError(f"data.min_utt_duration={d.min_utt_duration} must be below data.max_utt_duration="
                          f"{d.max_utt_duration}", ("data.min_utt_duration", "data.max_utt_duration"))
    for name in ("snr_db", "volume_db"):
        lo, hi = getattr(d.augment, name)
        if lo > hi:
            raise ConfigError(f"data.augment.{name}=[{lo}, {hi}] must be [low, high] with low <= high",
                              f"data.augment.{name}")
    t = cfg.train
    if t.precision == "fp16" and t.device == "cpu":
        raise ConfigError("train.precision=fp16 needs CUDA; use bf16 or fp32 with train.device=cpu",
                          ("train.precision", "train.device"))


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check an already built :class:`ExperimentConfig` as :func:`load_config` does (types, choices,
    ranges, cross-section facts) and tie ``model.encoder.input_dim`` to ``model.fbank.num_mel_bins``.

    Works in place and returns ``cfg``.  As it cannot know which values were set by hand, an
    ``input_dim`` still at its default follows ``num_mel_bins``; any other disagreement is refused.
    Raises :class:`ConfigError`."""
    if not isinstance(cfg, ExperimentConfig):
        raise TypeError(f"validate needs an ExperimentConfig, not {type(cfg).__name__}")
    fresh = _build(ExperimentConfig, to_dict(cfg), "", _Ctx(ExperimentConfig, ""))
    _validate_experiment(fresh, None)
    for f in dataclasses.fields(ExperimentConfig):
        setattr(cfg, f.name, getattr(fresh, f.name))
    return cfg


# ---------------------------------------------------------------------------------------------
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


def _parse_override(ov: str) -> tuple[list[str], Any]:
    if "=" not in ov:
        raise ConfigError(f"override {ov!r} must look like key.path=value")
    key, raw = ov.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {ov!r}: {key.strip()!r} is not a dotted key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {ov!r}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
    return parts, value


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for ov in overrides:
        parts, value = _parse_override(ov)
        node = d
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {ov!r}: {'.'.join(parts[:i + 1])!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return d


def load_config(path: str | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """The experiment config from a YAML file (optional) and dotted overrides, validated.

    Only the keys given count as set: a config that sets ``model.fbank.num_mel_bins`` alone gets a
    matching ``model.encoder.input_dim``.  Messages start with the file or the override at fault."""
    d: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{at} ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    src_of: dict[str, str] = {}  # dotted key -> the override that set it
    for ov in overrides or []:
        parts, _ = _parse_override(ov)
        src_of[".".join(parts)] = ov

    def source(keys: tuple[str, ...]) -> str:
        for key in keys:
            for k, ov in src_of.items():  # the key itself, a section above it, or a key below it
                if key == k or key.startswith(k + ".") or key.startswith(k + "[") or k.startswith(key + "."):
                    return f"override {ov!r}: "
        return f"{path}: " if path else ""

    apply_overrides(d, list(overrides or []))  # its messages name the override
    try:
        return from_dict(ExperimentConfig, d)
    except ConfigError as e:
        raise ConfigError(source(e.keys) + str(e), e.keys) from None


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
