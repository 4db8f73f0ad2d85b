"""finetune: data/target/ + models/pretrained.pt + params.finetune -> models/finetuned.pt,
models/probe.pt, metrics/finetune.json, plots/finetune.csv; checkpoints in checkpoints/finetune/.

Transfer in two phases. Phase 1 ("head", `head_epochs`): a new head for the target classes
trains on a frozen backbone, BatchNorm statistics included; its result is the linear probe
(models/probe.pt). Phase 2 ("full", `full_epochs`): everything trains, the backbone at
`backbone_lr_scale` x the head's lr, so the pretrained features move less than the new head.
With `l2sp` > 0 the backbone's weight decay toward zero is replaced by an L2 penalty toward its
pretrained weights (L2-SP, stages/core/regularize.py); the head keeps ordinary weight decay.
The target may have its own image size and channel count (data.target.image_size/channels):
the backbone is adapted first, and the change is logged (see `adapt_to_target`).

With `keep_best` (the default) models/finetuned.pt holds the epoch of both phases with the
best validation accuracy, not the last one (stages/core/best.py); the log and the metrics
say which (`selected_epoch`; `val_accuracy` is that epoch's, `last_val_accuracy` the last's).
The from-scratch baseline that measures the transfer gain is its own stage (stages/scratch.py),
so a transfer-only setting (params.TRANSFER_ONLY: lr, backbone_lr_scale, l2sp) does not
retrain it.

With `devices` > 1 the stage launches this machine's training processes itself
(stages/core/distributed.py); the first process writes every output.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.core import door
from stages.core.codeid import code_fingerprint
from stages.core.dataset import Dataset, file_sha256, load_dataset
from stages.core.errors import BadInput
from stages.params import FinetuneParams, Params
from stages.trainingdoor import training_main

if TYPE_CHECKING:
    from stages.core.best import BestEpoch
    from stages.core.device import Runtime
    from stages.core.devicedata import DeviceBatches
    from stages.core.models import Classifier, ModelFile

# torch (~2 s) is imported by the functions that train, not at load: `--help`, a params file
# refused and the door's launch decision start without it.

log = logging.getLogger("imagepipe.finetune")


@dataclass(frozen=True)
class Outputs:
    finetuned: Path
    probe: Path
    checkpoints: Path
    plot: Path


@dataclass(frozen=True)
class Target:
    """The target set on the device, and what every phase's checkpoint must match."""

    train: DeviceBatches
    val: DeviceBatches
    classes: list[str]
    fingerprint: dict[str, Any]
    base: ModelFile  # the pretrained model's file: spec, normalisation, extra carried over

    def model_file(self, stage: str, row: dict[str, Any], **extra: Any) -> ModelFile:
        """The file of a target model whose weights are those of epoch `row` (a history row;
        {}: none trained); mean/std stay the pretrained model's (one preprocessing; converted
        by adapt_to_target when the channel counts differ). export compares val_accuracy."""
        from stages.core.models import ModelFile

        return ModelFile(replace(self.base.spec, num_classes=len(self.classes)), self.classes,
                         self.base.mean, self.base.std, extra={
                             **self.base.extra, "stage": stage, "val_accuracy": row.get("val_acc"),
                             "epoch": row.get("epoch"), "pretrained_classes": self.base.classes,
                             **extra})


def adapt_to_target(model: Classifier, mf: ModelFile, ds: Dataset) -> tuple[Classifier, ModelFile]:
    """The pretrained network and its file, made for the target's image size and channels.

    Size: every backbone ends in global pooling, so the weights fit any input size; only the
    spec changes (the torchvision stem stays the one pretrained). Channels (grey <-> colour):
    the first conv's weights are converted (models.convert_in_channels) and the normalisation
    follows (grey -> colour: the grey mean/std for each of R, G, B; colour -> grey: their
    averages). Both are logged: a silent change of input is how a 16-px grey model of colour
    photos happened."""
    from stages.core.models import ModelFile, build_model, convert_in_channels

    size, _, channels = ds.image_shape
    spec = mf.spec
    if (size, channels) == (spec.image_size, spec.in_channels):
        return model, mf
    new_spec = replace(spec, image_size=size, in_channels=channels,
                       small_stem=spec.uses_small_stem)
    target = build_model(new_spec)
    state, mean, std = model.state_dict(), list(mf.mean), list(mf.std)
    if size != spec.image_size:
        log.info("finetune: the backbone was pretrained at %d px; it fine-tunes at the target's "
                 "%d px (global pooling takes any size)", spec.image_size, size)
    if channels != spec.in_channels:
        want = {k: v.shape for k, v in target.state_dict().items()}
        state, keys = convert_in_channels(state, want)
        mean, std = ([mean[0]] * 3, [std[0]] * 3) if channels == 3 else (
            [sum(mean) / 3], [sum(std) / 3])
        rule = ("grey -> colour: the grey kernels repeated over R, G, B and divided by 3"
                if channels == 3 else "colour -> grey: the R, G, B kernels summed")
        log.warning("finetune: the pretrained model takes %d channel(s), the target images have "
                    "%d: converted %s (%s); normalisation mean %s std %s", spec.in_channels,
                    channels, ", ".join(keys), rule, [round(m, 4) for m in mean],
                    [round(v, 4) for v in std])
    target.load_state_dict(state)
    return target.eval(), ModelFile(new_spec, mf.classes, mean, std, extra=dict(mf.extra))


