"""augment: data/source/ + params.augment -> data/augmented/, metrics/augment.json,
plots/augment_preview.png.

The augmented set holds the source train split, then `copies` seeded augmented copies of it
(split train), then the untouched val and test splits: the same dataset format, so pretrain
reads it like any other. Materialised rather than drawn online so that experiments on later
stages reuse the copies from DVC's cache; cheap crop/flip still run online in training.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.core.dataset import SPLIT_CODE, Dataset, dataset_writer, load_dataset
from stages.core.door import run_stage
from stages.core.io import atomic_path, write_json
from stages.core.progress import progress
from stages.params import AugmentParams, Params, load_params

if TYPE_CHECKING:
    from torchvision.transforms import v2

# torch and torchvision (~2.5 s) are imported where they are used, not for --help or the door.

log = logging.getLogger("imagepipe.augment")


def build_policy(p: AugmentParams, size: int, channels: int) -> v2.Compose:
    """The augmentation policy of params.augment, on uint8 CHW tensors, returning uint8."""
    import torch
    from torchvision.transforms import v2

    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=tuple(p.crop_scale), antialias=True)
    ]
    if p.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if p.rotation:
        steps.append(v2.RandomRotation(p.rotation))
    if p.color_jitter:
        # Saturation and hue mean nothing on one channel (and hue refuses it).
        colour = p.color_jitter if channels == 3 else 0.0
        steps.append(v2.ColorJitter(brightness=p.color_jitter, contrast=p.color_jitter,
                                    saturation=colour, hue=colour / 10))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if p.noise_std:
        steps.append(v2.GaussianNoise(sigma=p.noise_std, clip=True))
    if p.erasing:
        steps.append(v2.RandomErasing(p=p.erasing, value=0))
    steps.append(v2.ToDtype(torch.uint8, scale=True))
    return v2.Compose(steps)


def augment_batch(policy: v2.Compose, batch: np.ndarray) -> np.ndarray:
    """N x H x W x C uint8 -> N x H x W x C uint8, each image with its own random draw.

    The batch becomes one tensor, but the policy is called per image: a v2 transform called on
    a batch draws one set of parameters for all of it, and copies that share one crop and one
    rotation per batch would be far less diverse.
    """
    import torch

    chw = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    out = torch.stack([policy(img) for img in chw])
    return out.permute(0, 2, 3, 1).contiguous().numpy()


def run(params: Params, source: Path, out: Path) -> dict[str, Any]:
    """Write the augmented dataset to `out`; return metrics."""
    import torch

    p = params.augment
    ds = load_dataset(source)
    size, _, channels = ds.image_shape
    policy = build_policy(p, size, channels)
    train = ds.indices("train")
    others = np.concatenate([ds.indices("val"), ds.indices("test")])
    n = len(train) * (1 + p.copies) + len(others)
    start = time.perf_counter()
    with dataset_writer(out, n, ds.image_shape) as writer:
        pos = _copy(ds, train, writer, 0, p.batch_size)
        with progress("augment", len(train) * p.copies) as advance:
            for copy in range(p.copies):
                # One seed per copy: the same params give the same bytes, copy by copy.
                torch.manual_seed(params.seed * 1_000_003 + copy)
                for lo in range(0, len(train), p.batch_size):
                    idx = train[lo:lo + p.batch_size]
                    writer.images[pos:pos + len(idx)] = augment_batch(policy, ds.images[idx])
                    writer.labels[pos:pos + len(idx)] = ds.labels[idx]
                    writer.split[pos:pos + len(idx)] = SPLIT_CODE["train"]
                    pos += len(idx)
                    advance(len(idx))
        seconds = time.perf_counter() - start
        _copy(ds, others, writer, pos, p.batch_size)
        writer.finish(ds.classes, {
            "uri": ds.manifest.get("uri"), "role": "augmented", "source_sha256": ds.manifest["sha256"],
            "image_size": size, "channels": channels, "seed": params.seed,
            "params": {"augment": p.model_dump()},
        })
    made = len(train) * p.copies
    metrics = {"n_train_original": int(len(train)), "copies": p.copies, "n_augmented": made,
               "n_total": n, "seconds": round(seconds, 3),
               "images_per_s": round(made / seconds, 1) if made and seconds > 0 else 0.0}
    log.info("augment: %d copies of %d training images at %.0f images/s -> %s",
             p.copies, len(train), metrics["images_per_s"], out)
    return metrics


def _copy(ds: Dataset, idx: np.ndarray, writer: Any, pos: int, batch: int) -> int:
    for lo in range(0, len(idx), batch):
        part = idx[lo:lo + batch]
        writer.images[pos:pos + len(part)] = ds.images[part]
        writer.labels[pos:pos + len(part)] = ds.labels[part]
        writer.split[pos:pos + len(part)] = ds.split[part]
        pos += len(part)
    return pos


def preview(params: Params, source: Path, path: Path, n_aug: int = 3) -> None:
    """A grid per class: each original beside `n_aug` draws of the policy, scaled up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    ds = load_dataset(source)
    size, _, channels = ds.image_shape
    policy = build_policy(params.augment, size, channels)
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    per = params.augment.preview_per_class
    shown = [c for c in range(len(ds.classes)) if np.any(ds.labels[ds.indices("train")] == c)][:10]
    cols = per * (1 + n_aug)
    fig, axes = plt.subplots(len(shown), cols, figsize=(cols * 0.9, len(shown) * 0.95 + 0.4),
                             squeeze=False)
    train = ds.indices("train")
    for row, cls in enumerate(shown):
        members = train[ds.labels[train] == cls]
        picks = rng.choice(members, size=min(per, len(members)), replace=False)
        originals = np.asarray(ds.images[np.sort(picks)])
        tiles = []
        for img in originals:
            tiles.append((img, "original"))
            tiles += [(a, "augmented") for a in augment_batch(policy, np.repeat(img[None], n_aug, 0))]
        for col, ax in enumerate(axes[row]):
            ax.set_axis_off()
            if col < len(tiles):
                img, kind = tiles[col]
                ax.imshow(img.squeeze(-1) if channels == 1 else img,
                          cmap="gray" if channels == 1 else None, interpolation="nearest", vmin=0, vmax=255)
                if row == 0:
                    ax.set_title(kind, fontsize=6)
        axes[row][0].text(-0.3, 0.5, ds.classes[cls], transform=axes[row][0].transAxes,
                          ha="right", va="center", fontsize=8)
    fig.suptitle(f"augment preview: each original, then {n_aug} draws of the policy", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.augment", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--source", default="data/source", type=Path)
    parser.add_argument("--out", default="data/augmented", type=Path)
    parser.add_argument("--metrics", default="metrics/augment.json", type=Path)
    parser.add_argument("--preview", default="plots/augment_preview.png", type=Path)
    args = parser.parse_args(argv)

    def body() -> None:
        params = load_params(args.params)
        write_json(args.metrics, run(params, args.source, args.out))
        preview(params, args.source, args.preview)

    return run_stage("augment", body)


if __name__ == "__main__":
    sys.exit(main())
