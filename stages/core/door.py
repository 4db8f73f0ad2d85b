"""The stage door: every stage's main() parses its command line with `arguments` and ends in
run_stage(name, body), which sets up the process (logging, thread policy, SIGTERM), opens the
stage's MLflow run, runs the body, and maps what it raised to the exit codes of
stages/core/errors.py.

It sits above everything a stage calls; nothing in stages/core imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from stages.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_TRANSIENT,
    BadInput,
    Terminated,
    Transient,
    peer_lost,
)

log = logging.getLogger("imagepipe")


def arguments(stage: str, doc: str | None, argv: list[str] | None, **paths: str
              ) -> argparse.Namespace:
    """`python -m stages.STAGE`'s command line: --params, and a --NAME PATH for each of `paths`
    (NAME's underscores written as dashes; the value its default, what dvc.yaml passes)."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}",
                                     description=doc and doc.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    for name, default in paths.items():
        parser.add_argument("--" + name.replace("_", "-"), default=default, type=Path)
    return parser.parse_args(argv)


def configure_process() -> None:
    """Process-wide settings of a stage, made here and not at import time.

    OpenMP threads spin while they wait by default: on a CPU that other processes share, two
    spinning threads ran a resnet_small step 12-25x slower than passive ones (235-460 ms vs
    19-40 ms, measured). The price on a quiet machine: finetune-sized steps (batch 16, 16 px,
    2 threads) took 11.8 ms passive against 4.4 ms spinning; on a loaded one 22.7 against
    75.3 ms. Passive is kept as the default because a stage rarely has the CPU to itself (the
    flow, Prefect's API, DVC); a user who does sets OMP_WAIT_POLICY=ACTIVE, which is kept.
    Torch's OpenMP runtime reads it once when it loads, so it is set before any stage body
    imports torch (stage modules import torch lazily).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into Terminated for the duration (main thread only: Python's rule)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_body(name: str, body: Callable[[], object]) -> tuple[int, object]:
    """The exit code, and what the body returned (export: the Registration for tracking)."""
    try:
        return EXIT_OK, body()
    except BadInput as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT, None
    except Transient as err:
        print(f"{name}: transient failure (retry may help): {err}", file=sys.stderr)
        return EXIT_TRANSIENT, None
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED, None
    except Exception as err:  # noqa: BLE001 - a bug: the traceback for whoever fixes it, and a code not retried
        if peer_lost(err):  # a peer of a collective gone: the job is retried, not a bug
            print(f"{name}: transient failure (a training process it works with is gone; "
                  f"retry may help): {type(err).__name__}: {str(err).strip()[:300]}",
                  file=sys.stderr)
            return EXIT_TRANSIENT, None
        traceback.print_exc(file=sys.stderr)
        print(f"{name}: internal error (a bug, not retried): {type(err).__name__}: {err}",
              file=sys.stderr)
        return EXIT_BUG, None


def exit_process(code: int) -> NoReturn:
    """End a stage's process with `code` once its outputs are written: atexit handlers run and
    every stream is flushed, but the interpreter's teardown is skipped. Unloading torch's
    thousands of modules and objects took 1.1-1.7 s after a bare `import torch` and 2-4 s
    after pretrain (shared 2-core machine at load 7; benchmarks/bench_pipeline.py's `exit`
    column), a cost paid by every stage of every run for nothing: the process is ending.
    Only for `python -m stages.NAME`; tests call main() and keep their interpreter."""
    import atexit

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code if isinstance(code, int) else 1)


TIMES_ENV = "IMAGEPIPE_STAGE_TIMES"  # a file: benchmarks/bench_pipeline.py's per-stage account


def _record_times(name: str, clock: list[float]) -> None:
    """One JSON line per stage (wall-clock seconds: entered the door, body start and end,
    tracking done) appended to $IMAGEPIPE_STAGE_TIMES where it is set; nothing otherwise."""
    path = os.environ.get(TIMES_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"stage": name, "pid": os.getpid(), "clock": clock}) + "\n")


def run_stage(name: str, body: Callable[[], object], *, track: bool = True) -> int:
    """Run a stage body and return its exit code; one line on stderr for a known failure.

    With `track`, a stage that dvc.yaml declares gets an MLflow child run named `name` (unless
    IMAGEPIPE_TRACKING=0), opened before the body (MLFLOW_RUN_ID is set while it runs) and filled
    from the files dvc.yaml declares for the stage after it, plus what the body returned (export
    returns the model Registration): see stages/core/tracking/. The body runs even when tracking
    is down; the exit code is then 75. SIGTERM ends the body and the run (FAILED) cleanly: 143.
    """
    configure_process()
    stage_run = None
    clock = [time.time()]  # entered, body started, body ended, tracking done
    try:
        with _sigterm_unwinds():
            if track:
                # Kept by the tracking agent (no mlflow import here) or, failing that, in-process.
                from stages.core.tracking.remote import start_stage_run

                stage_run = start_stage_run(name)
            clock.append(time.time())
            code, value = _run_body(name, body)
            clock.append(time.time())
            if stage_run is not None:
                code = stage_run.finish(code, value)
            clock.append(time.time())
            _record_times(name, clock)
    except Terminated:  # in the body, or between the body and finish
        print(f"{name}: terminated", file=sys.stderr)
        code = EXIT_TERMINATED
        if stage_run is not None and not stage_run.finished:
            stage_run.finish(code)  # the run ends FAILED
    return code
