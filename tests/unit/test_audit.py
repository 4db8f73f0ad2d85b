"""The audit stage on tiny learnable sets, with the real cleanlab, sklearn and torch: planted
label flips are found, a resized JPEG copy of a training image placed in test is flagged as a
near-duplicate (a dark and a blurred image are named too), and the gate exits 2 naming the list.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy.stats import binom

from benchmarks.audit import flip, write_variant
from stages import audit, finetune, ingest, pretrain
from stages.core.dataset import load_dataset
from stages.core.errors import BadInput
from stages.core.history import write_csv
from stages.params import parse_params
from tests.helpers import default_params, run_stage, write_params
from tests.unit.test_train import pixel_flipped, tiny_params, with_verify, write_dataset

# The measure (benchmarks/audit.py --target digits, seed 0, pretrain 3 and finetune 2+4 epochs;
# README "Label and image audit"): at 10% flips (58 of 586 training labels) the audit flagged 56
# images, 54 of them flips. The test's floors are the
# 2.5% quantile of a binomial with that rate over the test's own flip count (recall) and flag
# count (precision): the value a method that performs as measured falls below 1 time in 40.
# A test set built to be learnable is easier than digits, so the floors are conservative.
MEASURED_RECALL_10 = 54 / 58  # 0.931
MEASURED_PRECISION_10 = 54 / 56  # 0.964


def floor(rate: float, n: int) -> float:
    return float(binom.ppf(0.025, n, rate)) / n


def audit_params(**audit_keys: Any) -> Any:
    p = tiny_params(finetune={"hflip": False, "full_epochs": 2, "baseline": False})
    raw = p.model_dump()
    raw["audit"] = {**raw["audit"], "device": "cpu", **audit_keys}
    return parse_params(raw)


def outputs(folder: Path) -> audit.Outputs:
    return audit.Outputs(folder / "audit.json", folder / "audit_issues.csv", folder / "grid.png")


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tune(params: Any, data: Path, pretrained: Path, folder: Path) -> Path:
    out = finetune.Outputs(*(folder / n for n in ("f.pt", "p.pt", "ck", "f.csv")))
    finetune.run(params, data, pretrained, out)
    return out.finetuned


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audit_backbone")
    write_dataset(root / "augmented", ["a", "b", "c"], {"train": 40, "val": 8, "test": 4})
    pretrain.run(tiny_params(), root / "augmented", root / "pretrained.pt", root / "ck",
                 root / "pretrain.csv")
    return root / "pretrained.pt"


@pytest.fixture(scope="module")
def flipped(tmp_path_factory: pytest.TempPathFactory, pretrained: Path) -> dict[str, Any]:
    """4 learnable classes, 40 training images each, 10% of the training labels flipped as
    the measure flips them; finetuned on the noisy labels, then audited."""
    root = tmp_path_factory.mktemp("audit_flips")
    write_dataset(root / "clean", ["p", "q", "r", "s"], {"train": 40, "val": 8, "test": 8}, seed=5)
    ds = load_dataset(root / "clean")
    noisy, flips = flip(ds.labels, ds.split, len(ds.classes), 0.10, seed=0)
    data = write_variant(root / "clean", noisy, np.arange(len(noisy)), root / "noisy")
    params = audit_params()
    model = tune(params, data, pretrained, root)
    metrics = audit.run(params, data, model, outputs(root))
    return {"root": root, "data": data, "model": model, "flips": flips, "metrics": metrics,
            "params": params}


def test_planted_flips_are_found(flipped: dict[str, Any]) -> None:
    rows = read_rows(flipped["root"] / "audit_issues.csv")
    flagged = {int(r["index"]) for r in rows if r["issue"] == "label"}
    flips = set(flipped["flips"].tolist())
    hits = len(flagged & flips)
    recall, precision = hits / len(flips), hits / max(len(flagged), 1)
    assert recall >= floor(MEASURED_RECALL_10, len(flips)), (recall, sorted(flagged), sorted(flips))
    assert precision >= floor(MEASURED_PRECISION_10, max(len(flagged), 1)), (precision, flagged)
    m = flipped["metrics"]
    assert m["label_issues"] == len(flagged) and m["k_folds"] == 5
    assert sum(c["label_issues"] for c in m["per_class"].values()) == len(flagged)
    # Each flagged row names the class the probe suggests: for a found flip, its true class.
    truth = load_dataset(flipped["root"] / "clean").labels
    classes = ["p", "q", "r", "s"]
    right = [r for r in rows if r["issue"] == "label" and int(r["index"]) in flips]
    assert all(r["suggested"] == classes[truth[int(r["index"])]] for r in right), right
    assert (flipped["root"] / "grid.png").stat().st_size > 5000


def test_gate_exits_2_naming_the_report(flipped: dict[str, Any], tmp_path: Path) -> None:
    raw = json.loads(flipped["params"].model_dump_json())
    raw["audit"]["max_issue_fraction"] = 0.01
    params_file = write_params(tmp_path / "params.yaml", raw)
    out = outputs(tmp_path)
    proc = run_stage("audit", "--params", params_file, "--data", flipped["data"], "--model",
                     flipped["model"], "--metrics", out.metrics, "--issues", out.issues,
                     "--grid", out.grid)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "audit.max_issue_fraction=0.01" in last and str(out.issues) in last, last
    assert out.issues.exists() and json.loads(out.metrics.read_text())["issue_fraction"] > 0.01
    # Off by default: the same figures pass.
    assert default_params()["audit"]["max_issue_fraction"] is None
    audit.gate(flipped["metrics"], out)


def test_audit_checks_its_set_as_verify_data_says(flipped: dict[str, Any], tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    # audit checked sha256 whatever verify_data said, unlike every other stage reading a set.
    data = pixel_flipped(flipped["data"], tmp_path / "data")
    out = outputs(tmp_path)
    with caplog.at_level(logging.INFO):
        audit.run(with_verify(flipped["params"], "size"), data, flipped["model"], out)
    assert "shard sha256 not checked (verify_data: size)" in caplog.text
    assert out.issues.exists()
    with pytest.raises(BadInput, match="00000.npy: its sha256 does not match"):
        audit.run(with_verify(flipped["params"], "sha256"), data, flipped["model"], out)


def write_folder(root: Path, *, copy: bool) -> None:
    """3 classes of smooth patterns (4 x 4 noisy draws of a class template, enlarged to 16 px
    bilinearly: smooth as photos and the 8-px digits enlarged are) (train 12, test 4 a class);
    in train a dark and a blurred image; with `copy`, train/c0/0.png enlarged to 40 px and
    saved as a JPEG in test/."""
    rng = np.random.default_rng(7)
    templates = [rng.integers(0, 256, (4, 4)) for _ in range(3)]
    for split, n in (("train", 12), ("test", 4)):
        for c, t in enumerate(templates):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                small = np.clip(t + rng.normal(0, 60, t.shape), 0, 255).astype(np.uint8)
                Image.fromarray(small).resize((16, 16), Image.Resampling.BILINEAR).save(
                    root / split / f"c{c}" / f"{i}.png")
    dark = np.clip(rng.normal(6, 2, (16, 16)), 0, 255).astype(np.uint8)
    Image.fromarray(dark).save(root / "train" / "c1" / "dark.png")
    sharp = Image.open(root / "train" / "c2" / "0.png")
    sharp.resize((64, 64), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(6)).save(
        root / "train" / "c2" / "blurred.png")
    if copy:
        original = Image.open(root / "train" / "c0" / "0.png")
        original.resize((40, 40), Image.Resampling.BICUBIC).save(root / "test" / "c0" / "x.jpg",
                                                                  quality=85)


def ingest_folder(folder: Path, out: Path) -> Path:
    raw = default_params()
    raw["data"]["target"] = {"uri": f"imagefolder:{folder}", "classes": None,
                             "train_per_class": None, "image_size": 16, "val_fraction": 0.2}
    params = parse_params(raw)
    ingest.ingest_role("target", params.data.target, params, out)
    return out


def test_resized_copy_in_test_is_a_near_duplicate(pretrained: Path, tmp_path: Path) -> None:
    write_folder(tmp_path / "with", copy=True)
    write_folder(tmp_path / "without", copy=False)
    with_copy = ingest_folder(tmp_path / "with", tmp_path / "d_with")
    control = ingest_folder(tmp_path / "without", tmp_path / "d_without")
    params = audit_params()
    model = tune(params, control, pretrained, tmp_path / "m")
    found = {}
    for name, data in (("with", with_copy), ("without", control)):
        (tmp_path / name / "out").mkdir()
        audit.run(params, data, model, outputs(tmp_path / name / "out"))
        found[name] = read_rows(tmp_path / name / "out" / "audit_issues.csv")
    dupes = [r for r in found["with"] if r["issue"] == "near_duplicate"]
    assert len(dupes) == 1 and dupes[0]["split"] == "test" and dupes[0]["given"] == "c0", dupes
    ds = load_dataset(with_copy)
    source = int(dupes[0]["detail"].split("near copy of row ")[1].split(" ")[0])
    copy_row = int(dupes[0]["index"])
    # The row it names is the enlarged original: the one training image closest in pixels.
    train = ds.indices("train")
    gap = np.abs(ds.images[train].astype(int) - ds.images[copy_row].astype(int)).mean(axis=(1, 2, 3))
    assert source == int(train[np.argmin(gap)]) and ds.split[source] == 0
    assert not [r for r in found["without"] if r["issue"] == "near_duplicate"], found["without"]
    reasons = {r["issue"] for r in found["without"]}
    assert {"dark", "blurry"} <= reasons, found["without"]


def test_the_pipeline_summary_has_one_audit_line(flipped: dict[str, Any]) -> None:
    from flows import report

    text = report.render(title="t", flow_run_id=None, stages={}, overrides=[],
                         metrics={"audit": flipped["metrics"]}, decision=None, promotion_note="")
    line = [x for x in text.splitlines() if x.startswith("| audit")]
    assert line == [f"| audit: share flagged, audit_issues.csv | "
                    f"{flipped['metrics']['issue_fraction']:.4f} |"], text


def test_an_empty_issue_list_keeps_its_header(tmp_path: Path) -> None:
    """audit writes its issues with history.write_csv and its own columns: with no issues the
    file still holds the header, so a reader can tell 'nothing found' from 'not run'."""
    write_csv(tmp_path / "issues.csv", [], audit.CSV_COLUMNS)
    assert (tmp_path / "issues.csv").read_text() == ",".join(audit.CSV_COLUMNS) + "\n"
