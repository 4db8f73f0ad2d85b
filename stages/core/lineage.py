"""Where a result came from: git commit and dirty flag (and the diff, when dirty), the DVC
hashes of a stage's inputs (as dvc.lock will record them), the content hashes of the datasets,
the Prefect flow run and the device.

`lineage_tags(root, deps)` gathers all of it as flat string tags (what tracking puts on every
MLflow run and on every registered model version). Reads files and asks git; imports nothing
heavy unless torch is already loaded.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

# FLOW_RUN_ENV: set by the Prefect flow (flows/) to its flow-run id; absent under `dvc repro`.
from stages.core.host import FLOW_RUN_ENV


def _git(*args: str, cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@cache
def git_commit(cwd: Path | None = None) -> str | None:
    """The HEAD commit, or None outside a git checkout (or before the first commit)."""
    return _git("rev-parse", "HEAD", cwd=cwd)


def git_dirty(cwd: Path | None = None) -> bool | None:
    """True when tracked files differ from HEAD; None outside a git checkout."""
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=cwd)
    return None if status is None else bool(status)


DIFF_ARTIFACT = "lineage/git-diff.patch"  # where a dirty tree's diff goes in a stage's run
_DIFF_LIMIT = 5_000_000  # characters: past this the diff is cut, and says so


def git_diff(cwd: Path) -> str | None:
    """What makes the tree at `cwd` differ from its HEAD: `git diff HEAD` (binary files named,
    not dumped) and the untracked files git does not ignore, listed. None when it does not
    differ (or this is no git checkout): a clean run's commit says it all."""
    untracked = (_git("ls-files", "--others", "--exclude-standard", cwd=cwd) or "").splitlines()
    if not git_dirty(cwd) and not untracked:
        return None
    head = git_commit(cwd) or "?"
    diff = _git("diff", "HEAD", "--no-color", "--no-ext-diff", cwd=cwd) or ""
    if len(diff) > _DIFF_LIMIT:
        diff = diff[:_DIFF_LIMIT] + f"\n# ... cut at {_DIFF_LIMIT:,} characters\n"
    lines = [f"# The working tree this run saw: `git diff HEAD` against {head}"]
    if untracked:
        lines += ["# Untracked files (not ignored, contents not included):",
                  *(f"#   {name}" for name in untracked)]
    return "\n".join(lines) + "\n" + diff + ("\n" if diff and not diff.endswith("\n") else "")


def dvc_lock_outs(root: Path, stage: str) -> dict[str, str]:
    """{out path: md5} of `stage` as recorded in root/dvc.lock; {} when it has no entry."""
    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    entry = (lock.get("stages") or {}).get(stage) or {}
    return {str(out["path"]): str(out["md5"]) for out in entry.get("outs") or []
            if isinstance(out, dict) and out.get("path") and out.get("md5")}


def path_hashes(root: Path, paths: list[str]) -> dict[str, str]:
    """{path: md5} as DVC computes it (a file's md5; a folder's md5 of its listing + ".dir"),
    by DVC's own hashing code and .dvcignore rules; paths that cannot be hashed are left out.

    Tagging a stage's outputs this way and its inputs likewise links runs into a graph: the
    run whose output hash equals another run's input hash made that input.
    """
    # dvc_data is what DVC itself hashes with; verified equal to dvc.lock by
    # tests/integration/test_tracking.py::test_dvc_repro_groups_its_stages_and_tags_the_hashes_dvc_locks.
    # dvc_data's public build(); dry_run: hashed, nothing written (the in-memory object store
    # only satisfies its signature). Same .dir hash as the private _build_tree, as fast.
    from dvc.ignore import DvcIgnoreFilter
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem
    from dvc_objects.fs.memory import MemoryFileSystem

    fs = LocalFileSystem()
    root = root.resolve()  # DVC's ignore filter takes absolute paths only
    db, ignore = HashFileDB(MemoryFileSystem(), "/"), DvcIgnoreFilter(fs, str(root))
    out: dict[str, str] = {}
    for rel in paths:
        try:
            _, _, obj = build(db, str(root / rel), fs, "md5", dry_run=True, ignore=ignore)
        except Exception:  # noqa: BLE001 - a missing or unreadable file: no tag
            continue
        out[rel] = str(obj.hash_info.value)
    return out


def data_hashes(root: Path) -> dict[str, str]:
    """{"<dataset>.<array>": sha256} for every dataset under root/data with a manifest.

    The manifest's sha256 of each array is the content of the data, whatever tool moved it.
    """
    out: dict[str, str] = {}
    for manifest in sorted((root / "data").glob("*/manifest.json")):
        try:
            sums = json.loads(manifest.read_text()).get("sha256") or {}
        except (OSError, ValueError):
            continue
        for array, digest in sorted(sums.items()):
            out[f"{manifest.parent.name}.{Path(array).stem}"] = str(digest)
    return out


def device_name() -> str:
    """'cuda:<GPU name>' when a CUDA device is usable, else 'cpu'.

    Asks torch only when it is already imported (a stage that trained loaded it): importing it
    here would cost seconds to stages that never touch a GPU.
    """
    torch: Any = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return "cpu"


def lineage_tags(root: Path, deps: list[str]) -> dict[str, str]:
    """Flat string tags naming the code, data, a stage's inputs `deps`, orchestrator run and
    device."""
    tags: dict[str, str] = {"device": device_name(), "host": platform.node()}
    commit = git_commit(root)
    if commit:
        tags["git.commit"] = commit
    dirty = git_dirty(root)
    if dirty is not None:
        tags["git.dirty"] = str(dirty).lower()
    # Hashed now: while a stage runs under `dvc repro`, dvc.lock still holds its previous run.
    for path, md5 in path_hashes(root, deps).items():
        tags[f"dvc.dep.{path}"] = md5
    for key, digest in data_hashes(root).items():
        tags[f"data.{key}.sha256"] = digest
    flow_run = os.environ.get(FLOW_RUN_ENV)
    if flow_run:
        tags["prefect.flow_run_id"] = flow_run
    return tags
