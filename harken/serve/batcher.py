"""Cross-request dynamic batching: the event loop enqueues items (one per utterance or VAD piece)
and awaits a future; dedicated inference threads form batches and call ``engine.infer_batch``.

A batch is released when it holds ``max_batch_size`` items, when its padded audio (items x the
longest item) would pass ``max_batch_seconds``, or when its oldest item has waited ``max_wait_ms``.
Items are batched only with items of the same decoding options, grouped by length around the
oldest waiting item (so padding stays small and nobody starves). The queue is bounded: a request
that does not fit is refused at once (:class:`QueueFull`, 503 + Retry-After). An item whose client
went away (``Item.cancel()``) or whose deadline passed is dropped before compute.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["Batcher", "Item", "QueueFull", "infer_batch"]

log = logging.getLogger("harken.serve")


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class Item:
    wave: np.ndarray
    options: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic()
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    queue_wait: float = 0.0
    compute: float = 0.0  # this item's share of its batch's compute time

    @property
    def samples(self) -> int:
        return int(self.wave.shape[0])

    def cancel(self) -> None:
        self.cancelled = True


def infer_batch(engine, waves: Sequence[np.ndarray], options=None, max_item_seconds: float | None = None) -> list:
    """``engine.infer_batch`` (the runtime contract): one Transcript or ItemError per wave."""
    return engine.infer_batch(list(waves), options, max_item_seconds=max_item_seconds)


class Batcher:
    def __init__(self, engine, metrics=None, max_batch_size: int = 16, max_wait_ms: float = 10.0,
                 max_batch_seconds: float = 240.0, max_queue: int = 256, workers: int = 1,
                 sample_rate: int = 16000, model: str = "", max_item_seconds: float | None = None,
                 nice: int = 5, expect_more=None):
        self.engine = engine
        self.metrics = metrics
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.max_batch_samples = int(max_batch_seconds * sample_rate)
        self.max_queue = max(1, int(max_queue))
        self.sample_rate = sample_rate
        self.model = model
        self.max_item_seconds = max_item_seconds
        self.nice = int(nice)
        # () -> bool: are more items on their way (requests still decoding)? If not, a lone item
        # does not wait max_wait_ms for companions that cannot come.
        self.expect_more = expect_more
        self._pending: deque[Item] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._busy = 0
        self._busy_since: dict[int, float] = {}  # thread id -> when its current batch started
        self.batches = 0
        self.items_done = 0
        self.dropped = 0  # items dropped before compute (client gone or deadline passed)
        self._torch_threads = _torch_threads()
        self._threads = [threading.Thread(target=self._run, name=f"harken-infer-{i}", daemon=True)
                         for i in range(max(1, int(workers)))]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ event-loop side
    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def saturated(self) -> bool:
        return len(self._pending) >= self.max_queue

    def submit(self, waves: Sequence[np.ndarray], options, deadline: float) -> list[Item]:
        """Enqueue all ``waves`` (one request) or none: :class:`QueueFull` when they do not fit.
        Call from the event loop; await ``item.future`` for a Transcript or ItemError."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if self._pending and len(self._pending) + len(waves) > self.max_queue:
                raise QueueFull(f"the queue is full ({len(self._pending)} items waiting)")
            items = [Item(w, options, loop.create_future(), loop, deadline) for w in waves]
            self._pending.extend(items)
            self._cond.notify()
        self._gauge()
        return items

    def health(self, stuck_after: float) -> str | None:
        """None when the inference threads are alive and none has been on one batch longer than
        ``stuck_after`` seconds; else why not."""
        if not all(t.is_alive() for t in self._threads):
            return "inference thread died"
        now = time.monotonic()
        if any(now - t0 > stuck_after for t0 in list(self._busy_since.values())):
            return "inference stuck"
        return None

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(model=self.model).set(len(self._pending))

    # ------------------------------------------------------------------ inference threads
    def _take(self) -> list[Item] | None:
        """Wait for and remove the next batch (None: stop)."""
        with self._cond:
            while True:
                self._drop_dead()
                if not self._pending:
                    if self._stop:
                        return None
                    self._cond.wait(0.5)
                    continue
                oldest = self._pending[0]
                same = [it for it in self._pending if it.options == oldest.options]
                full = len(same) >= self.max_batch_size or \
                    sum(it.samples for it in same) >= self.max_batch_samples
                wait = oldest.enqueued + self.max_wait - time.monotonic()
                if wait > 0 and self.expect_more is not None and not self.expect_more():
                    wait = 0.0
                if full or wait <= 0 or self._stop:
                    batch = self._group(oldest, same)
                    ids = {id(it) for it in batch}
                    self._pending = deque(it for it in self._pending if id(it) not in ids)
                    return batch
                self._cond.wait(wait)

    def _drop_dead(self) -> None:
        now = time.monotonic()
        if not any(it.cancelled or it.deadline < now for it in self._pending):
            return
        keep = deque()
        for it in self._pending:
            if it.cancelled or it.deadline < now:
                self.dropped += 1
            if it.cancelled:
                it.loop.call_soon_threadsafe(_cancel, it.future)
            elif it.deadline < now:
                it.loop.call_soon_threadsafe(_fail, it.future, TimeoutError("deadline passed in the queue"))
            else:
                keep.append(it)
        self._pending = keep

    def _group(self, oldest: Item, same: list[Item]) -> list[Item]:
        """The oldest item plus the items nearest to it in length, within the size and padded budget."""
        if len(same) == 1 or self.max_batch_size == 1:
            return [oldest]
        cands = sorted(same, key=lambda it: it.samples)
        i = cands.index(oldest)
        lo = hi = i
        batch_max = oldest.samples
        while hi - lo + 1 < self.max_batch_size:
            left = cands[lo - 1] if lo > 0 else None
            right = cands[hi + 1] if hi + 1 < len(cands) else None
            if left is None and right is None:
                break
            # prefer the neighbour that adds less padding
            if right is None or (left is not None and (batch_max - left.samples) <= (right.samples - batch_max)):
                if (hi - lo + 2) * batch_max > self.max_batch_samples:
                    break
                lo -= 1
            else:
                if (hi - lo + 2) * right.samples > self.max_batch_samples:
                    break
                hi += 1
                batch_max = right.samples
        return cands[lo: hi + 1]

    def _run(self) -> None:
        lower_priority(self.nice)
        if self._torch_threads:  # OpenMP thread counts are per thread: a new thread would use every core
            import torch

            torch.set_num_threads(self._torch_threads)
        while True:
            batch = self._take()
            self._gauge()
            if batch is None:
                return
            now = time.monotonic()
            for it in batch:
                it.queue_wait = now - it.enqueued
            self._busy += 1
            self._busy_since[threading.get_ident()] = time.monotonic()
            t0 = time.perf_counter()
            try:
                results = infer_batch(self.engine, [it.wave for it in batch], batch[0].options, self.max_item_seconds)
                if len(results) != len(batch):
                    raise RuntimeError(f"engine returned {len(results)} results for {len(batch)} inputs")
            except Exception as e:  # an engine failure fails this batch's requests, not the server
                log.exception("batch of %d failed", len(batch))
                results = [e] * len(batch)
            finally:
                self._busy -= 1
                self._busy_since.pop(threading.get_ident(), None)
            dt = time.perf_counter() - t0
            total = sum(it.samples for it in batch) or 1
            for it, res in zip(batch, results):
                it.compute = dt * it.samples / total
                if isinstance(res, BaseException):
                    it.loop.call_soon_threadsafe(_fail, it.future, res)
                else:
                    it.loop.call_soon_threadsafe(_done, it.future, res)
            self.batches += 1
            self.items_done += len(batch)
            if self.metrics is not None:
                m, mdl = self.metrics, self.model
                m.batch_compute.labels(model=mdl, kind="offline").observe(dt)
                m.batch_size.labels(model=mdl, kind="offline").observe(len(batch))
                longest = max(it.samples for it in batch)
                m.padding_ratio.labels(model=mdl).observe(1.0 - total / (longest * len(batch)) if longest else 0.0)
                for it in batch:
                    m.queue_wait.labels(model=mdl).observe(it.queue_wait)


def lower_priority(nice: int) -> None:
    """Raise this thread's niceness by ``nice`` (Linux: per thread), so that under CPU contention
    the event loop thread is scheduled before the compute threads."""
    if nice <= 0:
        return
    import os

    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError):
        pass


def _torch_threads() -> int:
    import sys

    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else 0


def _done(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _cancel(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.cancel()
