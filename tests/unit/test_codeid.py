"""Code identity: which project files a stage runs (stages/core/codeid.py), dvc.yaml's code deps
generated from them (stages/deps.py), checkpoints refused when the code differs, and model
files whose bytes depend on the tensors only."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.core.checkpoint import CheckpointStore, Position
from stages.core.codeid import code_files, code_fingerprint, relative
from stages.core.io import save_torch
from stages.deps import differences, write
from tests.helpers import REPO


def test_a_stage_runs_its_own_modules_and_not_tracking() -> None:
    files = {relative(p) for p in code_files("stages.pretrain")}
    assert {"stages/pretrain.py", "stages/core/train.py", "stages/core/checkpoint.py",
            "stages/params.py", "stages/core/models.py"} <= files
    assert not any(f.startswith("stages/core/tracking/") for f in files), files
    assert "stages/core/door.py" not in files
    assert "stages/core/onnxio.py" not in files  # export's, not pretrain's
    ingest = {relative(p) for p in code_files("stages.ingest")}
    assert "stages/core/train.py" not in ingest


def test_lazy_imports_inside_functions_count(tmp_path: Path) -> None:
    pkg = tmp_path / "stages"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "late.py").write_text("X = 1\n")
    (pkg / "core" / "typing_only.py").write_text("X = 1\n")
    (pkg / "one.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from stages.core import "
        "typing_only\n\ndef f():\n    from stages.core import late\n    return late.X\n")
    got = {relative(p, tmp_path) for p in code_files("stages.one", tmp_path)}
    assert got == {"stages/one.py", "stages/__init__.py", "stages/core/__init__.py",
                   "stages/core/late.py"}


def test_deps_check_passes_on_the_project(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "stages.deps", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "stages", tmp_path / "stages",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    return tmp_path / "dvc.yaml"


def test_deps_check_fails_on_a_hand_broken_copy_and_write_mends_it(tmp_path: Path) -> None:
    dvc_yaml = _copy(tmp_path)
    text = dvc_yaml.read_text()
    # A dep removed from pretrain, one nobody imports added to evaluate.
    broken = text.replace("      - stages/core/train.py\n", "", 1).replace(
        "      - stages/evaluate.py\n",
        "      - stages/evaluate.py\n      - stages/core/tracking/agent.py\n", 1)
    assert broken != text
    dvc_yaml.write_text(broken)
    done = subprocess.run([sys.executable, "-m", "stages.deps", "--check", "--dvc-yaml",
                           str(dvc_yaml)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "missing code dep stages/core/train.py" in done.stdout
    assert "evaluate: code dep stages/core/tracking/agent.py is not imported" in done.stdout
    assert write(dvc_yaml, tmp_path)
    assert differences(dvc_yaml, tmp_path) == {}
    assert dvc_yaml.read_text() == text  # comments, order and folded commands kept


def test_a_new_import_makes_check_fail(tmp_path: Path) -> None:
    dvc_yaml = _copy(tmp_path)
    (tmp_path / "stages" / "core" / "newpart.py").write_text("Y = 2\n")
    with (tmp_path / "stages" / "evaluate.py").open("a") as f:
        f.write("\nfrom stages.core import newpart  # noqa: E402\n")
    diff = differences(dvc_yaml, tmp_path)
    # evaluate and what imports it (audit reuses its scorer); no other stage.
    assert "evaluate" in diff and "pretrain" not in diff and "export" not in diff
    assert all(v == (["stages/core/newpart.py"], []) for v in diff.values()), diff


class _Box(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)


def test_checkpoint_from_other_code_is_set_aside(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    model = _Box()
    old = {"stage": "t", "code": {"stages/core/train.py": "aaaa", "stages/t.py": "bbbb"}}
    CheckpointStore(tmp_path / "c.pt", old).save({"model": model}, Position(epoch=1), [])
    assert CheckpointStore(tmp_path / "c.pt", old).resume({"model": model}) is not None
    new = {"stage": "t", "code": {"stages/core/train.py": "cccc", "stages/t.py": "bbbb"}}
    with caplog.at_level("WARNING"):
        assert CheckpointStore(tmp_path / "c.pt", new).resume({"model": model}) is None
    assert "made by other code (stages/core/train.py differ)" in caplog.text


def test_the_code_fingerprint_follows_the_files(tmp_path: Path) -> None:
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "s.py").write_text("A = 1\n")
    first = code_fingerprint("stages.s", tmp_path)
    (tmp_path / "stages" / "s.py").write_text("A = 2\n")
    code_files.cache_clear()
    assert code_fingerprint("stages.s", tmp_path)["stages/s.py"] != first["stages/s.py"]


def test_the_same_tensors_give_the_same_bytes_whatever_the_file_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = _Box().state_dict()
    save_torch({"state_dict": state}, tmp_path / "a" / "pretrained.pt")
    save_torch({"state_dict": state}, tmp_path / "b" / "other-name.pt")
    assert (tmp_path / "a" / "pretrained.pt").read_bytes() == \
        (tmp_path / "b" / "other-name.pt").read_bytes()
    loaded = torch.load(tmp_path / "a" / "pretrained.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(loaded[k], state[k]) for k in state)
