"""Training on tiny synthetic data: the on-device data path, checkpoints, the schedule, and one
pretrain -> finetune -> evaluate chain run in-process (phase 1 really freezes; every metric
key is written)."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
import yaml

from stages import evaluate, finetune, pretrain, scratch
from stages.core.checkpoint import CheckpointStore, Position, capture_rng, restore_rng
from stages.core.dataset import HEADER, SPLIT_CODE, preprocess
from stages.core.device import select_device
from stages.core.devicedata import DeviceBatches, channel_stats, crop_flip_grid
from stages.core.errors import BadInput
from stages.core.models import load_model_file
from stages.core.train import schedule_factor
from stages.params import Params, parse_params
from tests.helpers import REPO, default_params, save_dataset

CPU = torch.device("cpu")


def write_dataset(folder: Path, classes: list[str], per_split: dict[str, int], *, size: int = 8,
                  seed: int = 0, hflip: bool = False) -> None:
    """A learnable set: each class a fixed random pattern, each image it plus noise."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(len(classes), size, size, 1))
    rows = [(c, SPLIT_CODE[s]) for s, n in per_split.items() for c in range(len(classes))
            for _ in range(n)]
    images = np.stack([np.clip(templates[c] + rng.normal(0, 30, size=(size, size, 1)), 0, 255)
                       for c, _ in rows]).astype(np.uint8)
    save_dataset(folder, images, [c for c, _ in rows], [s for _, s in rows], classes,
                  {"uri": "test:synthetic", "params": {"augment": {"hflip": hflip}}})


def tiny_params(**sections: dict[str, Any]) -> Params:
    raw = default_params()
    common = {"device": "cpu", "batch_size": 16, "checkpoint_every_steps": 0}
    raw["pretrain"] = {**common, "epochs": 2, "width": 8, "lr": 0.05, "warmup_epochs": 0.5}
    raw["finetune"] = {**common, "head_epochs": 2, "full_epochs": 1, "lr": 0.05, "scratch_lr": 0.05,
                       "batch_size": 8, "hflip": True}
    raw["evaluate"] = {"device": "cpu", "batch_size": 16}
    for name, values in sections.items():
        raw[name] = {**raw[name], **values}
    return parse_params(raw)


# ---------------------------------------------------------------- the data path


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(50, 6, 7, 3), dtype=np.uint8)


def batches(images: np.ndarray, **kw: Any) -> DeviceBatches:
    args: dict[str, Any] = {"device": CPU, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
                            "batch_size": 16, "train": True, "seed": 3}
    args.update(kw)
    return DeviceBatches(images, np.arange(len(images)) % 5, np.arange(len(images)), **args)


def collect(b: DeviceBatches, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(b.epoch(epoch, start))


def test_eval_batches_are_models_preprocess(images: np.ndarray) -> None:
    b = batches(images, train=False)
    x = torch.cat([x for x, _ in b.epoch(0)]).numpy()
    np.testing.assert_allclose(x, preprocess(images, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]), atol=1e-6)


def test_epochs_are_seeded_permutations_and_resume_mid_epoch(images: np.ndarray) -> None:
    b = batches(images, crop_padding=1)
    first, again, other = collect(b, 0), collect(b, 0), collect(b, 1)
    assert len(first) == 50 // 16  # the ragged last batch is dropped in training
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], other[0][0])
    tail = collect(b, 0, start=2)
    assert len(tail) == 1 and torch.equal(tail[0][0], first[2][0])


def test_crop_and_flip_match_numpy_reflect_padding(images: np.ndarray) -> None:
    pad, (h, w) = 2, images.shape[1:3]
    rng = np.random.default_rng(0)
    offsets, flips = rng.integers(0, 2 * pad + 1, size=(len(images), 2)), rng.random(len(images)) < 0.5
    rows, cols = crop_flip_grid(offsets, flips, (h, w), pad, CPU)
    got = torch.from_numpy(images)[torch.arange(len(images))[:, None, None], rows[:, :, None],
                                   cols[:, None, :]].numpy()
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    for i, ((dy, dx), flip) in enumerate(zip(offsets, flips, strict=True)):
        want = padded[i, dy:dy + h, dx:dx + w]
        np.testing.assert_array_equal(got[i], want[:, ::-1] if flip else want)


