"""The streamed data path (stages/core/stream.py) and on-device random-resized crops
(stages/core/crops.py), on a small set written as real shards: order, ranks, resume, the
bounded reader, its shutdown and errors."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from stages import pretrain
from stages.core import budget
from stages.core.crops import draw_boxes, resized_crop
from stages.core.dataset import ShardedArray, file_sha256, load_dataset, preprocess, write_sharded
from stages.core.devicedata import DeviceBatches
from stages.core.io import atomic_dir
from stages.core.models import load_model_file
from stages.core.shards import RowWriter
from stages.core.stream import StreamBatches, batches, block_order, prefetch
from stages.params import parse_params
from tests.helpers import default_params

CPU = torch.device("cpu")
N, PER_SHARD, SIZE = 600, 230, 8  # three shards of 230, 230 and 140 images


def write_sharded_set(folder: Path, images: np.ndarray, labels: np.ndarray, per_shard: int,
                      split: np.ndarray | None = None) -> None:
    """A dataset folder with the images in shards of `per_shard`, through the real writers."""
    staging = folder.parent / f"{folder.name}.staging"
    staging.mkdir()
    shards = []
    for k, lo in enumerate(range(0, len(images), per_shard)):
        writer = RowWriter(staging / f"{k}.npy", images.shape[1:])
        writer.write(images[lo:lo + per_shard])
        writer.close()
        shards.append((writer.path, file_sha256(writer.path), writer.n))
    classes = [str(c) for c in range(int(labels.max()) + 1)]
    with atomic_dir(folder) as tmp:
        split = np.zeros(len(labels), np.uint8) if split is None else split
        write_sharded(tmp, shards, labels, split, classes,
                      {"uri": "test:synthetic"})


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, np.ndarray]:
    """(ShardedArray of the images as stored, the images in memory); each image's label is its
    own index, so a batch's labels say which images it holds."""
    images = np.random.default_rng(5).integers(0, 256, size=(N, SIZE, SIZE, 3), dtype=np.uint8)
    folder = tmp_path_factory.mktemp("stream") / "set"
    write_sharded_set(folder, images, np.arange(N), PER_SHARD)
    ds = load_dataset(folder)
    assert isinstance(ds.images, ShardedArray) and len(ds.images.parts) == 3
    return ds.images, images


def stream(source: Any, **kw: Any) -> StreamBatches:
    args: dict[str, Any] = {"device": CPU, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
                            "batch_size": 60, "train": True, "seed": 7, "block": 20,
                            "window": 120, "crop_padding": 2, "hflip": True}
    args.update(kw)
    return StreamBatches(source, np.arange(N), np.arange(N), **args)


def labels_of(b: DeviceBatches, epoch: int, start: int = 0) -> list[np.ndarray]:
    return [y.numpy() for _, y in b.epoch(epoch, start)]


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.name.startswith("imagepipe-reader") and t.is_alive()]


