"""Image issues of a dataset: uint8 N x H x W x C images + split codes -> near-duplicates
across splits, and dark, low-information and blurry images, each with the figure that flagged
it.

Ingest already refuses exact copies across splits (same bytes, same sha256). A training photo
saved again at another size or JPEG quality passes that check and leaks just the same: after
ingest's resize its pixels are nearly, not exactly, those of the training image. Near-copies
are pairs whose grey 8x8 thumbnails (mean removed: what a perceptual hash compares) have a
cosine of at least the threshold. Measured on the digits target (benchmarks/audit.py's set, 225
test images): 30 training digits enlarged to 40 px, saved as JPEG (quality 85) and read back as
ingest reads them scored 0.998 or more against their originals, while no genuine test digit
came above 0.990 against any training digit. The backbone's embeddings did not separate them
(cosine, features centred: copies 0.96-0.99, a genuine test digit's nearest training digit
0.985 at the median), so they are not used here.

Hand-written rather than cleanvision's: cleanvision reads image files or a Hugging Face
dataset, while the stage holds arrays; the statistics are its (99th-percentile brightness,
grey-level entropy) plus a Laplacian sharpness, each a few numpy lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

THUMB = 8  # thumbnail side: coarse enough that resampling and JPEG noise average out
CHUNK = 2048  # images per vectorised block: bounds memory whatever the set's size


@dataclass(frozen=True)
class ImageIssue:
    index: int  # row of the dataset
    reason: str  # near_duplicate | dark | low_information | blurry
    score: float  # the figure compared with the threshold
    detail: str  # a sentence a person can check
    other: int | None = None  # near_duplicate: the row it copies


@dataclass(frozen=True)
class Thresholds:
    near_duplicate: float
    dark: float
    low_information: float
    blurry: float


@dataclass
class ImageStats:
    brightness: np.ndarray = field(default_factory=lambda: np.zeros(0))  # 99th pct luminance
    entropy: np.ndarray = field(default_factory=lambda: np.zeros(0))  # bits
    sharpness: np.ndarray = field(default_factory=lambda: np.zeros(0))


def grey(images: np.ndarray) -> np.ndarray:
    """N x H x W float32 luminance in [0, 1] (ITU-R 601 weights for colour)."""
    x = np.asarray(images, dtype=np.float32) / 255.0
    if x.shape[-1] == 3:
        return x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return x[..., 0]


def _entropy(g: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of each image's 256-level grey histogram, one bincount a block."""
    levels = np.clip(np.rint(g * 255), 0, 255).astype(np.int64).reshape(len(g), -1)
    counts = np.bincount((levels + 256 * np.arange(len(g))[:, None]).ravel(),
                         minlength=256 * len(g)).reshape(len(g), 256)
    p = counts / levels.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=1)


def _sharpness(g: np.ndarray) -> np.ndarray:
    """Variance of the 4-neighbour Laplacian over the image's variance: scale-free, so a
    low-contrast sharp image is not called blurry; a flat image (variance 0) scores 0."""
    lap = (4 * g[:, 1:-1, 1:-1] - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2]
           - g[:, 1:-1, 2:])
    var = g.var(axis=(1, 2))
    return np.divide(lap.var(axis=(1, 2)), var, out=np.zeros_like(var), where=var > 1e-8)


def statistics(images: np.ndarray) -> ImageStats:
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for lo in range(0, len(images), CHUNK):
        g = grey(images[lo:lo + CHUNK])
        parts.append((np.percentile(g.reshape(len(g), -1), 99, axis=1), _entropy(g),
                      _sharpness(g)))
    if not parts:
        return ImageStats()
    b, e, s = (np.concatenate(col) for col in zip(*parts, strict=True))
    return ImageStats(b, e, s)


def quality_issues(stats: ImageStats, t: Thresholds) -> list[ImageIssue]:
    """Dark, low-information and blurry images. Blurry is relative to the set's median
    sharpness (it depends on image size and content) and is not said of a flat image, whose
    sharpness is 0 for want of any content: that one is low-information."""
    out: list[ImageIssue] = []
    for i in np.flatnonzero(stats.brightness < t.dark):
        out.append(ImageIssue(int(i), "dark", float(stats.brightness[i]),
                              f"99th-percentile brightness {stats.brightness[i]:.3f} < {t.dark}"))
    flat = stats.entropy < t.low_information
    for i in np.flatnonzero(flat):
        out.append(ImageIssue(int(i), "low_information", float(stats.entropy[i]),
                              f"grey-level entropy {stats.entropy[i]:.2f} bits < "
                              f"{t.low_information}"))
    if len(stats.sharpness):
        floor = t.blurry * float(np.median(stats.sharpness))
        for i in np.flatnonzero((stats.sharpness < floor) & ~flat):
            out.append(ImageIssue(int(i), "blurry", float(stats.sharpness[i]),
                                  f"sharpness {stats.sharpness[i]:.3g} < {t.blurry} x the set's "
                                  f"median ({floor:.3g})"))
    return out


def thumbnails(images: np.ndarray) -> np.ndarray:
    """N x THUMB^2 unit vectors: grey, area-averaged to THUMB x THUMB, mean removed (a flat
    image gives the zero vector, similar to nothing)."""
    import torch
    import torch.nn.functional as F

    out = []
    for lo in range(0, len(images), CHUNK):
        g = torch.from_numpy(grey(images[lo:lo + CHUNK]))[:, None]
        t = F.adaptive_avg_pool2d(g, THUMB).flatten(1).numpy()
        out.append(t - t.mean(axis=1, keepdims=True))
    return unit(np.concatenate(out) if out else np.zeros((0, THUMB * THUMB), np.float32))


def unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x, dtype=np.float32), where=norm > 1e-8)


def near_duplicates(thumbs: np.ndarray, split: np.ndarray, t: Thresholds) -> list[ImageIssue]:
    """Each val image against train, each test image against train and val: the most similar
    earlier-split image where the thumbnails' cosine reaches the threshold."""
    out: list[ImageIssue] = []
    for code in (1, 2):  # val, test (stages/core/dataset.py's SPLIT_CODE)
        queries, pool = np.flatnonzero(split == code), np.flatnonzero(split < code)
        if not len(queries) or not len(pool):
            continue
        for lo in range(0, len(queries), CHUNK):
            q = queries[lo:lo + CHUNK]
            pix = thumbs[q] @ thumbs[pool].T
            best = pix.argmax(axis=1)
            for row in np.flatnonzero(pix[np.arange(len(q)), best] >= t.near_duplicate):
                j, score = int(pool[best[row]]), float(pix[row, best[row]])
                out.append(ImageIssue(int(q[row]), "near_duplicate", score,
                                      f"near copy of row {j} (thumbnail cosine {score:.4f})",
                                      other=j))
    return out