def test_channel_stats_in_chunks_match_numpy(images: np.ndarray) -> None:
    mean, std = channel_stats(images, np.arange(40), chunk=7)
    x = images[:40].astype(np.float64) / 255
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), atol=1e-6)


# ---------------------------------------------------------------- checkpoints, schedule, device


def test_checkpoint_from_other_params_is_not_resumed(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    model = torch.nn.Linear(3, 2)
    CheckpointStore(tmp_path / "c.pt", {"train": {"lr": 0.1}}).save(
        {"model": model}, Position(epoch=1), [{"epoch": 1}])
    same = CheckpointStore(tmp_path / "c.pt", {"train": {"lr": 0.1}}).resume({"model": model})
    assert same is not None and same[0].epoch == 1 and same[1] == [{"epoch": 1}]
    with caplog.at_level(logging.WARNING, logger="imagepipe.checkpoint"):
        other = CheckpointStore(tmp_path / "c.pt", {"train": {"lr": 0.2}}).resume({"model": model})
    assert other is None
    assert "other params" in caplog.text and "train.lr: 0.1 -> 0.2" in caplog.text


def test_rng_states_round_trip() -> None:
    state = capture_rng()
    first = torch.rand(3).tolist()
    restore_rng(state)
    assert torch.rand(3).tolist() == first


def test_schedule_warms_up_then_decays_to_zero() -> None:
    for kind in ("onecycle", "cosine"):
        f = schedule_factor(kind, total=10, warmup=3)
        lrs = [f(t) for t in range(10)]
        assert lrs[:3] == sorted(lrs[:3]) and lrs[3] == 1.0
        assert lrs[3:] == sorted(lrs[3:], reverse=True) and 0 < lrs[-1] < 0.2
    assert schedule_factor("onecycle", total=1, warmup=5)(0) == 1.0


def test_a_warm_up_as_long_as_the_phase_still_decays() -> None:
    # One head epoch of 6 steps with warmup_epochs: 1 once ended at the peak lr.
    for kind in ("onecycle", "cosine"):
        lrs = [schedule_factor(kind, total=6, warmup=6)(t) for t in range(6)]
        assert max(lrs) == 1.0 and lrs.index(1.0) == 3
        assert lrs[-1] < 0.5, lrs


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_cuda_without_a_device_is_bad_input() -> None:
    with pytest.raises(BadInput, match="no CUDA device"):
        select_device("cuda")


# ---------------------------------------------------------------- ranks, precision, memory


def test_ranks_share_each_global_batch_disjointly(images: np.ndarray) -> None:
    aug = {"crop_padding": 2, "hflip": True}
    whole = collect(batches(images, **aug), 2)
    shares = [collect(batches(images, **aug, rank=r, world=2), 2) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == len(whole)
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *shares, strict=True):
        assert len(y0) == len(y1) == len(y) // 2  # images r, r + 2, ... of the same batch
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1) and torch.equal(y[1::2], y1)


def test_one_device_launches_nothing_and_two_launch_two_processes() -> None:
    from stages.core import distributed
    from stages.params import TrainParams

    assert distributed.plan(TrainParams(device="cpu", devices="auto")) is None
    assert distributed.plan(TrainParams(device="cpu", devices=1)) is None
    pl = distributed.plan(TrainParams(device="cpu", devices=2, dist_timeout_min=0.5))
    assert pl == distributed.Plan(2, "gloo", 30.0)


