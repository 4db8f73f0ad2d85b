"""DVC side of the flow: which stages are stale, params overrides, and one stage run as a
killable subprocess whose exit code becomes a typed error. No Prefect here (flows/pipeline.py
decides retries from the error types), so all of it runs and is tested without a server.

DVC stays the judge of what is stale: the plan comes from one in-process `Repo.status()`
(DVC's start-up is paid once, not once per stage), and each stage that may need work runs as
`dvc repro --single-item STAGE`, which skips it again if it turns out to be up to date.
"""

from __future__ import annotations

import contextvars
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flows.orphans import guarded, kill_group
from stages.core.errors import EXIT_BAD_INPUT, EXIT_BUG, EXIT_TRANSIENT
from stages.core.flat import differences
from stages.core.host import TELEMETRY_OFF, die_with_parent

# SIGTERM first so a stage can end its MLflow run and drop its locks; SIGKILL after this.
KILL_GRACE_S = 10.0
# Retries of a transient failure (exit 75, a death by signal): the flow's tasks and `imagepipe
# run`'s defaults. The first waits RETRY_DELAY_S, then 20, 40: a tracking server or a GPU
# often needs a minute back.
RETRIES = 3
RETRY_DELAY_S = 10.0
# DVC ends a failed stage with "... failed to run: CMD, exited with N" (dvc/stage/exceptions.py).
_DVC_EXIT = re.compile(r"exited with (-?\d+)\s*$")
# What stages.core.door.run_stage prints: "NAME: error: ..." / "NAME: transient failure ...".
_STAGE_REASON = re.compile(r"^[\w.-]+: (error|transient failure|internal error)\b")


class StageError(RuntimeError):
    """A stage (or DVC around it) failed; `reason` is the one line worth showing."""

    def __init__(self, stage: str, code: int | None, reason: str) -> None:
        self.stage, self.code, self.reason = stage, code, reason
        super().__init__(f"{stage}: {reason}" if not reason.startswith(f"{stage}:") else reason)


class StageTransient(StageError):
    """Exit 75, a death by signal, or DVC's repo lock held by another process: a retry may
    cure it."""


class StageBadInput(StageError):
    """Exit 2: bad data or configuration; running it again cannot help."""


class StageTimeout(StageError):
    """Ran past its time limit and was killed. Not retried: a slow stage stays slow."""


@dataclass(frozen=True)
class Plan:
    """The stages to consider, in dependency order, and which of them need a DVC run."""

    order: list[str]  # the selected stages
    all_stages: list[str]  # every stage of dvc.yaml
    stale: dict[str, str]  # stage -> why DVC says it changed
    to_run: list[str]  # stale, or downstream of a stale stage: DVC decides again when run
    skipped_upstream: list[str] = field(default_factory=list)  # stale but not selected
    remote: str | None = None  # the default DVC remote, if one is set


# -- planning ------------------------------------------------------------------------------


def plan_stages(root: Path, selected: Sequence[str] | None = None) -> Plan:
    """Ask DVC once, in process, what is stale; everything downstream of that may change too."""
    import networkx as nx  # DVC's own dependency
    from dvc.exceptions import DvcException
    from dvc.repo import Repo  # lazy: ~0.5 s, and only this function needs it

    top = (root / "dvc.yaml").resolve()
    try:
        with Repo(str(root)) as repo:
            # The top-level dvc.yaml's stages, named by stage and file: DVC's `addressing` is
            # relative to the process's working directory.
            names = {stage: stage.name for stage in repo.index.stages
                     if getattr(stage, "name", None) and Path(stage.dvcfile.path).resolve() == top}
            needs = nx.relabel_nodes(repo.index.graph, names)  # edges: stage -> its deps
            position = {names.get(s, s): i for i, s in enumerate(repo.index.stages)}
            # Dependencies first; file order among stages that do not depend on each other.
            order = [s for s in nx.lexicographical_topological_sort(
                needs.reverse(copy=False), key=lambda s: position.get(s, 0)) if s in names.values()]
            unknown = sorted(set(selected or ()) - set(order))
            if unknown:
                raise StageBadInput("flow", EXIT_BAD_INPUT,
                                    f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has: "
                                    f"{', '.join(order)}")
            by_address = {stage.addressing: name for stage, name in names.items()}
            stale = {by_address[addr]: _why(changes) for addr, changes in repo.status().items()
                     if addr in by_address}
            chosen = [s for s in order if selected is None or s in selected]
            downstream = set().union(*(nx.ancestors(needs, s) for s in stale))
            upstream = set().union(*(nx.descendants(needs, s) for s in chosen))
            remote = repo.config["core"].get("remote")
    except DvcException as err:  # dvc.yaml or params.yaml invalid, not a DVC repo, ...
        detail = f": {err.__cause__}" if err.__cause__ else ""
        raise StageBadInput("dvc", EXIT_BAD_INPUT, f"{err}{detail}".splitlines()[0]) from None
    to_run = [s for s in chosen if s in stale or s in downstream]
    skipped = [s for s in order if s in stale and s not in chosen and s in upstream]
    return Plan(order=chosen, all_stages=order, stale=stale, to_run=to_run,
                skipped_upstream=skipped, remote=remote)


