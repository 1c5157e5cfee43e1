"""Reading utterances into padded batches.

The dataset is indexed by a whole batch request ``(epoch, [indices])`` (the sampler decides the
batch), loads and augments each utterance with an RNG derived from (seed, epoch, index) -- so the
same batch is the same on any worker and after a resume -- and returns a padded batch dict.

Bad audio never kills a DataLoader worker when the dataset is built with ``skip_unreadable=True``
(the trainer): an utterance that cannot be read (or decodes far shorter than its manifest says) is
left out of its batch and reported in ``Batch.failed``, so the main process can warn, count and
stop when too many fail. :func:`check_records` is the check before any work: every file exists,
decodes, and lasts what its record says.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from harken.audio import SAMPLE_RATE, AudioError, audio_duration, load_audio
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
    sample_rate: int = SAMPLE_RATE  # of ``wave`` (the model's rate)
    # utterances of the requested batch left out because they could not be read: (id, audio, why)
    failed: list[tuple[str, str, str]] = field(default_factory=list)

    def to(self, device) -> "Batch":
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(self.ids, mv(self.wave), mv(self.wave_lens), mv(self.targets), mv(self.target_lens),
                     self.texts, mv(self.feats), mv(self.feat_lens), self.sample_rate, self.failed)

    @property
    def seconds(self) -> float:
        return float(self.wave_lens.sum()) / self.sample_rate


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
    """Utterances read (and resampled) at ``sample_rate``: the model's ``fbank.sample_rate``.
    ``None``: the augmenter's rate (``data.augment.sample_rate``, which the config ties to the
    model's), else 16 kHz.

    ``skip_unreadable``: an utterance whose audio cannot be read, or decodes to less than
    :func:`duration_tolerance` short of its record's duration (a file overwritten after the check
    at start), is left out of its batch and listed in ``Batch.failed`` instead of raising; a batch
    whose every utterance fails gets the next readable utterance (in index order) so that no rank
    ever gets an empty batch. Off (errors raise) for evaluation and the CMVN estimate."""

    #: how many following utterances a batch whose every utterance failed tries in its place
    SUBSTITUTE_TRIES = 16

    def __init__(self, records: Sequence[Record], tokenizer=None, augmenter=None, seed: int = 0,
                 normalize=None, feature_cache: FeatureCache | None = None, sample_rate: int | None = None,
                 skip_unreadable: bool = False):
        aug_rate = getattr(getattr(augmenter, "cfg", None), "sample_rate", None)
        self.sample_rate = int(sample_rate or aug_rate or SAMPLE_RATE)
        if aug_rate is not None and int(aug_rate) != self.sample_rate:
            raise ValueError(f"the augmenter works at {aug_rate} Hz but the data are read at {self.sample_rate} Hz")
        if feature_cache is not None and feature_cache.fbank.cfg.sample_rate != self.sample_rate:
            raise ValueError(f"the feature cache's fbank runs at {feature_cache.fbank.cfg.sample_rate} Hz but the "
                             f"data are read at {self.sample_rate} Hz")
        self.feature_cache = feature_cache
        self.records = list(records)
        self.tokenizer = tokenizer
        self.augmenter = augmenter
        self.seed = seed
        self.normalize = normalize
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int, epoch: int = 0) -> np.ndarray:
        r = self.records[i]
        wave = load_audio(r.audio, sample_rate=self.sample_rate, offset=r.offset, duration=r.duration)
        if self.skip_unreadable:
            got = len(wave) / self.sample_rate
            if got < r.duration - duration_tolerance(r.duration):
                raise AudioError(f"{r.audio}: decodes to {got:.2f} s, its record {r.id!r} says {r.duration:.2f} s "
                                 "(changed since the check at start?)", code="corrupt")
        if self.augmenter is not None:
            rng = np.random.default_rng([self.seed, epoch, i])
            wave = self.augmenter(wave, rng)
        return wave

    def _audio(self, i: int, epoch: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(waveform, cached features) of utterance ``i``: one of them is set."""
        if self.feature_cache is not None:
            return None, self.feature_cache.get(self.records[i], lambda: self.load(i, epoch))
        return self.load(i, epoch), None

    def __getitem__(self, request) -> Batch:
        epoch, indices = request if isinstance(request, tuple) else (0, request)
        loaded, failed = [], []
        for i in indices:
            try:
                loaded.append((i, *self._audio(i, epoch)))
            except (AudioError, OSError) as e:
                if not self.skip_unreadable:
                    raise
                why = " ".join(str(e).split())
                audio = self.records[i].audio
                why = why[len(audio) + 2:] if why.startswith(audio + ": ") else why  # the path is named beside it
                failed.append((self.records[i].id, audio, why))
        if not loaded and len(indices):  # a batch of unreadable utterances: fill in a readable one
            start = max(indices)
            for k in range(1, min(self.SUBSTITUTE_TRIES, len(self.records)) + 1):
                j = (start + k) % len(self.records)
                try:
                    loaded.append((j, *self._audio(j, epoch)))
                    break
                except (AudioError, OSError):
                    continue
            else:
                raise AudioError(f"all {len(indices)} utterance(s) of a batch and the {self.SUBSTITUTE_TRIES} after "
                                 f"them are unreadable; first: {failed[0][2]}", code="corrupt")
        waves, targets, texts, feats = [], [], [], []
        indices = [i for i, _, _ in loaded]
        for i, w, f in loaded:
            if f is not None:
                feats.append(f)
                waves.append(np.zeros(0, dtype=np.float32))
            else:
                waves.append(w)
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
        batch = Batch([self.records[i].id for i in indices], wave, wave_lens, tgt, tl, texts,
                      sample_rate=self.sample_rate, failed=failed)
        if feats:
            batch.feat_lens = torch.tensor([len(f) for f in feats], dtype=torch.int64)
            batch.feats = torch.zeros(len(feats), int(batch.feat_lens.max()), feats[0].shape[1])
            for j, f in enumerate(feats):
                batch.feats[j, : len(f)] = torch.from_numpy(f)
            # audio seconds (for throughput figures) from the frame counts: 10 ms per frame
            batch.wave_lens = batch.feat_lens * (self.sample_rate // 100)
        return batch


class EpochTagged:
    """Wraps a batch sampler so each batch travels with its epoch: ``(epoch, indices)``.

    The sampler is iterated in the main process (the DataLoader sends only the requests to its
    workers), and every ``iter(loader)`` starts a new pass here that reads the sampler's epoch
    afresh: so one DataLoader with persistent workers, iterated once per epoch, reshuffles every
    epoch, and the workers' dataset copies need no epoch of their own (it travels with each
    request)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        epoch = self.sampler.epoch
        for b in self.sampler:
            yield epoch, b

    def __len__(self) -> int:
        return len(self.sampler)


def make_loader(dataset: AsrDataset, sampler, num_workers: int = 0, prefetch_factor: int = 4,
                persistent: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader over whole-batch requests (the sampler forms batches; no re-batching here).

    With workers, they are ``persistent`` by default: started once and kept across epochs (iterate
    the same loader once per epoch; see :class:`EpochTagged`), instead of re-spawned, re-importing
    torch and re-reading the noise folder, at every epoch. ``prefetch_factor``: batches each
    worker prepares ahead."""
    return torch.utils.data.DataLoader(
        dataset,
        sampler=EpochTagged(sampler),
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=bool(persistent and num_workers > 0),
        prefetch_factor=max(1, int(prefetch_factor)) if num_workers > 0 else None,
        collate_fn=_identity,
        generator=torch.Generator(),  # never draw worker seeds from the global RNG (exact resume)
    )


def _identity(x):
    return x


def fixed_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]


