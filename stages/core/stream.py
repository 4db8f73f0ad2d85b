"""Batches streamed from a dataset's shards by a background reader, for sets that do not fit.

Input: a dataset's uint8 N x H x W x C images (a memmap, or the ShardedArray over its shards,
stages/core/dataset.py), labels and one split's indices. Output: the same per-epoch iterator of
(normalised float images, int64 labels) on the device as `DeviceBatches` (StreamBatches is a
subclass). `batches()` picks: resident where the split fits on the device
(stages/core/budget.py), streamed where it does not.

Order: a block-shuffled permutation, a pure function of (seed, epoch). The split, in storage
order, is cut into blocks of `block` images that never straddle a shard; the blocks are
shuffled, then the images within each `window` of the result, then each batch is sorted back
into storage order (a batch is a set: its order changes nothing but the reads, which become
runs within a few blocks). So reads are near-sequential while a batch still mixes `window`
images from many places, and a run resumed at `start_step` reads exactly the batches it had
left. DDP: every rank draws the same order and takes images r, r + w, ... of each batch, as
`DeviceBatches` does.

Reading: one thread per epoch reads each batch (this rank's share) into a host tensor, pinned
when the device is CUDA (so the copy to the device is asynchronous; pinning on a CPU only
costs), at most `ahead` batches ahead of the training step, so memory is bounded whatever the
set's size. The consumer stopping early stops and joins the thread; an exception in the reader
is raised in the consumer.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any, TypeVar

import numpy as np
import torch

from stages.core.budget import Budget
from stages.core.dataset import ShardedArray
from stages.core.devicedata import DeviceBatches

log = logging.getLogger("imagepipe.data")

# 256 images is 38 MB of 224 px RGB: one sequential read; a window of 16 blocks mixes 16
# places of the set (often 16 classes of a class-local set) into every batch.
BLOCK = 256
WINDOW = 16 * BLOCK
# Batches read ahead of the step: enough to hide a slow read behind a few steps, few enough
# that host memory stays a few batches (4 x 512 x 150 KB = 300 MB at ImageNet's size).
AHEAD = 4

T = TypeVar("T")


def block_order(n: int, starts: np.ndarray, rng: np.random.Generator, block: int = BLOCK,
                window: int = WINDOW) -> np.ndarray:
    """A permutation of range(n): shuffled blocks (split at `starts`, where shards begin),
    then shuffled within consecutive windows of `window` images."""
    edges = np.unique(np.concatenate([[0], np.asarray(starts, dtype=np.int64), [n]]))
    los, his = [], []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        lo = np.arange(a, b, block)
        los.append(lo)
        his.append(np.minimum(lo + block, b))
    lo_all, hi_all = np.concatenate(los), np.concatenate(his)
    perm = rng.permutation(len(lo_all))
    seq = np.concatenate([np.arange(lo_all[i], hi_all[i]) for i in perm]) if n else \
        np.zeros(0, np.int64)
    keys = rng.random(n)
    return seq[np.lexsort((keys, np.arange(n) // max(window, 1)))]


def prefetch(tasks: Iterable[Any], read: Callable[[Any], T], ahead: int) -> Iterator[T]:
    """`read(task)` for each task on one background thread, handed over in order, at most
    `ahead` of them read or being read and not yet taken. Stopping early cancels the queued
    reads and joins the thread; a read's exception is raised here."""
    tasks = iter(tasks)
    pool = ThreadPoolExecutor(1, thread_name_prefix="imagepipe-reader")
    try:
        pending = deque(pool.submit(read, task) for task in islice(tasks, max(ahead, 1)))
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(read, task) for task in islice(tasks, 1))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class StreamBatches(DeviceBatches):
    """DeviceBatches whose images stay in their shards and are read ahead of the step."""

    resident = False

    def __init__(self, images: Any, labels: np.ndarray, indices: np.ndarray, *,
                 block: int = BLOCK, window: int = WINDOW, ahead: int = AHEAD,
                 **kw: Any) -> None:
        super().__init__(images, labels, indices, **kw)
        self.block, self.window, self.ahead = block, window, ahead
        self.pin = self.device.type == "cuda"
        # Positions in the split (ascending, as every split is) where a new shard begins.
        self._starts = (np.searchsorted(self.indices, images.offsets[1:-1])
                        if isinstance(images, ShardedArray) else np.zeros(0, np.int64))

    def _draw(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.train:
            return super()._draw(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        order = block_order(self.n, self._starts, rng, self.block, self.window)
        full = len(self) * self.batch_size
        order[:full].reshape(len(self), self.batch_size).sort(axis=1)
        return self._augmentation(rng, order)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        drawn = self._draw(epoch)

        def read(step: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
            pos, off, flip = self._share(drawn, step)
            return self._read(self.indices[pos]), pos, off, flip

        for host, pos, off, flip in prefetch(range(start_step, len(self)), read, self.ahead):
            src = host.to(self.device, non_blocking=True)
            which = torch.arange(len(pos), device=self.device)
            yield self.augmented(src, which, off, flip), self._labels[pos]

    def _read(self, idx: np.ndarray) -> torch.Tensor:
        """uint8 images `idx` in a (pinned, on CUDA) host tensor, in the order of `idx`."""
        host = torch.empty((len(idx), *self._source.shape[1:]), dtype=torch.uint8,
                           pin_memory=self.pin)
        if isinstance(self._source, ShardedArray):
            self._source.read_into(idx, host.numpy())
        else:  # mode="clip": numpy buffers `out` under the default "raise" (bounds are known)
            np.take(self._source, idx, axis=0, out=host.numpy(), mode="clip")
        return host


def batches(images: Any, labels: np.ndarray, indices: np.ndarray, *, device: torch.device,
            budget: Budget | None = None, **kw: Any) -> DeviceBatches:
    """A split's batches: resident on the device where they fit in `budget` (shared by a
    stage's splits, so train and val are counted together; None: a budget of its own), else
    streamed from the shards, as they are when the resident copy itself runs out of memory.
    Keywords are DeviceBatches'."""
    nbytes = len(indices) * int(np.prod(images.shape[1:]))
    budget = Budget(device) if budget is None else budget
    if budget.take(nbytes):
        try:
            return DeviceBatches(images, labels, indices, device=device, **kw)
        except (torch.OutOfMemoryError, MemoryError):
            log.warning("the set does not fit on %s: streaming it from its shards", device)
        budget.give(nbytes)
        if device.type == "cuda":  # the failed copy's blocks, freed with the exception
            torch.cuda.empty_cache()
    return StreamBatches(images, labels, indices, device=device, **kw)
