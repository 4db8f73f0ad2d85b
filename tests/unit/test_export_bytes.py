"""export's output bytes are a function of its inputs: the same checkpoint, target and params,
exported by two processes under two MLflow run ids, one from the checkout and one from a copy
of the code in another folder (where `dvc exp run --temp` and `--queue` run), write the same
model.onnx and int8 variant byte for byte. Otherwise every `dvc repro -f` or experiment shows
export's outputs changed when nothing did, and DVC's cache keeps a copy per run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from stages.core import onnxio, onnxvariants
from stages.core.codeid import code_digest
from stages.core.models import ModelSpec
from tests.helpers import REPO
from tests.unit.test_export import MEAN, STD, make_model, make_params, make_target

# The child exports with run(): the stage's work without the door's tracking.
_EXPORT_CHILD = """
import json, sys
from pathlib import Path
from stages import export
from stages.params import parse_params
project, out, params = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
export.run(parse_params(params), project / "finetuned.pt", project / "target",
           out / "model.onnx", out / "variants")
"""


def _export_in_a_process(code_root: Path, project: Path, out: Path, run_id: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(code_root), "MLFLOW_RUN_ID": run_id}
    done = subprocess.run([sys.executable, "-c", _EXPORT_CHILD, str(project), str(out),
                           json.dumps(make_params())], cwd=code_root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _differences(a: Path, b: Path) -> str:
    """What differs between two ONNX files, for the failure message."""
    pa, pb = onnx.load(a), onnx.load(b)
    meta_a = {p.key: p.value for p in pa.metadata_props}
    meta_b = {p.key: p.value for p in pb.metadata_props}
    keys = sorted(k for k in meta_a.keys() | meta_b.keys() if meta_a.get(k) != meta_b.get(k))
    nodes = sorted({p.key for na, nb in zip(pa.graph.node, pb.graph.node, strict=False)
                    for p in na.metadata_props if p not in nb.metadata_props})
    return f"metadata_props differ at {keys}; node metadata_props differ at {nodes}"


@pytest.fixture(scope="module")
def two_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bytes")
    make_model(root / "finetuned.pt", ModelSpec("resnet_small", 5, 1, 16, width=8), MEAN, STD)
    make_target(root / "target", 16, 1)
    copy = root / "exps" / "tmpk3j9x2a1"  # what DVC's temporary experiment folders look like
    shutil.copytree(REPO / "stages", copy / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    _export_in_a_process(REPO, root, root / "first", "0123456789abcdef0123456789abcdef")
    _export_in_a_process(copy, root, root / "second", "fedcba9876543210fedcba9876543210")
    return {"first": root / "first", "second": root / "second"}


@pytest.mark.parametrize("name", ["model.onnx", f"variants/{onnxvariants.INT8_NAME}"])
def test_the_same_inputs_export_the_same_bytes(two_exports: dict[str, Path], name: str) -> None:
    first, second = two_exports["first"] / name, two_exports["second"] / name
    assert first.read_bytes() == second.read_bytes(), _differences(first, second)


def test_the_file_names_its_inputs_not_its_run(two_exports: dict[str, Path]) -> None:
    """Lineage in the file is what its bytes are a function of; the run id, git commit and
    no path of the exporting machine are in it (they are the MLflow run's and version's)."""
    path = two_exports["first"] / "model.onnx"
    meta = onnxio.read_metadata(onnx.load(path))
    assert meta["export_code_sha256"] == code_digest("stages.export")
    assert len(meta["source_model_sha256"]) == 64
    assert not {"mlflow_run_id", "git_commit", "git_dirty"} & set(meta)
    assert str(REPO).encode() not in path.read_bytes()
    # What says which module and op made each node stays.
    node = onnx.load(path).graph.node[0]
    assert {"namespace", "pkg.torch.onnx.class_hierarchy"} <= {p.key for p in node.metadata_props}
