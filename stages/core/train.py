"""The training loop that pretrain and finetune share: their train and val batches
(`split_batches`), the model prepared for the device, optimiser, schedule, `train_one_epoch`,
`evaluate`, and `fit` (epochs with checkpoints and one history row each, and the best epoch's
weights kept when asked: core/best.py). Device set-up (`Runtime`, `make_runtime`) is
core/device.py's; reporting a history is core/history.py's.

Training autocasts to the Runtime's precision (a GradScaler for fp16), torch.compile once per
model; evaluation runs in fp32. Several processes (core/distributed.py): DDP, each rank on its
share of a batch, the root alone writes checkpoints and calls `on_epoch`; SyncBatchNorm on CUDA
only (it has no CPU/gloo implementation: CPU ranks normalise over their own share). Each step
runs in `micro_batches` forward/backward passes whose gradients add up to the batch's (nanoGPT's
gradient accumulation). What out of device memory does: `_step` (training), `_forward`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stages.core.best import BestEpoch
from stages.core.budget import Budget
from stages.core.checkpoint import CheckpointStore, Position
from stages.core.dataset import Dataset
from stages.core.device import Runtime
from stages.core.devicedata import DeviceBatches
from stages.core.epochlog import record_epoch
from stages.core.errors import BadInput
from stages.core.progress import progress
from stages.core.stream import batches
from stages.params import TrainParams

# Batch size of the training stages' validation passes (no gradients, so larger than any
# training batch fits in the same memory).
EVAL_BATCH = 512

log = logging.getLogger("imagepipe.train")


def split_batches(ds: Dataset, p: TrainParams, rt: Runtime, mean: list[float], std: list[float],
                  seed: int, train_size: int | None = None) -> tuple[DeviceBatches, DeviceBatches]:
    """Training batches (shuffled; augmented on the device: padded crop and flip, or
    random-resized crops of `train_size` where that is below the stored size) and validation
    batches (plain), each resident on the device where both fit, else streamed from the shards
    (core/stream.py)."""
    common = {"device": rt.device, "mean": mean, "std": std, "channels_last": rt.channels_last,
              "budget": Budget(rt.device, rt.comm.local_world)}  # train + val together
    train = batches(ds.images, ds.labels, ds.indices("train"), batch_size=p.batch_size,
                    train=True, crop_padding=p.crop_padding, hflip=p.hflip, seed=seed,
                    rank=rt.comm.rank, world=rt.comm.world, train_size=train_size, **common)
    val = batches(ds.images, ds.labels, ds.indices("val"), batch_size=EVAL_BATCH, train=False,
                  **common)
    return train, val


def prepare(model: nn.Module, rt: Runtime) -> nn.Module:
    """Move `model` to the device in place; return what to call (compiled, DDP-wrapped)."""
    distributed = rt.comm.world > 1
    if distributed and rt.device.type == "cuda" and not any(
            isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below the top module
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    net = compiled(model, rt.backend()) if rt.compile else model
    if distributed:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        net = DistributedDataParallel(net, device_ids=ids)
    return net


def compiled(model: nn.Module, backend: str | Callable[..., Any]) -> nn.Module:
    """torch.compile(model), once per model: finetune's phases share one wrapper, whose graphs
    dynamo reuses while their guards hold (phase 2 adds the graphs of a trainable backbone).
    The first call's backend stays."""
    cached = model.__dict__.get("_imagepipe_compiled")  # not a submodule: outside state_dict
    if cached is None:
        cached = model.__dict__["_imagepipe_compiled"] = torch.compile(model, backend=backend)
    return cached


