"""The promotion lock (stages/core/tracking/registry.py) and what runs under it
(commands/promote.py): a live holder's lock is never broken, however long it holds it; a holder
stopped for real (SIGSTOP) has its lock broken by a second checkout, then finds it lost before
moving anything, deletes nothing of the second's, and the pair ends with exactly one champion;
scoring happens outside the lock."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stages.core.tracking.remote import AGENT_ENV
from tests.integration.test_registry import alias, client, model_name
from tests.integration.tracking_kit import REPO, MlflowServer

pytestmark = pytest.mark.slow


def registry_on(uri: str, root: Path) -> Any:
    """A Registry with a client of its own: another checkout, as far as the lock can tell."""
    from stages.core.tracking.registry import Registry
    from stages.core.tracking.store import Store

    return Registry(Store(root, uri, client(uri)))


def test_a_live_holders_lock_is_never_broken_however_long_it_holds_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_db: Path) -> None:
    """The holder works four times the stale limit: its heartbeat keeps the waiter out. (The old
    waiter judged staleness by the lock's age on its own clock and broke in after the limit, so
    both held the lock at once.)"""
    from stages.core.tracking import registry

    monkeypatch.setattr(registry, "STALE_LOCK_S", 1.0)
    monkeypatch.setattr(registry, "HEARTBEAT_S", 0.2, raising=False)
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first, second = registry_on(uri, tmp_path), registry_on(uri, tmp_path)
    inside: list[str] = []
    overlap: list[bool] = []
    held = threading.Event()

    def hold(reg: Any, who: str, seconds: float) -> None:
        with reg._server_lock("m", time.monotonic() + 120):
            held.set()
            overlap.append(bool(inside))
            inside.append(who)
            time.sleep(seconds)
            inside.remove(who)

    worker = threading.Thread(target=hold, args=(first, "first", 4.0))
    worker.start()
    assert held.wait(60)
    hold(second, "second", 0.0)
    worker.join()
    assert overlap == [False, False]


# A checkout's promote. HOOK=stop: it stops itself for real (SIGSTOP: its heartbeat stops too)
# just before its first alias move, inside the lock. HOOK=wait: it holds the lock, alive, just
# before its move until the file GO-B appears. The stale limit is seconds, not a minute.
CHECKOUT_PROMOTE = """
import os, signal, sys, time
from pathlib import Path

from commands.promote import main as promote_main
from stages.core.tracking import registry

registry.STALE_LOCK_S, registry.HEARTBEAT_S = 3.0, 0.3
move, here, hook = registry.Registry.set_alias, Path(sys.argv[1]), os.environ["HOOK"]


def hooked(self, *args):
    if not (here / "hooked").exists():
        (here / "hooked").touch()
        if hook == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            while not (here.parent / "GO-B").exists():
                time.sleep(0.05)
    return move(self, *args)


registry.Registry.set_alias = hooked
sys.exit(promote_main([]))
"""


def test_a_lock_broken_while_its_holder_is_stopped_ends_with_one_champion(
        mlflow_server: MlflowServer, project: Path, tiny_export: Callable[..., int],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Checkout A takes the server lock and is stopped (SIGSTOP) before its move; checkout B
    sees A's heartbeat stand still, breaks the lock and takes it. A resumes while B holds it:
    A must move nothing and delete nothing of B's (the old A moved the alias and deleted B's
    lock on release). Then B promotes, and A, deciding again, finds v1 already champion."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"t-stale-{time.time_ns()}")
    name = model_name(project, mlflow_server.uri)
    assert tiny_export("good") == 0
    a, b = tmp_path / "checkout-a", tmp_path / "checkout-b"
    for folder in (a, b):
        shutil.copytree(project, folder, ignore=shutil.ignore_patterns("mlflow.db", "mlruns"))
    key = f"{name}.promotion-lock"
    with contextlib.ExitStack() as stack:
        proc_a, err_a = stack.enter_context(_checkout(a, "stop"))
        _until(lambda: _state(proc_a.pid) == "T", "A stopped inside the lock", proc_a)
        # B only now: A must be the one that took the lock.
        proc_b, _ = stack.enter_context(_checkout(b, "wait"))
        _until(lambda: (b / "hooked").exists(), "B broke the stale lock and holds it", proc_b)
        assert f"pid {proc_b.pid} " in _holder(mlflow_server.uri, key)
        os.kill(proc_a.pid, signal.SIGCONT)
        _until(lambda: "deciding again" in err_a.read_text(), "A found its lock lost", proc_a)
        # A has left the lock it lost: B's lock is still there, still B's.
        assert f"pid {proc_b.pid} " in _holder(mlflow_server.uri, key)
        assert alias(mlflow_server.uri, name, "champion") is None  # A moved nothing
        (tmp_path / "GO-B").touch()
        outs = {who: p.communicate(timeout=300)[0] for who, p in (("a", proc_a), ("b", proc_b))}
    assert (proc_a.returncode, proc_b.returncode) == (0, 0), (outs, err_a.read_text())
    assert re.search(r" v1 promoted: ", outs["b"]), outs
    assert "already champion (promoted by another run)" in outs["a"], outs
    assert alias(mlflow_server.uri, name, "champion") == "1"
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):  # released by B, its holder
        client(mlflow_server.uri).get_registered_model(key)


@contextlib.contextmanager
def _checkout(folder: Path, hook: str) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A checkout's promote (on a machine of its own: no shared tracking agent), its stderr
    in a file the test can read while it runs."""
    err = folder / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), AGENT_ENV: "0", "HOOK": hook}
    with err.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-c", CHECKOUT_PROMOTE, str(folder)],
                                cwd=folder, env=env, stdout=subprocess.PIPE, stderr=sink,
                                text=True)
    try:
        yield proc, err
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.communicate()


def _until(check: Callable[[], bool], what: str, proc: subprocess.Popen[str],
           timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, (what, proc.communicate())
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)


def _state(pid: int) -> str:
    """The process state letter from /proc (T: stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def _holder(uri: str, key: str) -> str:
    return str(client(uri).get_registered_model(key).tags.get("imagepipe.lock.holder"))


def test_scoring_runs_outside_the_lock(project: Path, tiny_export: Callable[..., int],
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads and ONNX scoring (minutes on a large test split) hold no lock: only the
    compare-and-set and the alias moves do."""
    import commands.promote as gate
    from stages.core.tracking.registry import Registry

    held: list[bool] = []
    locked = threading.Event()
    lock, hits = Registry.lock, gate.hits

    @contextlib.contextmanager
    def watched_lock(self: Registry, *args: Any, **kwargs: Any) -> Iterator[None]:
        with lock(self, *args, **kwargs):
            locked.set()
            try:
                yield
            finally:
                locked.clear()

    def watched_hits(*args: Any) -> Any:
        held.append(locked.is_set())
        return hits(*args)

    monkeypatch.setattr(Registry, "lock", watched_lock)
    monkeypatch.setattr(gate, "hits", watched_hits)
    monkeypatch.setenv(AGENT_ENV, "0")  # in this process, where the patches are
    from commands.promote import main as promote_main

    assert tiny_export("good") == 0
    assert promote_main([]) == 0  # v1 scored alone: the first champion
    assert tiny_export("good") == 0
    assert promote_main([]) == 0  # v2 and champion v1 scored
    capsys.readouterr()
    assert held and not any(held), held