def _why(changes: Iterable[Any]) -> str:
    """DVC's status entry for a stage, shortened to one line ("changed deps: params.yaml")."""
    parts = []
    for change in changes:
        if isinstance(change, dict):
            parts += [f"{kind}: {', '.join(map(str, what)) if isinstance(what, dict) else what}"
                      for kind, what in change.items()]
        else:
            parts.append(str(change))
    return "; ".join(parts) or "changed"


# -- params overrides, as `dvc exp run -S` applies them ------------------------------------


def apply_overrides(root: Path, overrides: Sequence[str]) -> list[str]:
    """Apply Hydra-style overrides (`key=value`, `+key=value`, `~key`) to params.yaml in
    place with DVC's own code, so `dvc repro` records them in dvc.lock; return one line per
    changed key. A bad override or a file stages/params.py refuses restores the file and raises.
    """
    if not overrides:
        return []
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides as dvc_apply

    from stages.params import load_params  # pydantic only: no torch, no tracking client

    path = root / "params.yaml"
    before_text = path.read_text()
    before = yaml.safe_load(before_text) or {}
    try:
        dvc_apply(path, list(overrides))
        after = yaml.safe_load(path.read_text()) or {}
        load_params(path)
    except BaseException as err:
        path.write_text(before_text)
        if not isinstance(err, Exception):  # interrupted: the file is back, the run ends
            raise
        reason = (f"bad override {list(overrides)}: {err.__cause__ or err}"
                  if isinstance(err, InvalidArgumentError) else str(err))
        raise StageBadInput("params", EXIT_BAD_INPUT, reason.splitlines()[0]) from None
    changes = differences(before, after)
    if not changes:
        path.write_text(before_text)  # same values: keep the user's formatting
    return changes


