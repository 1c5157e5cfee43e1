"""Reading utterances into padded batches.

The dataset is indexed by a whole batch request ``(epoch, [indices])`` (the sampler decides the
batch), loads and augments each utterance with an RNG derived from (seed, epoch, index) -- so the
same batch is the same on any worker and after a resume -- and returns a padded batch dict.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from harken.audio import SAMPLE_RATE, load_audio
from harken.data.manifest import Record
from harken.fsutil import atomic_open


@dataclass
class Batch:
    ids: list[str]
    wave: torch.Tensor  # (B, S) float32, zero padded
    wave_lens: torch.Tensor  # (B,) int64 samples
    targets: torch.Tensor  # (B, U) int64, zero padded
    target_lens: torch.Tensor  # (B,) int64
    texts: list[str]
    feats: torch.Tensor | None = None  # (B, T, F) cached fbank features, when a feature cache is used
    feat_lens: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(self.ids, mv(self.wave), mv(self.wave_lens), mv(self.targets), mv(self.target_lens),
                     self.texts, mv(self.feats), mv(self.feat_lens))

    @property
    def seconds(self) -> float:
        return float(self.wave_lens.sum()) / SAMPLE_RATE


def pad_waves(waves: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([len(w) for w in waves], dtype=torch.int64)
    out = torch.zeros(len(waves), int(lens.max()) if len(waves) else 0, dtype=torch.float32)
    for i, w in enumerate(waves):
        out[i, : len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
    return out, lens


class FeatureCache:
    """Fbank features of unaugmented utterances, computed once and kept as float16 ``.npy`` files.

    The folder is keyed by the fbank settings (a hash of ``FbankConfig``), a file by the utterance's
    audio path, offset and duration, so a changed front end or a changed manifest never reads stale
    features. Files are written atomically; concurrent workers or ranks may race to write the same
    file harmlessly."""

    def __init__(self, folder: str | os.PathLike, fbank_cfg):
        import dataclasses

        from harken.features import Fbank

        key = hashlib.sha1(json.dumps(dataclasses.asdict(fbank_cfg), sort_keys=True).encode()).hexdigest()[:12]
        self.dir = Path(folder) / f"fbank-{key}"
        self.dir.mkdir(parents=True, exist_ok=True)
        fb = dataclasses.replace(fbank_cfg, dither=0.0)
        self.fbank = Fbank(fb).eval()

    def path(self, r: Record) -> Path:
        h = hashlib.sha1(f"{os.path.abspath(r.audio)}|{r.offset:.4f}|{r.duration:.4f}".encode()).hexdigest()
        return self.dir / h[:2] / f"{h[2:]}.npy"

    def get(self, r: Record, load_wave) -> np.ndarray:
        p = self.path(r)
        if p.exists():
            try:
                return np.load(p).astype(np.float32)
            except (ValueError, OSError, EOFError):
                pass  # damaged: recompute below
        wave = torch.from_numpy(load_wave())[None]
        with torch.inference_mode():
            feats, n = self.fbank(wave, torch.tensor([wave.shape[1]]))
        out = feats[0, : int(n[0])].numpy()
        with atomic_open(p, "wb", fsync=False) as f:
            np.save(f, out.astype(np.float16))
        return out


class AsrDataset(torch.utils.data.Dataset):
    def __init__(self, records: Sequence[Record], tokenizer=None, augmenter=None, seed: int = 0,
                 normalize=None, feature_cache: FeatureCache | None = None):
        self.feature_cache = feature_cache
        self.records = list(records)
        self.tokenizer = tokenizer
        self.augmenter = augmenter
        self.seed = seed
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int, epoch: int = 0) -> np.ndarray:
        r = self.records[i]
        wave = load_audio(r.audio, offset=r.offset, duration=r.duration)
        if self.augmenter is not None:
            rng = np.random.default_rng([self.seed, epoch, i])
            wave = self.augmenter(wave, rng)
        return wave

    def __getitem__(self, request) -> Batch:
        epoch, indices = request if isinstance(request, tuple) else (0, request)
        waves, targets, texts, feats = [], [], [], []
        for i in indices:
            if self.feature_cache is not None:
                feats.append(self.feature_cache.get(self.records[i], lambda i=i: self.load(i, epoch)))
                waves.append(np.zeros(0, dtype=np.float32))
            else:
                waves.append(self.load(i, epoch))
            text = self.records[i].text
            if self.normalize is not None:
                text = self.normalize(text)
            texts.append(text)
            if self.tokenizer is not None:
                targets.append(self.tokenizer.encode(text))
        wave, wave_lens = pad_waves(waves)
        tl = torch.tensor([len(t) for t in targets] or [0] * len(indices), dtype=torch.int64)
        tgt = torch.zeros(len(indices), int(tl.max()) if len(indices) else 0, dtype=torch.int64)
        for j, t in enumerate(targets):
            tgt[j, : len(t)] = torch.tensor(t, dtype=torch.int64)
        batch = Batch([self.records[i].id for i in indices], wave, wave_lens, tgt, tl, texts)
        if feats:
            batch.feat_lens = torch.tensor([len(f) for f in feats], dtype=torch.int64)
            batch.feats = torch.zeros(len(feats), int(batch.feat_lens.max()), feats[0].shape[1])
            for j, f in enumerate(feats):
                batch.feats[j, : len(f)] = torch.from_numpy(f)
            # audio seconds (for throughput figures) from the frame counts: 10 ms per frame
            batch.wave_lens = batch.feat_lens * (SAMPLE_RATE // 100)
        return batch


class EpochTagged:
    """Wraps a batch sampler so each batch travels with its epoch: ``(epoch, indices)``."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        epoch = self.sampler.epoch
        for b in self.sampler:
            yield epoch, b

    def __len__(self) -> int:
        return len(self.sampler)


def make_loader(dataset: AsrDataset, sampler, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over whole-batch requests (the sampler forms batches; no re-batching here)."""
    return torch.utils.data.DataLoader(
        dataset,
        sampler=EpochTagged(sampler),
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        collate_fn=_identity,
        generator=torch.Generator(),  # never draw worker seeds from the global RNG (exact resume)
    )


def _identity(x):
    return x


def fixed_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]


def estimate_cmvn(records: Sequence[Record], fbank_cfg, max_utts: int = 500, seed: int = 0):
    """Global CMVN (:func:`harken.features.compute_cmvn`, the one estimator) over a random subset
    of at most ``max_utts`` records, read without augmentation."""
    from harken.features import compute_cmvn

    rng = np.random.default_rng(seed)
    n = min(len(records), int(max_utts))
    pick = sorted(rng.choice(len(records), size=n, replace=False).tolist())
    ds = AsrDataset(records)
    return compute_cmvn((ds.load(i, 0) for i in pick), fbank_cfg)
