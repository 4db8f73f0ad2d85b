"""The model you get is the best you trained: finetune and the scratch baseline ship their best
epoch by validation (also after a rerun from complete checkpoints), export takes the better of
the two on validation (export.model) and says so in its metrics and the version description,
a transfer-only setting cannot reach the baseline, and dvc.yaml's params lists split the
finetune keys between the two stages so that DVC reruns only the one a change concerns."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import yaml

from stages import export, finetune, scratch
from stages.core.dataset import SPLIT_CODE, load_dataset, preprocess
from stages.core.errors import BadInput
from stages.core.models import ModelFile, ModelSpec, build_model, load_model_file
from stages.core.models import save_model_file as save_file
from stages.core.selection import choose
from stages.core.tracking.describe import version_description
from stages.core.tracking.registration import Parity, Registration
from stages.params import BASELINE_ONLY, TRANSFER_ONLY, FinetuneParams, Params
from tests.helpers import REPO, save_dataset
from tests.unit.test_train import tiny_params, write_dataset

CLASSES = ["p", "q", "r"]


def write_misleading_target(folder: Path) -> None:
    """Three learnable patterns whose validation labels are each shifted by one class: the
    better training learns the train split, the worse validation gets, so validation accuracy
    peaks in the first epochs and the last epoch is the worst (a stand-in for overfitting)."""
    rng = np.random.default_rng(7)
    templates = rng.integers(0, 256, size=(len(CLASSES), 8, 8, 1))
    rows = [(c, s) for s, n in (("train", 12), ("val", 6), ("test", 4))
            for c in range(len(CLASSES)) for _ in range(n)]
    images = np.stack([np.clip(templates[c] + rng.normal(0, 30, size=(8, 8, 1)), 0, 255)
                       for c, _ in rows]).astype(np.uint8)
    labels = [(c + 1) % len(CLASSES) if s == "val" else c for c, s in rows]
    save_dataset(folder, images, labels, [SPLIT_CODE[s] for _, s in rows], CLASSES,
                  {"uri": "test:misleading", "params": {"augment": {"hflip": False}}})


def params(**finetune_values: Any) -> Params:
    return tiny_params(finetune={"hflip": False, "head_epochs": 1, "full_epochs": 3,
                                 "lr": 0.05, "scratch_lr": 0.05, **finetune_values})


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stages import pretrain

    root = tmp_path_factory.mktemp("best")
    write_dataset(root / "augmented", ["a", "b", "c"], {"train": 30, "val": 6, "test": 3})
    write_misleading_target(root / "target")
    pretrain.run(params(), root / "augmented", root / "pretrained.pt", root / "ck" / "pretrain",
                 root / "pretrain.csv")
    return root


def val_figures(model_path: Path, target: Path) -> tuple[float, float]:
    """(loss, accuracy) of a model file on the validation split, as training computes them."""
    model, mf = load_model_file(model_path)
    x, y = load_dataset(target).part("val")
    with torch.inference_mode():
        logits = model.eval()(torch.from_numpy(preprocess(np.asarray(x), mf.mean, mf.std)))
    labels = torch.from_numpy(np.asarray(y))
    loss = torch.nn.functional.cross_entropy(logits.float(), labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


def rows(path: Path) -> list[dict[str, Any]]:
    import csv

    with open(path) as f:
        return [{k: float(v) for k, v in r.items() if k != "phase"} for r in csv.DictReader(f)]


def peak(history: list[dict[str, Any]]) -> dict[str, Any]:
    return max(history, key=lambda r: (r["val_acc"], -r["val_loss"]))  # max keeps the first


def finetuned(root: Path, name: str, **values: Any) -> tuple[finetune.Outputs, dict[str, Any]]:
    out = finetune.Outputs(root / f"{name}.pt", root / f"{name}-probe.pt", root / "ck" / name,
                           root / f"{name}.csv")
    return out, finetune.run(params(**values), root / "target", root / "pretrained.pt", out)


@pytest.fixture(scope="module")
def best_run(project: Path) -> tuple[finetune.Outputs, dict[str, Any], str]:
    """finetune with the defaults (keep_best), and what it logged."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("imagepipe")
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        out, metrics = finetuned(project, "best")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)
    return out, metrics, "\n".join(records)


