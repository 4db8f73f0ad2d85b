"""The canonical dataset format every stage reads and ingest/augment write.

A dataset is a folder:
  shards/*.npy   uint8 images, n_k x H x W x C each, bounded in size (data.shard_mb); in the
                 order of manifest["shards"], together the logical N x H x W x C array
                 (stages/core/shards.py).
  labels.npy     int64 N, indices into manifest["classes"]
  split.npy      uint8 N: 0 train, 1 val, 2 test
  manifest.json  classes, counts per split and class, sha256 of each shard and array (the
                 images' entry, "images.npy", is one digest over the shards' digests), source
                 URI, params

A shard file is written by RowWriter (rows appended after a fixed header; see shards.py for
why) and read by ShardedArray or iter_rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.errors import BadInput
from stages.core.integrity import Verify, file_sha256, load_array, read_manifest, remedy
from stages.core.integrity import verify as check_files
from stages.core.io import reserve

SPLITS = ("train", "val", "test")
SPLIT_CODE = {name: code for code, name in enumerate(SPLITS)}


@dataclass(frozen=True)
class Dataset:
    # N x H x W x C uint8: a read-only memmap (one shard), else a ShardedArray over the shards'
    # memmaps
    images: np.ndarray | ShardedArray
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


class ShardedArray:
    """Read-only N x ... uint8 array over several same-shaped shard arrays (usually memmaps)."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        if not parts:
            raise ValueError("a sharded array needs at least one shard")
        self.parts = list(parts)
        sizes = np.array([len(p) for p in self.parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # shard k holds [o[k], o[k+1])
        self.shape = (int(self.offsets[-1]), *self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key: Any) -> Any:
        """Rows by an int, a slice or an array of row indices: what the stages ask for."""
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"index {key} is out of bounds for {len(self)} images")
            k = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return self.parts[k][i - self.offsets[k]]
        if isinstance(key, slice):
            key = np.arange(*key.indices(len(self)))
        idx = None if isinstance(key, tuple) else np.asarray(key)
        if idx is None or idx.dtype.kind not in "iu":  # a mask or a tuple: refused, not misread
            raise IndexError(f"a sharded array takes rows by int, slice or int array, not {key!r}")
        idx = idx.astype(np.int64, copy=False).reshape(-1) if idx.ndim else idx.reshape(1)
        idx = np.where(idx < 0, idx + len(self), idx)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of bounds for {len(self)} images")
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        self.read_into(idx, out)
        return out

    def read_into(self, idx: np.ndarray, out: np.ndarray) -> None:
        """Rows `idx` (in bounds) into `out`, a run of rows of one shard at a time (sequential
        where `idx` ascends, as every stage's does), without a temporary."""
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        cuts = [0, *(np.flatnonzero(np.diff(which)) + 1), len(idx)]
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            if hi > lo:
                k = int(which[lo])
                # mode="clip": numpy buffers `out` under the default "raise" (bounds are known).
                np.take(self.parts[k], idx[lo:hi] - self.offsets[k], axis=0, out=out[lo:hi],
                        mode="clip")

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, shards={len(self.parts)})"


HEADER = 128  # bytes: numpy pads its .npy headers to a multiple of 64; a shard's is always 128


def npy_header(shape: tuple[int, ...]) -> bytes:
    """numpy's own version-1.0 .npy header for uint8 C-order `shape`: exactly HEADER bytes, so
    rows can be appended before the row count is known and the header written last."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
    if buf.tell() != HEADER:
        raise ValueError(f"shape {shape} does not fit a {HEADER}-byte .npy header")
    return buf.getvalue()


class RowWriter:
    """Append uint8 rows of one shape to `path` (a temporary), then `close()` writes the header.

    Rows start at byte HEADER whatever `path` later becomes: a whole shard (header written in
    place) or a piece whose rows the driver copies after its own header (staging.ShardAssembler).
    With `hashed`, `digest` is the file's sha256 after close(), hashed as written on the bet
    that all `capacity` rows come (no bad file); a lost bet reads the file back."""

    def __init__(self, path: Path, row_shape: tuple[int, ...], capacity: int = 0,
                 hashed: bool = False) -> None:
        self.path, self.row_shape, self.n = path, tuple(row_shape), 0
        self.row = int(np.prod(row_shape))
        # Claim the blocks of every row now: a full disk is DiskFull (exit 75) before decoding.
        path.write_bytes(b"\0" * HEADER)
        if capacity:
            reserve(path, HEADER + capacity * self.row)
        self._f = open(path, "r+b")  # noqa: SIM115 - closed in close()
        self._f.seek(HEADER)
        self.capacity, self.digest = capacity, ""
        self._sha = hashlib.sha256(npy_header((capacity, *self.row_shape))) if hashed else None

    def write(self, rows: np.ndarray) -> None:
        if rows.shape[1:] != self.row_shape or rows.dtype != np.uint8:
            raise ValueError(f"rows {rows.shape} {rows.dtype} are not uint8 x {self.row_shape}")
        data = np.ascontiguousarray(rows).data
        self._f.write(data)
        if self._sha is not None:
            self._sha.update(data)
        self.n += len(rows)

    def close(self) -> None:
        self._f.seek(0)
        self._f.write(npy_header((self.n, *self.row_shape)))
        self._f.truncate(HEADER + self.n * self.row)  # the reserved rows of bad files
        self._f.close()
        if self._sha is not None:
            self.digest = (self._sha.hexdigest() if self.n == self.capacity
                           else file_sha256(self.path))

    def discard(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)


def iter_rows(path: Path, row_shape: tuple[int, ...], chunk: int
              ) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of a shard in chunks of `chunk` rows, read with plain reads into one
    buffer (the rows yielded are valid until the next): memory flat, no map, no allocation per
    read."""
    buf = np.empty((chunk, *row_shape), dtype=np.uint8)
    lo = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(HEADER)  # RowWriter's fixed header
        while n := f.readinto(buf):
            yield lo, buf[:n // buf[0].nbytes]
            lo += n // buf[0].nbytes


def preprocess(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 N x H x W x C -> the model's float32 N x C x H x W input: x / 255, then
    (x - mean) / std."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x - m) / s)


def load_dataset(folder: str | Path, *, verify: Verify | None = "sha256") -> Dataset:
    """The dataset in `folder`, its files first checked against the manifest (integrity.py:
    `verify` "sha256" hashes them, "size" checks they are complete, None: this process has
    just checked them); BadInput naming the file and the fix when one is missing, damaged or
    changed."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if verify is not None:
        check_files(folder, manifest, verify)
    parts = [load_array(folder / s["file"], folder, manifest, "r") for s in manifest["shards"]]
    images = parts[0] if len(parts) == 1 else ShardedArray(parts)
    labels = load_array(folder / "labels.npy", folder, manifest, None)
    split = load_array(folder / "split.npy", folder, manifest, None)
    if not len(images) == len(labels) == len(split) == manifest.get("n", len(labels)):
        raise BadInput(f"{folder}: {len(images)} images, {len(labels)} labels and {len(split)} "
                       f"split entries where manifest.json says {manifest.get('n')}; "
                       f"{remedy(folder, manifest)}")
    return Dataset(images=images, labels=labels, split=split, classes=list(manifest["classes"]),
                   manifest=manifest)


def counts(labels: np.ndarray, split: np.ndarray, classes: list[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name, code in SPLIT_CODE.items():
        per_class = np.bincount(labels[split == code], minlength=len(classes))
        out[name] = {cls: int(n) for cls, n in zip(classes, per_class, strict=True)}
    return out


def write_sharded(folder: Path, shards: list[tuple[Path, str, int]], labels: np.ndarray,
                  split: np.ndarray, classes: list[str], meta: dict[str, Any]) -> dict[str, Any]:
    """Complete a sharded dataset in `folder` (an atomic_dir's temporary, or any empty one).

    `shards`: (finished shard file, its sha256, its rows) in logical order; each is hard-linked
    (copied where links fail) to folder/shards/NNNNN.npy, so a shard is never written twice."""
    (folder / "shards").mkdir(exist_ok=True)
    entries = []
    for k, (path, digest, n) in enumerate(shards):
        name = f"shards/{k:05d}.npy"
        try:
            os.link(path, folder / name)
        except OSError:  # a file system that refuses links
            shutil.copyfile(path, folder / name)
        entries.append({"file": name, "n": int(n), "sha256": digest})
    np.save(folder / "labels.npy", labels.astype(np.int64, copy=False))
    np.save(folder / "split.npy", split.astype(np.uint8, copy=False))
    # Keyed images.npy: lineage tags (data.<set>.images.sha256) and the registry's promotion
    # tags read it. Its value is the digest over the shards', in order.
    sums = {"images.npy": hashlib.sha256("\n".join(e["sha256"] for e in entries).encode()
                                         ).hexdigest()}
    sums |= {name: file_sha256(folder / name) for name in ("labels.npy", "split.npy")}
    manifest = {"classes": classes, "n": int(len(labels)), "counts": counts(labels, split, classes),
                "sha256": sums, "shards": entries, **meta}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
