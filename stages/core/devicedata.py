"""The training data path: uint8 images on the device, augmented and normalised in whole batches.

Input: a dataset's uint8 N x H x W x C array (usually a read-only memmap), its labels and the
indices of one split. Output: an iterator of (float N x C x H x W normalised images, int64
labels) on the device, per epoch.

Why not a DataLoader: on small images the per-sample Python work of a DataLoader (index, crop,
flip, collate, one image at a time) costs more than the network on a few CPU cores, and on a
GPU it starves the device. Here a set that fits is copied to the device once as uint8 (a
quarter of float32's size) and every epoch is a few indexing operations on whole batches
(airbench's habit). `benchmarks/bench_datapath.py` measures this path against a torchvision
DataLoader with the same per-sample transforms.

Randomness: each epoch's permutation and each batch's crop offsets and flips come from a numpy
Generator seeded with (seed, epoch), never from the global RNG. So an epoch is the same batches
whatever happened before it, which is what lets a run resumed mid-epoch skip the batches it
already did and still end bit-identical to an uninterrupted one.

Several processes (DDP): every rank draws the same epoch from (seed, epoch); `batch_size` is
the global batch and rank r of w takes its images r, r + w, r + 2w, ... So the ranks read
disjoint parts of each epoch that together cover it, and w ranks see, step for step, the
images (and crops and flips) that one process with the whole batch would.

Stored images larger than the train size (`train_size`, pretrain's): each training image is a
random-resized crop of the train size, flipped when `hflip` (stages/core/crops.py), drawn per
epoch like the small images' crops. A set that does not fit on the device is streamed from its
shards by a background reader instead (stages/core/stream.py: `StreamBatches`, a subclass that
keeps nothing resident, and `batches`, which picks one of the two).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from stages.core.crops import draw_boxes, resized_crop


def reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Indices in [-(n-1), 2(n-1)] mirrored into [0, n-1] (numpy's 'reflect' padding).

    Padding by index arithmetic instead of padding the images: no padded copy of the set, and
    it works on uint8, which torch's reflection padding does not accept."""
    idx = idx.abs()
    return torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)