def test_finetune_ships_the_epoch_that_peaked_on_validation(
        project: Path, best_run: tuple[finetune.Outputs, dict[str, Any], str]) -> None:
    out, metrics, logged = best_run
    history = rows(out.plot)
    best, last = peak(history), history[-1]
    assert best["epoch"] < last["epoch"] and best["val_acc"] > last["val_acc"], history
    loss, acc = val_figures(out.finetuned, project / "target")
    assert (acc, loss) == pytest.approx((best["val_acc"], best["val_loss"]), abs=1e-4)
    assert metrics["selected_epoch"] == metrics["best_epoch"] == best["epoch"]
    assert metrics["val_accuracy"] == pytest.approx(best["val_acc"])
    assert metrics["last_val_accuracy"] == pytest.approx(last["val_acc"])
    extra = load_model_file(out.finetuned)[1].extra
    assert (extra["epoch"], extra["val_accuracy"]) == (best["epoch"], pytest.approx(acc, abs=1e-4))
    assert f"finetune: the model is epoch {int(best['epoch'])} of {int(last['epoch'])}, the " \
           f"best by validation" in logged


def test_keep_best_false_ships_the_last_epoch(project: Path) -> None:
    out, metrics = finetuned(project, "last", keep_best=False)
    last = rows(out.plot)[-1]
    loss, acc = val_figures(out.finetuned, project / "target")
    assert (acc, loss) == pytest.approx((last["val_acc"], last["val_loss"]), abs=1e-4)
    assert metrics["selected_epoch"] == last["epoch"]


def test_a_rerun_from_finished_checkpoints_ships_the_same_best_epoch(
        project: Path, best_run: tuple[finetune.Outputs, dict[str, Any], str]) -> None:
    """The best weights ride in the checkpoints: a rerun that trains nothing (the checkpoints
    are complete) still restores them, instead of shipping the last epoch's."""
    out, first, _ = best_run
    want = torch.load(out.finetuned, weights_only=True)["state_dict"]
    out.finetuned.unlink()
    _, second = finetuned(project, "best")
    got = torch.load(out.finetuned, weights_only=True)["state_dict"]
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    assert second["selected_epoch"] == first["selected_epoch"] < len(rows(out.plot))


def baseline(root: Path, name: str, p: Params) -> tuple[scratch.Outputs, dict[str, Any]]:
    out = scratch.Outputs(root / f"{name}.pt", root / "ck" / name, root / f"{name}.csv")
    return out, scratch.run(p, root / "target", root / "pretrained.pt", out)


@pytest.fixture(scope="module")
def scratch_run(project: Path) -> tuple[scratch.Outputs, dict[str, Any]]:
    return baseline(project, "scratch", params())


def test_scratch_keeps_its_best_epoch_too(
        project: Path, scratch_run: tuple[scratch.Outputs, dict[str, Any]]) -> None:
    out, metrics = scratch_run
    history = rows(out.plot)
    best = peak(history)
    assert best["epoch"] < history[-1]["epoch"], history
    loss, acc = val_figures(out.model, project / "target")
    assert (acc, loss) == pytest.approx((best["val_acc"], best["val_loss"]), abs=1e-4)
    assert metrics["selected_epoch"] == best["epoch"]
    assert load_model_file(out.model)[1].extra["stage"] == "scratch"


