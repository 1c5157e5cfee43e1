"""Dynamic batches by total duration, bucketed by length, deterministic and resumable.

The sampler sees only durations (and optional per-utterance weights). For each epoch it

1. draws the epoch's utterance list: each utterance appears ``floor(w)`` times plus once more with
   probability ``frac(w)`` (weights > 1 oversample rare groups, < 1 undersample), from an RNG seeded
   by (seed, epoch);
2. sorts the list by duration and cuts it into ``num_buckets`` buckets of similar length, shuffles
   inside each bucket, and packs consecutive utterances into batches whose *padded* duration
   (longest utterance x batch size) stays under ``max_duration`` seconds;
3. groups consecutive (similar-length) batches into the batches of one global step (``group_size`` =
   ranks x gradient accumulation), shuffles the groups, and deals batches to ranks round-robin, so
   every rank gets the same number of batches (no rank waits at a collective that others never
   reach) and the batches of one step cost about the same on every rank.

Curriculum (``curriculum_epochs=N``): in the first N epochs step 3 keeps the groups in length order
instead of shuffling them, so training sees short utterances first and long ones last (still
bucketed and shuffled inside each bucket); from epoch N on, epochs are shuffled as above. The plan
depends only on (seed, epoch), so a curriculum epoch is as deterministic and resumable as any other.

``state_dict()`` records the epoch and how many batches this rank has consumed, so a resumed run
continues from the next batch of the same epoch with the same order.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


class BucketSampler:
    def __init__(
        self,
        durations: Sequence[float],
        max_duration: float,
        *,
        num_buckets: int = 10,
        shuffle: bool = True,
        seed: int = 0,
        max_utt_duration: float | None = None,
        min_utt_duration: float = 0.0,
        weights: Sequence[float] | None = None,
        world_size: int = 1,
        rank: int = 0,
        max_batch_size: int | None = None,
        drop_last: bool = False,
        group_size: int | None = None,
        curriculum_epochs: int = 0,
    ):
        if max_duration <= 0:
            raise ValueError(f"max_duration must be > 0 seconds, got {max_duration}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.durations = np.asarray(durations, dtype=np.float64)
        self.max_duration = float(max_duration)
        self.num_buckets = max(1, int(num_buckets))
        self.shuffle = shuffle
        self.seed = int(seed)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.max_batch_size = max_batch_size
        # batches per global step (world_size x gradient accumulation); must be a multiple of world_size
        self.group_size = int(group_size or world_size)
        if self.group_size % self.world_size:
            raise ValueError(f"group_size {self.group_size} is not a multiple of world_size {world_size}")
        self.drop_last = drop_last
        self.curriculum_epochs = max(0, int(curriculum_epochs))
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        if self.weights is not None and len(self.weights) != len(self.durations):
            raise ValueError("weights and durations differ in length")
        hi = max_duration if max_utt_duration is None else min(max_utt_duration, max_duration)
        keep = (self.durations <= hi) & (self.durations >= min_utt_duration)
        self.kept = np.flatnonzero(keep)
        self.num_filtered = int(len(self.durations) - len(self.kept))
        if len(self.kept) == 0:
            raise ValueError(
                f"no utterance fits: all {len(self.durations)} are outside [{min_utt_duration}, {hi}] s"
            )
        self.epoch = 0
        self._consumed = 0  # batches of the current epoch this rank has yielded
        self._cache: tuple[int, list[list[int]]] | None = None
        self._epoch_items = 0  # utterances in the current epoch's batches, all ranks

    # -- epoch plan ---------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._consumed = 0

    def _epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        idx = self.kept
        if self.weights is None:
            return idx
        w = self.weights[idx]
        reps = np.floor(w).astype(np.int64) + (rng.random(len(idx)) < (w - np.floor(w)))
        return np.repeat(idx, reps)

    def _all_batches(self) -> list[list[int]]:
        """Every batch of the epoch (all ranks), in global order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        idx = self._epoch_indices(rng)
        order = idx[np.argsort(self.durations[idx], kind="stable")]
        # a bucket must hold a few batches' worth of audio, or small data sets get tiny batches
        total = float(self.durations[order].sum())
        nb = max(1, min(self.num_buckets, len(order), int(total // (3 * self.max_duration))))
        buckets = np.array_split(order, nb)
        batches: list[list[int]] = []
        for b in buckets:
            if self.shuffle:
                b = b[rng.permutation(len(b))]
            cur: list[int] = []
            longest = 0.0
            for i in b.tolist():
                d = self.durations[i]
                new_longest = max(longest, d)
                full = self.max_batch_size is not None and len(cur) >= self.max_batch_size
                if cur and (new_longest * (len(cur) + 1) > self.max_duration or full):
                    batches.append(cur)
                    cur, new_longest = [], d
                cur.append(i)
                longest = new_longest
            if cur and not (self.drop_last and longest * len(cur) < 0.5 * self.max_duration):
                batches.append(cur)
        # Consecutive batches (taken in length order) form groups of `group_size`: the batches of
        # one global step (all ranks x accumulation). Shuffling whole groups keeps every rank's
        # batch in a step about equally long, so no rank idles at the all-reduce waiting for a
        # rank that drew a long bucket. A tail that cannot fill a group is left for this epoch.
        g = self.group_size
        groups = [batches[i : i + g] for i in range(0, len(batches) - g + 1, g)]
        if self.shuffle and not self.in_curriculum():
            groups = [groups[i] for i in rng.permutation(len(groups))]
        return [b for grp in groups for b in grp]

    def in_curriculum(self, epoch: int | None = None) -> bool:
        """Whether ``epoch`` (default: the current one) is ordered short to long."""
        return (self.epoch if epoch is None else epoch) < self.curriculum_epochs

    def _rank_batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            allb = self._all_batches()
            n = (len(allb) // self.world_size) * self.world_size
            if n == 0:
                raise ValueError(
                    f"epoch has {len(allb)} batches, fewer than world_size={self.world_size}: "
                    "lower max_duration or add data"
                )
            self._cache = (self.epoch, allb[self.rank : n : self.world_size])
            self._epoch_items = sum(len(b) for b in allb[:n])
        return self._cache[1]

    def epoch_items(self) -> int:
        """Utterances in the current epoch's batches, over all ranks (the base of the trainer's
        unreadable-file limit)."""
        self._rank_batches()
        return self._epoch_items

    def __len__(self) -> int:
        return len(self._rank_batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        while self._consumed < len(batches):
            b = batches[self._consumed]
            self._consumed += 1
            yield b
        # the epoch is over: the next iteration starts the next epoch
        self.epoch += 1
        self._consumed = 0

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self._consumed, "seed": self.seed,
                "world_size": self.world_size, "num_utts": int(len(self.durations)),
                "curriculum_epochs": self.curriculum_epochs}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``. With another world size the *global* position is kept: W_old
        ranks that each consumed c batches consumed global batches [0, c*W_old); each of the W_new
        ranks continues at floor(c*W_old / W_new), so up to W_new-1 global batches are trained
        again and none is skipped. (The epoch's global batch order does not depend on the world
        size; only the tail truncated to a multiple of W differs.)"""
        if state.get("num_utts", len(self.durations)) != len(self.durations):
            raise ValueError(
                f"sampler state is for {state['num_utts']} utterances, this data has {len(self.durations)}"
            )
        self.epoch = int(state["epoch"])
        consumed = int(state["consumed"])
        old_ws = int(state.get("world_size", self.world_size))
        if old_ws != self.world_size:
            # the same global position: old ranks consumed `consumed` batches each
            consumed = (consumed * old_ws) // self.world_size
        self._consumed = consumed

    # -- diagnostics --------------------------------------------------------------------------
    def padding_fraction(self) -> float:
        """Fraction of padded audio in this rank's batches for the current epoch."""
        tot = pad = 0.0
        for b in self._rank_batches():
            d = self.durations[b]
            tot += d.max() * len(b)
            pad += d.max() * len(b) - d.sum()
        return pad / tot if tot else 0.0


class RandomBatchSampler:
    """The naive baseline: fixed-size batches of randomly ordered utterances (for benchmarks)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 0

    def __iter__(self):
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()
        for i in range(0, self.n, self.batch_size):
            yield perm[i : i + self.batch_size]
        self.epoch += 1

    def __len__(self):
        return (self.n + self.batch_size - 1) // self.batch_size


def group_weights(groups: Sequence[str], mode: str = "sqrt_inverse", cap: float = 10.0) -> np.ndarray:
    """Per-utterance sampling weights that lift rare groups.

    ``inverse`` gives every group the same expected share; ``sqrt_inverse`` (default) moves halfway
    there in log space (the usual compromise, as in multilingual sampling with temperature 0.5);
    weights are scaled so the largest group keeps weight 1 and capped at ``cap``.
    """
    groups = list(groups)
    names, inv, counts = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True,
                                   return_counts=True)
    power = {"inverse": 1.0, "sqrt_inverse": 0.5, "none": 0.0}.get(mode)
    if power is None:
        raise ValueError(f"unknown weighting mode '{mode}' (inverse, sqrt_inverse, none)")
    per_group = (counts.max() / counts) ** power
    return np.minimum(per_group, cap)[inv]


def length_batches(lengths: Sequence[float], max_total: float, max_size: int | None = None,
                   max_ratio: float | None = None) -> list[list[int]]:
    """Deterministic inference batches: indices sorted by length, cut so that a batch's padded size
    (longest x count) stays within ``max_total``, its count within ``max_size`` and, with
    ``max_ratio``, its longest item within ``max_ratio`` x its shortest (bounded padding). Every index
    appears once; one over-long item gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0.0
    shortest = 0.0
    for i in order:
        n = float(lengths[i])
        full = max(longest, n) * (len(cur) + 1) > max_total or (max_size is not None and len(cur) >= max_size)
        if cur and max_ratio is not None and n > max_ratio * max(shortest, 1e-9):
            full = True
        if cur and full:
            batches.append(cur)
            cur, longest = [], 0.0
        if not cur:
            shortest = n
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches
