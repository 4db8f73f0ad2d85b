"""Image sources behind the dataset URIs: sklearn:digits, imagefolder:PATH, torchvision:NAME.

Each source lists its items (a reference, a class, the split it ships with or None) without
decoding anything; `fetch(ref)` later reads one item as (content sha256, PIL image in its own
mode: imageform.canonical converts it) or raises BadFile. Listing first lets ingest filter
classes and cap counts before paying for decoding; a class filter given to `open_source` keeps
the walk out of the other classes' folders (a tenth of ImageNet's classes lists a tenth of its
files).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import stat
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages.core.cifar import download_or_refuse, read_cifar
from stages.core.errors import BadInput
from stages.core.imageform import DEFAULT_MAX_FILE_BYTES, MAX_PIXELS
from stages.core.walk import Walk, kind

SPLIT_FOLDERS = ("train", "val", "test")
TORCHVISION_NAMES = ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST")
# Files up to this are read whole, hashed and decoded from memory: one read instead of two
# passes, and PIL parses from a BytesIO (50 against 81 us per CIFAR JPEG for read, hash and
# decode, one core, timed side by side on a loaded machine). Larger files stream: memory flat.
WHOLE_READ_BYTES = 2**20


class BadFile(Exception):
    """One item that cannot be used; the message is the reason shown in report.json."""


class TooLarge(BadFile):
    """A file over data.max_file_mb, found by its reader: "skipped" in report.json, as the
    listing's own refusals are, not "bad" (not counted against data.max_bad_fraction)."""


@dataclass(frozen=True)
class Listing:
    classes: list[str]
    refs: list[str]  # a path for files, "uri#index" for arrays
    labels: np.ndarray  # int64, indices into classes
    splits: np.ndarray  # int8: 0 train, 1 val, 2 test, -1 none shipped
    fetch: Callable[[str], tuple[str, Image.Image]]
    ignored: list[str]  # files that are not images by name (README.txt, .DS_Store, ...)
    # Entries refused before reading, each {"path", "reason"}: a link out of the root, a loop,
    # a FIFO, socket or device. For report.json's "skipped".
    skipped: list[dict[str, str]] = field(default_factory=list)


def open_source(uri: str, *, root: str, download: bool, key: str = "",
                follow_symlinks: bool = False,
                max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                classes: Collection[str] | None = None) -> Listing:
    """`key` (the dotted params key, "data.source.uri") prefixes the errors about the URI.

    `classes`: the class folders whose files are listed (None: all). Every class name is
    still in Listing.classes, so a misspelt name is reported with the names there are.
    A file over `max_file_bytes` is listed and left to its reader (TooLarge), which stats it
    as it opens it: the walk stats no plain file."""
    kind, _, rest = uri.partition(":")
    where = f"{key}: " if key else ""
    if kind == "sklearn":
        return _sklearn(rest)
    if kind == "imagefolder":
        return _imagefolder(Path(rest).expanduser(), where, follow_symlinks, max_file_bytes,
                            classes)
    if kind == "torchvision":
        return _torchvision(rest, Path(root), download)
    raise BadInput(f"{where}unknown dataset URI kind {kind!r}: use sklearn:, imagefolder: or "
                   "torchvision:")


# ---------------------------------------------------------------- arrays in memory


def _array_listing(
    uri: str, images: np.ndarray, labels: np.ndarray, splits: np.ndarray, classes: list[str]
) -> Listing:
    def fetch(ref: str) -> tuple[str, Image.Image]:
        arr = np.ascontiguousarray(images[int(ref.rpartition("#")[2])])
        return hashlib.sha256(arr.tobytes()).hexdigest(), Image.fromarray(arr)

    refs = [f"{uri}#{i}" for i in range(len(labels))]
    return Listing(classes, refs, labels.astype(np.int64), splits.astype(np.int8), fetch, [])


def _sklearn(name: str) -> Listing:
    if name != "digits":
        raise BadInput(f"sklearn:{name} is not available: the embedded dataset is sklearn:digits")
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Digits are 8x8 intensities in 0..16; spread them over the uint8 range.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    classes = [str(c) for c in digits.target_names]
    no_split = np.full(len(images), -1, dtype=np.int8)
    return _array_listing("sklearn:digits", images, digits.target, no_split, classes)


def _torchvision(name: str, root: Path, download: bool) -> Listing:
    if name not in TORCHVISION_NAMES:
        raise BadInput(f"torchvision:{name} is not supported: choose one of {TORCHVISION_NAMES}")
    if name.startswith("CIFAR"):
        images, labels, n_train, classes = read_cifar(name, root, download)
    else:  # MNIST-style: raw IDX files torchvision parses itself; no pickle involved
        import torchvision.datasets as tvd

        cls = getattr(tvd, name)
        parts = [_open_torchvision(cls, name, root, train, download) for train in (True, False)]
        images = np.concatenate([np.asarray(p.data) for p in parts])
        labels = np.concatenate([np.asarray(p.targets) for p in parts])
        n_train, classes = len(parts[0].targets), list(parts[0].classes)
    # The shipped test split stays the test split; val is carved out of train later.
    splits = np.where(np.arange(len(labels)) < n_train, -1, 2).astype(np.int8)
    return _array_listing(f"torchvision:{name}", images, labels, splits, classes)


