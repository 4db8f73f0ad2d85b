"""The Prefect flow under Prefect's test harness, with real DVC in a temporary git repo whose
stage is a tiny script told (by codes.json) how to end each attempt."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter
from prefect.testing.utilities import prefect_test_harness

from commands import run as run_command
from flows import dvcstage, pipeline, report

pytestmark = pytest.mark.slow

STAGE_SCRIPT = textwrap.dedent("""\
    import json, os, pathlib, subprocess, sys, time
    state = pathlib.Path("state"); state.mkdir(exist_ok=True)
    attempt = len(list(state.glob("attempt-*"))) + 1
    (state / f"attempt-{attempt}").write_text(os.environ.get("IMAGEPIPE_FLOW_RUN_ID", ""))
    codes = json.loads(pathlib.Path("codes.json").read_text())
    code = codes[attempt - 1] if attempt <= len(codes) else 0
    if code == 2:
        print("flaky: error: labels.csv lists no classes", file=sys.stderr); sys.exit(2)
    if code == 75:
        print("flaky: transient failure (retry may help): server away", file=sys.stderr); sys.exit(75)
    if code == "kill":
        os.kill(os.getpid(), 9)
    if code == "hang":  # a worker process of its own, as a DataLoader would have
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        (state / "child.pid").write_text(str(child.pid)); time.sleep(300)
    pathlib.Path("metrics").mkdir(exist_ok=True)
    pathlib.Path("metrics/flaky.json").write_text(json.dumps({"accuracy": 0.875, "n": 8}))
    pathlib.Path("out.txt").write_text("ok")
""")

DVC_YAML = {
    "stages": {
        "flaky": {"cmd": "python stage.py", "deps": ["stage.py"], "params": ["seed"],
                  "outs": ["out.txt"], "metrics": [{"metrics/flaky.json": {"cache": False}}]},
        "after": {"cmd": "python -c \"import shutil; shutil.copy('out.txt', 'after.txt')\"",
                  "deps": ["out.txt"], "outs": ["after.txt"]},
    }
}

# A stand-in for `imagepipe promote --json` (commands/promote.py needs a real registry):
# it answers as the real one does and echoes the lineage env it was given.
FAKE_CLI = textwrap.dedent("""\
    import json, os, pathlib, sys
    # No `export` stage in this project: nothing was exported, so no challenger is no failure.
    assert sys.argv[1:] == ["promote", "--json", "--missing-ok"], sys.argv
    calls = pathlib.Path("state/promote-calls"); calls.parent.mkdir(exist_ok=True)
    calls.write_text(calls.read_text() + "x" if calls.exists() else "x")
    print("registry: scoring challenger and champion", file=sys.stderr)
    print(json.dumps({"promoted": True, "challenger_version": 2, "champion_version": 1,
                      "challenger_accuracy": 0.91, "champion_accuracy": 0.88,
                      "reason": "challenger beats champion by 0.03",
                      "challenger_run_id": os.environ["IMAGEPIPE_FLOW_RUN_ID"]}))
""")


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=None):  # the env's 180 s: a cold DB
        yield


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git + DVC repo with the two stages above; codes.json empty (every attempt succeeds)."""
    from dvc.repo import Repo

    root = tmp_path / "proj"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    Repo.init(str(root)).close()
    (root / "stage.py").write_text(STAGE_SCRIPT)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    # The flow validates params.yaml with stages/params.py: the smallest file it accepts.
    (root / "params.yaml").write_text("# tiny\nseed: 1  # kept comment\ndata:\n"
                                      "  source: {uri: 'sklearn:digits'}\n"
                                      "  target: {uri: 'sklearn:digits'}\n")
    (root / "codes.json").write_text("[]")
    monkeypatch.setenv("IMAGEPIPE_GPU_LOCK_DIR", str(tmp_path / "locks"))
    return root


def _run(project: Path, **kw: Any) -> Any:
    kw = {"retry_delay_s": 0.05, "promote": False, **kw}
    return pipeline.pipeline(project_dir=str(project), return_state=True, **kw)