# -- running a stage -----------------------------------------------------------------------


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment (TELEMETRY_OFF where unset), this interpreter's folder first on PATH:
    dvc.yaml says `python`, and that must be the interpreter that has the project installed
    even when nobody activated the virtualenv (`.venv/bin/imagepipe run`, a Prefect worker)."""
    env = {**TELEMETRY_OFF, **os.environ}
    bindir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != bindir:
        env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    env.update(extra or {})
    return env


@dataclass
class Finished:
    code: int
    tail: list[str]  # last lines of stderr+stdout (or stderr alone when stdout is captured)
    stdout: str
    seconds: float


def run_killable(cmd: Sequence[str], cwd: Path, env: dict[str, str], timeout_s: float | None,
                 on_line: Callable[[str], None], capture_stdout: bool = False) -> Finished:
    """Run `cmd` in its own process group, each output line to `on_line`; past `timeout_s`
    the whole group (DVC, the shell, the stage and its workers) is killed, not just DVC.
    The code is 128 + N when signal N ended the command (as the guard, orphans.py, reports it;
    negative only where there is no guard or the guard itself was killed); raises TimeoutError
    on timeout.
    """
    start = time.perf_counter()
    # Captured stdout (a command's JSON answer) stays apart from its log lines on stderr.
    stderr = subprocess.PIPE if capture_stdout else subprocess.STDOUT
    proc = subprocess.Popen(guarded(cmd, KILL_GRACE_S), cwd=cwd, env=env, process_group=0,
                            preexec_fn=die_with_parent(signal.SIGTERM),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                            text=True, errors="replace")
    tail: deque[str] = deque(maxlen=200)
    out: list[str] = []
    stream = proc.stderr if capture_stdout else proc.stdout
    readers = [_pump(stream, lambda line: (tail.append(line), on_line(line)))]
    if capture_stdout:
        readers.append(_pump(proc.stdout, out.append))
    _LIVE.add(proc)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc, KILL_GRACE_S)
        raise TimeoutError(f"ran past {timeout_s:g} s") from None
    except BaseException:
        # Cancelled, interrupted, or the flow's own process is ending: leave no orphan behind.
        kill_group(proc, KILL_GRACE_S)
        raise
    finally:
        _LIVE.discard(proc)
        for reader in readers:
            reader.join(timeout=5)
    return Finished(proc.returncode, list(tail), "".join(out), time.perf_counter() - start)


_LIVE: set[subprocess.Popen[str]] = set()


def kill_live_groups() -> None:
    """Kill every stage process group still running (the flow process is going away)."""
    for proc in list(_LIVE):
        kill_group(proc, grace_s=2.0)


def _pump(stream: Any, sink: Callable[[str], None]) -> threading.Thread:
    def pump() -> None:
        for line in stream:
            sink(line.rstrip("\n"))
        stream.close()

    # In the caller's context: Prefect keeps its settings (the API URL) and the task run in
    # context variables, and a thread without them would log to a new temporary server.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(pump,), daemon=True)
    thread.start()
    return thread


def repro_command(stage: str) -> list[str]:
    return [sys.executable, "-m", "dvc", "repro", "--single-item", stage]


def run_dvc_stage(root: Path, stage: str, env: dict[str, str], timeout_s: float | None,
                  on_line: Callable[[str], None]) -> Finished:
    """`dvc repro --single-item STAGE`; a failure raises the StageError subclass it deserves."""
    try:
        done = run_killable(repro_command(stage), root, env, timeout_s, on_line)
    except TimeoutError as err:
        raise StageTimeout(stage, None, f"{err}; its process group was killed") from None
    if done.code != 0:
        raise classify(stage, done.code, done.tail)
    return done


def classify(stage: str, dvc_code: int, tail: list[str]) -> StageError:
    """Map DVC's exit and output to an error type: the stage's own exit code when DVC reports
    one ("exited with N"), else DVC's."""
    reports = [(i, int(m.group(1))) for i, line in enumerate(tail) if (m := _DVC_EXIT.search(line))]
    dvc_line, code = reports[-1] if reports else (None, dvc_code)
    reason = _reason(tail, dvc_line)
    if code == EXIT_TRANSIENT:
        return StageTransient(stage, code, reason)
    if code < 0 or 128 < code <= 128 + 64:  # killed by a signal (directly, or as the shell says)
        sig = -code if code < 0 else code - 128
        return StageTransient(stage, code, f"killed by signal {_signame(sig)}: {reason}")
    if code == EXIT_BAD_INPUT:
        return StageBadInput(stage, code, reason)
    if code == EXIT_BUG:  # an unexpected exception in the stage: its traceback is in the log
        return StageError(stage, code, f"a bug, not retried (exit {code}): {reason}")
    if dvc_line is None and any("Unable to acquire lock" in line for line in tail):
        return StageTransient(stage, code, reason)  # another DVC process holds the repo
    return StageError(stage, code, f"exit {code}: {reason}")


def _reason(tail: list[str], dvc_line: int | None) -> str:
    """The stage's own one-line reason, else the last line before DVC's error that is not one of
    DVC's own, else DVC's; with no DVC error line, the last line."""
    lines = [line.strip() for line in tail[:dvc_line] if line.strip()]
    own = [line for line in lines if _STAGE_REASON.match(line)]
    if own:
        return own[-1]
    if dvc_line is None:
        return lines[-1] if lines else "no output"
    before = [line for line in lines if not line.startswith("ERROR:")] or lines
    return before[-1] if before else tail[dvc_line].strip()


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)
