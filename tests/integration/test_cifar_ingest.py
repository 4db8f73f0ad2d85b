"""ingest on real JPEGs: a two-class slice of CIFAR-10 from ../shared (skipped where absent)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from stages import ingest
from stages.core.dataset import load_dataset
from stages.params import parse_params
from tests.conftest import CIFAR_TARBALL
from tests.helpers import default_params

pytestmark = [
    pytest.mark.cifar,
    pytest.mark.skipif(not CIFAR_TARBALL.exists(), reason=f"{CIFAR_TARBALL.name} not found beside the repo"),
]


def test_real_jpegs_with_shipped_split(tmp_path: Path) -> None:
    keep = ("train/cat/", "train/dog/", "test/cat/", "test/dog/")
    with tarfile.open(CIFAR_TARBALL) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.lstrip("./").startswith(keep)]
        tar.extractall(tmp_path / "cifar", members=members, filter="data")
    root = next(p.parent.parent for p in (tmp_path / "cifar").rglob("train/cat"))
    raw = default_params()
    raw["data"].update(image_size=32, channels=3)
    raw["data"]["source"] = {"uri": f"imagefolder:{root}", "train_per_class": 500}
    params = parse_params(raw)
    report = ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    ds = load_dataset(tmp_path / "out")
    assert report["bad"] == []
    assert ds.classes == ["cat", "dog"]
    counts = ds.manifest["counts"]
    assert counts["test"] == {"cat": 1000, "dog": 1000}
    assert counts["train"] == {"cat": 500, "dog": 500}  # the cap, after val was carved out
    assert sum(counts["val"].values()) == 1000  # 10% of 5,000 per class, before the cap
    # CIFAR images are natural photos: no flat, empty arrays.
    assert float(np.asarray(ds.images[:64]).std()) > 20