def estimate_cmvn(records: Sequence[Record], fbank_cfg, max_utts: int = 500, seed: int = 0):
    """Global CMVN (:func:`harken.features.compute_cmvn`, the one estimator) over a random subset
    of at most ``max_utts`` records, read without augmentation at the fbank's sample rate."""
    from harken.features import compute_cmvn

    rng = np.random.default_rng(seed)
    n = min(len(records), int(max_utts))
    pick = sorted(rng.choice(len(records), size=n, replace=False).tolist())
    ds = AsrDataset(records, sample_rate=fbank_cfg.sample_rate)
    return compute_cmvn((ds.load(i, 0) for i in pick), fbank_cfg)


# ------------------------------------------------------------------------------------ the check at start
#: why a record is left out before training, in the order the checks run
EXCLUDE_REASONS = ("missing", "unreadable", "duration_mismatch", "too_short", "too_long")


def duration_tolerance(seconds: float) -> float:
    """How far a file's real duration may be from its record's before the record is refused:
    max(0.1 s, 10 %) (container rounding and encoder padding stay well inside it; a file truncated
    to a few samples, or a record pointing at the wrong file, does not)."""
    return max(0.1, 0.1 * float(seconds))


def _probe(path: str) -> tuple[float | None, str | None, str | None]:
    """(duration in seconds, None, None), or (None, reason, detail) for a missing or unreadable
    file. WAV/FLAC/OGG: from the header and frame count (fast); other formats: by decoding."""
    if not os.path.exists(path):
        return None, "missing", "file not found"
    try:
        return float(audio_duration(path)), None, None
    except (AudioError, OSError) as e:
        return None, "unreadable", " ".join(str(e).split())