def test_precision_on_the_cpu() -> None:
    from stages.core.device import resolve_precision

    assert resolve_precision("auto", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(BadInput, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)


def tiny_trainer(model: torch.nn.Module, steps: int) -> Any:
    from stages.core.train import Runtime, make_trainer, param_groups
    from stages.params import TrainParams

    rt = Runtime(CPU, bf16=False, channels_last=False, compile=False)
    return make_trainer(model, param_groups(model, 0.05, 5e-4), TrainParams(device="cpu"),
                        rt, 1, steps)


def test_simulated_out_of_memory_accumulates_to_the_same_step(images: np.ndarray) -> None:
    """No GPU here: the OOM is simulated (a forward that raises torch.OutOfMemoryError above 4
    images), as a GPU raises it. Micro-batches of 4 then give the whole batch's step."""
    from stages.core.train import train_one_epoch

    class Fussy(torch.nn.Module):  # no BatchNorm: micro-batches change its statistics
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6 * 7 * 3, 5))
            self.limit = 10**9

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if len(x) > self.limit:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.net(x)

    b = batches(images, crop_padding=1)
    plain, fussy = Fussy(), Fussy()
    fussy.limit = 4
    tr_plain, tr_fussy = tiny_trainer(plain, len(b)), tiny_trainer(fussy, len(b))
    train_one_epoch(tr_plain, b, 0, Position())
    train_one_epoch(tr_fussy, b, 0, Position())
    assert tr_fussy.parts == 4 and tr_plain.parts == 1  # 16 -> 8 -> 4 images a micro-batch
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(fussy.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    fussy.limit = 0
    with pytest.raises(BadInput, match="even one image at a time"):
        train_one_epoch(tr_fussy, b, 1, Position())


class TwoPart(torch.nn.Module):
    """A backbone (with BatchNorm) and a head, named as finetune freezes and unfreezes them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def finetune_phases(images: np.ndarray, folder: Path, backend: Any
                    ) -> tuple[TwoPart, list[Any], list[int], np.ndarray]:
    """Finetune's two phases as transfer() runs them, through make_trainer and fit (2 epochs of
    3 steps each, validated every epoch): head on a frozen backbone, then everything. Returns
    the model, each phase's net, the compilations counted after each epoch, and the logits."""
    from stages.core.train import Runtime, fit, make_trainer, param_groups, predict
    from stages.params import TrainParams

    model, p = TwoPart(), TrainParams(device="cpu")
    rt = Runtime(CPU, bf16=False, channels_last=False, compile=backend is not None)
    train = batches(images, crop_padding=1)
    val = batches(images[:48], train=False)  # whole batches: one evaluation shape
    nets: list[Any] = []
    counts: list[int] = []
    # Runtime.backend names the backend; a counting one is an object, not a name.
    counted = mock.patch.object(Runtime, "backend", lambda _: backend)
    for phase, frozen in (("head", True), ("full", False)):
        for q in model.backbone.parameters():
            q.requires_grad_(not frozen)
        part = model.head if frozen else model
        with counted:
            tr = make_trainer(model, param_groups(part, 0.05, 5e-4), p, rt, 2, len(train),
                              frozen=model.backbone if frozen else None)
        fit(tr, train, val, CheckpointStore(folder / f"{phase}.pt", {"phase": phase}),
            phase=phase, epochs=2, epoch_offset=0 if frozen else 2,
            on_epoch=lambda _: counts.append(getattr(backend, "frame_count", 0)))
        nets.append(tr.net)
    return model, nets, counts, predict(nets[-1], val, rt)


