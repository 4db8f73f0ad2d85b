"""Exit codes of every stage, and the door that maps exceptions to them.

0 done; 2 bad input or configuration (never retried: retrying cannot help);
75 transient failure (retried by the flow); 143 terminated by SIGTERM (a crash by signal:
transient too). See ARCHITECTURE.md, "Contracts".
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_TRANSIENT = 75  # EX_TEMPFAIL from sysexits.h: "try again later"

log = logging.getLogger("imagepipe")


class BadInput(Exception):
    """Bad data or configuration: the message is the one line the user sees."""


class Transient(Exception):
    """A failure that a retry may cure: a server unreachable, a device out of memory."""


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that `except Exception` in
    a stage does not swallow it while atomic writes and tracking still clean up on the way."""


EXIT_TERMINATED = 128 + signal.SIGTERM  # what a shell reports for a SIGTERM-killed process


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


def _run_body(name: str, body: Callable[[], object]) -> int:
    try:
        body()
    except BadInput as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Transient as err:
        print(f"{name}: transient failure (retry may help): {err}", file=sys.stderr)
        return EXIT_TRANSIENT
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{name}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    return EXIT_OK


def run_stage(name: str, body: Callable[[], object], *, track: bool = True) -> int:
    """Run a stage body and return its exit code; one line on stderr for a known failure.

    With `track`, a stage that dvc.yaml declares gets an MLflow child run named `name` (unless
    IMAGEPIPE_TRACKING=0), opened before the body (MLFLOW_RUN_ID is set while it runs)
    and filled from the files dvc.yaml declares for the stage after it: see
    stages/core/tracking.py. The body runs even when tracking is down; the exit code is then
    75. SIGTERM ends the body and the run (FAILED) cleanly, exit code 143.
    """
    configure_logging()
    stage_run = None
    try:
        with _sigterm_unwinds():
            if track:
                from stages.core.tracking import StageRun  # imports mlflow only to open a run

                stage_run = StageRun.start(name)
            code = _run_body(name, body)
            if stage_run is not None:
                code = stage_run.finish(code)
    except Terminated:
        print(f"{name}: terminated", file=sys.stderr)
        code = EXIT_TERMINATED
        if stage_run is not None and not stage_run.finished:
            stage_run.finish(code)  # the signal fell between body and finish: end it FAILED
    return code