def crop_flip_grid(offsets: np.ndarray, flips: np.ndarray, size: tuple[int, int], pad: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (B x H) and column (B x W) source indices of each image's crop and flip."""
    h, w = size
    off = torch.from_numpy(offsets).to(device)
    rows = reflect(off[:, :1] - pad + torch.arange(h, device=device), h)
    cols = reflect(off[:, 1:] - pad + torch.arange(w, device=device), w)
    flip = torch.from_numpy(flips).to(device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return rows, cols


class DeviceBatches:
    """Batches of one split, its images copied to the device once as uint8.

    `epoch(e, start_step)` yields the batches of epoch e from batch `start_step` on. Training
    batches are shuffled, augmented and drop the ragged last batch (a batch of one breaks
    BatchNorm); evaluation batches are in order, plain, and complete. The copy raises
    torch.OutOfMemoryError or MemoryError where the split does not fit (stream.batches then
    streams it).
    """

    resident = True  # StreamBatches: False, the images stay in their shards

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, *,
                 device: torch.device, mean: list[float], std: list[float], batch_size: int,
                 train: bool, crop_padding: int = 0, hflip: bool = False, seed: int = 0,
                 channels_last: bool = False, rank: int = 0,
                 world: int = 1, train_size: int | None = None) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.n = len(self.indices)
        self.size = (int(images.shape[1]), int(images.shape[2]))
        # Random-resized crops to train_size where the stored images are larger (training only).
        self.train_size = train_size if train and train_size and train_size < min(self.size) \
            else None
        self.device, self.train, self.seed = device, train, seed
        # Drawn per image and epoch (training only): a crop with reflect padding of
        # `crop_padding` pixels and, when `hflip`, a horizontal flip with p = 0.5.
        self.crop_padding, self.hflip = (crop_padding, hflip) if train else (0, False)
        self.batch_size = min(batch_size, self.n) if train else batch_size
        # Evaluation batches are not shared out: each rank scores the whole split.
        self.rank, self.world = (rank, world) if train else (0, 1)
        if train and world > 1:
            self.batch_size -= self.batch_size % world
            if not self.batch_size:
                raise ValueError(f"{self.n} training images cannot be shared by {world} processes")
        self.channels_last = channels_last
        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self._labels = torch.from_numpy(np.asarray(labels)[self.indices].astype(np.int64)).to(device)
        self._source = images
        self._images = torch.from_numpy(np.ascontiguousarray(images[self.indices])).to(device) \
            if self.resident else None

    def __len__(self) -> int:
        if self.train:
            return max(self.n // self.batch_size, 1)
        return -(-self.n // self.batch_size)

    @property
    def images_per_epoch(self) -> int:
        """Images this rank sees per epoch."""
        return min(len(self) * self.batch_size, self.n) // self.world

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        drawn = self._draw(epoch)
        for step in range(start_step, len(self)):
            pos, off, flip = self._share(drawn, step)
            which = torch.from_numpy(pos).to(self.device)
            yield self.augmented(self._images, which, off, flip), self._labels[pos]

    def _share(self, drawn: tuple[np.ndarray, np.ndarray, np.ndarray], step: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's positions, crop offsets and flips of batch `step` of a drawn epoch."""
        order, offsets, flips = drawn
        lo = step * self.batch_size
        pos = order[lo:lo + self.batch_size]
        off, flip = offsets[lo:lo + len(pos)], flips[lo:lo + len(pos)]
        if self.world > 1:
            pos, off, flip = (a[self.rank::self.world] for a in (pos, off, flip))
        return pos, off, flip

    def _draw(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The whole epoch's order and augmentation, from (seed, epoch) alone."""
        if not self.train:
            return np.arange(self.n), np.zeros((self.n, 2), np.int64), np.zeros(self.n, bool)
        rng = np.random.default_rng([self.seed, epoch])
        return self._augmentation(rng, rng.permutation(self.n))

    def _augmentation(self, rng: np.random.Generator, order: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order, offsets, flips) for an epoch in `order`. With random-resized crops the
        offsets are n x 4 boxes (top, left, height, width), drawn after the small-image draws so
        those stay what they were."""
        offsets = rng.integers(0, 2 * self.crop_padding + 1, size=(self.n, 2))
        flips = rng.random(self.n) < 0.5 if self.hflip else np.zeros(self.n, bool)
        if self.train_size is not None:
            offsets = draw_boxes(rng, self.n, self.size)
        return order, offsets, flips

    def augmented(self, src: torch.Tensor, which: torch.Tensor, offsets: np.ndarray,
                  flips: np.ndarray) -> torch.Tensor:
        """Images `which` of uint8 `src` on the device, cropped, flipped and normalised (the
        same arithmetic as dataset.preprocess): float B x C x H x W in the model's memory format."""
        if self.train_size is None and (self.crop_padding or self.hflip):
            rows, cols = crop_flip_grid(offsets, flips, self.size, self.crop_padding, self.device)
            # One gather does the batch selection, the crop and the flip: B x H x W x C.
            src = src[which[:, None, None], rows[:, :, None], cols[:, None, :]]
        else:
            src = src[which]
        x = src.permute(0, 3, 1, 2).float().div_(255.0)
        if self.train_size is not None:
            x = resized_crop(x, offsets, flips, self.train_size)
        x = x.sub_(self._mean).div_(self._std)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)


def channel_stats(images: np.ndarray, indices: np.ndarray, chunk: int = 4096
                  ) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the [0, 1] scale, in chunks (the set may not fit in memory)."""
    total = np.zeros(images.shape[-1], dtype=np.float64)
    squares = np.zeros_like(total)
    count = 0
    for lo in range(0, len(indices), chunk):
        x = np.asarray(images[np.sort(indices[lo:lo + chunk])], dtype=np.float64) / 255.0
        total += x.sum(axis=(0, 1, 2))
        squares += (x * x).sum(axis=(0, 1, 2))
        count += x.shape[0] * x.shape[1] * x.shape[2]
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean * mean, 0.0))
    # A constant channel would divide by zero; 1.0 leaves it centred and unscaled.
    std = np.where(std < 1e-6, 1.0, std)
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]