def check_records(records: Sequence[Record], *, min_duration: float = 0.0, max_duration: float = math.inf,
                  check_audio: bool = True, jobs: int = 8, cache_path: str | os.PathLike | None = None,
                  ) -> tuple[list[Record], list[dict]]:
    """Split ``records`` into (kept, excluded) before any work; ``excluded`` holds one dict per
    record left out: ``id``, ``audio``, ``reason`` (one of :data:`EXCLUDE_REASONS`), ``detail``,
    ``duration`` (the record's) and ``audio_duration`` (the file's, when known).

    Checks, in order: the file exists; it decodes (``check_audio``); its real duration agrees with
    the record within :func:`duration_tolerance` (a record alone on its file, at offset 0, must
    match the file's duration; a segment must lie inside the file); the record's duration is within
    [``min_duration``, ``max_duration``]. ``check_audio=False`` only checks that files exist.

    Files are probed once each, ``jobs`` at a time; with ``cache_path`` the durations are kept in a
    JSON file keyed by path, size and mtime, so a restart re-probes only files that changed."""
    records = list(records)
    paths = sorted({r.audio for r in records if "://" not in r.audio})
    cache: dict = {}
    if cache_path is not None and check_audio:
        try:
            cache = json.loads(Path(cache_path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cache = {}
    probed: dict[str, tuple[float | None, str | None, str | None]] = {}
    todo: list[str] = []
    stats: dict[str, tuple[int, int]] = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            probed[p] = (None, "missing", "file not found")
            continue
        if not check_audio:
            probed[p] = (None, None, None)
            continue
        stats[p] = (st.st_size, st.st_mtime_ns)
        hit = cache.get(p)
        if isinstance(hit, list) and len(hit) == 5 and tuple(hit[:2]) == stats[p]:
            probed[p] = (hit[2], hit[3], hit[4])
        else:
            todo.append(p)
    if todo:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, min(int(jobs), len(todo)))) as ex:
            for p, res in zip(todo, ex.map(_probe, todo)):
                probed[p] = res
    if cache_path is not None and check_audio and todo:
        from harken.fsutil import atomic_write_text

        new = {p: [*stats[p], *probed[p]] for p in stats if probed[p][1] != "missing"}
        atomic_write_text(cache_path, json.dumps(new), fsync=False)

    per_file: dict[str, int] = {}
    for r in records:
        per_file[r.audio] = per_file.get(r.audio, 0) + 1
    kept: list[Record] = []
    excluded: list[dict] = []
    for r in records:
        real, reason, detail = probed.get(r.audio, (None, None, None))
        if reason is None and real is not None:
            tol = duration_tolerance(r.duration)
            if per_file[r.audio] == 1 and r.offset == 0:
                if abs(real - r.duration) > tol:
                    reason = "duration_mismatch"
                    detail = f"the file lasts {real:.3f} s, the record says {r.duration:.3f} s"
            elif real < r.offset + r.duration - tol:
                reason = "duration_mismatch"
                detail = (f"the file lasts {real:.3f} s, the record's segment is {r.offset:.3f}+{r.duration:.3f} s")
        if reason is None and r.duration < min_duration:
            reason, detail = "too_short", f"{r.duration:.3f} s < data.min_utt_duration={min_duration:g} s"
        if reason is None and r.duration > max_duration:
            reason, detail = "too_long", f"{r.duration:.3f} s > {max_duration:g} s"
        if reason is None:
            kept.append(r)
        else:
            excluded.append({"id": r.id, "audio": r.audio, "reason": reason, "detail": detail,
                             "duration": r.duration, "audio_duration": None if real is None else round(real, 4)})
    return kept, excluded