def param_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """`module`'s trainable parameters at `lr`, split so that biases and norm weights get no
    weight decay (decaying BatchNorm scales only fights the normalisation)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "lr": lr, "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def schedule_factor(kind: str, total: int, warmup: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at step t: linear warm-up over `warmup` steps, then down to 0
    by the last step, linearly (onecycle, Smith's triangle as airbench uses it) or along a
    cosine. Written out rather than torch's OneCycleLR, which divides by zero when a phase is
    a step or two long (a few batches per epoch is normal on a small target set). The warm-up
    takes at most half the phase: a one-epoch phase with a one-epoch warm-up used to end at the
    peak lr, and fine-tuning's first phase then handed a diverged head to the second."""
    warmup = min(warmup, total // 2)

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / (warmup + 1)
        q = (t - warmup) / max(total - warmup, 1)
        return 1.0 - q if kind == "onecycle" else 0.5 * (1.0 + math.cos(math.pi * q))

    return factor


@dataclass
class Trainer:
    """What one training run holds: `model` is saved, `net` (maybe compiled) is called."""

    model: nn.Module
    net: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    rt: Runtime
    loss_fn: nn.Module
    # Frozen part (phase 1 of transfer): kept in eval mode so BatchNorm statistics stay put.
    frozen: nn.Module | None = None
    # Micro-batches per step: training.micro_batches, doubled when a step runs out of memory.
    parts: int = 1
    penalty: Callable[[], torch.Tensor] | None = None  # added to the loss: L2-SP (regularize.py)


def make_trainer(model: nn.Module, groups: list[dict[str, Any]], p: TrainParams, rt: Runtime,
                 epochs: int, steps: int, frozen: nn.Module | None = None) -> Trainer:
    net = prepare(model, rt)
    if rt.comm.world > 1:
        # DDP made the weights rank 0's; dropout should differ between ranks' shares.
        torch.manual_seed(torch.initial_seed() + rt.comm.rank)
    if p.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum,
                                                     nesterov=p.momentum > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=p.lr)
    factor = schedule_factor(p.schedule, max(epochs * steps, 1), int(round(p.warmup_epochs * steps)))
    # bf16 needs no loss scaling (fp16 does): the scaler is checkpointed either way.
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.fp16)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    return Trainer(model, net, opt, torch.optim.lr_scheduler.LambdaLR(opt, factor), scaler, rt,
                   loss_fn, frozen, parts=p.micro_batches)


def train_one_epoch(tr: Trainer, batches: DeviceBatches, epoch: int, pos: Position,
                    advance: Callable[[int], None] = lambda n: None,
                    save: Callable[[Position], None] | None = None, every: int = 0) -> Position:
    """Train from `pos` to the end of `epoch`; `save(pos)` every `every` steps (0: never);
    `advance(n)` after each batch of n images (a progress bar)."""
    tr.net.train()
    if tr.frozen is not None:
        tr.frozen.eval()
    # Totals stay on the device (float64: the same sums whether or not the epoch was resumed);
    # reading them forces a sync, so only at checkpoints and at the end.
    loss_sum = torch.tensor(pos.loss_sum, dtype=torch.float64, device=tr.rt.device)
    correct = torch.tensor(pos.correct, dtype=torch.int64, device=tr.rt.device)
    start, before = time.perf_counter(), pos.seconds
    for x, y in batches.epoch(epoch, pos.step):
        logits, loss = _step(tr, x, y)
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.argmax(1) == y).sum()
        pos.step, pos.seen = pos.step + 1, pos.seen + len(y)
        advance(len(y))
        if save is not None and every and pos.step % every == 0 and pos.step < len(batches):
            pos.loss_sum, pos.correct = float(loss_sum), int(correct)
            pos.seconds = before + time.perf_counter() - start
            save(pos)
    pos.loss_sum, pos.correct = float(loss_sum), int(correct)
    pos.seconds = before + time.perf_counter() - start
    return pos


