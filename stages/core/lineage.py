"""Where a result came from: the git commit and whether the tree had uncommitted changes."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path


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
