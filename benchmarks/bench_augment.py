"""augment's policy: images/s of the per-image torchvision v2 path the stage had, the batched
tensor path it has (stages/core/augpolicy.py), and the per-image path in a DataLoader with a
worker per core (the usual way to parallelise per-sample transforms).

The embedded default's shape (16 x 16 grey digits, params.augment's defaults: crop 0.8-1.0,
rotation 10, colour jitter 0.2) and a CIFAR-like one (32 x 32 x 3, flips on). Content does not
change the speed, so the images are random. Rounds are interleaved so a shared machine's load
hits each contender alike; medians are reported. Writes benchmarks/results/augment.json.

`python -m benchmarks augment` (or `python -m benchmarks.bench_augment`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from stages.core.augpolicy import augment, image_keys
from stages.core.host import usable_cores
from stages.params import AugmentParams

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
N_IMAGES, BATCH, ROUNDS = 2_048, 256, 3
SHAPES = {"digits_16px_grey": (16, 1, AugmentParams()),
          "cifar_32px_rgb": (32, 3, AugmentParams(hflip=True))}


def v2_policy(p: AugmentParams, size: int, channels: int) -> v2.Compose:
    """The stage's policy before issue 27, as it was: v2 transforms, one image per call."""
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=tuple(p.crop_scale), antialias=True)]
    if p.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if p.rotation:
        steps.append(v2.RandomRotation(p.rotation))
    if p.color_jitter:
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


class PerImage(Dataset):
    """The v2 policy on one CHW image per item: what a DataLoader's workers run."""

    def __init__(self, images: np.ndarray, policy: v2.Compose) -> None:
        self.chw = torch.from_numpy(images).permute(0, 3, 1, 2)
        self.policy = policy

    def __len__(self) -> int:
        return len(self.chw)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.policy(self.chw[i])


def contenders(images: np.ndarray, p: AugmentParams) -> dict[str, Callable[[], object]]:
    size, channels = images.shape[1], images.shape[3]
    policy = v2_policy(p, size, channels)
    chw = torch.from_numpy(images).permute(0, 3, 1, 2)
    keys = image_keys(0, 0, np.arange(len(images)))
    workers = usable_cores()
    loader = DataLoader(PerImage(images, policy), BATCH, num_workers=workers,
                        persistent_workers=True)

    def per_image() -> None:
        for lo in range(0, len(chw), BATCH):
            torch.stack([policy(img) for img in chw[lo:lo + BATCH]])

    def batched() -> None:
        for lo in range(0, len(images), BATCH):
            augment(p, images[lo:lo + BATCH], keys[lo:lo + BATCH])

    return {"per_image_v2": per_image, "batched_tensor": batched,
            f"dataloader_{workers}_workers_v2": lambda: sum(1 for _ in loader)}


def measure(name: str, size: int, channels: int, p: AugmentParams) -> dict[str, Any]:
    images = np.random.default_rng(0).integers(0, 256, (N_IMAGES, size, size, channels),
                                               dtype=np.uint8)
    runs = contenders(images, p)
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up: worker start-up, first allocations
    for _ in range(ROUNDS):
        for key, fn in runs.items():
            start = time.perf_counter()
            fn()
            rates[key].append(len(images) / (time.perf_counter() - start))
    median = {k: round(statistics.median(v)) for k, v in rates.items()}
    print(f"bench_augment {name}: " + ", ".join(f"{k} {v:,} img/s" for k, v in median.items())
          + f"; batched / per-image = {median['batched_tensor'] / median['per_image_v2']:.1f}x")
    return {"images_per_s": median, "rounds": {k: [round(r) for r in v] for k, v in rates.items()}}


def main() -> dict[str, Any]:
    torch.set_num_threads(1)  # the stage's tasks run one per core; compare like with like
    result: dict[str, Any] = {
        "torch": torch.__version__, "machine": platform.machine(), "cpu_cores": usable_cores(),
        "load_1min": os.getloadavg()[0], "images": N_IMAGES, "batch": BATCH,
        "torch_threads": 1, "shapes": {}}
    for name, (size, channels, p) in SHAPES.items():
        result["shapes"][name] = measure(name, size, channels, p)
    result["load_1min_after"] = os.getloadavg()[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "augment.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
