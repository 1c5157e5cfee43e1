"""Checkpoint -> model for inference, with no training code and no arbitrary unpickling.

    loaded = load_model("exp/demo/best.pt")
    loaded.model, loaded.tokenizer, loaded.config, loaded.info

Checkpoints are read with ``torch.load(weights_only=True)``: tensors, plain containers, numbers and
strings only, so a file from elsewhere cannot run code while it is read (a pickle renamed ``.pt``
is refused before any of its payload runs). The training resume path
(:func:`harken.train.checkpoint.load_checkpoint`) may keep full pickles of the trainer's own files.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harken.models.info import ModelInfo, file_model_id

__all__ = ["LoadedModel", "ModelFileError", "read_checkpoint", "load_model"]


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names the file and the reason."""


@dataclass
class LoadedModel:
    model: Any  # CtcModel in eval mode on the CPU
    tokenizer: Any
    config: Any  # ExperimentConfig
    info: ModelInfo


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The dict inside a harken checkpoint, read with ``weights_only=True``. Raises
    FileNotFoundError (missing) or :class:`ModelFileError` (a directory, not a torch file,
    a file with code in its pickle, not a harken checkpoint), each naming the path."""
    import torch

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model file")
    if p.is_dir():
        raise ModelFileError(f"{p}: is a directory; give the checkpoint file (e.g. {p}/best.pt)")
    if p.stat().st_size == 0:
        raise ModelFileError(f"{p}: file is empty (0 bytes)")
    if not zipfile.is_zipfile(p):
        raise ModelFileError(f"{p}: not a harken checkpoint (not a torch zip archive; a raw pickle or "
                             "another format is refused for safety)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"{p}: refused: the file holds objects other than tensors and plain data, "
                             f"which could run code when loaded ({first[:160]})") from None
    except Exception as e:  # truncated zip, bad records, ...
        raise ModelFileError(f"{p}: not a readable checkpoint ({type(e).__name__}: {str(e)[:160]})") from None
    if not isinstance(obj, dict):
        raise ModelFileError(f"{p}: not a harken checkpoint (holds a {type(obj).__name__}, not a dict)")
    missing = [k for k in ("config", "model", "tokenizer") if k not in obj]
    if missing:
        raise ModelFileError(f"{p}: not a harken checkpoint (missing {', '.join(repr(k) for k in missing)})")
    return obj


def load_model(path: str | os.PathLike, device: str = "cpu") -> LoadedModel:
    """Rebuild the model of a harken checkpoint in eval mode, with its tokenizer, config and
    :class:`ModelInfo` (``model_id`` = hash of the file)."""
    from harken.config import ConfigError, ExperimentConfig, from_dict
    from harken.models.build import build_model
    from harken.text.tokenizer import tokenizer_from_dict

    obj = read_checkpoint(path)
    try:
        cfg = from_dict(ExperimentConfig, obj["config"])
    except (ConfigError, TypeError) as e:
        raise ModelFileError(f"{path}: its config does not load with this harken ({e})") from None
    try:
        tok = tokenizer_from_dict(obj["tokenizer"])
    except Exception as e:
        raise ModelFileError(f"{path}: its tokenizer does not load ({type(e).__name__}: {e})") from None
    from harken.models.registry import encoder_class

    pretrained_ref = cfg.model.encoder.pretrained  # kept in the info: what it was fine-tuned from
    try:  # encoders whose pretrained weights are in the state dict rebuild without the original files
        if cfg.model.encoder.pretrained and getattr(encoder_class(cfg.model.encoder.type), "weights_in_state_dict",
                                                    False):
            cfg.model.encoder = dataclasses.replace(cfg.model.encoder, pretrained=None)
    except (KeyError, ValueError):
        pass  # an unknown encoder type: build_model names it below
    try:
        model = build_model(cfg, tok.vocab_size)
        model.load_state_dict(obj["model"])
    except (ImportError, ModuleNotFoundError):
        raise
    except Exception as e:  # a state dict that does not fit its own config
        raise ModelFileError(f"{path}: cannot rebuild the model from this checkpoint "
                             f"({type(e).__name__}: {str(e)[:200]})") from None
    model = model.to(device).eval()
    info = ModelInfo.from_model(model, tok, cfg, model_id=file_model_id(path))
    if pretrained_ref:
        info.extra["pretrained"] = str(pretrained_ref)
    return LoadedModel(model=model, tokenizer=tok, config=cfg, info=info)