def load_target(ds: Dataset, mf: ModelFile, p: FinetuneParams, rt: Runtime, seed: int) -> Target:
    from stages.core import distributed
    from stages.core.train import split_batches

    if not len(ds.indices("train")):
        raise BadInput("the target train split is empty")
    train, val = split_batches(ds, p, rt, mf.mean, mf.std, seed)
    fingerprint = {"stage": "finetune", "seed": seed, "data": ds.manifest["sha256"],
                   "spec": vars(mf.spec), "mean": mf.mean, "std": mf.std,
                   **distributed.world_fingerprint(p, rt.comm, "finetune"),
                   "code": code_fingerprint("stages.finetune")}
    return Target(train, val, ds.classes, fingerprint, mf)


def transfer(model: Classifier, t: Target, p: FinetuneParams, rt: Runtime, out: Outputs,
             pretrained_sha: str, best: BestEpoch | None
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Phase 1 then phase 2 on `model` (already carrying the new head); return both histories.
    `best` follows both phases: the best epoch may be a head-only one."""
    from stages.core.checkpoint import CheckpointStore
    from stages.core.history import write_csv
    from stages.core.models import save_model_file
    from stages.core.regularize import l2sp, l2sp_groups
    from stages.core.train import fit, make_trainer, param_groups

    steps, rows = len(t.train), []
    fp = {**t.fingerprint, "pretrained": pretrained_sha}

    def plot(history: list[dict[str, Any]]) -> None:
        if rt.comm.is_main:
            write_csv(out.plot, rows + history)

    model.backbone.requires_grad_(False)
    tr = make_trainer(model, param_groups(model.head, p.lr, p.weight_decay), p, rt,
                      p.head_epochs, steps, frozen=model.backbone)
    head = fit(tr, t.train, t.val, CheckpointStore(out.checkpoints / "head.pt",
                                                   {**fp, "phase": "head"}, rt.comm),
               phase="head", epochs=p.head_epochs, every=p.checkpoint_every_steps, on_epoch=plot,
               best=best)
    rows += head
    model.backbone.requires_grad_(True)
    del tr  # its DDP's gradient hooks must be gone before the next one's exist
    gc.collect()
    if rt.comm.is_main:
        save_model_file(out.probe, model, t.model_file("probe", head[-1] if head else {},
                                                       head_epochs=p.head_epochs))
    groups = l2sp_groups(model.backbone, model.head, p.lr * p.backbone_lr_scale, p.lr,
                         p.weight_decay, p.l2sp)
    tr = make_trainer(model, groups, p, rt, p.full_epochs, steps)
    if p.l2sp > 0:  # anchored at the backbone as phase 2 starts: the pretrained weights
        tr.penalty = l2sp(model.backbone, p.l2sp)
    full = fit(tr, t.train, t.val, CheckpointStore(out.checkpoints / "full.pt",
                                                   {**fp, "phase": "full"}, rt.comm),
               phase="full", epochs=p.full_epochs, epoch_offset=p.head_epochs,
               every=p.checkpoint_every_steps, on_epoch=plot, best=best)
    plot(full)
    return head, full


def run(params: Params, data: Path, pretrained: Path, out: Outputs) -> dict[str, Any]:
    """Transfer; write the finetuned and probe model files and the CSV; return the metrics."""
    import torch

    from stages.core.best import BestEpoch, chosen
    from stages.core.device import make_runtime
    from stages.core.history import summary, throughput
    from stages.core.models import load_model_file, save_model_file

    start = time.perf_counter()
    p = params.finetune
    rt = make_runtime(p)
    ds = load_dataset(data, verify=params.verify_data)
    model, mf = adapt_to_target(*load_model_file(pretrained), ds)
    t = load_target(ds, mf, p, rt, params.seed)
    # The new head's initial weights depend on the seed only, not on what ran before.
    torch.manual_seed(params.seed)
    model.replace_head(len(t.classes))
    best = BestEpoch(model) if p.keep_best else None
    head, full = transfer(model, t, p, rt, out, file_sha256(pretrained), best)
    row = chosen(best, head + full, "finetune")
    hflip = bool(mf.extra.get("hflip_policy", False) or p.hflip)
    if rt.comm.is_main:
        save_model_file(out.finetuned, model, t.model_file(
            "finetune", row, hflip_policy=hflip, head_epochs=p.head_epochs,
            full_epochs=p.full_epochs, keep_best=p.keep_best))
    if head + full:
        log.info("finetune: transfer %s", throughput(head + full))
    log.info("finetune: stage %.1f s", time.perf_counter() - start)
    return {**summary(head + full, row), "probe_val_accuracy": summary(head).get("val_accuracy"),
            "n_train": t.train.n, "n_val": t.val.n, "world_size": rt.comm.world}


def arguments(argv: list[str] | None) -> argparse.Namespace:
    return door.arguments("finetune", __doc__, argv, data="data/target",
                          pretrained="models/pretrained.pt", model="models/finetuned.pt",
                          probe="models/probe.pt", checkpoints="checkpoints/finetune",
                          metrics="metrics/finetune.json", plot="plots/finetune.csv")


def work(params: Params, args: argparse.Namespace) -> dict[str, Any]:
    out = Outputs(args.model, args.probe, args.checkpoints, args.plot)
    return run(params, args.data, args.pretrained, out)


def main(argv: list[str] | None = None) -> int:
    return training_main("finetune", "finetune", argv, arguments, work)


if __name__ == "__main__":
    door.exit_process(main())
