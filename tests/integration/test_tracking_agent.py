"""The tracking agent (stages/core/tracking/agent.py): stages run as DVC runs them, in processes
of their own, keep their MLflow runs in one long-lived agent and never import mlflow
themselves; a stage killed outright (SIGKILL: no door code runs) has its run ended FAILED by
the agent; with the agent switched off the stage tracks in its own process as before.

Faults injected for real, each ending in a bounded wait and a stage that says what happened:
the agent stopped (SIGSTOP) before a stage starts and while it closes its run, killed -9 while
a stage runs under `dvc repro`, asked to stop while a stage uses it, a plain file (or a
read-only folder) where the agents' folder goes, a stale socket beside a lock naming another
code's live agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages.core.tracking.channel import code_key, socket_path
from stages.core.tracking.remote import AGENT_ENV
from tests.integration.tracking_kit import REPO, write_dvc_yaml

pytestmark = pytest.mark.slow

EVALUATE = {"cmd": "python stage.py", "deps": ["inputs.txt"],
            "metrics": [{"metrics/evaluate.json": {"cache": False}}]}

STAGE = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from stages.core.door import run_stage

    def body() -> None:
        Path("metrics").mkdir(exist_ok=True)
        Path("metrics/evaluate.json").write_text(json.dumps({"accuracy": float(sys.argv[1])}))
        Path("seen.json").write_text(json.dumps({"run_id": os.environ.get("MLFLOW_RUN_ID")}))
        if len(sys.argv) > 2:
            time.sleep(float(sys.argv[2]))

    code = run_stage("evaluate", body)
    Path("mlflow_imported.json").write_text(json.dumps("mlflow" in sys.modules))
    sys.exit(code)
""")


