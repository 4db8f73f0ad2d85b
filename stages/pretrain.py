"""pretrain: data/augmented/ (train + val) + params.pretrain -> models/pretrained.pt,
metrics/pretrain.json, plots/pretrain.csv; checkpoints in checkpoints/pretrain/.

Trains the chosen architecture on the augmented source set with online crop/flip on the
device (random-resized crops of `train_size` where that is below the stored size). A set that
does not fit on the device is streamed from its shards ahead of the step (core/stream.py).
The normalisation (per-channel mean and std of the training split) is computed here and
recorded in the model file: finetune, evaluate, export and serving all reuse these numbers.
A run killed mid-way resumes from its last checkpoint when the params and data are unchanged.
With `devices` > 1 the stage launches this machine's training processes itself
(stages/core/distributed.py); the first process writes every output. With `engine: ray` they
are Ray Train workers on a Ray cluster, the way to train on several machines
(stages/core/raytrain.py).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from stages import trainingdoor
from stages.core import door
from stages.core.codeid import code_fingerprint
from stages.core.dataset import load_dataset
from stages.core.errors import BadInput
from stages.params import Params

# torch (~2 s) is imported by the functions that train, not at load: `--help`, a params file
# refused and the door's launch decision start without it.

log = logging.getLogger("imagepipe.pretrain")


def run(params: Params, data: Path, model_out: Path, checkpoints: Path, plot: Path
        ) -> dict[str, Any]:
    """Pretrain, write the model file and the per-epoch CSV; return the metrics."""
    import torch

    from stages.core import distributed
    from stages.core.checkpoint import CheckpointStore
    from stages.core.device import make_runtime
    from stages.core.devicedata import channel_stats
    from stages.core.history import summary, throughput, write_csv
    from stages.core.models import ModelFile, ModelSpec, build_model, save_model_file
    from stages.core.train import fit, make_trainer, param_groups, split_batches

    start = time.perf_counter()
    p = params.pretrain
    rt = make_runtime(p)
    world = distributed.world_fingerprint(p, rt.comm, "pretrain")
    ds = load_dataset(data, verify=params.verify_data)
    if not len(ds.indices("train")):
        raise BadInput(f"{data}: the train split is empty")
    size, _, channels = ds.image_shape
    mean, std = channel_stats(ds.images, ds.indices("train"))
    torch.manual_seed(params.seed)
    spec = ModelSpec(p.model, len(ds.classes), channels, size, p.width, p.dropout)
    model = build_model(spec, p.weights)
    train, val = split_batches(ds, p, rt, mean, std, params.seed, train_size=p.train_size)
    log.info("pretrain: %s on %s, %d train / %d val images (%s), %d steps per epoch",
             p.model, rt.device, train.n, val.n,
             "resident on the device" if train.resident else "streamed", len(train))
    tr = make_trainer(model, param_groups(model, p.lr, p.weight_decay), p, rt, p.epochs,
                      len(train))
    store = CheckpointStore(checkpoints / "pretrain.pt", {
        "stage": "pretrain", "seed": params.seed, "data": ds.manifest["sha256"], **world,
        "code": code_fingerprint("stages.pretrain")}, rt.comm)
    history = fit(tr, train, val, store, phase="pretrain", epochs=p.epochs,
                  every=p.checkpoint_every_steps, on_epoch=lambda rows: write_csv(plot, rows))
    figures = summary(history)
    metrics = {**figures, "n_train": train.n, "n_val": val.n, "world_size": rt.comm.world,
               "parameters": sum(t.numel() for t in model.parameters())}
    if history:
        log.info("pretrain: %s (stage %.1f s)", throughput(history), time.perf_counter() - start)
    if not rt.comm.is_main:
        return metrics
    write_csv(plot, history)
    # Whether the model saw mirrored images: augment's policy or the online flip.
    offline_flip = ds.manifest.get("params", {}).get("augment", {}).get("hflip", False)
    save_model_file(model_out, model, ModelFile(spec, ds.classes, mean, std, extra={
        "stage": "pretrain", "weights": p.weights, "hflip_policy": bool(offline_flip or p.hflip),
        "val_accuracy": figures.get("val_accuracy"), "epochs": p.epochs,
        "train_size": train.train_size or size}))
    return metrics


def arguments(argv: list[str] | None) -> argparse.Namespace:
    return door.arguments("pretrain", __doc__, argv, data="data/augmented",
                          model="models/pretrained.pt", checkpoints="checkpoints/pretrain",
                          metrics="metrics/pretrain.json", plot="plots/pretrain.csv")


def work(params: Params, args: argparse.Namespace) -> dict[str, Any]:
    return run(params, args.data, args.model, args.checkpoints, args.plot)


def _ray(params: Params, args: argparse.Namespace, argv: list[str]) -> bool:
    """With engine: ray, the run on Ray Train workers (each runs trainingdoor.rank_body); else
    False."""
    if params.pretrain.engine != "ray":
        return False
    from stages.core import raytrain

    raytrain.fit("stages.trainingdoor:rank_body", ["pretrain", *argv], params.pretrain,
                 params.data.ray_address, stage="pretrain",
                 storage=args.checkpoints.resolve().parent / ".ray-train")
    return True


def main(argv: list[str] | None = None) -> int:
    return trainingdoor.training_main("pretrain", "pretrain", argv, arguments, work, engine=_ray)


if __name__ == "__main__":
    door.exit_process(main())
