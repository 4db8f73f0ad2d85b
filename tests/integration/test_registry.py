"""The registry and the promotion gate, on the SQLite default and against a real server:
versions registered by the export stage's door, promote re-scores champion and challenger on
today's target split, a worse challenger changes nothing, a better one wins, rollback undoes,
lineage walks back, two promotions at once leave exactly one champion, a rolled-back or stale
challenger is promoted only with --force, five checkouts promoting at once against one server
print "promoted" exactly once."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from commands.lineage import main as lineage_main
from commands.promote import main as promote_main
from commands.rollback import main as rollback_main
from stages.core.errors import EXIT_BAD_INPUT, EXIT_TRANSIENT
from stages.core.tracking.remote import AGENT_ENV
from tests.integration.tracking_kit import REPO, MlflowServer, save_tiny, tiny_model

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
    rollback_sticks(backend, name, capsys)


def rollback_sticks(backend: str, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """v5 is still the challenger (and the workspace's model) after the rollbacks: promote
    leaves it out until asked with --force."""
    tags = client(backend).get_model_version(name, "5").tags
    assert tags["rolled_back"] == "true" and tags["rolled_back.time"]
    again = promote_json(capsys)
    assert not again["promoted"] and "rolled back" in again["reason"]
    assert "--force" in again["reason"] and alias(backend, name, "champion") == "2"
    forced = promote_json(capsys, "--force")
    assert forced["promoted"] and forced["forced"] and "--force overrode" in forced["reason"]
    assert alias(backend, name, "champion") == "5"
    assert client(backend).get_model_version(name, "5").tags["rolled_back"] == "false"


def walk_back_from_version(backend: str, project: Path, name: str, version: str) -> None:
    """From a registered version to the data, code and params that made it."""
    from commands.lineage import lineage
    from stages.params import load_params

    mv = client(backend).get_model_version(name, version)
    manifest = json.loads((project / "data/target/manifest.json").read_text())
    assert mv.tags["parity_passed"] == "true"
    assert mv.tags["data.target.images.sha256"] == manifest["sha256"]["images.npy"]
    assert mv.tags["dvc.dep.models/finetuned.pt"] == hashlib.md5(
        (project / "models/finetuned.pt").read_bytes()).hexdigest()
    assert mv.tags["imagepipe.pipeline_run_id"]
    walked = lineage(load_params("params.yaml").registry, version)
    assert walked["version"] == version and "metrics" in walked["runs"][0]
    export_run = walked["runs"][0]
    assert export_run["stage"] == "export" and export_run["run_id"] == mv.run_id
    assert export_run["params"]["registry.model_name"] == name
    assert export_run["lineage"]["dvc.dep.data/target"].endswith(".dir")
    exported = json.loads((project / "metrics/export.json").read_text())
    assert exported["mlflow_run_id_seen"] == mv.run_id  # export saw its run id


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
    # In-process promotes: one tracking agent would take the two one after the other and leave
    # the lock untested.
    env = {**os.environ, "PYTHONPATH": str(REPO), AGENT_ENV: "0"}
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


PROMOTE_AND_SAY = """
import json, sys
from pathlib import Path
from commands.promote import main as promote_main
code = promote_main(["--json", *sys.argv[1:]])
Path("mlflow_imported.json").write_text(json.dumps("mlflow" in sys.modules))
sys.exit(code)
"""


def test_promote_runs_in_the_tracking_agent_and_answers_as_in_process(
        project: Path, tiny_export: Callable[..., int]) -> None:
    """`imagepipe promote` hands the decision to the project's tracking agent (mlflow is
    imported there, not in the command's process); bad input comes back as exit 2 with its
    message; switched off, the same command decides in its own process."""
    assert tiny_export("good") == 0

    def promote(*args: str, agent: bool = True) -> tuple[subprocess.CompletedProcess[str], bool]:
        env = {**os.environ, "PYTHONPATH": str(REPO), AGENT_ENV: "1" if agent else "0"}
        done = subprocess.run([sys.executable, "-c", PROMOTE_AND_SAY, *args], cwd=project,
                              env=env, capture_output=True, text=True, timeout=300)
        return done, json.loads((project / "mlflow_imported.json").read_text())

    done, imported = promote()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["promoted"] and not imported
    assert alias(f"sqlite:///{(project / 'mlflow.db').as_posix()}", NAME, "champion") == "1"
    bad, imported = promote("--data", "no-such-folder")
    assert bad.returncode == EXIT_BAD_INPUT and "promote: error: " in bad.stderr, bad.stderr
    assert "no-such-folder" in bad.stderr and not imported
    off, imported = promote(agent=False)
    assert off.returncode == 0, off.stderr
    assert json.loads(off.stdout)["reason"] == "version 1 is already champion" and imported


def test_a_challenger_older_than_the_workspace_is_refused(
        project: Path, tiny_export: Callable[..., int], capsys: pytest.CaptureFixture[str]) -> None:
    """An export that failed after writing models/model.onnx registered nothing: the challenger
    is the previous model, which promote must not take for this workspace's."""
    assert tiny_export("good") == 0  # v1, registered
    save_tiny(tiny_model("medium"), project / "models" / "finetuned.pt",
              project / "models" / "model.onnx")  # a new model, never registered
    refused = promote_json(capsys)
    assert not refused["promoted"] and refused["challenger_accuracy"] is None
    assert "challenger v1 is older than the workspace" in refused["reason"]
    capsys.readouterr()
    assert promote_main([]) == 0
    assert "(champion now: no champion)" in capsys.readouterr().out
    (project / "models" / "model.onnx").unlink()
    assert "is not in this workspace" in promote_json(capsys)["reason"]
    forced = promote_json(capsys, "--force")
    assert forced["promoted"] and "--force overrode" in forced["reason"]


def test_lineage_prints_a_summary_and_json_on_request(
        project: Path, tiny_export: Callable[..., int], capsys: pytest.CaptureFixture[str]) -> None:
    assert tiny_export("good") == 0
    assert promote_main([]) == 0
    capsys.readouterr()
    assert lineage_main([]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{NAME} v1 (champion, challenger)")
    assert "accuracy 1.0000 [" in text and "export    run " in text and "git commit" in text
    assert len(text.splitlines()) < 15
    assert lineage_main(["1", "--json"]) == 0
    walked = json.loads(capsys.readouterr().out)
    assert walked["version"] == "1" and walked["runs"][0]["stage"] == "export"


# A checkout's promote, started together with the others (all wait for GO once imported) and
# with a slow network between its re-check of the champion and its move (set_alias sleeps): the
# window in which two checkouts both see "no champion yet" and both move it.
CHECKOUT_PROMOTE = """
import sys, time
from pathlib import Path

import mlflow, onnxruntime  # imported before the start line, so all start together
from commands.promote import main as promote_main
from stages.core.tracking import registry

move = registry.Registry.set_alias


def slow_move(self, *args):
    time.sleep(1.0)
    return move(self, *args)


registry.Registry.set_alias = slow_move
Path(sys.argv[1], "ready").touch()
while not Path(sys.argv[1]).parent.joinpath("GO").exists():
    time.sleep(0.01)
sys.exit(promote_main([]))
"""


def test_five_checkouts_promoting_at_once_print_promoted_once(
        mlflow_server: MlflowServer, project: Path, tiny_export: Callable[..., int],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each checkout has its own lock file: only the lock held on the server serialises them.
    Exactly one says promoted; the others say another run did."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"t-five-{time.time_ns()}")
    name = model_name(project, mlflow_server.uri)
    assert tiny_export("good") == 0
    checkouts = [tmp_path / f"checkout-{i}" for i in range(5)]
    for folder in checkouts:
        shutil.copytree(project, folder, ignore=shutil.ignore_patterns("mlflow.db", "mlruns"))
    # Checkouts on machines of their own: no shared tracking agent (and set_alias patched here).
    env = {**os.environ, "PYTHONPATH": str(REPO), AGENT_ENV: "0"}
    procs = [subprocess.Popen([sys.executable, "-c", CHECKOUT_PROMOTE, str(folder)], cwd=folder,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for folder in checkouts]
    deadline = time.monotonic() + 240
    while not all((f / "ready").exists() for f in checkouts) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    (tmp_path / "GO").touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 5, [e for _, e in outs]
    said = [o.strip() for o, _ in outs]
    winners = [o for o in said if re.search(r" v1 promoted: ", o)]
    assert len(winners) == 1, said
    assert all("already champion (promoted by another run)" in o for o in said
               if o not in winners), said
    assert alias(mlflow_server.uri, name, "champion") == "1"
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):  # the lock held on the server was released
        client(mlflow_server.uri).get_registered_model(f"{name}.promotion-lock")


def test_a_lock_released_while_the_server_reads_it_is_a_retry_not_a_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race CI met: the server's create finds the lock's name taken, the holder deletes it,
    the server's read-back then answers RESOURCE_DOES_NOT_EXIST. On the real SQL registry store,
    the release is placed in that window; the waiter must simply try again and then hold it."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    from stages.core.tracking.registry import Registry
    from stages.core.tracking.store import Store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry = Registry(Store(tmp_path, uri, client(uri)))
    key = "m.promotion-lock"
    assert registry._try_lock(key, "holder")
    original = SqlAlchemyStore.get_registered_model

    def released_meanwhile(self: Any, name: str) -> Any:
        monkeypatch.setattr(SqlAlchemyStore, "get_registered_model", original)
        client(uri).delete_registered_model(key)  # the holder's release, inside the window
        return original(self, name)

    monkeypatch.setattr(SqlAlchemyStore, "get_registered_model", released_meanwhile)
    assert registry._try_lock(key, "waiter") is False  # not taken, and not an error
    assert registry._try_lock(key, "waiter") is True
    assert client(uri).get_registered_model(key).tags["imagepipe.lock.holder"] == "waiter"


def test_download_reads_its_own_store_whatever_project_mlflow_points_at(
        project: Path, tiny_export: Callable[..., int], tmp_path: Path) -> None:
    """The tracking agent serves many projects in one process, and MLflow resolves models:/
    through its process-wide registry URI, not the one passed in (CI met it: 'Registered
    Model ... not found' in a promotion). Left pointing at another project's store, a
    download must still read this project's."""
    import mlflow

    from stages.core.tracking.registry import Registry

    assert tiny_export("good") == 0
    elsewhere = f"sqlite:///{(tmp_path / 'other.db').as_posix()}"
    mlflow.set_tracking_uri(elsewhere)  # also exports MLFLOW_TRACKING_URI: taken back below
    mlflow.set_registry_uri(elsewhere)
    # As in the agent: the request's own environment (here: none) replaces the process's.
    # (Not monkeypatch.delenv: its teardown would put `elsewhere` back for the next tests.)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(var, None)
    try:
        version, onnx = Registry.connect(project).download(NAME, "challenger", tmp_path / "dl")
        assert version == "1" and onnx.suffix == ".onnx"
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            os.environ.pop(var, None)