def _attempts(project: Path) -> list[str]:
    return sorted((project / "state").glob("attempt-*"))


def _task_runs(state: Any) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [state.state_details.flow_run_id]}))
    return {r.name: r for r in runs}


def _artifact(state: Any, key: str = pipeline.ARTIFACT_KEY) -> str:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]),
            flow_run_id={"any_": [state.state_details.flow_run_id]}))
    assert found, "no artifact for this flow run"
    return str(found[0].data)


def test_exit_75_twice_is_retried_then_completes_and_rerun_is_noop(harness: None,
                                                                    project: Path) -> None:
    (project / "codes.json").write_text("[75, 75]")
    state = _run(project)
    assert state.is_completed(), state.message
    flow_run_id = str(state.state_details.flow_run_id)
    assert len(_attempts(project)) == 3
    # The stage saw the flow-run id (MLflow lineage reads it) on every attempt.
    assert {p.read_text() for p in _attempts(project)} == {flow_run_id}
    runs = _task_runs(state)
    assert runs["flaky"].run_count == 3 and runs["after"].run_count == 1
    result = state.result()
    assert result["stages"]["flaky"]["outcome"] == "ran"
    assert result["stages"]["flaky"]["attempts"] == 3
    assert (project / "after.txt").read_text() == "ok"
    text = _artifact(state)
    assert flow_run_id in text and "table artifact `imagepipe-metrics`" in text
    assert "0.875" in _artifact(state, report.METRICS_KEY)  # metrics/flaky.json's accuracy

    # Nothing changed: DVC's one status check says so, and no stage process starts.
    again = _run(project)
    assert again.is_completed()
    assert len(_attempts(project)) == 3
    assert {s["outcome"] for s in again.result()["stages"].values()} == {"up to date"}


def test_exit_2_fails_at_once_with_the_stage_reason(harness: None, project: Path) -> None:
    (project / "codes.json").write_text("[2]")
    state = _run(project)
    assert state.is_failed()
    assert len(_attempts(project)) == 1
    assert _task_runs(state)["flaky"].run_count == 1
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, dvcstage.StageBadInput)
    assert exc.reason == "flaky: error: labels.csv lists no classes"
    assert "labels.csv lists no classes" in (state.message or "")
    assert "after" not in _task_runs(state)  # nothing ran past the failure
    assert "| flaky | failed: flaky: error: labels.csv lists no classes |" in _artifact(state)