def test_order_is_a_pure_function_of_seed_and_epoch_and_a_permutation(data: Any) -> None:
    source, _ = data
    first, again = labels_of(stream(source), 2), labels_of(stream(source), 2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    seen = np.concatenate(first)
    assert len(first) == N // 60 and np.array_equal(np.sort(seen), np.arange(N))
    assert not np.array_equal(seen, np.concatenate(labels_of(stream(source), 3)))
    assert not np.array_equal(seen, np.concatenate(labels_of(stream(source, seed=8), 2)))
    assert not np.array_equal(seen, np.sort(seen))  # shuffled, not the storage order


def test_block_order_keeps_blocks_within_shards_and_mixes_windows() -> None:
    rng = np.random.default_rng(0)
    order = block_order(1000, np.array([230, 460]), rng, block=50, window=200)
    assert np.array_equal(np.sort(order), np.arange(1000))
    blocks = {(lo, min(lo + 50, hi)) for a, hi in ((0, 230), (230, 460), (460, 1000))
              for lo in range(a, hi, 50)}
    block_of = {i: b for b in blocks for i in range(*b)}
    for w in range(0, 1000, 200):
        window = set(order[w:w + 200].tolist())
        # a window is whole blocks (of its shard), but for the two it shares with its neighbours
        touched = {block_of[i] for i in window}
        whole = [blk for blk in touched if window.issuperset(range(*blk))]
        assert len(touched) - len(whole) <= 2 and len(touched) <= 200 // 30 + 2
    again = block_order(1000, np.array([230, 460]), np.random.default_rng(0), block=50, window=200)
    assert np.array_equal(order, again)


def test_ranks_are_disjoint_cover_the_batch_and_see_its_crops(data: Any) -> None:
    source, _ = data
    whole = list(stream(source).epoch(1))
    ranks = [list(stream(source, rank=r, world=3).epoch(1)) for r in range(3)]
    for step, (x, y) in enumerate(whole):
        parts = [ranks[r][step] for r in range(3)]
        got = np.concatenate([p[1].numpy() for p in parts])
        assert len(set(got)) == len(got) and set(got) == set(y.numpy())
        for r, (xr, yr) in enumerate(parts):
            assert torch.equal(xr, x[r::3]) and torch.equal(yr, y[r::3])


def test_resume_at_step_k_yields_exactly_the_remaining_batches(data: Any) -> None:
    source, _ = data
    b = stream(source)
    full, tail = list(b.epoch(4)), list(b.epoch(4, start_step=6))
    assert len(tail) == len(full) - 6
    for (xa, ya), (xb, yb) in zip(full[6:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_streamed_batches_are_the_resident_ones_of_the_same_draws(data: Any) -> None:
    """The images read from the shards, cropped and flipped, are what the resident path makes
    of the same images with the same crops and flips (only the order is the stream's own)."""
    source, images = data
    b = stream(source)
    resident = DeviceBatches(images, np.arange(N), np.arange(N), device=CPU, mean=[0.5, 0.4, 0.3],
                             std=[0.2, 0.25, 0.3], batch_size=60, train=True, seed=7,
                             crop_padding=b.crop_padding, hflip=b.hflip)
    order, offsets, flips = b._draw(3)
    for step, (x, y) in enumerate(b.epoch(3)):
        lo = step * 60
        pos = order[lo:lo + 60]
        assert np.array_equal(y.numpy(), pos)
        want = resident.augmented(resident._images, torch.from_numpy(pos), offsets[lo:lo + 60],
                                  flips[lo:lo + 60])
        assert torch.equal(x, want)


def test_evaluation_stream_is_in_order_and_is_models_preprocess(data: Any) -> None:
    source, images = data
    b = stream(source, train=False, batch_size=128)
    x = torch.cat([x for x, _ in b.epoch(0)]).numpy()
    assert len(b) == -(-N // 128)
    np.testing.assert_allclose(x, preprocess(images, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]),
                               atol=1e-6)


def test_the_reader_never_runs_more_than_ahead_batches_ahead() -> None:
    started, taken = [], []

    def read(task: int) -> int:
        started.append(task)
        return task

    ahead = 3
    for i, task in enumerate(prefetch(range(12), read, ahead)):
        assert task == i
        taken.append(task)
        time.sleep(0.05)  # a slow step: the reader catches up and must wait
        assert len(started) == min(len(taken) + ahead, 12), (len(started), len(taken))
    assert taken == list(range(12))


def test_the_reader_thread_stops_when_the_consumer_stops_early(data: Any) -> None:
    source, _ = data
    before = reader_threads()
    epoch = stream(source, ahead=2).epoch(0)
    next(epoch)
    assert len(reader_threads()) == len(before) + 1
    epoch.close()  # what a `break` out of the loop (or the loop's frame going away) does
    assert reader_threads() == before
    for _ in stream(source, ahead=2).epoch(0):
        break
    assert reader_threads() == before


class Failing:
    """A shard whose reads fail after `good` calls, as a vanished or unreadable file would."""

    def __init__(self, images: np.ndarray, good: int) -> None:
        self.images, self.good = images, good
        self.shape, self.dtype = images.shape, images.dtype

    def __len__(self) -> int:
        return len(self.images)

    def take(self, idx: np.ndarray, axis: int = 0, out: Any = None, mode: str = "raise") -> Any:
        if self.good <= 0:
            raise OSError("Input/output error")
        self.good -= 1
        return np.take(self.images, idx, axis=axis, out=out, mode=mode)


def test_an_exception_in_the_reader_surfaces_in_the_consumer(data: Any) -> None:
    _, images = data
    before = reader_threads()
    b = stream(ShardedArray([Failing(images, good=3)]), train=False, batch_size=100)
    got = []
    with pytest.raises(OSError, match="Input/output error"):
        for x, _ in b.epoch(0):
            got.append(x)
    assert len(got) == 3 and reader_threads() == before


def test_random_resized_crops_are_seeded_in_bounds_and_exact_on_the_whole_image() -> None:
    boxes = draw_boxes(np.random.default_rng(3), 500, (20, 30))
    assert np.array_equal(boxes, draw_boxes(np.random.default_rng(3), 500, (20, 30)))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 20 + 1e-9).all() \
        and (left + w <= 30 + 1e-9).all()
    area = h * w / 600
    assert area.min() >= 0.08 - 1e-9 and area.max() <= 1 + 1e-9 and area.std() > 0.1
    x = torch.rand(4, 3, 16, 16)
    whole = np.array([[0.0, 0.0, 16.0, 16.0]] * 4)
    flips = np.array([False, True, False, True])
    out = resized_crop(x, whole, flips, 16)
    torch.testing.assert_close(out[0::2], x[0::2])
    torch.testing.assert_close(out[1::2], x[1::2].flip(-1))
    assert resized_crop(x, boxes[:4] * 16 / np.array([20, 30, 20, 30]), flips, 7).shape \
        == (4, 3, 7, 7)


def test_stored_images_larger_than_train_size_are_random_resized_crops(data: Any) -> None:
    source, _ = data
    b = stream(source, train_size=5)
    first, again = list(b.epoch(0)), list(stream(source, train_size=5).epoch(0))
    assert first[0][0].shape == (60, 3, 5, 5)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(first, again, strict=True))
    assert stream(source, train=False, train_size=5).epoch(0).__next__()[0].shape[-1] == SIZE
    assert next(stream(source, train_size=SIZE).epoch(0))[0].shape[-1] == SIZE  # no crop
    resident = DeviceBatches(source, np.arange(N), np.arange(N), device=CPU, mean=[0.5] * 3,
                             std=[0.2] * 3, batch_size=60, train=True, train_size=5)
    x0, x1 = next(resident.epoch(0))[0], next(resident.epoch(0))[0]
    assert x0.shape == (60, 3, 5, 5) and torch.equal(x0, x1)


def test_batches_stay_resident_where_the_set_fits_else_stream(
        data: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    source, _ = data
    kw: dict[str, Any] = {"device": CPU, "mean": [0.5] * 3, "std": [0.2] * 3, "batch_size": 60,
                          "train": True}
    resident = batches(source, np.arange(N), np.arange(N), **kw)
    assert type(resident) is DeviceBatches and resident.resident
    monkeypatch.setattr(budget, "RESIDENT_SHARE", 0.0)  # no room: as a set larger than memory
    streamed = batches(source, np.arange(N), np.arange(N), **kw)
    assert isinstance(streamed, StreamBatches) and not streamed.resident
    assert len(streamed) == len(resident) and streamed.images_per_epoch == resident.images_per_epoch


def test_pretrain_streams_a_sharded_set_with_random_resized_crops_reproducibly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), 40)
    images = rng.integers(0, 256, size=(120, 12, 12, 1), dtype=np.uint8)
    split = np.where(np.arange(120) % 5 == 0, 1, 0).astype(np.uint8)  # a fifth for val
    write_sharded_set(tmp_path / "set", images, labels, 50, split)
    raw = default_params()
    raw["pretrain"] = {**raw["pretrain"], "device": "cpu", "epochs": 2, "batch_size": 16,
                       "width": 8, "train_size": 9, "checkpoint_every_steps": 0}
    params = parse_params(raw)
    monkeypatch.setattr(budget, "RESIDENT_SHARE", 0.0)  # no room: both splits stream
    weights = []
    for run in ("a", "b"):
        with caplog.at_level("INFO", logger="imagepipe.pretrain"):
            metrics = pretrain.run(params, tmp_path / "set", tmp_path / run / "model.pt",
                                   tmp_path / run / "ck", tmp_path / run / "plot.csv")
        assert metrics["n_train"] == 96 and metrics["epochs"] == 2
        weights.append(load_model_file(tmp_path / run / "model.pt"))
    assert "streamed" in caplog.text
    (model_a, a), (model_b, _) = weights
    assert a.extra["train_size"] == 9 and a.spec.image_size == 12  # it serves whole images
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    # same bytes for the same params: the streamed order and crops are seeded
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
