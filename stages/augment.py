"""augment: data/source/ + params.augment -> data/augmented/, metrics/augment.json,
plots/augment_preview.png.

The augmented set holds the source train split, then `copies` seeded augmented copies of it
(split train), then the untouched val and test splits: the same dataset format, so pretrain
reads it like any other. Materialised rather than drawn online so that experiments on later
stages reuse the copies from DVC's cache; cheap crop/flip still run online in training.
With `copies: 0` the augmented set is the source itself: its shards are hard links to the
source's (copied only where the file system has no links), in the source's row order, so no
image is written again (29,400 images on the CIFAR-10 preset).
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import engine
from stages.core.augpolicy import augment, image_keys
from stages.core.dataset import (
    SPLIT_CODE,
    Dataset,
    RowWriter,
    iter_rows,
    load_dataset,
    write_sharded,
)
from stages.core.door import arguments, exit_process, run_stage
from stages.core.io import atomic_dir, atomic_path, write_json
from stages.core.progress import progress
from stages.params import AugmentParams, Params, load_params

# torch (~2 s) is imported where it is used (stages/core/augpolicy.py), not for --help or the
# door.

log = logging.getLogger("imagepipe.augment")
TRAIN = SPLIT_CODE["train"]


@dataclass(frozen=True)
class CopyTask:
    """One augmented copy of one source shard's training rows: an engine task."""

    source: str  # the source shard (.npy)
    train_rows: np.ndarray  # its rows in the train split
    offset: int  # the shard's first row in the dataset: an image's key names its row there
    dest: str  # the output shard
    policy: AugmentParams
    seed: int  # params.seed
    copy: int
    batch: int


def augment_shard(task: CopyTask) -> tuple[int, str]:
    """Write the task's augmented copy; return (rows, sha256). Reads and writes in batches.

    Each image is drawn from its own key (seed, copy, dataset row): the bytes are the same
    whatever the batch size, the engine or the number of workers."""
    import torch

    if multiprocessing.parent_process() is not None:
        torch.set_num_threads(1)  # one task per core: the engine is the parallelism
    src = np.load(task.source, mmap_mode="r")
    keys = image_keys(task.seed, task.copy, task.offset + task.train_rows)
    writer = RowWriter(Path(task.dest), src.shape[1:], capacity=len(task.train_rows),
                       hashed=True)  # hashed as written: the shard is not read back
    for lo in range(0, len(task.train_rows), task.batch):
        rows = slice(lo, lo + task.batch)
        writer.write(augment(task.policy, src[task.train_rows[rows]], keys[rows]))
    writer.close()
    return writer.n, writer.digest


def run(params: Params, source: Path, out: Path) -> dict[str, Any]:
    """Write the augmented dataset to `out`; return metrics.

    Layout: every source shard's training rows, then copy by copy each shard's augmented
    training rows (one engine task each), then each shard's val and test rows. Each output
    shard is at most as large as its source shard; nothing is held whole in memory."""
    p = params.augment
    ds = load_dataset(source, verify=params.verify_data)
    size, _, channels = ds.image_shape
    meta = {"uri": ds.manifest.get("uri"), "role": "augmented",
            "source_sha256": ds.manifest["sha256"], "image_size": size, "channels": channels,
            "seed": params.seed, "params": {"augment": p.model_dump()}}
    if p.copies == 0:
        return linked(source, out, ds, meta)
    files, bounds = source_shards(source.resolve(), ds)  # absolute: read on other nodes too
    train = ds.indices("train")
    n = len(train) * (1 + p.copies) + len(ds.labels) - len(train)
    with atomic_dir(out) as tmp:
        (tmp / "shards").mkdir()
        made: list[tuple[Path, str, int]] = []
        labels, splits = [], []
        for k, path in enumerate(files):  # originals
            lo, hi = bounds[k], bounds[k + 1]
            made.append(_copy_rows(path, ds.split[lo:hi] == TRAIN, tmp / f"orig-{k}.npy"))
            labels.append(ds.labels[lo:hi][ds.split[lo:hi] == TRAIN])
        tasks = [CopyTask(str(path), np.flatnonzero(ds.split[bounds[k]:bounds[k + 1]] == TRAIN),
                          int(bounds[k]), str(tmp.resolve() / f"copy-{c}-{k}.npy"), p,
                          params.seed, c, p.batch_size)
                 for c in range(p.copies) for k, path in enumerate(files)]
        start = time.perf_counter()
        results: dict[int, tuple[int, str]] = {}
        small = len(train) * p.copies < engine.AUGMENT_POOL_FROM
        with progress("augment", len(train) * p.copies) as advance:
            for i, result in engine.run_map(augment_shard, tasks,
                                            engine="inline" if small else params.data.engine,
                                            ray_address=params.data.ray_address):
                results[i] = result
                advance(result[0])
        seconds = time.perf_counter() - start
        made += [(Path(t.dest), results[i][1], results[i][0]) for i, t in enumerate(tasks)]
        labels += [labels[k] for _ in range(p.copies) for k in range(len(files))]
        splits = [np.full(sum(map(len, labels)), TRAIN, dtype=np.uint8)]
        for k, path in enumerate(files):  # val and test, untouched
            lo, hi = bounds[k], bounds[k + 1]
            made.append(_copy_rows(path, ds.split[lo:hi] != TRAIN, tmp / f"rest-{k}.npy"))
            labels.append(ds.labels[lo:hi][ds.split[lo:hi] != TRAIN])
            splits.append(ds.split[lo:hi][ds.split[lo:hi] != TRAIN])
        write_sharded(tmp, [m for m in made if m[2]], np.concatenate(labels),
                      np.concatenate(splits), ds.classes, meta)
        for path, _, _ in made:  # linked into shards/ by write_sharded
            path.unlink(missing_ok=True)
    made_n = len(train) * p.copies
    log.info("augment: %d copies of %d training images in %.1f s (%.0f images/s) -> %s",
             p.copies, len(train), seconds, made_n / max(seconds, 1e-9), out)
    return _metrics(len(train), p.copies, n)


