"""Image trees as other systems leave them: file names that are not valid UTF-8, and (with
data.follow_symlinks: true) a link that leads to a folder this process may not read.

Both are real on disk: a name written as raw bytes, a folder of mode 000 read by a process
without the capabilities that let root read anything (setpriv drops them when the tests run
as root, as they do in containers).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.core.dataset import load_dataset
from tests.helpers import REPO, default_params, write_params

ODD = b"good_\xff\xfe.png"  # Latin-1 bytes: not UTF-8, so Python names it with surrogates


def _tree(root: Path, per_class: int = 50) -> None:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")


def _params(tmp_path: Path, root: Path, **data: object) -> Path:
    raw = default_params()
    raw["data"]["source"] = {"uri": f"imagefolder:{root}"}
    raw["data"]["target"] = {"uri": f"imagefolder:{root}"}
    raw["data"].update({"image_size": 8, "channels": 3, "engine": "local", **data})
    return write_params(tmp_path / "params.yaml", raw)


def _ingest(params: Path, out: Path, prefix: list[str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IMAGEPIPE_TRACKING": "0"}
    return subprocess.run([*(prefix or []), sys.executable, "-m", "stages.ingest", "--params",
                           str(params), "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)


def test_a_name_that_is_not_utf8_is_read_like_any_other(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _tree(root)
    odd = os.path.join(os.fsencode(root / "cat"), ODD)
    Image.fromarray(np.full((10, 10, 3), 7, np.uint8)).save(odd, "PNG")  # its own pixels
    params, out = _params(tmp_path, root), tmp_path / "data"
    proc = _ingest(params, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The target decodes all 101 (the source leaves its test split undecoded: nothing reads it).
    ds = load_dataset(out / "target")
    assert len(ds.labels) == 101  # the odd name's image is in, with its class
    for role in ("source", "target"):
        report = json.loads((out / role / "report.json").read_text())
        assert report["bad"] == [] and report["skipped"] == []
    assert any((row == 7).all() for row in np.asarray(ds.images))
    # The staged shards are found again by the same names: nothing decoded twice.
    again = _ingest(params, out)
    assert again.returncode == 0 and "(0 decoded now)" in again.stderr, again.stderr[-3000:]


def _no_read_override() -> list[str]:
    """A prefix that runs a command without root's power to read any folder (none needed
    when the tests do not run as root)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("runs as root and setpriv (util-linux) is missing: cannot make a folder "
                    "unreadable to the stage")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def test_an_unreadable_folder_behind_a_followed_link_is_skipped(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "imgs", tmp_path / "elsewhere"
    _tree(root, per_class=20)
    (elsewhere / "locked").mkdir(parents=True)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(elsewhere / "locked" / "x.png")
    Image.fromarray(np.ones((10, 10, 3), np.uint8)).save(elsewhere / "open.png")
    (root / "dog" / "more").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "locked").chmod(0)
    prefix = _no_read_override()
    try:
        check = subprocess.run([*prefix, "ls", str(elsewhere / "locked")], capture_output=True)
        assert check.returncode != 0, "the folder is readable: the fault is not injected"
        out = tmp_path / "data"
        proc = _ingest(_params(tmp_path, root, follow_symlinks=True), out, prefix)
    finally:
        (elsewhere / "locked").chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "source" / "report.json").read_text())
    assert report["skipped"] == [{"path": str(root / "dog" / "more" / "locked"),
                                  "reason": "unreadable folder: Permission denied"}]
    # The target role decodes every split (the source leaves its test split undecoded).
    assert len(load_dataset(out / "target").labels) == 41  # 40 + elsewhere/open.png
    assert f"not read {root / 'dog' / 'more' / 'locked'}: unreadable folder" in proc.stderr
