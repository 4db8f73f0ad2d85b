"""scratch: data/target/ + models/pretrained.pt (its architecture and normalisation only) +
params.finetune (all but TRANSFER_ONLY) -> models/scratch.pt, metrics/scratch.json,
plots/scratch.csv; checkpoints in checkpoints/scratch/.

The from-scratch baseline that measures the transfer gain: the finetuned model's architecture
from random weights, on the same target train split, with the same data draws, epochs
(head_epochs + full_epochs) and schedule, at its own lr (`scratch_lr`, tuned like the
finetune's, never weakened). With `keep_best` it keeps its best epoch by validation, as the
finetuned model does, so the comparison stays fair. Without a baseline the gain would be
assumed, not measured. With `baseline: false` models/scratch.pt still exists (DVC's graph is
fixed) but holds the untrained network, marked `extra.baseline = false`: evaluate then
reports no gain and export never ships it.

Its own DVC stage, separate from finetune, so that it reruns only when its own params, data or
code change: a transfer-only setting (params.TRANSFER_ONLY: lr, backbone_lr_scale, l2sp) used
to retrain a bit-identical baseline (220 s of a 522 s experiment on the CIFAR-10 preset). It
trains with `FinetuneParams.baseline_view()`, where those keys are fixed, so they cannot reach
it whatever the code reads.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stages.core import door
from stages.core.codeid import code_fingerprint
from stages.core.dataset import load_dataset
from stages.finetune import adapt_to_target, load_target
from stages.params import Params
from stages.trainingdoor import training_main

log = logging.getLogger("imagepipe.scratch")


@dataclass(frozen=True)
class Outputs:
    model: Path
    checkpoints: Path
    plot: Path


def run(params: Params, data: Path, pretrained: Path, out: Outputs) -> dict[str, Any]:
    """Train the baseline (or not, with `baseline: false`); write its model file and CSV."""
    # torch is imported here, not at load (as in finetune.py): --help starts without it.
    import torch

    from stages.core.best import BestEpoch, chosen
    from stages.core.checkpoint import CheckpointStore
    from stages.core.device import make_runtime
    from stages.core.history import summary, throughput, write_csv
    from stages.core.models import build_model, load_model_file, save_model_file
    from stages.core.train import fit, make_trainer, param_groups

    start = time.perf_counter()
    p = params.finetune.baseline_view()
    rt = make_runtime(p)
    ds = load_dataset(data, verify=params.verify_data)
    _, mf = adapt_to_target(*load_model_file(pretrained), ds)  # the spec and normalisation
    t = load_target(ds, mf, p, rt, params.seed)
    torch.manual_seed(params.seed)
    model = build_model(replace(mf.spec, num_classes=len(t.classes)))
    best = BestEpoch(model) if p.keep_best else None
    history: list[dict[str, Any]] = []
    if p.baseline:
        epochs = p.head_epochs + p.full_epochs
        tr = make_trainer(model, param_groups(model, p.scratch_lr, p.weight_decay), p, rt,
                          epochs, len(t.train))
        store = CheckpointStore(out.checkpoints / "scratch.pt",
                                {**t.fingerprint, "phase": "scratch",
                                 # its own stage's files (they include finetune.py's)
                                 "code": code_fingerprint("stages.scratch")}, rt.comm)
        history = fit(tr, t.train, t.val, store, phase="scratch", epochs=epochs,
                      every=p.checkpoint_every_steps, best=best,
                      on_epoch=lambda rows: write_csv(out.plot, rows))
        log.info("scratch: %s", throughput(history))
    else:
        log.info("scratch: baseline is false: %s holds the untrained network", out.model)
    row = chosen(best, history, "scratch")
    if rt.comm.is_main:
        write_csv(out.plot, history)
        save_model_file(out.model, model, t.model_file(
            "scratch", row, baseline=p.baseline, hflip_policy=bool(p.hflip),
            keep_best=p.keep_best))
    log.info("scratch: stage %.1f s", time.perf_counter() - start)
    return {**summary(history, row), "n_train": t.train.n, "n_val": t.val.n,
            "world_size": rt.comm.world}


def arguments(argv: list[str] | None) -> argparse.Namespace:
    return door.arguments("scratch", __doc__, argv, data="data/target",
                          pretrained="models/pretrained.pt", model="models/scratch.pt",
                          checkpoints="checkpoints/scratch", metrics="metrics/scratch.json",
                          plot="plots/scratch.csv")


def work(params: Params, args: argparse.Namespace) -> dict[str, Any]:
    return run(params, args.data, args.pretrained, Outputs(args.model, args.checkpoints, args.plot))


def main(argv: list[str] | None = None) -> int:
    return training_main("scratch", "finetune", argv, arguments, work)


if __name__ == "__main__":
    door.exit_process(main())
