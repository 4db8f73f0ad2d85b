"""Image sources behind the dataset URIs: sklearn:digits, imagefolder:PATH, torchvision:NAME.

Each source lists its items (a reference, a class, the split it ships with or None) without
decoding anything; `fetch(ref)` later reads one item as (content sha256, RGB/L PIL image)
or raises BadFile. Listing first lets ingest filter classes and cap counts before paying
for decoding.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from stages.core.errors import BadInput

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
SPLIT_FOLDERS = ("train", "val", "test")
# Pixels above which a file is refused as a decompression bomb (Pillow's own default limit).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
TORCHVISION_NAMES = ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST")

# We check the pixel count ourselves and report the file; Pillow's warning would only be noise.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadFile(Exception):
    """One item that cannot be used; the message is the reason shown in report.json."""


@dataclass(frozen=True)
class Listing:
    classes: list[str]
    refs: list[str]  # a path for files, "uri#index" for arrays
    labels: np.ndarray  # int64, indices into classes
    splits: np.ndarray  # int8: 0 train, 1 val, 2 test, -1 none shipped
    fetch: Callable[[str], tuple[str, Image.Image]]
    ignored: list[str]  # files that are not images by name (README.txt, .DS_Store, ...)


def open_source(uri: str, *, root: str, download: bool) -> Listing:
    kind, _, rest = uri.partition(":")
    if kind == "sklearn":
        return _sklearn(rest)
    if kind == "imagefolder":
        return _imagefolder(Path(rest).expanduser())
    if kind == "torchvision":
        return _torchvision(rest, Path(root), download)
    raise BadInput(f"unknown dataset URI kind {kind!r}: use sklearn:, imagefolder: or torchvision:")


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
    import torchvision.datasets as tvd

    if name not in TORCHVISION_NAMES:
        raise BadInput(f"torchvision:{name} is not supported: choose one of {TORCHVISION_NAMES}")
    cls = _trusting(getattr(tvd, name))
    parts = []
    for train in (True, False):
        parts.append(_open_torchvision(cls, name, root, train, download))
    images = np.concatenate([np.asarray(p.data) for p in parts])
    labels = np.concatenate([np.asarray(p.targets) for p in parts])
    n_train = len(parts[0].targets)
    # The shipped test split stays the test split; val is carved out of train later.
    splits = np.where(np.arange(len(labels)) < n_train, -1, 2).astype(np.int8)
    return _array_listing(f"torchvision:{name}", images, labels, splits, list(parts[0].classes))


def _trusting(cls: type) -> type:
    """CIFAR re-checks each batch file's md5 on every load, which refuses any root that is not
    the exact original archive (a converted or test-written copy). torchvision still checks the
    archive's md5 when it downloads it; we hash the arrays we keep into the manifest."""
    if not hasattr(cls, "train_list"):
        return cls  # MNIST-style classes only check that the files exist.
    return type(cls.__name__, (cls,), {
        "train_list": [[f, None] for f, _ in cls.train_list],
        "test_list": [[f, None] for f, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    })


def _open_torchvision(cls: type, name: str, root: Path, train: bool, download: bool):  # noqa: ANN202
    try:
        return cls(root=str(root), train=train, download=False)
    except RuntimeError:
        pass
    reason = "download is off (data.<role>.download: false)"
    if download:
        try:
            return cls(root=str(root), train=train, download=True)
        except Exception as err:  # noqa: BLE001 - any network or archive failure means the same
            reason = f"download failed ({type(err).__name__}: {err})".splitlines()[0]
    where = getattr(cls, "url", None) or (cls.mirrors[0] if hasattr(cls, "mirrors") else "")
    raise BadInput(
        f"torchvision:{name}: no files under {root} and {reason}; download {where} "
        f"and extract it into {root} (or run once with a network and download: true)"
    )


# ---------------------------------------------------------------- files on disk


def _imagefolder(root: Path) -> Listing:
    if not root.is_dir():
        raise BadInput(f"imagefolder:{root}: no such folder")
    has_splits = (root / "train").is_dir()
    split_roots = [(root / s, code) for code, s in enumerate(SPLIT_FOLDERS) if (root / s).is_dir()]
    if has_splits and not (root / "val").is_dir():
        # No val/ shipped: ingest carves it out of train (-1: "no split yet"), as for torchvision.
        split_roots = [(sr, -1 if code == 0 else code) for sr, code in split_roots]
    if not has_splits:
        split_roots = [(root, -1)]
    classes = sorted({d.name for sr, _ in split_roots for d in sr.iterdir() if _visible_dir(d)})
    if not classes:
        raise BadInput(f"imagefolder:{root}: no class folders (expected ROOT/CLASS/IMAGE files)")
    index = {c: i for i, c in enumerate(classes)}
    refs, labels, splits, ignored = [], [], [], []
    for split_root, code in split_roots:
        for class_dir in sorted(d for d in split_root.iterdir() if _visible_dir(d)):
            for path in sorted(p for p in class_dir.rglob("*") if p.is_file()):
                if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
                    ignored.append(str(path))
                    continue
                refs.append(str(path))
                labels.append(index[class_dir.name])
                splits.append(code)
    return Listing(
        classes, refs, np.asarray(labels, dtype=np.int64), np.asarray(splits, dtype=np.int8),
        read_image_file, ignored,
    )


def _visible_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".")


def read_image_file(ref: str) -> tuple[str, Image.Image]:
    """One file -> (sha256 of its bytes, decoded image); BadFile with the reason when unusable.
    OSError (missing, a folder, no permission) is left to the caller, which knows the context."""
    data = Path(ref).read_bytes()
    if not data:
        raise BadFile("empty file (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    try:
        img = Image.open(io.BytesIO(data))
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
    return digest, img


# ---------------------------------------------------------------- one image to the canonical form


def canonical(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """Any mode and size -> uint8 size x size x channels: upright, opaque, centre-cropped."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        wide = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if wide.max() > 255 else 255.0
        img = Image.fromarray(np.clip(wide * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        # Transparent pixels over white, as most viewers show them.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("RGB" if channels == 3 else "L")
    if img.size != (size, size):
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr
