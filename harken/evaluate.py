"""Batch decoding of manifests and WER/CER reports."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jiwer
import torch

from harken.data.dataset import AsrDataset
from harken.data.manifest import Record
from harken.data.sampler import length_batches


def duration_batches(records: Sequence[Record], max_duration: float) -> list[list[int]]:
    """Deterministic batches of similar length for inference (sorted by duration)."""
    return length_batches([r.duration for r in records], max_duration)


def as_engine(model_or_engine, tokenizer=None, config=None, device=None):
    """An :class:`~harken.runtime.Engine` for an Engine (returned as is) or an in-memory CtcModel
    with its tokenizer and experiment config (the trainer's dev evaluation)."""
    from harken.runtime import Engine

    if isinstance(model_or_engine, Engine):
        return model_or_engine
    if tokenizer is None or config is None:
        raise TypeError("a bare model needs its tokenizer and config to be evaluated")
    device = device or next(model_or_engine.parameters()).device
    return Engine.from_model(model_or_engine, tokenizer, config, device)


def iter_record_batches(records: Sequence[Record], max_duration: float = 200.0, progress: bool = False):
    """``(indices, waveforms)`` of duration-sorted batches of manifest records: the one loop that
    evaluation, tuning and the trainer's dev pass read audio through (one batch held at a time)."""
    ds = AsrDataset(records)
    batches = duration_batches(records, max_duration)
    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc="decode", unit="batch", leave=False)
    for b in it:
        yield b, [ds.load(i, 0) for i in b]


def decode_records(engine, records: Sequence[Record], options=None, *, max_duration: float = 200.0,
                   progress: bool = False) -> list[str]:
    """Decode every record through ``engine`` (an :class:`~harken.runtime.Engine`; ``options``: a
    :class:`~harken.runtime.DecodeOptions` or a ``DecodeConfig``, default the engine's); returns
    hypotheses in the records' order. A record whose audio cannot be used raises, naming it."""
    from harken.runtime import DecodeOptions, ItemError

    if options is not None and not isinstance(options, DecodeOptions):
        options = DecodeOptions.from_config(options)
    hyps: list[str] = [""] * len(records)
    for b, waves in iter_record_batches(records, max_duration, progress):
        for i, r in zip(b, engine.infer_batch(waves, options, long_form=True)):
            if isinstance(r, ItemError):
                raise ValueError(f"{records[i].audio} (utterance {records[i].id}): {r.message}")
            hyps[i] = r.text
    return hyps


def log_probs_for_records(engine, records: Sequence[Record], max_duration: float = 200.0) -> list[torch.Tensor]:
    """Model outputs for each record, in record order: (T_i, V) float32 log-probs on the CPU."""
    out: list[torch.Tensor | None] = [None] * len(records)
    for b, waves in iter_record_batches(records, max_duration):
        for i, lp in zip(b, engine.log_probs(waves)):
            out[i] = lp.clone()
    return out  # type: ignore[return-value]


@dataclass
class ErrorReport:
    wer: float
    cer: float
    num_utts: int
    num_words: int
    substitutions: int
    deletions: int
    insertions: int
    sentence_error_rate: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def error_report(refs: Sequence[str], hyps: Sequence[str]) -> ErrorReport:
    pairs = [(r, h) for r, h in zip(refs, hyps) if r.strip()]
    if not pairs:
        raise ValueError("no non-empty reference transcripts to score")
    r, h = [p[0] for p in pairs], [p[1] for p in pairs]
    out = jiwer.process_words(r, h)
    cer = jiwer.cer(r, h)
    n_words = out.hits + out.substitutions + out.deletions
    ser = sum(a != b for a, b in pairs) / len(pairs)
    return ErrorReport(wer=out.wer, cer=float(cer), num_utts=len(pairs), num_words=n_words,
                       substitutions=out.substitutions, deletions=out.deletions,
                       insertions=out.insertions, sentence_error_rate=ser)


def write_errors(path: str | Path, records: Sequence[Record], refs: Sequence[str], hyps: Sequence[str]) -> None:
    """A per-utterance file: one JSON line per utterance with ref, hyp and its own word errors."""
    with open(path, "w", encoding="utf-8") as f:
        for rec, r, h in zip(records, refs, hyps):
            if r.strip():
                o = jiwer.process_words(r, h)
                errs = o.substitutions + o.deletions + o.insertions
                n = o.hits + o.substitutions + o.deletions
            else:
                errs, n = len(h.split()), 0
            f.write(json.dumps({"id": rec.id, "speaker": rec.speaker, "errors": errs, "words": n,
                                "ref": r, "hyp": h}, ensure_ascii=False) + "\n")
