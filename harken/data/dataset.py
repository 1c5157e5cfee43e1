"""Reading utterances into padded batches.

The dataset is indexed by a whole batch request ``(epoch, [indices])`` (the sampler decides the
batch), loads and augments each utterance with an RNG derived from (seed, epoch, index) -- so the
same batch is the same on any worker and after a resume -- and returns a padded batch dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from harken.audio import SAMPLE_RATE, load_audio
from harken.data.manifest import Record


@dataclass
class Batch:
    ids: list[str]
    wave: torch.Tensor  # (B, S) float32, zero padded
    wave_lens: torch.Tensor  # (B,) int64 samples
    targets: torch.Tensor  # (B, U) int64, zero padded
    target_lens: torch.Tensor  # (B,) int64
    texts: list[str]

    def to(self, device) -> "Batch":
        return Batch(self.ids, self.wave.to(device, non_blocking=True), self.wave_lens.to(device),
                     self.targets.to(device), self.target_lens.to(device), self.texts)

    @property
    def seconds(self) -> float:
        return float(self.wave_lens.sum()) / SAMPLE_RATE


def pad_waves(waves: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([len(w) for w in waves], dtype=torch.int64)
    out = torch.zeros(len(waves), int(lens.max()) if len(waves) else 0, dtype=torch.float32)
    for i, w in enumerate(waves):
        out[i, : len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
    return out, lens


class AsrDataset(torch.utils.data.Dataset):
    def __init__(self, records: Sequence[Record], tokenizer=None, augmenter=None, seed: int = 0,
                 normalize=None):
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
        waves, targets, texts = [], [], []
        for i in indices:
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
        return Batch([self.records[i].id for i in indices], wave, wave_lens, tgt, tl, texts)


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