def _open_torchvision(cls: type, name: str, root: Path, train: bool, download: bool):
    try:
        return cls(root=str(root), train=train, download=False)
    except RuntimeError:
        return download_or_refuse(name, root, download,
                                  lambda: cls(root=str(root), train=train, download=True),
                                  cls.mirrors[0] if hasattr(cls, "mirrors") else "")


# ---------------------------------------------------------------- files on disk


def _imagefolder(root: Path, where: str, follow_symlinks: bool, max_bytes: int,
                 wanted: Collection[str] | None) -> Listing:
    if not root.is_dir():
        raise BadInput(f"{where}imagefolder:{root}: no such folder")
    has_splits = (root / "train").is_dir()
    split_roots = [(root / s, code) for code, s in enumerate(SPLIT_FOLDERS) if (root / s).is_dir()]
    if has_splits and not (root / "val").is_dir():
        # No val/ shipped: ingest carves it out of train (-1: "no split yet"), as for torchvision.
        split_roots = [(sr, -1 if code == 0 else code) for sr, code in split_roots]
    if not has_splits:
        split_roots = [(root, -1)]
    walk = Walk(root.resolve(), follow_symlinks)
    class_dirs = [(d, code) for sr, code in split_roots for d in sorted(sr.iterdir())
                  if d.is_dir() and not d.name.startswith(".") and walk.admits(d)]
    classes = sorted({d.name for d, _ in class_dirs})
    if len(classes) < 2:
        raise BadInput(f"{where}imagefolder:{root}: {len(classes)} class folder(s) {classes}; a "
                       "classifier needs at least two (expected ROOT/CLASS/IMAGE files)")
    index = {c: i for i, c in enumerate(classes)}
    wanted = None if wanted is None else set(wanted)
    refs: list[str] = []
    labels, splits = [np.zeros(0, np.int64)], [np.zeros(0, np.int8)]
    for class_dir, code in class_dirs:
        if wanted is not None and class_dir.name not in wanted:
            continue  # never opened: its files are no candidates, nor ignored or skipped
        found = walk.files(class_dir)
        refs += found
        labels.append(np.full(len(found), index[class_dir.name], dtype=np.int64))
        splits.append(np.full(len(found), code, dtype=np.int8))
    return Listing(
        classes, refs, np.concatenate(labels), np.concatenate(splits),
        functools.partial(read_image_file, max_bytes=max_bytes), walk.ignored, walk.skipped,
    )


def read_image_file(ref: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
                    stamps: list[tuple[int, int]] | None = None) -> tuple[str, Image.Image]:
    """One file -> (sha256 of its bytes, decoded image); BadFile with the reason when unusable.

    `stamps`: its (size, mtime_ns) by the fstat below is appended there, bad or not (a shard's
    record of its inputs: the listing stats no file).

    Only a regular file is read: it is opened without blocking (a FIFO would wait for a writer
    forever) and checked by fstat before any byte is read; its size is checked against
    `max_bytes`; up to WHOLE_READ_BYTES it is read once and hashed and decoded from memory,
    above that hashed and decoded from the open file, never held whole in memory.
    OSError (missing, no permission) is left to the caller, which knows the context.
    """
    fd = os.open(ref, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stamps is not None:
            stamps.append((st.st_size, st.st_mtime_ns))
        if not stat.S_ISREG(st.st_mode):
            raise BadFile(f"{kind(st.st_mode)}, not a regular file")
        if st.st_size == 0:
            raise BadFile("empty file (0 bytes)")
        if st.st_size > max_bytes:
            raise TooLarge(f"too large: {st.st_size / 2**20:,.1f} MB is over data.max_file_mb="
                           f"{max_bytes / 2**20:g}")
        if st.st_size <= WHOLE_READ_BYTES:
            # Exactly its size (+1 to see growth): a read of WHOLE_READ_BYTES allocated a
            # megabyte per image, 16 us of the 81 one took.
            data = os.read(fd, st.st_size + 1)
            if len(data) == st.st_size:
                return hashlib.sha256(data).hexdigest(), _decode(io.BytesIO(data))
            os.lseek(fd, 0, os.SEEK_SET)  # it changed while read: stream it as a large one
        with os.fdopen(fd, "rb", closefd=False) as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            f.seek(0)
            return digest, _decode(f)
    finally:
        os.close(fd)


def _decode(f: Any) -> Image.Image:
    try:
        img = Image.open(f)
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise BadFile(f"decompression bomb: {w}x{h} pixels is over the {MAX_PIXELS:,} limit")
        img.load()
    except Image.DecompressionBombError as err:
        raise BadFile(f"decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise BadFile("not an image (no known image format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadFile(f"unreadable: {err}") from None
    return img
