"""The canonical dataset format every stage reads and ingest/augment write.

A dataset is a folder:
  images.npy     uint8 N x H x W x C, memory-mappable (np.load(mmap_mode="r"))
  labels.npy     int64 N, indices into manifest["classes"]
  split.npy      uint8 N: 0 train, 1 val, 2 test
  manifest.json  classes, counts per split and class, sha256 of each array, source URI, params
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.errors import BadInput
from stages.core.io import atomic_dir, disk_full, is_disk_full, reserve

SPLITS = ("train", "val", "test")
SPLIT_CODE = {name: code for code, name in enumerate(SPLITS)}
ARRAYS = ("images.npy", "labels.npy", "split.npy")


@dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # N x H x W x C uint8, usually a read-only memmap
    labels: np.ndarray  # N int64
    split: np.ndarray  # N uint8
    classes: list[str]
    manifest: dict[str, Any]

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLIT_CODE[split])

    def part(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of one split, images loaded into memory."""
        idx = self.indices(split)
        return np.asarray(self.images[idx]), np.asarray(self.labels[idx])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


def preprocess(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 N x H x W x C -> the model's float32 N x C x H x W input (see the module doc)."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x - m) / s)


def load_dataset(folder: str | Path, *, mmap: bool = True) -> Dataset:
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise BadInput(f"{folder} is not a dataset (no manifest.json): run the stage that makes it")
    manifest = json.loads(manifest_path.read_text())
    mode = "r" if mmap else None
    return Dataset(
        images=np.load(folder / "images.npy", mmap_mode=mode),
        labels=np.load(folder / "labels.npy"),
        split=np.load(folder / "split.npy"),
        classes=list(manifest["classes"]),
        manifest=manifest,
    )


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def counts(labels: np.ndarray, split: np.ndarray, classes: list[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name, code in SPLIT_CODE.items():
        per_class = np.bincount(labels[split == code], minlength=len(classes))
        out[name] = {cls: int(n) for cls, n in zip(classes, per_class, strict=True)}
    return out


class DatasetWriter:
    """Fill a preallocated memmap in place, so peak memory is one batch, not the dataset."""

    def __init__(self, folder: Path, n: int, image_shape: tuple[int, int, int]) -> None:
        self.folder = folder
        self.images = _new_images(folder / "images.npy", (n, *image_shape))
        self.labels = np.zeros(n, dtype=np.int64)
        self.split = np.zeros(n, dtype=np.uint8)

    def truncate(self, n: int, chunk: int = 4096) -> None:
        """Keep the first n images (bad files were skipped): copy in chunks, never all at once."""
        if n == len(self.labels):
            return
        path, tmp = self.folder / "images.npy", self.folder / "images.compact.npy"
        small = _new_images(tmp, (n, *self.images.shape[1:]))
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            small[start:stop] = self.images[start:stop]
        small.flush()
        del self.images
        tmp.replace(path)
        self.images = np.load(path, mmap_mode="r+")
        self.labels, self.split = self.labels[:n], self.split[:n]

    def finish(self, classes: list[str], meta: dict[str, Any]) -> dict[str, Any]:
        self.images.flush()
        del self.images  # close the memmap before hashing the file
        np.save(self.folder / "labels.npy", self.labels)
        np.save(self.folder / "split.npy", self.split)
        manifest = {
            "classes": classes,
            "n": int(len(self.labels)),
            "counts": counts(self.labels, self.split, classes),
            "sha256": {name: file_sha256(self.folder / name) for name in ARRAYS},
            **meta,
        }
        (self.folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest


def _new_images(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A writable uint8 .npy memmap whose disk blocks are allocated now: a sparse one turned a
    full disk into SIGBUS ("Bus error", exit 135) mid-write; this is DiskFull (exit 75) first."""
    try:
        images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    except OSError as err:  # numpy writes the header and the last byte: the first to find no room
        if is_disk_full(err):
            raise disk_full(path.parent, int(np.prod(shape)), err) from None
        raise
    reserve(path)
    return images


@contextmanager
def dataset_writer(
    folder: str | Path, n: int, image_shape: tuple[int, int, int]
) -> Iterator[DatasetWriter]:
    """A writer into a temporary folder that replaces `folder` only when the block succeeds."""
    with atomic_dir(folder) as tmp:
        yield DatasetWriter(tmp, n, image_shape)