def test_compile_for_real_once_per_model_and_equal_to_eager(images: np.ndarray,
                                                            tmp_path: Path) -> None:
    """torch.compile itself (dynamo and AOTAutograd, with the aot_eager backend rather than
    inductor, whose C++ build takes ~45 s here: COMPILE_BACKEND_ENV) through the training code.
    A backend that counts what dynamo hands it counts the real graph compilations."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()  # other tests' graphs would be reused and not counted
    counter = CompileCounterWithBackend("aot_eager")
    model, nets, counts, logits = finetune_phases(images, tmp_path / "compiled", counter)
    eager, _, _, want = finetune_phases(images, tmp_path / "eager", None)
    assert nets[0] is nets[1] and type(nets[0]).__name__ == "OptimizedModule"  # one wrapper
    # Phase 1: a training graph and an evaluation graph in its first epoch, none in its second
    # (no recompilation per step or epoch); phase 2, a new trainer on the same model, adds the
    # same two for a backbone that now needs gradients (dynamo guards on requires_grad), once.
    assert counts == [2, 2, 4, 4], counts
    assert "_imagepipe_compiled" not in "".join(model.state_dict())
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-4, atol=1e-5)
    assert not torch.equal(model.head.weight, TwoPart().head.weight)  # it did train
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)


def test_rng_restore_uses_the_gpus_visible_now(monkeypatch: pytest.MonkeyPatch) -> None:
    state = capture_rng()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 2  # saved on a 2-GPU machine
    restored: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append(i))
    restore_rng(state)  # not "invalid device ordinal"
    assert restored == [0]


# ---------------------------------------------------------------- one tiny chain, in-process


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chain")
    write_dataset(root / "augmented", ["a", "b", "c"], {"train": 40, "val": 8, "test": 4})
    target = [f"t{i}" for i in range(6)]
    write_dataset(root / "target", target, {"train": 6, "val": 4, "test": 6}, seed=1)
    params = tiny_params()
    pretrain.run(params, root / "augmented", root / "pretrained.pt", root / "ck" / "pretrain",
                 root / "pretrain.csv")
    out = finetune.Outputs(root / "finetuned.pt", root / "probe.pt", root / "ck" / "finetune",
                           root / "finetune.csv")
    finetune.run(params, root / "target", root / "pretrained.pt", out)
    scratch.run(params, root / "target", root / "pretrained.pt",
                scratch.Outputs(root / "scratch.pt", root / "ck" / "scratch", root / "scratch.csv"))
    ev = evaluate.Outputs(root / "evaluate.json", root / "per_class.json", root / "confusion.png",
                          root / "confusion.csv")
    metrics = evaluate.run(params, root / "target", root / "finetuned.pt", root / "scratch.pt",
                           root / "probe.pt", ev)
    (root / "evaluate.json").write_text(json.dumps(metrics))
    return root


def test_phase_one_freezes_backbone_weights_and_batchnorm_statistics(chain: Path) -> None:
    pre = torch.load(chain / "pretrained.pt", weights_only=True)["state_dict"]
    probe = torch.load(chain / "probe.pt", weights_only=True)["state_dict"]
    # Phase 2's last epoch, from its checkpoint: finetuned.pt is the best epoch by validation,
    # which may be a head-only one.
    tuned = torch.load(chain / "ck" / "finetune" / "full.pt", weights_only=True)["state"]["model"]
    backbone = [k for k in pre if k.startswith("backbone.")]
    assert any(k.endswith("running_mean") for k in backbone)
    assert any(k.endswith("num_batches_tracked") for k in backbone)
    changed = [k for k in backbone if not torch.equal(pre[k], probe[k])]
    assert changed == [], f"phase 1 changed {changed}"
    # Phase 2 does move the backbone: the comparison above can see a change.
    assert any(not torch.equal(pre[k], tuned[k]) for k in backbone)
    assert not torch.equal(probe["head.weight"], tuned["head.weight"])


def test_evaluate_json_has_every_key(chain: Path) -> None:
    m = json.loads((chain / "evaluate.json").read_text())
    for key in ("accuracy", "top5_accuracy", "macro_f1", "macro_precision", "macro_recall", "ece",
                "scratch_accuracy", "transfer_gain", "n_test", "probe_accuracy",
                "shift_consistency", "flip_consistency"):
        assert m.get(key) is not None, key
    assert m["n_test"] == 36
    assert m["majority_accuracy"] == pytest.approx(1 / 6, abs=1e-6)  # six test images a class
    with open(chain / "confusion.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 36 and {r["actual"] for r in rows} == {f"t{i}" for i in range(6)}
    assert (chain / "confusion.png").stat().st_size > 1000
    assert set(json.loads((chain / "per_class.json").read_text())["per_class"]) >= {"t0", "t5"}


def pixel_flipped(data: Path, dest: Path) -> Path:
    """A copy of the set in `data` with one pixel's lowest bit flipped in its first shard: the
    sizes still right (verify_data size passes it), the sha256 not (sha256 refuses it)."""
    copy = Path(shutil.copytree(data, dest))
    with open(copy / "shards" / "00000.npy", "r+b") as f:
        f.seek(HEADER)
        byte = f.read(1)
        f.seek(HEADER)
        f.write(bytes([byte[0] ^ 0x01]))
    return copy


def with_verify(params: Params, how: str) -> Params:
    return parse_params({**params.model_dump(), "verify_data": how})


def test_scratch_checks_its_set_as_verify_data_says(chain: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    # scratch checked sha256 whatever verify_data said, unlike every other stage reading a set.
    data = pixel_flipped(chain / "target", tmp_path / "target")
    params = tiny_params(finetune={"baseline": False})
    out = scratch.Outputs(*(tmp_path / n for n in ("s.pt", "ck", "s.csv")))
    with caplog.at_level(logging.INFO):
        scratch.run(with_verify(params, "size"), data, chain / "pretrained.pt", out)
    assert "shard sha256 not checked (verify_data: size)" in caplog.text
    assert out.model.exists()
    with pytest.raises(BadInput, match="00000.npy: its sha256 does not match"):
        scratch.run(with_verify(params, "sha256"), data, chain / "pretrained.pt", out)


def test_finetune_learns_a_task_built_to_be_learnable(chain: Path, tmp_path: Path) -> None:
    # Three classes, each a fixed pattern under noise, no flips (a flipped random pattern is
    # another pattern): chance is 1/3, and a working transfer gets nearly all of them.
    write_dataset(tmp_path / "target", ["p", "q", "r"], {"train": 30, "val": 6, "test": 20}, seed=3)
    params = tiny_params(finetune={"hflip": False, "full_epochs": 4, "baseline": False})
    out = finetune.Outputs(*(tmp_path / n for n in ("f.pt", "p.pt", "ck", "f.csv")))
    finetune.run(params, tmp_path / "target", chain / "pretrained.pt", out)
    base = scratch.Outputs(*(tmp_path / n for n in ("s.pt", "ck-s", "s.csv")))
    scratch.run(params, tmp_path / "target", chain / "pretrained.pt", base)
    ev = evaluate.Outputs(*(tmp_path / n for n in ("e.json", "pc.json", "c.png", "c.csv")))
    m = evaluate.run(params, tmp_path / "target", out.finetuned, base.model, out.probe, ev)
    assert m["accuracy"] >= 0.9, m
    assert m["transfer_gain"] is None  # baseline: false -> no scratch model, no gain claimed


def test_model_files_share_one_normalisation_and_log_every_epoch(chain: Path) -> None:
    _, pre = load_model_file(chain / "pretrained.pt")
    for name, stage in (("finetuned", "finetune"), ("probe", "probe"), ("scratch", "scratch")):
        _, mf = load_model_file(chain / f"{name}.pt")
        assert (mf.mean, mf.std) == (pre.mean, pre.std)
        assert mf.classes == [f"t{i}" for i in range(6)] and mf.extra["stage"] == stage
    with open(chain / "finetune.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["phase"], r["epoch"]) for r in rows] == [("head", "1"), ("head", "2"), ("full", "3")]
    with open(chain / "pretrain.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


def test_cifar10_preset_is_valid_and_names_every_section() -> None:
    preset = yaml.safe_load((REPO / "params" / "cifar10.yaml").read_text())
    parse_params(preset)
    # DVC refuses to run a stage whose params section is missing: the preset must have them all.
    assert set(default_params()) <= set(preset)
    cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    assert preset["data"]["source"]["classes"] == sorted(cifar)[:6]
    assert preset["data"]["target"]["classes"] == sorted(cifar)[6:]
    assert preset["data"]["target"]["train_per_class"] == 50


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal when CUDA is absent")
def test_a_stage_granted_gpus_refuses_to_train_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEPIPE_GPUS_GRANTED", "2")
    with pytest.raises(BadInput, match="granted 2 GPU"):
        select_device("auto")
    assert select_device("cpu").type == "cpu"  # asked for explicitly: allowed
    monkeypatch.delenv("IMAGEPIPE_GPUS_GRANTED")
    assert select_device("auto").type == "cpu"
