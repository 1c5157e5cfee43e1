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


def iter_record_batches(records: Sequence[Record], max_duration: float = 200.0, progress: bool = False,
                        sample_rate: int | None = None):
    """``(indices, waveforms)`` of duration-sorted batches of manifest records: the one loop that
    evaluation, tuning and the trainer's dev pass read audio through (one batch held at a time).
    Waveforms are read at ``sample_rate`` (the model's; None: 16 kHz)."""
    ds = AsrDataset(records, sample_rate=sample_rate)
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
    sr = getattr(engine, "sample_rate", None)
    for b, waves in iter_record_batches(records, max_duration, progress, sample_rate=sr):
        for i, r in zip(b, engine.infer_batch(waves, options, long_form=True)):
            if isinstance(r, ItemError):
                raise ValueError(f"{records[i].audio} (utterance {records[i].id}): {r.message}")
            hyps[i] = r.text
    return hyps


def log_probs_for_records(engine, records: Sequence[Record], max_duration: float = 200.0) -> list[torch.Tensor]:
    """Model outputs for each record, in record order: (T_i, V) float32 log-probs on the CPU."""
    out: list[torch.Tensor | None] = [None] * len(records)
    for b, waves in iter_record_batches(records, max_duration, sample_rate=getattr(engine, "sample_rate", None)):
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


# ------------------------------------------------------------------------------------ by field
_RECORD_ATTRS = ("speaker", "group", "id", "audio", "text", "duration", "offset")
NO_VALUE = "(none)"


def record_field(rec: Record, name: str) -> str:
    """A manifest field as a string for grouping: a record attribute (``speaker``, ``group``)
    or a key of ``extra`` (``engine``, ``source``, ``channel``, Common Voice's ``gender`` ...);
    ``""`` when the record does not have it."""
    if name in _RECORD_ATTRS:
        v = getattr(rec, name)
    else:
        v = (rec.extra or {}).get(name)
    return "" if v is None else str(v)


def check_group_fields(records: Sequence[Record], names: Sequence[str], where: str) -> None:
    """Every field in ``names`` must be set on at least one record; else ValueError listing the
    fields the records do have."""
    for name in names:
        if not any(record_field(r, name) for r in records):
            have = [a for a in ("speaker", "group") if any(getattr(r, a) for r in records)]
            extra = sorted({k for r in records for k in (r.extra or {})})
            raise ValueError(f"--group-by {name}: no record in {where} has a '{name}' field (fields there: "
                             f"{', '.join(have + extra) or 'none besides id, audio, text'})")


def grouped_report(records: Sequence[Record], refs: Sequence[str], hyps: Sequence[str], name: str) -> list[dict]:
    """One row per value of the field ``name`` (sorted by value; records without it under
    ``"(none)"``): the :class:`ErrorReport` figures of that value's utterances and their hours.
    Utterances with an empty reference are left out, as in :func:`error_report`, so the rows'
    ``num_utts`` and ``num_words`` add up to the whole set's."""
    by: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by.setdefault(record_field(r, name) or NO_VALUE, []).append(i)
    rows = []
    for value in sorted(by):
        idx = by[value]
        hours = sum(records[i].duration for i in idx) / 3600
        if any(refs[i].strip() for i in idx):
            d = error_report([refs[i] for i in idx], [hyps[i] for i in idx]).as_dict()
        else:
            d = dict(wer=None, cer=None, num_utts=0, num_words=0, substitutions=0, deletions=0, insertions=0,
                     sentence_error_rate=None)
        rows.append({"value": value, **d, "hours": hours})
    return rows


def format_groups(name: str, rows: Sequence[dict], set_name: str = "") -> str:
    """A text table of :func:`grouped_report` rows."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    w = max([len(name), 5] + [len(r["value"]) for r in rows])
    out = [f"{(set_name + ': ') if set_name else ''}by {name}",
           f"{name:<{w}} {'utts':>6} {'words':>7} {'WER %':>7} {'CER %':>7} {'SER %':>7} {'hours':>8}"]
    for r in rows:
        out.append(f"{r['value']:<{w}} {r['num_utts']:>6} {r['num_words']:>7} {pct(r['wer']):>7} {pct(r['cer']):>7} "
                   f"{pct(r['sentence_error_rate']):>7} {r['hours']:>8.3f}")
    return "\n".join(out)


def write_errors(path: str | Path, records: Sequence[Record], refs: Sequence[str], hyps: Sequence[str],
                 fields: Sequence[str] = ()) -> None:
    """A per-utterance file: one JSON line per utterance with ref, hyp and its own word errors
    (and the value of each of ``fields``, the ``--group-by`` fields)."""
    with open(path, "w", encoding="utf-8") as f:
        for rec, r, h in zip(records, refs, hyps):
            if r.strip():
                o = jiwer.process_words(r, h)
                errs = o.substitutions + o.deletions + o.insertions
                n = o.hits + o.substitutions + o.deletions
            else:
                errs, n = len(h.split()), 0
            d = {"id": rec.id, "speaker": rec.speaker}
            d.update({k: record_field(rec, k) for k in fields if k != "speaker"})
            d.update(errors=errs, words=n, ref=r, hyp=h)
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