def test_main_maps_bad_input_to_exit_2(harness: None, project: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (project / "codes.json").write_text("[2]")
    monkeypatch.chdir(project)
    old = signal.getsignal(signal.SIGTERM)
    try:
        assert run_command.main(["--no-promote", "--retry-delay", "0.05"]) == 2
    finally:
        signal.signal(signal.SIGTERM, old)


def test_death_by_signal_is_retried(harness: None, project: Path) -> None:
    (project / "codes.json").write_text('["kill"]')
    state = _run(project, stages=["flaky"])
    assert state.is_completed(), state.message
    assert len(_attempts(project)) == 2
    assert list(_task_runs(state)) == ["flaky"]


def test_timeout_kills_the_whole_process_group(harness: None, project: Path) -> None:
    (project / "codes.json").write_text('["hang"]')
    state = _run(project, timeouts_s={"flaky": 4})
    assert state.is_failed()  # the stage sleeps 300 s and would end 0: only the kill fails it
    assert isinstance(state.result(raise_on_failure=False), dvcstage.StageTimeout)
    assert len(_attempts(project)) == 1  # a timeout is not retried
    child = int((project / "state" / "child.pid").read_text())
    deadline = time.monotonic() + 30  # the group was sent SIGKILL: wait for the reaping only
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the stage's own child process outlived the timeout"
    # DVC was killed mid-stage too: the repo is not left locked, the next run just works.
    assert _run(project, stages=["flaky"]).is_completed()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but not yet reaped by its (re-)parent.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def test_params_override_is_written_and_locked(harness: None, project: Path) -> None:
    state = _run(project, set_params=["seed=5"], stages=["flaky"])
    assert state.is_completed(), state.message
    params = (project / "params.yaml").read_text()
    assert "seed: 5" in params and "# kept comment" in params
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["flaky"]["params"]["params.yaml"]["seed"] == 5
    assert state.result()["overrides"] == ["seed: 1 -> 5"]
    assert "`seed: 1 -> 5`" in _artifact(state)


def test_bad_override_fails_and_leaves_params_alone(harness: None, project: Path) -> None:
    before = (project / "params.yaml").read_text()
    state = _run(project, set_params=["seed=-1"])  # a valid override, a value the schema refuses
    assert state.is_failed()
    assert "params.seed" in str(state.result(raise_on_failure=False))
    assert (project / "params.yaml").read_text() == before
    assert not _attempts(project)


def test_promotion_runs_with_lineage_and_again_when_nothing_changed(
        harness: None, project: Path) -> None:
    (project / "commands").mkdir()
    (project / "commands" / "__init__.py").write_text("")
    (project / "commands" / "cli.py").write_text(FAKE_CLI)
    state = _run(project, promote=True)
    assert state.is_completed(), state.message
    decision = state.result()["promotion"]
    assert decision["promoted"] is True
    assert decision["challenger_run_id"] == str(state.state_details.flow_run_id)
    text = _artifact(state)
    assert "**promoted**: challenger v2" in text and "challenger_run_id" in text
    # Nothing changed in DVC, but the registry may have (a rollback, another machine's
    # challenger): the gate runs again, and no stage does.
    again = _run(project, promote=True)
    assert again.is_completed(), again.message
    assert all(r["outcome"].startswith("up to date") for r in again.result()["stages"].values())
    assert (project / "state" / "promote-calls").read_text() == "xx"


def test_a_failed_promotion_is_said_in_the_artifact(harness: None, project: Path) -> None:
    (project / "commands").mkdir()
    (project / "commands" / "__init__.py").write_text("")
    (project / "commands" / "cli.py").write_text(
        "import sys\nprint('promote: error: data/target: the test split is empty', "
        "file=sys.stderr)\nsys.exit(2)\n")
    state = _run(project, promote=True)
    assert state.is_failed()
    assert isinstance(state.result(raise_on_failure=False), dvcstage.StageBadInput)
    text = _artifact(state)
    promotion = text.split("## Promotion", 1)[1].split("##", 1)[0]
    assert "Not run." not in promotion, text
    assert "**Failed**: promote: error: data/target: the test split is empty" in promotion, text


def test_gpu_limit_serialises_training_stages(harness: None, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Two local slots, so only the server's `gpu` limit (1 slot) can keep them apart.
    monkeypatch.setenv("IMAGEPIPE_GPU_SLOTS", "2")
    monkeypatch.setenv("IMAGEPIPE_GPU_LOCK_DIR", str(tmp_path))
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(pipeline.GPU_LIMIT, 1)
    lock = threading.Lock()
    inside = {"now": 0, "most": 0}
    started = {"a": threading.Event(), "b": threading.Event()}

    @task
    def train(name: str, other: str) -> None:
        started[name].set()
        with pipeline.gpu_slot(1):
            with lock:
                inside["now"] += 1
                inside["most"] = max(inside["most"], inside["now"])
            # Hold the slot until the other task has asked for one too (and a little longer,
            # so that a broken limit would let it in while this one is inside).
            assert started[other].wait(60)
            time.sleep(0.5)
            with lock:
                inside["now"] -= 1

    @flow
    def two_trainings() -> None:
        futures = [train.submit("a", "b"), train.submit("b", "a")]
        [f.result() for f in futures]

    two_trainings()
    assert pipeline.uses_server_limit()
    assert inside["most"] == 1, "two training stages held the GPU at once"
