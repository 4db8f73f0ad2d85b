"""Issue 11, hardening: `kill -9` of the flow process takes its children with it.

A small driver does what `imagepipe run` does around a stage: it starts Prefect's temporary API
server (flows/localapi.py) and runs `dvc repro` through flows.dvcstage.run_killable, from its
main thread. The stage writes its pid and sleeps. The driver is SIGKILLed mid-stage (no handler,
no atexit can run); within seconds no process of the run may be left, and a rerun of the stage
must find no stale DVC lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, dvc, git

pytestmark = pytest.mark.slow

DRIVER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from flows import dvcstage
    from flows import localapi

    root = Path(sys.argv[1])
    api, _ = localapi.start()
    (root / "api.pid").write_text(str(api.pid))
    (root / "driver.pid").write_text(str(os.getpid()))
    done = dvcstage.run_killable(dvcstage.repro_command("sleeper"), root,
                                 dvcstage.child_env({"SLEEP_S": "120"}), None, print)
    print("finished", done.code)
""")

STAGE = ("python -c \"import os, time; open('stage.pid', 'w').write(str(os.getpid())); "
         "time.sleep(float(os.environ.get('SLEEP_S', '0')))\"")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; its parent has not reaped it yet


def _group(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def _wait_for(path: Path, timeout_s: float, driver: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and driver.poll() is None:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{path} was not written within {timeout_s} s")


@pytest.fixture
def sleeper_project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    git(root, "init", "-q")
    dvc(root, "init", "-q")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"sleeper": {"cmd": STAGE}}}))
    return root


def test_kill_9_of_the_flow_process_leaves_no_process_and_no_lock(
        sleeper_project: Path, tmp_path: Path) -> None:
    root = sleeper_project
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(root)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        stage_pid = int(_wait_for(root / "stage.pid", 60, driver))
        api_pid = int(_wait_for(root / "api.pid", 5, driver))
        group = os.getpgid(stage_pid)  # the guard's group: the guard, dvc, the shell, the stage
        assert group != os.getpgid(driver.pid)
        assert _alive(api_pid) and _alive(stage_pid)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (_group(group) or _alive(api_pid)):
            time.sleep(0.2)
        left = _group(group) + ([api_pid] if _alive(api_pid) else [])
    finally:
        driver.kill()
    for pid in left:  # clean up before failing, so no orphan outlives the test
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"still running after the flow process was killed: {left}"
    # A rerun finds no stale lock: DVC runs the stage again at once.
    (root / "stage.pid").unlink()
    dvc(root, "repro", "sleeper", timeout=120)
    assert (root / "stage.pid").exists()
