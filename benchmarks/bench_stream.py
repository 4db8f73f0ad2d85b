"""Training throughput with the set streamed from its shards vs resident on the device.

Both contenders train the pretrain stage's model (its own builder and params.yaml's pretrain
section: resnet_small at its width) with the stages' training loop (`train_one_epoch`), at
batch 512, on the same synthetic CIFAR-sized set (32 x 32 x 3, random pixels: content does not
change the speed) written as shards through the real writers (RowWriter, write_sharded) into a
temporary folder and loaded with load_dataset, as a stage reads it. `resident`: DeviceBatches
copies the split to the device once; `streamed`: StreamBatches reads each batch from the
shards in a background thread ahead of the step (stages/core/stream.py). Each trains its own
model for the same epochs, round by round interleaved so a shared machine's load hits both
alike; medians are reported with the ratio (goal: streamed >= 0.8 x resident). The loader
alone (batches made, no training) is timed too: the rate a faster device could be fed at.
On a machine others load, wall-clock rates swing by tens of percent between rounds; the
process's CPU time per trained image (all its threads, the reader's included) moves less, and
is reported beside them. Writes benchmarks/results/stream.json.
"""

from __future__ import annotations

import os

# As in the stages: must precede torch's import (see stages/pretrain.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.core.checkpoint import Position
from stages.core.dataset import file_sha256, load_dataset, write_sharded
from stages.core.device import make_runtime
from stages.core.devicedata import DeviceBatches, channel_stats
from stages.core.host import usable_cores
from stages.core.io import atomic_dir
from stages.core.models import ModelSpec, build_model
from stages.core.shards import RowWriter
from stages.core.stream import StreamBatches
from stages.core.train import make_trainer, param_groups, train_one_epoch
from stages.params import load_params

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
N_IMAGES, SIZE, CLASSES, BATCH, PER_SHARD, ROUNDS = 4096, 32, 10, 512, 1024, 5


def write_set(folder: Path) -> None:
    """A synthetic set in shards of PER_SHARD images, every image in the train split."""
    rng = np.random.default_rng(0)
    staging = folder.parent / "staging"
    staging.mkdir()
    shards = []
    for k, lo in enumerate(range(0, N_IMAGES, PER_SHARD)):
        writer = RowWriter(staging / f"{k}.npy", (SIZE, SIZE, 3))
        writer.write(rng.integers(0, 256, size=(min(PER_SHARD, N_IMAGES - lo), SIZE, SIZE, 3),
                                  dtype=np.uint8))
        writer.close()
        shards.append((writer.path, file_sha256(writer.path), writer.n))
    labels = rng.integers(0, CLASSES, size=N_IMAGES)
    with atomic_dir(folder) as tmp:
        write_sharded(tmp, shards, labels, np.zeros(N_IMAGES, np.uint8),
                      [str(c) for c in range(CLASSES)], {"uri": "bench:synthetic"})


class Contender:
    """One batch source and a model of its own, trained an epoch per call."""

    def __init__(self, source: DeviceBatches, p: Any, rt: Any) -> None:
        self.batches, self.rt, self.epoch = source, rt, 0
        spec = ModelSpec(p.model, CLASSES, 3, SIZE, p.width, p.dropout)
        torch.manual_seed(0)
        model = build_model(spec)
        self.trainer = make_trainer(model, param_groups(model, p.lr, p.weight_decay), p, rt,
                                    100, len(source))

    def train(self) -> tuple[float, float]:
        """(images/s, CPU ms per image) of one training epoch."""
        start, cpu = time.perf_counter(), time.process_time()
        pos = train_one_epoch(self.trainer, self.batches, self.epoch, Position(epoch=self.epoch))
        self._sync()
        self.epoch += 1
        return (pos.seen / (time.perf_counter() - start),
                1000 * (time.process_time() - cpu) / pos.seen)

    def load(self) -> float:
        """Images/s of one epoch's batches made on the device, no training."""
        start, seen = time.perf_counter(), 0
        for _, y in self.batches.epoch(self.epoch):
            seen += len(y)
        self._sync()
        return seen / (time.perf_counter() - start)

    def _sync(self) -> None:
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize()


def main() -> dict[str, Any]:
    p = load_params(REPO / "params.yaml").pretrain.model_copy(update={"batch_size": BATCH})
    rt = make_runtime(p)
    with tempfile.TemporaryDirectory(prefix="bench_stream.") as tmp:
        write_set(Path(tmp) / "set")
        ds = load_dataset(Path(tmp) / "set")
        idx = ds.indices("train")
        mean, std = channel_stats(ds.images, idx)
        kw: dict[str, Any] = {"device": rt.device, "mean": mean, "std": std, "batch_size": BATCH,
                              "train": True, "crop_padding": p.crop_padding, "hflip": p.hflip,
                              "seed": 0, "channels_last": rt.channels_last}
        runs = {"resident": Contender(DeviceBatches(ds.images, ds.labels, idx, **kw), p, rt),
                "streamed": Contender(StreamBatches(ds.images, ds.labels, idx, **kw), p, rt)}
        assert runs["resident"].batches.resident and not runs["streamed"].batches.resident
        train: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        load: dict[str, list[float]] = {name: [] for name in runs}
        for c in runs.values():  # warm-up: first allocations, thread pools
            c.train()
        for _ in range(ROUNDS):
            for name, c in runs.items():
                rate, ms = c.train()
                train[name].append(rate)
                cpu[name].append(ms)
                load[name].append(c.load())
    med = {name: round(statistics.median(v), 1) for name, v in train.items()}
    loader = {name: round(statistics.median(v), 1) for name, v in load.items()}
    cpu_ms = {name: round(statistics.median(v), 3) for name, v in cpu.items()}
    result = {
        "device": str(rt.device), "cpu_cores": usable_cores(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(), "model": p.model,
        "width": p.width, "images": N_IMAGES, "image_size": SIZE, "batch": BATCH,
        "shards": -(-N_IMAGES // PER_SHARD), "rounds": ROUNDS, "load_average": os.getloadavg(),
        "train_images_per_s": med, "train_runs": train,
        "ratio_streamed_vs_resident": round(med["streamed"] / med["resident"], 3),
        "cpu_ms_per_image": cpu_ms, "cpu_runs": cpu,
        "cpu_ratio_resident_vs_streamed": round(cpu_ms["resident"] / cpu_ms["streamed"], 3),
        "loader_only_images_per_s": loader,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stream.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"bench_stream ({rt.device}, batch {BATCH}): training resident {med['resident']:,.0f} "
          f"img/s, streamed {med['streamed']:,.0f} img/s, ratio "
          f"{result['ratio_streamed_vs_resident']}; CPU ms/image resident "
          f"{cpu_ms['resident']}, streamed {cpu_ms['streamed']}; loader alone resident "
          f"{loader['resident']:,.0f}, streamed {loader['streamed']:,.0f} img/s")
    return result


if __name__ == "__main__":
    main()
