"""The README's own-photos command, taken from README.md as written, run with real DVC on a
class-per-folder tree of generated photos (train/ and val/, two classes, mixed sizes and
modes), on params.yaml and on the CIFAR-10 preset: every key it sets with `-S` must exist in
the params file (DVC refuses a missing one: "Key 'val_fraction' is not in struct"), and it
must work a second time on the file the first run edited.

The project copy's dvc.yaml holds the ingest stage alone: the command sets data params only,
and ingest is what reads them (the other stages are tested elsewhere)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers import git, project_copy

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PLACEHOLDER = "/path/to/my-images"
PRESET_SOURCE = ("airplane", "automobile", "bird", "cat", "deer", "dog")


def readme_own_photos_command() -> str:
    """The bash block of README.md that points data.target at the user's photos."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if f"imagefolder:{PLACEHOLDER}" in b]
    assert len(found) == 1, f"README.md has {len(found)} own-photos command blocks"
    return found[0]


def _photos(folder: Path, count: int, seed: int) -> None:
    """`count` small photos of one class: JPEG and PNG, RGB, grey and RGBA, assorted sizes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        h, w = (int(x) for x in rng.integers(20, 48, size=2))
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        pixels[..., seed % 3] = 255 - pixels[..., seed % 3] // 4  # a colour per class
        image = Image.fromarray(pixels)
        image = image.convert(("RGB", "L", "RGBA")[i % 3])
        image.save(folder / f"{i:03d}.{'png' if i % 3 == 2 else 'jpg'}")


def _my_photos(root: Path) -> Path:
    """A user's folder: train/ and val/ (no test/), two classes."""
    for k, name in enumerate(("cat", "dog")):
        _photos(root / "train" / name, 12, seed=k)
        _photos(root / "val" / name, 4, seed=10 + k)
    return root


def _project(tmp: Path, params_file: str) -> Path:
    root = project_copy(tmp / "project")
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": stages["ingest"]}}))
    shutil.copy(REPO / params_file, root / "params.yaml")
    if params_file != "params.yaml":  # the preset's source: CIFAR's layout, 6 classes
        for k, name in enumerate(PRESET_SOURCE):
            _photos(root / "data" / "raw" / "cifar10-jpg" / "train" / name, 50, seed=20 + k)
            _photos(root / "data" / "raw" / "cifar10-jpg" / "test" / name, 2, seed=30 + k)
    git(root, "add", "-A")
    git(root, "commit", "-qm", f"ingest only, {params_file}")
    return root


def _run_as_written(project: Path, command: str) -> subprocess.CompletedProcess[str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    who = {f"GIT_{role}_{key}": value for role in ("AUTHOR", "COMMITTER")
           for key, value in (("NAME", "imagepipe test"), ("EMAIL", "test@imagepipe.invalid"))}
    return subprocess.run(["bash", "-euc", command], cwd=project, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PATH": path, **who,
                                            "IMAGEPIPE_TRACKING": "0"})


@pytest.mark.timeout(900)
@pytest.mark.parametrize("params_file", ["params.yaml", "params/cifar10.yaml"])
def test_readme_own_photos_command_runs_as_written(params_file: str, tmp_path: Path) -> None:
    from stages.core.dataset import load_dataset

    photos = _my_photos(tmp_path / "my-images")
    project = _project(tmp_path, params_file)
    command = readme_own_photos_command().replace(PLACEHOLDER, str(photos))
    assert "dvc exp run" in command and "data.target.val_fraction=0.2" in command
    for attempt in (1, 2):  # the second time on the params.yaml the first run edited
        done = _run_as_written(project, command)
        assert done.returncode == 0, f"attempt {attempt}:\n{done.stdout}\n{done.stderr}"
        target = load_dataset(project / "data" / "target")
        assert target.image_shape == (32, 32, 3)
        assert target.classes == ["cat", "dog"]
    role = yaml.safe_load((project / "params.yaml").read_text())["data"]["target"]
    assert role["val_fraction"] == 0.2 and role["train_per_class"] is None
