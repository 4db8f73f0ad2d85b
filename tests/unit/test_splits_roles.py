"""Splits and per-role settings that make sense: a train/ + val/ folder gets a test split at
ingest, an empty split a later stage needs is exit 2 at ingest, each role has its own size,
channels and fractions, and a grey source fine-tunes on a colour target, converted and logged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages import evaluate, finetune, ingest, pretrain, scratch
from stages.core.dataset import load_dataset
from stages.core.errors import BadInput
from stages.core.models import ModelSpec, build_model, convert_in_channels, load_model_file
from stages.params import parse_params
from tests.helpers import default_params, run_stage, write_params

RNG = np.random.default_rng(0)
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def _png(path: Path, rgb: tuple[int, int, int], size: int = 10) -> None:
    """A noisy, class-coloured square with a class-dependent bright corner (learnable in grey
    and in colour)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.clip(np.asarray(rgb) + RNG.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    corner = sorted(COLOURS.values()).index(rgb)
    arr[(corner // 2) * (size // 2):, (corner % 2) * (size // 2):][: size // 2, : size // 2] = 255
    Image.fromarray(arr, "RGB").save(path, "PNG")


def _tree(root: Path, counts: dict[str, int]) -> Path:
    for split, n in counts.items():
        for name, rgb in COLOURS.items():
            for i in range(n):
                _png(root / split / name / f"{i}.png", rgb)
    return root


def _raw(source: dict, target: dict, **data: object) -> dict:
    raw = default_params()
    raw["data"]["source"], raw["data"]["target"] = source, target
    raw["data"].update(data)
    return raw


def test_train_and_val_without_test_gives_the_target_a_test_split(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _tree(tmp_path / "photos", {"train": 10, "val": 3})
    uri = f"imagefolder:{root}"
    params = parse_params(_raw({"uri": uri}, {"uri": uri}, val_fraction=0.2, image_size=8,
                               channels=3))
    with caplog.at_level(logging.INFO, logger="imagepipe.ingest"):
        ingest.run(params, tmp_path / "data")
    target = load_dataset(tmp_path / "data" / "target").manifest["counts"]
    # val/ (3 a class) is the test split; validation is 20% of train/ (2 of 10), seeded.
    assert target["test"] == {"blue": 3, "green": 3, "red": 3}
    assert target["val"] == {"blue": 2, "green": 2, "red": 2}
    assert target["train"] == {"blue": 8, "green": 8, "red": 8}
    # The source needs no test split: its shipped val/ stays its val split.
    source = load_dataset(tmp_path / "data" / "source").manifest["counts"]
    assert source["val"] == {"blue": 3, "green": 3, "red": 3}
    assert sum(source["test"].values()) == 0
    assert "ships train/ and val/ but no test/: its val/ (9 images) is the test split" in caplog.text
    assert "class" in caplog.text and "total" in caplog.text  # the counts table
    report = json.loads((tmp_path / "data" / "target" / "report.json").read_text())
    assert report["notes"] and "test split" in report["notes"][0]


def test_an_empty_test_split_is_exit_2_at_ingest_naming_the_fix(tmp_path: Path) -> None:
    # Two images a class in a flat folder: one for train, one for test, none for val.
    root = tmp_path / "few"
    for name, rgb in COLOURS.items():
        for i in range(2):
            _png(root / name / f"{i}.png", rgb)
    uri = f"imagefolder:{root}"
    path = write_params(tmp_path / "p.yaml", _raw({"uri": "sklearn:digits"}, {"uri": uri},
                                                  image_size=8, channels=3))
    proc = run_stage("ingest", "--params", path, "--out", tmp_path / "data")
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "target" in last and "val split would be empty" in last
    assert "data.target.val_fraction" in last and "val/ folder" in last
    assert not (tmp_path / "data" / "target").exists()


def test_an_empty_test_split_is_refused_naming_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "one"  # one image a class: all of it goes to train
    for name, rgb in COLOURS.items():
        _png(root / name / "0.png", rgb)
    raw = _raw({"uri": "sklearn:digits"}, {"uri": f"imagefolder:{root}", "val_fraction": 0.0},
               image_size=8)
    params = parse_params(raw)
    with pytest.raises(BadInput, match=r"target .*: the test split would be empty, and evaluate "
                                       r"needs it; ship a test/ folder .*at least 3 images"):
        ingest.ingest_role("target", params.data.target, params, tmp_path / "out")


def test_a_shipped_val_folder_without_images_is_exit_2(tmp_path: Path) -> None:
    root = _tree(tmp_path / "photos", {"train": 4, "test": 2})
    for name in COLOURS:  # val/ with class folders but no images
        (root / "val" / name).mkdir(parents=True)
    params = parse_params(_raw({"uri": "sklearn:digits"}, {"uri": f"imagefolder:{root}"},
                               image_size=8))
    with pytest.raises(BadInput, match=r"the val split would be empty.*its val/ holds no usable "
                                       r"image.*remove the empty val/"):
        ingest.ingest_role("target", params.data.target, params, tmp_path / "out")


def test_cap_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    params = parse_params(default_params())  # digits target: train_per_class 20
    with caplog.at_level(logging.INFO, logger="imagepipe.ingest"):
        ingest.ingest_role("target", params.data.target, params, tmp_path / "out")
    assert "train_per_class=20 capped 5 of 5 classes" in caplog.text
    assert "raise or remove data.target.train_per_class" in caplog.text


def test_per_role_fractions_size_and_channels(tmp_path: Path) -> None:
    raw = default_params()
    raw["data"]["source"].update(image_size=8, channels=1)
    raw["data"]["target"].update(image_size=12, channels=3, val_fraction=0.3, test_fraction=0.3)
    params = parse_params(raw)
    assert params.data.source.filled(params.data).val_fraction == raw["data"]["val_fraction"]  # default
    ingest.run(params, tmp_path)
    source, target = load_dataset(tmp_path / "source"), load_dataset(tmp_path / "target")
    assert source.images.shape[1:] == (8, 8, 1) and target.images.shape[1:] == (12, 12, 3)
    assert target.manifest["image_size"] == 12 and target.manifest["channels"] == 3
    counts = target.manifest["counts"]
    n_val, n_test = sum(counts["val"].values()), sum(counts["test"].values())
    # digits 5-9: ~180 a class, 30% each for val and test (the cap applies to train only).
    assert 250 < n_val < 290 and 250 < n_test < 290


def test_per_role_fractions_that_leave_no_train_name_the_role() -> None:
    raw = default_params()
    raw["data"]["target"].update(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(BadInput, match=r"params\.data: target: val_fraction .* must be below 1"):
        parse_params(raw)


def test_first_conv_conversion_keeps_a_grey_image_response() -> None:
    torch.manual_seed(0)
    grey = build_model(ModelSpec("resnet_small", 3, in_channels=1, image_size=8, width=4)).eval()
    colour = build_model(ModelSpec("resnet_small", 3, in_channels=3, image_size=8, width=4)).eval()
    want = {k: v.shape for k, v in colour.state_dict().items()}
    state, keys = convert_in_channels(grey.state_dict(), want)
    assert keys == ["backbone.0.0.weight"]
    colour.load_state_dict(state)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():  # R = G = B: the colour network answers as the grey one did
        torch.testing.assert_close(colour(x.repeat(1, 3, 1, 1)), grey(x), rtol=1e-4, atol=1e-5)
    back, _ = convert_in_channels(colour.state_dict(), {k: v.shape for k, v in
                                                        grey.state_dict().items()})
    torch.testing.assert_close(back["backbone.0.0.weight"], grey.state_dict()["backbone.0.0.weight"])


def _tiny(raw: dict) -> dict:
    common = {"device": "cpu", "batch_size": 8, "checkpoint_every_steps": 0, "crop_padding": 1}
    raw["pretrain"] = {**raw["pretrain"], **common, "epochs": 1, "width": 4}
    raw["finetune"] = {**raw["finetune"], **common, "head_epochs": 1, "full_epochs": 1}
    raw["evaluate"] = {**raw["evaluate"], "device": "cpu"}
    return raw


def test_grey_8px_source_finetunes_on_a_colour_12px_target(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = _tree(tmp_path / "src", {"train": 8, "val": 2})
    tgt = _tree(tmp_path / "tgt", {"train": 6, "val": 3})
    raw = _tiny(_raw({"uri": f"imagefolder:{src}", "image_size": 8, "channels": 1},
                     {"uri": f"imagefolder:{tgt}", "image_size": 12, "channels": 3},
                     val_fraction=0.2))
    params = parse_params(raw)
    ingest.run(params, tmp_path / "data")
    pretrain.run(params, tmp_path / "data" / "source", tmp_path / "pre.pt", tmp_path / "ck1",
                 tmp_path / "pre.csv")
    out = finetune.Outputs(*(tmp_path / n for n in ("ft.pt", "probe.pt", "ck2", "ft.csv")))
    with caplog.at_level(logging.INFO, logger="imagepipe.finetune"):
        finetune.run(params, tmp_path / "data" / "target", tmp_path / "pre.pt", out)
    scratch.run(params, tmp_path / "data" / "target", tmp_path / "pre.pt",
                scratch.Outputs(tmp_path / "sc.pt", tmp_path / "ck3", tmp_path / "sc.csv"))
    assert "pretrained at 8 px; it fine-tunes at the target's 12 px" in caplog.text
    assert "grey -> colour" in caplog.text and "backbone.0.0.weight" in caplog.text
    _, pre = load_model_file(tmp_path / "pre.pt")
    for name in ("ft.pt", "probe.pt", "sc.pt"):
        _, mf = load_model_file(tmp_path / name)
        assert (mf.spec.image_size, mf.spec.in_channels) == (12, 3)
        assert mf.mean == pre.mean * 3 and mf.std == pre.std * 3
    ev = evaluate.Outputs(*(tmp_path / n for n in ("ev.json", "pc.json", "cm.png", "cm.csv")))
    m = evaluate.run(params, tmp_path / "data" / "target", out.finetuned, tmp_path / "sc.pt",
                     out.probe, ev)
    assert m["n_test"] == 9 and m["accuracy_ci_low"] <= m["accuracy"] <= m["accuracy_ci_high"]
    assert m["majority_accuracy"] == pytest.approx(1 / 3)
    assert m["transfer_verdict"] in {"helped", "hurt", "inconclusive"}
