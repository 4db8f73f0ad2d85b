"""Placeholder until the Prefect flow lands (issue 6): `imagepipe run` is `dvc repro`."""

from __future__ import annotations

import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    return subprocess.call([sys.executable, "-m", "dvc", "repro", *(argv or [])])