def _metrics(n_train: int, copies: int, n_total: int) -> dict[str, Any]:
    # No timings in the metrics (dvc metrics diff would show a change nobody made): the log.
    return {"n_train_original": n_train, "copies": copies, "n_augmented": n_train * copies,
            "n_total": n_total}


def linked(source: Path, out: Path, ds: Dataset, meta: dict[str, Any]) -> dict[str, Any]:
    """copies 0: the source's shards linked into `out` as they are (write_sharded links each,
    copying only where links fail), with the source's labels and splits: no image rewritten."""
    shards = [(source / e["file"], e["sha256"], int(e["n"])) for e in ds.manifest["shards"]]
    with atomic_dir(out) as tmp:
        write_sharded(tmp, shards, np.asarray(ds.labels), np.asarray(ds.split), ds.classes, meta)
    n_train = len(ds.indices("train"))
    log.info("augment: copies 0: the source as it is (%d training images of %d), its %d "
             "shard(s) linked, not copied -> %s", n_train, len(ds.labels), len(shards), out)
    return _metrics(n_train, 0, len(ds.labels))


def source_shards(folder: Path, ds: Dataset) -> tuple[list[Path], np.ndarray]:
    """The source's shard files and their row offsets."""
    entries = ds.manifest["shards"]
    return ([folder / e["file"] for e in entries],
            np.concatenate([[0], np.cumsum([e["n"] for e in entries])]))


def _copy_rows(path: Path, mask: np.ndarray, dest: Path) -> tuple[Path, str, int]:
    """The rows of a shard where `mask`, into a new shard, in chunks: memory flat."""
    shape = tuple(np.load(path, mmap_mode="r").shape[1:])
    writer = RowWriter(dest, shape, capacity=int(mask.sum()), hashed=True)
    for lo, rows in iter_rows(path, shape, chunk=2048):
        writer.write(rows[mask[lo:lo + len(rows)]])
    writer.close()
    return dest, writer.digest, writer.n


def preview(params: Params, source: Path, path: Path, n_aug: int = 3) -> None:
    """One grid, a row per class (the first ten with training images): each original beside
    `n_aug` draws of the policy, scaled up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # run() checked the source in this process a moment ago.
    ds = load_dataset(source, verify=None)
    channels = ds.image_shape[2]
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
        picks = np.sort(picks)
        tiles = []
        for row_index, img in zip(picks, np.asarray(ds.images[picks]), strict=True):
            tiles.append((img, "original"))
            # Copies 0..n_aug-1 of this row: the images data/augmented holds for it.
            drawn = [augment(params.augment, img[None], image_keys(params.seed, c, [row_index]))[0]
                     for c in range(n_aug)]
            tiles += [(a, "augmented") for a in drawn]
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
    args = arguments("augment", __doc__, argv, source="data/source", out="data/augmented",
                     metrics="metrics/augment.json", preview="plots/augment_preview.png")

    def body() -> None:
        params = load_params(args.params)
        write_json(args.metrics, run(params, args.source, args.out))
        preview(params, args.source, args.preview)

    return run_stage("augment", body)


if __name__ == "__main__":
    exit_process(main())