def _step(tr: Trainer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on the batch, in `tr.parts` micro-batches.

    Several processes cannot redo a step together: SyncBatchNorm (every model here, on CUDA)
    runs collectives inside the forward, so a rank out of memory there leaves the others
    waiting in a collective it will never join, and nothing can be voted on. So under DDP an
    out-of-memory step is exit 2 with the hint; one process doubles its micro-batches (BadInput
    at one image each)."""
    while True:
        tr.opt.zero_grad(set_to_none=True)
        try:
            logits, loss = _accumulate(tr, x, y)
            break
        except torch.OutOfMemoryError as err:
            micro = -(-len(y) // tr.parts)
            if tr.rt.comm.world > 1:
                raise BadInput(
                    f"out of device memory in a step of {tr.rt.comm.world} training processes "
                    f"at {micro} images per pass ({err}); lower batch_size or raise micro_batches "
                    f"(now {tr.parts}: try {2 * tr.parts}), which keeps the same effective batch"
                ) from None
            if micro <= 1:
                raise BadInput(f"out of device memory even one image at a time ({err}); use a "
                               "smaller model or width, a lower image_size, or a GPU with more "
                               "memory") from None
            tr.opt.zero_grad(set_to_none=True)  # the gradients' memory first, then the cache
            if tr.rt.device.type == "cuda":
                torch.cuda.empty_cache()
            tr.parts *= 2
            log.warning("out of device memory at a micro-batch of %d: now %d micro-batches of "
                        "about %d (the same effective batch of %d; set micro_batches: %d to start "
                        "there)", micro, tr.parts, -(-len(y) // tr.parts), len(y), tr.parts)
    tr.scaler.step(tr.opt)
    tr.scaler.update()
    tr.sched.step()
    return logits, loss


def _accumulate(tr: Trainer, x: torch.Tensor, y: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of the batch in `tr.parts` micro-batches, each loss weighted by
    its share, so the gradients sum to the whole batch's. DDP syncs on the last one only."""
    parts = min(tr.parts, len(y))
    ddp = isinstance(tr.net, DistributedDataParallel)
    outs, total = [], torch.zeros((), device=y.device)
    for i, (xi, yi) in enumerate(zip(x.tensor_split(parts), y.tensor_split(parts), strict=True)):
        quiet = i < parts - 1 and ddp
        with tr.net.no_sync() if quiet else nullcontext():  # type: ignore[operator]
            with tr.rt.autocast():
                logits = tr.net(xi)
            loss = tr.loss_fn(logits.float(), yi) + (tr.penalty() if tr.penalty else 0.0)
            if parts > 1:
                loss = loss * (len(yi) / len(y))
            tr.scaler.scale(loss).backward()
        outs.append(logits.detach())
        total = total + loss.detach()
    return (outs[0] if parts == 1 else torch.cat(outs)), total


def _forward(net: nn.Module, x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """`net(x)` in fp32 (evaluation never autocasts); out of device memory, the batch in two
    halves, recursively: an evaluation batch is a speed choice, never a reason to fail. No
    collective is involved (`_scored` unwraps DDP), so one rank may halve alone."""
    try:
        return net(x).float()
    except torch.OutOfMemoryError as err:
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(x) <= 1:
            raise BadInput(f"out of device memory evaluating one image ({err}); use a smaller "
                           "model or image_size, or a GPU with more memory") from None
        log.warning("out of device memory evaluating %d images: now %d at a time", len(x),
                    -(-len(x) // 2))
        return torch.cat([_forward(net, h, rt) for h in x.tensor_split(2)])


def _scored(net: nn.Module, batches: DeviceBatches, rt: Runtime
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(fp32 logits, labels) of each batch in order, by `net` in eval mode without its DDP
    wrapper: evaluation needs none of its collectives (the ranks' weights are equal)."""
    net = net.module if isinstance(net, DistributedDataParallel) else net
    net.eval()
    for x, y in batches.epoch(0):
        yield _forward(net, x, rt), y


@torch.inference_mode()
def predict(net: nn.Module, batches: DeviceBatches, rt: Runtime) -> np.ndarray:
    """Logits (float32 N x K, numpy) of every image, in order."""
    return torch.cat([logits.cpu() for logits, _ in _scored(net, batches, rt)]).numpy()


@torch.inference_mode()
def evaluate(net: nn.Module, batches: DeviceBatches, rt: Runtime, loss_fn: nn.Module
             ) -> tuple[float, float]:
    """(mean loss, accuracy) over a split."""
    loss_sum, correct, seen = 0.0, 0, 0
    for logits, y in _scored(net, batches, rt):
        loss_sum += float(loss_fn(logits, y)) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def fit(tr: Trainer, train: DeviceBatches, val: DeviceBatches, store: CheckpointStore, *,
        phase: str, epochs: int, epoch_offset: int = 0, every: int = 0,
        on_epoch: Callable[[list[dict[str, Any]]], None] | None = None,
        best: BestEpoch | None = None) -> list[dict[str, Any]]:
    """Train for `epochs`, resuming from `store` when it matches; return one row per epoch.

    A checkpoint is written after every epoch and every `every` steps; a finished run's last
    checkpoint makes a rerun with the same fingerprint a no-op that returns the same history.
    Every rank calls this; rows hold the totals of all ranks; only the root calls `on_epoch`.
    `best` sees each epoch before its checkpoint is written, and is saved and resumed with it.
    """

    # What the checkpoint holds (their state_dict() when it is written).
    states = {"model": tr.model, "optimizer": tr.opt, "scheduler": tr.sched, "scaler": tr.scaler,
              **({} if best is None else {"best": best})}
    resumed = store.resume(states)
    pos, history = resumed or (Position(), [])
    if resumed and pos.epoch >= epochs:
        log.info("%s: its checkpoint is complete (%d epochs): nothing to train", phase, epochs)
    left = max(epochs - pos.epoch, 0) * train.images_per_epoch
    # One bar for the whole run: per epoch, a small target set would log every few batches.
    with progress(f"{phase} ({epochs} epochs)", left) as advance:
        advance(pos.seen)
        for epoch in range(pos.epoch, epochs):
            # The data epoch counts across phases, so phase 2 does not replay phase 1's draws.
            pos = train_one_epoch(tr, train, epoch_offset + epoch, pos, advance,
                                  save=lambda p: store.save(states, p, history), every=every)
            row = _row(tr, phase, epoch_offset + epoch + 1, pos, val)
            history.append(row)
            if best is not None:
                best.observe(row)
            record_epoch(phase, row)  # the live curve (core/epochlog.py)
            log.info("%s epoch %d/%d: train loss %.4f acc %.4f | val loss %s acc %s | %.0f "
                     "images/s", phase, epoch + 1, epochs, row["train_loss"], row["train_acc"],
                     row["val_loss"], row["val_acc"], row["images_per_s"])
            pos = Position(epoch=epoch + 1)
            store.save(states, pos, history)
            if on_epoch is not None and tr.rt.comm.is_main:
                on_epoch(history)
    return history


def _row(tr: Trainer, phase: str, epoch: int, pos: Position, val: DeviceBatches
         ) -> dict[str, Any]:
    loss_sum, correct, seen = tr.rt.comm.all_sum([pos.loss_sum, pos.correct, pos.seen])
    val_loss, val_acc = evaluate(tr.net, val, tr.rt, tr.loss_fn) if val.n else (None, None)
    return {
        "phase": phase, "epoch": epoch,
        "train_loss": round(loss_sum / max(seen, 1), 6),
        "train_acc": round(correct / max(seen, 1), 6),
        "val_loss": None if val_loss is None else round(val_loss, 6),
        "val_acc": None if val_acc is None else round(val_acc, 6),
        "lr": round(max(g["lr"] for g in tr.opt.param_groups), 8),
        "images_per_s": round(seen / max(pos.seconds, 1e-9), 1),
        "seconds": round(pos.seconds, 3),
    }
