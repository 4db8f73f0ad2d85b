"""Out of device memory, and the micro-batches that avoid it (one process; several: tests/
integration/test_distributed.py). No GPU here: the out-of-memory error is a real
torch.OutOfMemoryError raised by a module's forward above a number of images, as CUDA's caching
allocator raises it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from stages.core.checkpoint import Position
from stages.core.devicedata import DeviceBatches
from stages.core.errors import BadInput
from stages.core.train import Runtime, evaluate, make_trainer, param_groups, predict, train_one_epoch
from stages.params import TrainParams

CPU = torch.device("cpu")
RT = Runtime(CPU, bf16=False, channels_last=False, compile=False)


class Limited(nn.Module):
    """A small conv net (no BatchNorm: micro-batches would change its statistics) whose forward
    of more than `limit` images raises torch.OutOfMemoryError."""

    def __init__(self, limit: int = 10**9) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 6 * 7, 5))
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated above {self.limit})")
        return self.net(x)


def feed(train: bool, batch_size: int) -> DeviceBatches:
    images = np.random.default_rng(1).integers(0, 256, size=(80, 6, 7, 3), dtype=np.uint8)
    kw: dict[str, Any] = {"crop_padding": 1} if train else {}
    return DeviceBatches(images, np.arange(80) % 5, np.arange(80), device=CPU,
                         mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], batch_size=batch_size,
                         train=train, seed=3, **kw)


def trained(micro_batches: int, limit: int = 10**9) -> tuple[nn.Module, int]:
    model = Limited(limit)
    p = TrainParams(device="cpu", lr=0.05, micro_batches=micro_batches)
    b = feed(True, 16)
    tr = make_trainer(model, param_groups(model, p.lr, p.weight_decay), p, RT, 1, len(b))
    train_one_epoch(tr, b, 0, Position())
    return model, tr.parts


@pytest.mark.parametrize("k", [2, 3, 16])
def test_micro_batches_give_the_weights_of_the_whole_batch(k: int) -> None:
    """5 SGD steps of 16 images: one pass each, or k passes (3: uneven shares of 6, 5, 5)."""
    whole, parts = trained(1)
    split, split_parts = trained(k)
    assert (parts, split_parts) == (1, k)
    assert not torch.equal(whole.state_dict()["net.0.weight"], Limited().state_dict()["net.0.weight"])
    for name, w in whole.state_dict().items():
        diff = float((split.state_dict()[name] - w).abs().max())
        assert diff <= 1e-6, (name, diff)


def test_one_process_out_of_memory_still_halves_from_micro_batches() -> None:
    _, parts = trained(2, limit=4)  # 16 in 2 passes of 8 -> 4 of 4
    assert parts == 4


def test_micro_batches_is_bounded() -> None:
    for bad in (0, -1, 10**6):
        with pytest.raises(ValueError, match="micro_batches"):
            TrainParams(micro_batches=bad)


def test_evaluation_out_of_memory_halves_its_batch_not_exit_70() -> None:
    """Evaluation at 32 images a batch on a model that fits 5: the same logits, loss and
    accuracy as unlimited, in batches of 16, 8, then 4; at one image, bad input with a hint."""
    b = feed(False, 32)
    want = predict(Limited(), b, RT)
    got = predict(Limited(limit=5), b, RT)
    np.testing.assert_array_equal(got, want)
    loss_fn = nn.CrossEntropyLoss()
    assert evaluate(Limited(limit=5), b, RT, loss_fn) == pytest.approx(
        evaluate(Limited(), b, RT, loss_fn), rel=1e-6)
    with pytest.raises(BadInput, match="evaluating one image"):
        predict(Limited(limit=0), b, RT)