def test_a_transfer_only_setting_cannot_reach_the_baseline(
        project: Path, scratch_run: tuple[scratch.Outputs, dict[str, Any]]) -> None:
    _, one = scratch_run
    _, two = baseline(project, "s-two", params(lr=0.2, l2sp=0.5, backbone_lr_scale=0.9))
    a = torch.load(project / "scratch.pt", weights_only=True)["state_dict"]
    b = torch.load(project / "s-two.pt", weights_only=True)["state_dict"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert one == two
    # What it does read moves it: the comparison above can see a change.
    baseline(project, "s-three", params(scratch_lr=0.2))
    c = torch.load(project / "s-three.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_dvc_yaml_splits_the_finetune_keys_between_finetune_and_scratch() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    every = set(FinetuneParams.model_fields)
    assert set(TRANSFER_ONLY) | set(BASELINE_ONLY) <= every
    for stage, excluded in (("finetune", BASELINE_ONLY), ("scratch", TRANSFER_ONLY)):
        listed = stages[stage]["params"]
        assert listed[0] == "seed", listed
        assert {k.removeprefix("finetune.") for k in listed[1:]} == every - set(excluded), stage
    assert "models/scratch.pt" in stages["scratch"]["outs"]
    assert "models/scratch.pt" in stages["export"]["deps"]
    assert "--scratch models/scratch.pt" in stages["export"]["cmd"]


# ---------------------------------------------------------------- export's choice


def model_file(path: Path, val: float | None, *, trained: bool = True, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    spec = ModelSpec("resnet_small", len(CLASSES), 1, 8, width=8)
    extra = {"val_accuracy": val, "epoch": 4, **({} if trained else {"baseline": False})}
    save_file(path, build_model(spec).eval(), ModelFile(spec, CLASSES, [0.5], [0.25],
                                                          extra=extra))
    return path


def test_best_takes_the_higher_validation_accuracy(tmp_path: Path) -> None:
    ft = model_file(tmp_path / "ft.pt", 0.80)
    assert choose("best", ft, model_file(tmp_path / "sc.pt", 0.90)).model == "scratch"
    tie = choose("best", ft, model_file(tmp_path / "tie.pt", 0.80))
    assert tie.model == "finetuned" and "a tie keeps the finetuned one" in tie.reason
    low = choose("best", ft, model_file(tmp_path / "low.pt", 0.70))
    assert (low.model, low.finetuned_val_accuracy, low.scratch_val_accuracy) == (
        "finetuned", 0.80, 0.70)
    off = model_file(tmp_path / "off.pt", 0.99, trained=False)
    assert choose("best", ft, off).model == "finetuned"  # an untrained baseline never ships
    with pytest.raises(BadInput, match="export.model is scratch but .* is untrained"):
        choose("scratch", ft, off)
    assert choose("finetuned", ft, tmp_path / "sc.pt").path == ft
    with pytest.raises(BadInput, match="does not exist"):
        choose("best", ft, tmp_path / "missing.pt")


def test_export_ships_scratch_when_it_wins_on_validation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage's body, as DVC runs it: the ONNX file is the scratch model's (its source
    sha256 in the metadata), the metrics say which and why, the Registration carries it."""
    from stages.core import onnxio
    from stages.core.dataset import file_sha256
    from tests.unit.test_export import make_params

    write_dataset(tmp_path / "target", CLASSES, {"train": 4, "val": 2, "test": 4})
    ft = model_file(tmp_path / "finetuned.pt", 0.5)
    sc = model_file(tmp_path / "scratch.pt", 0.75, seed=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(make_params(quantize_int8=False)))
    bodies: list[Any] = []
    monkeypatch.setattr(export, "run_stage", lambda name, body: bodies.append(body()) or 0)
    args = ["--params", tmp_path / "params.yaml", "--model", ft, "--scratch", sc, "--target",
            tmp_path / "target", "--out", tmp_path / "model.onnx", "--variants",
            tmp_path / "variants", "--metrics", tmp_path / "export.json", "--details",
            tmp_path / "details.json"]
    assert export.main([str(a) for a in args]) == 0
    metrics = json.loads((tmp_path / "export.json").read_text())
    assert (metrics["model"], metrics["model_rule"]) == ("scratch", "best")
    assert (metrics["finetuned_val_accuracy"], metrics["scratch_val_accuracy"]) == (0.5, 0.75)
    meta = onnxio.read_metadata(onnx.load(tmp_path / "model.onnx"))
    assert meta["source_model_sha256"] == file_sha256(sc)
    reg = bodies[0]
    assert (reg.torch_path, reg.shipped) == (sc, "scratch")
    assert "from-scratch baseline, the better on validation" in reg.selection


def test_the_version_description_says_which_model_and_why(tmp_path: Path) -> None:
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps(
        {"accuracy": 0.81, "scratch_accuracy": 0.88, "transfer_gain": -0.07}))
    reason = "The from-scratch baseline, the better on validation (export.model best: ...)."
    reg = Registration(onnx_path=Path("models/model.onnx"), torch_path=Path("models/scratch.pt"),
                       parity=Parity(True, 1e-6, 1.0, 1e-4, 40, 1e-3), model_name="m",
                       dataset=Path("data/target"), serving_max_images=1024, input_example=None,
                       output_example=None, shipped="scratch", selection=reason)
    text = version_description(tmp_path, "r" * 32, reg, {})
    assert "exported from scratch.pt" in text and reason in text
    assert "Test accuracy 0.880 for this from-scratch model, against 0.810 for the finetuned" \
           in text
