"""The training data path: imagepipe's on-device batches vs a torchvision DataLoader.

Both produce the same thing: shuffled batches of 256 CIFAR-sized (32 x 32 x 3) images, each
randomly cropped from a 4-pixel reflect padding, randomly flipped, scaled and normalised, as
float32 N x C x H x W on the training device. The DataLoader does it per sample with
torchvision transforms v2 (the usual recipe), with no worker process and with one per core;
`DeviceBatches` does it per batch with indexing (stages/core/devicedata.py). Content does not
change the speed, so the images are random (nothing to download). Rounds are interleaved so a
shared machine's load hits each contender alike; medians are reported, and the ratio of the
on-device path to the faster DataLoader. Writes benchmarks/results/datapath.json.
"""

from __future__ import annotations

import os

# As in the stages: must precede torch's import (see stages/pretrain.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from stages.core.device import select_device
from stages.core.devicedata import DeviceBatches
from stages.core.host import usable_cores as cpu_cores

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
N_IMAGES, SIZE, BATCH, PAD, ROUNDS = 10_000, 32, 256, 4, 3
MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


class ArrayImages(Dataset):
    """uint8 N x H x W x C in memory, one transformed sample at a time (the DataLoader way)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels
        self.transform = v2.Compose([
            v2.RandomCrop(SIZE, padding=PAD, padding_mode="reflect"),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(self.images[i]).permute(2, 0, 1)
        return self.transform(img), int(self.labels[i])


def images_per_s(batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                 device: torch.device) -> float:
    """One epoch, every batch on the device; images/s."""
    start, seen = time.perf_counter(), 0
    for x, _ in batches():
        x = x.to(device, non_blocking=True)
        seen += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def contenders(images: np.ndarray, labels: np.ndarray, device: torch.device
               ) -> dict[str, Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]]:
    ds = ArrayImages(images, labels)
    workers = cpu_cores()
    pin = device.type == "cuda"
    loaders = {
        "dataloader_0_workers": DataLoader(ds, BATCH, shuffle=True, drop_last=True, pin_memory=pin),
        f"dataloader_{workers}_workers": DataLoader(ds, BATCH, shuffle=True, drop_last=True,
                                                    num_workers=workers, pin_memory=pin,
                                                    persistent_workers=True),
    }
    on_device = DeviceBatches(images, labels, np.arange(len(labels)), device=device, mean=MEAN,
                              std=STD, batch_size=BATCH, train=True,
                              crop_padding=PAD, hflip=True, seed=0)
    epoch = iter(range(1_000_000))
    out: dict[str, Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]] = {
        "on_device": lambda: on_device.epoch(next(epoch))}
    out.update({name: (lambda dl=dl: dl) for name, dl in loaders.items()})
    return out


def main() -> dict[str, Any]:
    device = select_device("auto")
    torch.set_num_threads(cpu_cores())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(N_IMAGES, SIZE, SIZE, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=N_IMAGES)
    runs = contenders(images, labels, device)
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for batches in runs.values():  # warm-up: worker start-up, first allocations
        images_per_s(batches, device)
    for _ in range(ROUNDS):
        for name, batches in runs.items():
            speeds[name].append(images_per_s(batches, device))
    median = {name: round(statistics.median(v), 1) for name, v in speeds.items()}
    best_loader = max((n for n in median if n.startswith("dataloader")), key=median.__getitem__)
    result = {
        "device": str(device), "cpu_cores": cpu_cores(), "torch": torch.__version__,
        "machine": platform.machine(), "images": N_IMAGES, "image_size": SIZE, "batch": BATCH,
        "rounds": ROUNDS, "images_per_s": median,
        "ratio_on_device_vs_best_dataloader": round(median["on_device"] / median[best_loader], 2),
        "best_dataloader": best_loader,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "datapath.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"bench_datapath ({device}): " + ", ".join(f"{k} {v:,.0f} img/s" for k, v in median.items())
          + f"; on-device / {best_loader} = {result['ratio_on_device_vs_best_dataloader']}x")
    return result


if __name__ == "__main__":
    main()
