"""Stage modules load without torch, onnx or onnxruntime (issue 27): `--help`, a params file
refused and the door's decisions must not pay ~2-3 s of imports per process, which every
`dvc repro` stage and every subprocess test paid before."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "onnx", "onnxruntime")
STAGES = ("ingest", "augment", "pretrain", "finetune", "scratch", "evaluate", "export")


def loaded_after(code: str) -> list[str]:
    """The heavy modules in sys.modules after `code` runs in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=True)
    return proc.stdout.split()


def test_stage_modules_load_without_torch() -> None:
    assert loaded_after("; ".join(f"import stages.{m}" for m in STAGES)) == []


def test_a_refused_params_file_loads_no_torch(tmp_path: Path) -> None:
    """pretrain, finetune and export read params before anything else: a bad file is exit 2
    with torch never loaded (one interpreter for the three: each start costs a second)."""
    bad = tmp_path / "params.yaml"
    bad.write_text("pretrain: {width: -1}\n")
    code = "".join(f"from stages.{m} import main as {m}\n"
                   f"rc = {m}(['--params', {str(bad)!r}])\nassert rc == 2, ({m!r}, rc)\n"
                   for m in ("pretrain", "finetune", "export"))
    assert loaded_after(code) == []
