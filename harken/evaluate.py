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
from harken.decode.greedy import greedy_ids


def duration_batches(records: Sequence[Record], max_duration: float) -> list[list[int]]:
    """Deterministic batches of similar length for inference (sorted by duration)."""
    return length_batches([r.duration for r in records], max_duration)


@torch.inference_mode()
def decode_records(model, records: Sequence[Record], tokenizer, device=None,
                   max_duration: float = 200.0, progress: bool = False, decode_cfg=None) -> list[str]:
    """Decode every record (greedy, or ``decode_cfg``: beam, LM, hotwords); returns hypotheses in the
    records' order."""
    decoder = None
    if decode_cfg is not None and decode_cfg.method != "greedy":
        from harken.decode import build_decoder, decode_texts

        decoder = build_decoder(tokenizer, decode_cfg)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    ds = AsrDataset(records)
    hyps: list[str] = [""] * len(records)
    batches = duration_batches(records, max_duration)
    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc="decode", unit="batch", leave=False)
    for b in it:
        batch = ds[(0, b)]
        log_probs, out_lens = model(batch.wave.to(device), batch.wave_lens.to(device))
        if decoder is not None:
            for i, text in zip(b, decode_texts(log_probs.float().cpu(), out_lens.cpu(), tokenizer, decode_cfg,
                                               decoder)):
                hyps[i] = text
            continue
        for i, ids in zip(b, greedy_ids(log_probs, out_lens)):
            hyps[i] = tokenizer.decode(ids)
    model.train(was_training)
    return hyps


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