def client(project: Path) -> Any:
    from mlflow import MlflowClient

    uri = f"sqlite:///{(project / 'mlflow.db').as_posix()}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def stage_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def stage(project: Path, *args: str, env: dict[str, str] | None = None
          ) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "stage.py", *args], cwd=project,
                            env=stage_env(**(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stage_key() -> str:
    """The key of the agent the stages above use (their environment is part of it)."""
    return code_key(env=stage_env())


def stop_agent() -> bool:
    """Drain the stages' agent the way a user can: remove its socket (it takes no new stage,
    finishes the ones it serves, then exits). Whether there was one."""
    path = socket_path(stage_key())
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed


def agent_pid() -> int | None:
    """The pid of the agent listening for the stages' code (it answered the handshake), if one
    runs."""
    from stages.core.tracking.channel import AgentUnavailable, dial, peer_pid

    try:
        conn = dial(socket_path(stage_key()))
    except AgentUnavailable:
        return None
    if conn is None:
        return None
    with conn:
        return peer_pid(conn)


@pytest.fixture
def tracked(project: Path) -> Path:
    write_dvc_yaml(project, {"evaluate": EVALUATE})
    (project / "inputs.txt").write_text("x")
    (project / "stage.py").write_text(STAGE)
    return project


def test_stages_share_one_agent_and_never_import_mlflow(tracked: Path) -> None:
    run_ids, pids = [], set()
    for accuracy in ("0.75", "0.8"):
        proc = stage(tracked, accuracy)
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        assert json.loads((tracked / "mlflow_imported.json").read_text()) is False
        run_ids.append(json.loads((tracked / "seen.json").read_text())["run_id"])
        pids.add(agent_pid())
    assert None not in pids and len(pids) == 1, pids  # the second stage reused the first's
    from stages.core.tracking.channel import dial, request

    conn = dial(socket_path(stage_key()))
    assert conn is not None
    with conn:  # it answers only what stages and commands send
        assert (request(conn, {"op": "ping"}, 30) or {})["raised"][0] == "BadInput"
    runs = [client(tracked).get_run(r) for r in run_ids]
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert [r.data.metrics["accuracy"] for r in runs] == [0.75, 0.8]
    assert runs[0].data.tags["mlflow.parentRunId"] != runs[1].data.tags["mlflow.parentRunId"]


def test_a_stage_killed_outright_has_its_run_ended_failed(tracked: Path) -> None:
    proc = stage(tracked, "0.7", "120")
    try:
        deadline = time.monotonic() + 120
        while not (tracked / "seen.json").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        run_id = json.loads((tracked / "seen.json").read_text())["run_id"]
        assert client(tracked).get_run(run_id).info.status == "RUNNING"
        proc.send_signal(signal.SIGKILL)  # no handler, no finally: only the agent can end it
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 30
    status = "RUNNING"
    while status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
        status = client(tracked).get_run(run_id).info.status
    assert status == "FAILED"


def test_switched_off_the_stage_tracks_in_its_own_process(tracked: Path) -> None:
    proc = stage(tracked, "0.6", env={AGENT_ENV: "0"})
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert json.loads((tracked / "mlflow_imported.json").read_text()) is True
    run_id = json.loads((tracked / "seen.json").read_text())["run_id"]
    run = client(tracked).get_run(run_id)
    assert (run.info.status, run.data.metrics["accuracy"]) == ("FINISHED", 0.6)


def test_removing_its_socket_ends_the_agent_and_a_new_stage_starts_another(tracked: Path) -> None:
    proc = stage(tracked, "0.5")
    assert proc.wait(timeout=180) == 0
    first = agent_pid()
    assert first is not None
    assert stop_agent()
    deadline = time.monotonic() + 15
    while agent_pid() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agent_pid() is None
    proc = stage(tracked, "0.55")
    assert proc.wait(timeout=180) == 0
    second = agent_pid()
    assert second is not None and second != first


def test_a_stage_right_after_the_flows_prewarm_uses_that_agent_not_a_second(tracked: Path
                                                                             ) -> None:
    from stages.core.tracking.remote import connect_agent, prewarm

    stop_agent()
    deadline = time.monotonic() + 15
    while agent_pid() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    key = code_key()  # this process's environment: prewarm and connect_agent use it too

    def agents() -> set[Path]:
        return {p for p in Path("/proc").glob("[0-9]*")
                if _cmdline(p).count(key.encode()) and b"tracking.agent" in _cmdline(p)}

    # An agent of this key still draining the other test worker's stage may outlive the stop.
    before = agents()
    prewarm()  # returns at once: the agent has not bound its socket yet
    sock = connect_agent()  # what the first stage does a moment later
    assert sock is not None
    sock.close()
    started = agents() - before
    assert len(started) <= 1 and (started or before), (before, started)


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


# ---------------------------------------------------------------- faults, injected for real


def running_agent(tracked: Path) -> int:
    """The pid of the stages' agent, started by a first stage if none runs."""
    pid = agent_pid()
    if pid is None:
        proc = stage(tracked, "0.1")
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        pid = agent_pid()
    assert pid is not None
    (tracked / "seen.json").unlink(missing_ok=True)  # the next stage's body writes it anew
    return pid


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def ended_or_failed(proc: subprocess.Popen[str], stopped: int) -> str:
    """The stage's stderr once it ends; a failure if it hangs on the stopped agent (woken
    again either way)."""
    try:
        try:
            return proc.communicate(timeout=150)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"the stage hung on the stopped agent: {proc.communicate()}")
    finally:
        os.kill(stopped, signal.SIGCONT)


def test_a_stopped_agent_costs_a_stage_a_bounded_wait_then_it_tracks_in_process(
        tracked: Path) -> None:
    """SIGSTOP the agent: a stage no longer hangs on it (the old stage had no socket timeout
    and was still waiting after 180 s): it gives up on the handshake, says so, and tracks its
    run in its own process."""
    pid = running_agent(tracked)
    os.kill(pid, signal.SIGSTOP)
    proc = stage(tracked, "0.65")
    err = ended_or_failed(proc, pid)
    assert proc.returncode == 0, err
    assert "did not answer the handshake" in err and "tracking in this process instead" in err
    assert json.loads((tracked / "mlflow_imported.json").read_text()) is True
    run = client(tracked).get_run(json.loads((tracked / "seen.json").read_text())["run_id"])
    assert (run.info.status, run.data.metrics["accuracy"]) == ("FINISHED", 0.65)


def test_an_agent_stopped_while_it_closes_the_run_is_exit_75_saying_so(tracked: Path) -> None:
    pid = running_agent(tracked)
    proc = stage(tracked, "0.6", "3")  # its body sleeps 3 s, its run held by the agent
    wait_for(tracked / "seen.json", proc)
    os.kill(pid, signal.SIGSTOP)
    err = ended_or_failed(proc, pid)
    assert proc.returncode == 75, err
    assert f"the tracking agent (pid {pid}) is stopped" in err, err
    assert "the stage's outputs were written" in err


def test_the_agent_killed_mid_run_under_dvc_repro_the_stage_still_exits_0_and_locks(
        tracked: Path) -> None:
    """kill -9 the agent (not the stage) while the stage's body runs under `dvc repro`: the
    stage says so at once, reopens the same run in its own process at the end, and the stage
    exits 0, so DVC writes its dvc.lock entry (the old stage exited 75, DVC locked nothing)."""
    running_agent(tracked)
    write_dvc_yaml(tracked, {"evaluate": {**EVALUATE, "cmd": f"{sys.executable} stage.py 0.7 4"}})
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tracked, env=stage_env(), check=True)
    proc = subprocess.Popen([dvc, "repro"], cwd=tracked, env=stage_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(tracked / "seen.json", proc)
        pid = agent_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert f"the tracking agent (pid {pid}) died while the stage ran" in out, out
    lock = yaml.safe_load((tracked / "dvc.lock").read_text())["stages"]
    assert "evaluate" in lock
    run_id = json.loads((tracked / "seen.json").read_text())["run_id"]
    run = client(tracked).get_run(run_id)  # the very run the body saw, finished here
    assert (run.info.status, run.data.metrics["accuracy"]) == ("FINISHED", 0.7)


def test_removing_its_socket_drains_the_agent_a_stage_is_using(tracked: Path) -> None:
    """The socket removed while a stage runs: the agent takes no new stage but keeps serving
    this one to its end, then exits."""
    pid = running_agent(tracked)
    proc = stage(tracked, "0.55", "10")
    try:
        wait_for(tracked / "seen.json", proc)
        assert stop_agent()
        assert agent_pid() is None  # no new stage reaches it
        time.sleep(3)
        assert _alive(pid) and proc.poll() is None, proc.communicate()  # still serving it
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert json.loads((tracked / "mlflow_imported.json").read_text()) is False
    run = client(tracked).get_run(json.loads((tracked / "seen.json").read_text())["run_id"])
    assert (run.info.status, run.data.metrics["accuracy"]) == ("FINISHED", 0.55)
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)  # drained, then gone


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_file_where_the_agents_folder_goes_never_stops_the_body(tracked: Path) -> None:
    """A plain file where <tmp>/imagepipe-<uid> goes: the old door let the OSError out before
    the body (a traceback, exit 1). (A read-only tmp cannot be made here: the tests run as
    root, and tempfile skips a TMPDIR it cannot write; both end in the same OSError path.)
    The TMPDIR is a short one: under a long one (pytest-xdist's tmp_path) the agents' folder
    is a short one in /tmp instead, and the file would not be in the way."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="ip-", dir="/tmp"))
    (tmp / f"imagepipe-{os.getuid()}").write_text("not a folder")
    try:
        proc = stage(tracked, "0.45", env={"TMPDIR": str(tmp)})
        _, err = proc.communicate(timeout=180)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == 0, err
    assert "tracking in this process instead" in err and "Traceback" not in err, err
    run = client(tracked).get_run(json.loads((tracked / "seen.json").read_text())["run_id"])
    assert (run.info.status, run.data.metrics["accuracy"]) == ("FINISHED", 0.45)


def test_a_long_tmpdir_still_gets_an_agent(tracked: Path, tmp_path: Path) -> None:
    """A TMPDIR as long as pytest's under xdist put the socket past the 107 bytes a Unix
    socket address holds: the agent could not bind, and the stage tracked in-process (CI saw
    the nightly deployment test fail that way). The socket now goes to a short folder."""
    tmp = tmp_path / ("t" * 60) / "tmp"
    tmp.mkdir(parents=True)
    env = {"TMPDIR": str(tmp)}
    assert len(os.fsencode(tmp / f"imagepipe-{os.getuid()}" / f"{'0' * 20}.sock")) > 107
    proc = stage(tracked, "0.4", env=env)
    _, err = proc.communicate(timeout=180)
    try:
        assert proc.returncode == 0, err
        assert "in this process instead" not in err, err
        assert json.loads((tracked / "mlflow_imported.json").read_text()) is False
        run = client(tracked).get_run(json.loads((tracked / "seen.json").read_text())["run_id"])
        assert (run.info.status, run.data.metrics["accuracy"]) == ("FINISHED", 0.4)
    finally:
        subprocess.run([sys.executable, "-c", "from stages.core.tracking.channel import code_key, "
                        "socket_path; socket_path(code_key()).unlink(missing_ok=True)"],
                       env=stage_env(**env), check=True, timeout=120)


def test_a_stale_socket_and_a_lock_naming_another_codes_agent_cost_no_wait(
        tracked: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This code's socket left behind by a killed agent, and its lock file naming the pid of a
    live agent of *another* code (a reused pid): the old stage waited the whole spawn wait for
    that agent to bind this code's socket. Now it starts its own agent at once."""
    import socket as sockets
    import threading

    from stages.core.tracking import remote
    from stages.core.tracking.channel import agents_dir

    monkeypatch.setattr(remote, "SPAWN_WAIT_S", 600.0)  # the old wait, made long enough to see
    key = code_key()
    path = socket_path(key)
    path.unlink(missing_ok=True)  # this code's agent, if one runs, drains and exits
    deadline = time.monotonic() + 30
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    other = subprocess.Popen([sys.executable, "-m", "stages.core.tracking.agent", "f" * 20,
                              str(REPO)], cwd=REPO, env=stage_env(IMAGEPIPE_TRACKING_AGENT_IDLE_S="600"),
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    got: list[Any] = []
    try:
        while not (agents_dir() / f"{'f' * 20}.sock").exists():  # listening: alive, not ours
            assert other.poll() is None and time.monotonic() < deadline + 60
            time.sleep(0.05)
        stale = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
        stale.bind(str(path))
        stale.close()  # the path stays: a socket nobody listens on
        (agents_dir() / f"{key}.lock").write_text(str(other.pid))
        worker = threading.Thread(target=lambda: got.append(remote.connect_agent()),
                                  daemon=True)
        worker.start()
        worker.join(timeout=120)
        assert not worker.is_alive(), "still waiting for another code's agent"
    finally:
        other.kill()
        other.wait()
    assert got and got[0] is not None
    got[0].close()
