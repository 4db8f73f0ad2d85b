"""The registry and the promotion gate, on the SQLite default and against a real server:
versions registered by the export stage's door, promote re-scores champion and challenger on
today's target split, a worse challenger changes nothing, a better one wins, rollback undoes,
lineage walks back, two promotions at once leave exactly one champion."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from commands.registry import promote_main, rollback_main
from stages.core.errors import EXIT_BAD_INPUT, EXIT_TRANSIENT
from tests.integration.tracking_kit import REPO

pytestmark = pytest.mark.slow
NAME = "imagepipe-classifier"


def client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def alias(uri: str, name: str, which: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client(uri).get_model_version_by_alias(name, which).version)
    except MlflowException:
        return None


def promote_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    assert promote_main(["--json", *args]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # one JSON object, nothing else on stdout
    return json.loads(out[0])


def model_name(project: Path, backend: str) -> str:
    """On the shared server each test registers its own model name."""
    if backend.startswith("sqlite"):
        return NAME
    name = f"{NAME}-{os.environ['MLFLOW_EXPERIMENT_NAME'][-12:]}"
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace(f"model_name: {NAME}", f"model_name: {name}"))
    return name


def test_gate_promotes_only_a_better_challenger_and_rollback_restores(
        backend: str, project: Path, tiny_export: Callable[..., int],
        capsys: pytest.CaptureFixture[str]) -> None:
    name = model_name(project, backend)
    assert promote_main([]) == EXIT_BAD_INPUT  # nothing registered yet: bad input, not a crash

    assert tiny_export("medium") == 0  # v1, always says "b": no better than the majority class
    assert alias(backend, name, "challenger") == "1"
    medium = promote_json(capsys)
    assert not medium["promoted"] and "majority-class" in medium["reason"]
    assert medium["challenger_accuracy"] == pytest.approx(medium["majority_accuracy"])
    assert alias(backend, name, "champion") is None  # not even as the first version

    assert tiny_export("good") == 0  # v2, right on every image: the first champion
    first = promote_json(capsys)
    assert first["promoted"] and first["champion_version"] is None
    assert first["challenger_accuracy"] == 1.0
    assert first["challenger_run_id"] == client(backend).get_model_version(name, "2").run_id
    assert alias(backend, name, "champion") == "2"

    assert tiny_export("bad") == 0  # v3, wrong on every image
    worse = promote_json(capsys)
    assert not worse["promoted"]
    assert (worse["challenger_version"], worse["champion_version"]) == ("3", "2")
    assert worse["challenger_accuracy"] == 0.0 and worse["champion_accuracy"] == 1.0
    assert alias(backend, name, "champion") == "2"
    for version in ("2", "3"):  # the decision and both scores on both versions
        tags = client(backend).get_model_version(name, version).tags
        assert tags["promotion.decision"] == "rejected"
        assert float(tags["promotion.challenger_accuracy"]) == 0.0
        assert float(tags["promotion.champion_accuracy"]) == 1.0

    for version in ("4", "5"):  # as good: a tie promotes the newer (min_improvement 0)
        assert tiny_export("good") == 0
        assert promote_json(capsys)["promoted"]
        assert alias(backend, name, "champion") == version
    assert alias(backend, name, "previous-champion") == "4"

    # Rollback walks history back one promotion at a time: 5 -> 4 -> 2, then nothing.
    for want_from, want_to, want_previous in (("5", "4", "2"), ("4", "2", None)):
        capsys.readouterr()
        assert rollback_main(["--json"]) == 0
        rolled = json.loads(capsys.readouterr().out)
        assert (rolled["from_version"], rolled["champion_version"]) == (want_from, want_to)
        assert alias(backend, name, "champion") == want_to
        assert alias(backend, name, "previous-champion") == want_previous
    assert rollback_main([]) == EXIT_BAD_INPUT  # nothing further back
    walk_back_from_version(backend, project, name, "5")


def walk_back_from_version(backend: str, project: Path, name: str, version: str) -> None:
    """From a registered version to the data, code and params that made it."""
    from commands.registry import lineage
    from stages.params import load_params

    mv = client(backend).get_model_version(name, version)
    manifest = json.loads((project / "data/target/manifest.json").read_text())
    assert mv.tags["parity_passed"] == "true"
    assert mv.tags["data.target.images.sha256"] == manifest["sha256"]["images.npy"]
    assert mv.tags["dvc.dep.models/finetuned.pt"] == hashlib.md5(
        (project / "models/finetuned.pt").read_bytes()).hexdigest()
    assert mv.tags["imagepipe.pipeline_run_id"]
    walked = lineage(load_params().registry, version)
    export_run = walked["runs"][0]
    assert export_run["stage"] == "export" and export_run["run_id"] == mv.run_id
    assert export_run["params"]["registry.model_name"] == name
    assert export_run["lineage"]["dvc.dep.data/target"].endswith(".dir")
    exported = json.loads((project / "metrics/export.json").read_text())
    assert exported["mlflow_run_id_seen"] == mv.run_id  # export saw its run id (ONNX metadata)


def test_a_challenger_that_failed_parity_is_never_promoted(
        project: Path, tiny_export: Callable[..., int], capsys: pytest.CaptureFixture[str]) -> None:
    assert tiny_export("good", parity=False) == 0
    decision = promote_json(capsys)
    assert not decision["promoted"] and "parity" in decision["reason"]
    assert alias(f"sqlite:///{(project / 'mlflow.db').as_posix()}", NAME, "champion") is None


def test_promote_with_tracking_unreachable_exits_75(
        project: Path, tiny_export: Callable[..., int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert promote_main([]) == EXIT_TRANSIENT


def test_two_promotions_at_once_leave_exactly_one_champion(
        backend: str, project: Path, tiny_export: Callable[..., int]) -> None:
    """Both see v1 as challenger and no champion; without the lock and the re-read both would
    report a promotion. With them, one promotes and the other finds v1 already champion."""
    name = model_name(project, backend)
    assert tiny_export("good") == 0
    cmd = [sys.executable, "-m", "commands.cli", "promote", "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    decisions = [json.loads(o) for o, _ in outs]
    assert sorted(d["promoted"] for d in decisions) == [False, True]
    loser = next(d for d in decisions if not d["promoted"])
    assert "already champion" in loser["reason"]
    assert alias(backend, name, "champion") == "1"
    assert alias(backend, name, "previous-champion") is None
