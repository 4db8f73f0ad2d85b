"""`imagepipe run`: the whole pipeline as the Prefect flow imagepipe-pipeline (flows/pipeline.py).

argv -> checked here, before Prefect is imported (a typo answers in well under a second) ->
Prefect's API (the user's PREFECT_API_URL, else a temporary local one) -> the flow -> an exit
code: 0 done, 2 bad input or configuration, 75 transient (retries spent, or another run holds
the project), 130 interrupted, 70 anything else (a bug or a crash the flow could not classify).

One run per project at a time: .dvc/tmp/imagepipe-run.lock is flock()ed before the flow starts
and held until this process ends (the kernel drops it on any death, kill -9 included, so a
rerun never finds it stale). A second run says who holds it and exits 75, or queues (--wait).
"""

from __future__ import annotations

import argparse
import atexit
import fcntl
import json
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import yaml

from flows.dvcstage import RETRIES, RETRY_DELAY_S
from stages.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_TRANSIENT,
    BadInput,
    Transient,
)
from stages.core.host import project_root


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="imagepipe run",
        description="Run the pipeline as the Prefect flow imagepipe-pipeline: the DVC stages "
                    "that changed, then the promotion gate.")
    parser.add_argument("--stages", help="comma-separated stage names (default: all)")
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param as `dvc exp run -S` does (repeatable)")
    parser.add_argument("--push", action="store_true", help="dvc push at the end (needs a remote)")
    parser.add_argument("--no-promote", action="store_true", help="skip the promotion gate")
    parser.add_argument("--retries", type=int, default=RETRIES,
                        help=f"retries of a transient failure (default {RETRIES})")
    parser.add_argument("--retry-delay", type=float, default=RETRY_DELAY_S,
                        help=f"first retry delay in seconds, doubling (default {RETRY_DELAY_S:g})")
    parser.add_argument("--timeout", action="append", default=[], type=_timeout,
                        metavar="STAGE=SECONDS",
                        help="a stage's time limit (repeatable)")
    parser.add_argument("--wait", action="store_true",
                        help="if another run holds this project, wait for it instead of exiting 75")
    return parser.parse_args(argv)


def _timeout(pair: str) -> tuple[str, float]:
    stage, _, seconds = pair.partition("=")
    try:
        return stage, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants STAGE=SECONDS, got {pair!r}") from None


def _stage_names(root: Path, requested: str | None) -> list[str] | None:
    """The --stages list, each checked against dvc.yaml (read as YAML: no DVC, no Prefect)."""
    if not requested:
        return None
    stages = [s.strip() for s in requested.split(",") if s.strip()]
    try:
        known = list((yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {}))
    except (OSError, yaml.YAMLError) as err:
        raise BadInput(f"cannot read {root / 'dvc.yaml'}: {err}") from None
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise BadInput(f"--stages: unknown stage {', '.join(map(repr, unknown))}; "
                       f"dvc.yaml has: {', '.join(known)}")
    return stages


def _check_overrides(root: Path, overrides: list[str]) -> None:
    """The -S overrides applied to a copy of params.yaml and validated, as the flow will apply
    them to the file itself: a bad one answers in a second or two, before Prefect's API starts
    (tens of seconds on a new PREFECT_HOME). Deployments, which call the flow directly, are
    checked there."""
    if not overrides or not (root / "params.yaml").is_file():
        return
    import shutil
    import tempfile

    from flows.dvcstage import StageBadInput, apply_overrides

    with tempfile.TemporaryDirectory(prefix="imagepipe-params-") as tmp:
        shutil.copy2(root / "params.yaml", Path(tmp) / "params.yaml")
        try:
            apply_overrides(Path(tmp), overrides)
        except StageBadInput as err:
            raise BadInput(err.reason) from None


LOCK_FILE = Path(".dvc") / "tmp" / "imagepipe-run.lock"
_HELD: list[IO[str]] = []  # the open lock file: closing it (or exiting) releases the lock


def lock_project(root: Path, wait: bool) -> None:
    """Take the project's run lock for the rest of this process, or raise Transient naming the
    holder. DVC's own .dvc/tmp/rwlock is taken per stage, and its message when two runs meet
    advises deleting it, which would corrupt the live run; this lock stops the second run first.
    """
    if not (root / ".dvc").is_dir():
        return  # not a DVC project: DVC refuses it with its own message
    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 - held open until the process ends
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(f)
        if not wait:
            f.close()
            raise Transient(f"another run ({holder}) holds {root}; wait for it to finish, "
                            "or run again with --wait to start when it does") from None
        print(f"imagepipe run: waiting for the run that holds {root} ({holder})", file=sys.stderr)
        fcntl.flock(f, fcntl.LOCK_EX)
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "since": datetime.now(UTC).isoformat(timespec="seconds"),
                        "argv": sys.argv}) + "\n")
    f.flush()
    _HELD.append(f)


def _holder(f: IO[str]) -> str:
    f.seek(0)
    try:
        info = json.loads(f.read() or "{}")
        return f"pid {info['pid']}, since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "pid unknown: it is starting"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    root = project_root()
    try:
        stages = _stage_names(root, args.stages)
        _check_overrides(root, args.set_param)
        lock_project(root, args.wait)
        return _run_flow(root, args, stages, dict(args.timeout))
    except (BadInput, Transient) as err:  # also a busy project, Prefect's API, a stage's failure
        print(f"imagepipe run: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(err, BadInput) else EXIT_TRANSIENT
    except KeyboardInterrupt:
        print("imagepipe run: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run_flow(root: Path, args: argparse.Namespace, stages: list[str] | None,
              timeouts: dict[str, float]) -> int:
    from flows import dvcstage, pipeline

    # A SIGTERM (CI cancelling, `kill`) unwinds like Ctrl-C, so the running stage's process
    # group is killed too instead of being orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    atexit.register(dvcstage.kill_live_groups)
    start = time.perf_counter()
    if not args.set_param:  # overrides change the plan: it is made after them
        pipeline.plan_ahead(root, stages)
    with pipeline.api():
        state = pipeline.pipeline(
            project_dir=str(root), stages=stages, set_params=args.set_param, push=args.push,
            promote=not args.no_promote, stage_retries=args.retries,
            retry_delay_s=args.retry_delay, timeouts_s=timeouts, return_state=True)
    if state.is_completed():
        print(f"imagepipe run: done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        return 0
    exc = state.result(raise_on_failure=False)
    why = f"{state.type.value.lower()}: {exc}"
    if isinstance(exc, dvcstage.StageBadInput):
        raise BadInput(why)
    if isinstance(exc, dvcstage.StageTransient):
        raise Transient(why)
    print(f"imagepipe run: {why}", file=sys.stderr)  # a bug, a crash, a timeout
    return EXIT_BUG
