"""imagepipe-pipeline: the Prefect flow that runs the DVC stages, then the promotion gate.

params overrides (as `dvc exp run -S`) -> one in-process DVC status (the plan) -> one task per
dvc.yaml stage, in dependency order (`dvc repro --single-item STAGE` for those that may need
work) -> `imagepipe promote --json` -> `dvc push` (when asked and a remote is set) -> a markdown
artifact. Prefect decides when, where, how often and how long; DVC decides what is stale, so
dvc.lock stays the truth whichever way a run was started. `imagepipe run` is `main()`.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run, task_run
from prefect.states import State

from flows import dvcstage, report, slots
from flows.dvcstage import Plan, StageBadInput, StageError, StageTransient
from flows.localapi import APIUnavailable, TemporaryAPI
from stages.core.io import write_json

FLOW_NAME = "imagepipe-pipeline"
ARTIFACT_KEY = "imagepipe-pipeline"
# One slot per GPU: a training stage holds one for its whole run (see README, "GPU slots").
GPU_LIMIT = "gpu"
GPU_STAGES = ("pretrain", "finetune")
# Per-stage wall-clock limits; past them the stage's process group is killed.
TIMEOUTS_S = {"pretrain": 6 * 3600.0, "finetune": 6 * 3600.0}
DEFAULT_TIMEOUT_S = 3600.0
RETRIES = 3
STARTUP_TIMEOUT_S = 180  # the first start of Prefect's temporary API creates its database
RETRY_DELAY_S = 10.0  # then 20, 40: a tracking server or a GPU often needs a minute back
# Where the last promotion decision is kept with the dvc.lock it was made for: a re-run with
# nothing changed reuses it instead of re-scoring both models (seconds of MLflow and ONNX).
PROMOTION_RECORD = Path("reports/promotion.json")


def _retry_only_transient(task_: Any, run: TaskRun, state: State[Any]) -> bool:
    """Retry exit 75 and deaths by signal; never exit 2, a crash, or a timeout."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        with contextlib.suppress(Exception):
            exc = state.result(raise_on_failure=False)
    return isinstance(exc, StageError) and exc.retryable


def _lineage_env() -> dict[str, str]:
    """What the stages' MLflow tracking reads to tag its runs and find the parent run."""
    run_id = str(flow_run.get_id() or "")
    return {"IMAGEPIPE_FLOW_RUN_ID": run_id, "IMAGEPIPE_PIPELINE_ID": run_id} if run_id else {}


def _backoff(retries: int, first_s: float) -> list[float]:
    return [first_s * 2**i for i in range(max(retries, 1))]


@task(name="stage", task_run_name="{stage}", retries=RETRIES,
      retry_delay_seconds=_backoff(RETRIES, RETRY_DELAY_S), retry_jitter_factor=0.2,
      retry_condition_fn=_retry_only_transient, cache_policy=NO_CACHE, persist_result=False)
def stage_task(stage: str, project_dir: str, needed: bool, timeout_s: float | None,
               gpu: bool) -> dict[str, Any]:
    """One dvc.yaml stage through DVC; `needed=False` (DVC said up to date) spawns nothing."""
    if not needed:
        return {"outcome": "up to date", "seconds": 0.0, "attempts": 0}
    logger = get_run_logger()
    with gpu_slot(gpu) as device_env:
        done = dvcstage.run_dvc_stage(Path(project_dir), stage,
                                      dvcstage.child_env({**_lineage_env(), **device_env}),
                                      timeout_s, logger.info)
    skipped = any("didn't change, skipping" in line for line in done.tail)
    return {"outcome": "up to date (DVC)" if skipped else "ran",
            "seconds": round(done.seconds, 2), "attempts": task_run.get_run_count()}


@task(name="promote", retries=RETRIES, retry_delay_seconds=_backoff(RETRIES, RETRY_DELAY_S),
      retry_jitter_factor=0.2, retry_condition_fn=_retry_only_transient, cache_policy=NO_CACHE,
      persist_result=False)
def promote_task(project_dir: str, timeout_s: float) -> dict[str, Any]:
    """`imagepipe promote --json`: 0 promoted or not, 2 bad input, 75 tracking unreachable."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "stages.cli", "promote", "--json"]
    done = dvcstage.run_killable(cmd, Path(project_dir), dvcstage.child_env(_lineage_env()),
                                 timeout_s, logger.info, capture_stdout=True)
    if done.code != 0:
        raise dvcstage.classify("promote", done.code, done.tail)
    lines = [ln for ln in done.stdout.splitlines() if ln.strip().startswith("{")]
    if not lines:
        raise StageError("promote", 0, "printed no JSON object on stdout")
    decision = json.loads(lines[-1])
    logger.info("promotion: %s", decision)
    return decision


@task(name="dvc-push", retries=RETRIES, retry_delay_seconds=_backoff(RETRIES, RETRY_DELAY_S),
      cache_policy=NO_CACHE, persist_result=False)
def push_task(project_dir: str, remote: str, timeout_s: float) -> None:
    """`dvc push`: any failure is retried (a remote is a network service)."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "push"]
    done = dvcstage.run_killable(cmd, Path(project_dir), dvcstage.child_env(), timeout_s,
                                 logger.info)
    if done.code != 0:
        raise StageTransient("dvc push", done.code, f"to remote {remote!r} failed: "
                             + (done.tail[-1] if done.tail else f"exit {done.code}"))


@flow(name=FLOW_NAME, log_prints=False)
def pipeline(stages: list[str] | None = None, set_params: list[str] | None = None,
             push: bool = False, promote: bool = True, stage_retries: int = RETRIES,
             retry_delay_s: float = RETRY_DELAY_S, timeouts_s: dict[str, float] | None = None,
             gpu_stages: list[str] | None = None, project_dir: str = ".") -> dict[str, Any]:
    """Run the dvc.yaml stages (all, or `stages`) in dependency order, then the promotion gate.

    set_params: `key=value` overrides, applied to params.yaml as `dvc exp run -S` does.
    push: `dvc push` at the end when a DVC remote is set. timeouts_s: per-stage limits.
    """
    logger = get_run_logger()
    began = time.perf_counter()
    root = Path(project_dir).resolve()
    overrides = dvcstage.apply_overrides(root, set_params or [], validate=_params_validator(root))
    for line in overrides:
        logger.info("params override: %s", line)
    plan = _planned(root, stages)
    _log_plan(plan)
    gpu = set(GPU_STAGES if gpu_stages is None else gpu_stages)
    limits = {**TIMEOUTS_S, **(timeouts_s or {})}
    results: dict[str, dict[str, Any]] = {s: {"outcome": "not reached"} for s in plan.order}
    decision: dict[str, Any] | None = None
    note = ""
    try:
        options = {"retries": stage_retries,
                   "retry_delay_seconds": _backoff(stage_retries, retry_delay_s)}
        for name in plan.order:
            results[name] = {"outcome": "failed"}
            try:
                results[name] = stage_task.with_options(**options)(
                    name, str(root), name in plan.to_run, limits.get(name, DEFAULT_TIMEOUT_S),
                    name in gpu)
            except StageError as err:
                results[name] = {"outcome": f"failed: {err}"}
                raise
        ran = any(r["outcome"] == "ran" for r in results.values())
        decision, note = _promotion(root, plan, promote, ran, options,
                                    limits.get("promote", DEFAULT_TIMEOUT_S))
        if push:
            _push(root, plan, options, limits.get("push", DEFAULT_TIMEOUT_S))
    finally:
        _artifact(root, results, overrides, decision, note)
        busy = sum(r.get("seconds", 0.0) for r in results.values() if "seconds" in r)
        logger.info("stage processes %.1f s of this flow's %.1f s", busy,
                    time.perf_counter() - began)
    return {"stages": results, "promotion": decision, "overrides": overrides}


def _params_validator(root: Path) -> Any:
    """The project's own params schema, when it has one (stages/params.py), else none."""
    if not (root / "stages" / "params.py").is_file():
        return None
    from stages.params import load_params  # pydantic only: no torch, no mlflow

    return load_params


def _log_plan(plan: Plan) -> None:
    logger = get_run_logger()
    fresh = [s for s in plan.order if s not in plan.to_run]
    logger.info("stages: %s", ", ".join(plan.order) or "(none)")
    logger.info("up to date: %s", ", ".join(fresh) or "(none)")
    for name in plan.to_run:
        logger.info("to run: %s (%s)", name, plan.stale.get(name, "downstream of a change"))
    if plan.skipped_upstream:
        logger.warning("stale but not selected, their old outputs are used: %s",
                       ", ".join(plan.skipped_upstream))


def _promotion(root: Path, plan: Plan, promote: bool, ran: bool, options: dict[str, Any],
               timeout_s: float) -> tuple[dict[str, Any] | None, str]:
    """Run the gate when the pipeline's last stage was part of this run and something changed
    since the recorded decision; else say why not (never silently)."""
    logger = get_run_logger()
    if not promote:
        return None, "Skipped (promote=False)."
    if not (root / "stages" / "registry.py").is_file():
        return None, "Skipped: this project has no stages/registry.py (imagepipe promote)."
    if not plan.order or plan.order[-1] != plan.all_stages[-1]:
        return None, f"Skipped: the run stopped before {plan.all_stages[-1]!r}."
    lock = _lock_digest(root)
    record = _read_record(root)
    if not ran and record and record.get("dvc_lock_md5") == lock:
        logger.info("promotion: dvc.lock unchanged since flow run %s; decision reused",
                    record.get("flow_run_id"))
        return record.get("decision"), (
            f"dvc.lock unchanged since flow run `{record.get('flow_run_id')}`: that decision "
            "stands (not re-scored).")
    decision = promote_task.with_options(**options)(str(root), timeout_s)
    _write_record(root, {"dvc_lock_md5": lock, "flow_run_id": flow_run.get_id(),
                         "decision": decision})
    return decision, ""


def _push(root: Path, plan: Plan, options: dict[str, Any], timeout_s: float) -> None:
    if not plan.remote:
        get_run_logger().warning("push requested but no default DVC remote is set: skipped "
                                 "(dvc remote add -d NAME URL)")
        return
    push_task.with_options(**options)(str(root), plan.remote, timeout_s)


def _lock_digest(root: Path) -> str | None:
    path = root / "dvc.lock"
    return hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else None


def _read_record(root: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((root / PROMOTION_RECORD).read_text())
    return None


def _write_record(root: Path, record: dict[str, Any]) -> None:
    write_json(root / PROMOTION_RECORD, record)  # atomic: the old decision or the new one


def _artifact(root: Path, results: dict[str, dict[str, Any]], overrides: list[str],
              decision: dict[str, Any] | None, note: str) -> None:
    markdown = report.render(
        title=f"imagepipe pipeline: {flow_run.get_name() or 'run'}", flow_run_id=flow_run.get_id(),
        stages=results, overrides=overrides, metrics=report.read_metrics(root / "metrics"),
        decision=decision, promotion_note=note)
    create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY,
                             description="Stages, metrics, promotion decision, MLflow runs")


# Plans that main() started before the flow (DVC's status check overlaps the API's start-up
# and the flow run's creation); valid while dvc.yaml, dvc.lock and params.yaml keep their
# modification times (a second later, in practice).
_PLANS: dict[tuple[Any, ...], Future[Plan]] = {}


# -- GPU slots ----------------------------------------------------------------------------

# The URL of the temporary API that main() started, if any: there the `gpu` limit is not used.
_TEMPORARY_API_URL: str | None = None


def uses_server_limit() -> bool:
    """True against a real Prefect server (PREFECT_API_URL set by the user, a worker, a test)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return bool(url) and url != _TEMPORARY_API_URL


@contextlib.contextmanager
def gpu_slot(gpu: bool) -> Iterator[dict[str, str]]:
    """Hold a GPU slot of this machine (and of the server's `gpu` limit); yield the env that
    points the stage at its GPU. See flows/slots.py for why two layers."""
    if not gpu:
        yield {}
        return
    logger = get_run_logger()
    count = slots.gpu_slots()
    with slots.local_gpu_slot(count, on_wait=logger.info) as index:
        if not uses_server_limit():
            yield slots.visible_device(index, count)
            return
        ensure_concurrency_limit(GPU_LIMIT, count)
        with concurrency(GPU_LIMIT, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
            yield slots.visible_device(index, count)


def ensure_concurrency_limit(name: str, limit: int) -> None:
    """Create the global concurrency limit if this Prefect API has none by that name yet;
    an existing one is left as the operator set it (`prefect gcl update gpu --limit N`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):  # another run created it just now
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=limit))
            get_run_logger().info("created concurrency limit %r with %d slot(s)", name, limit)


# -- `imagepipe run` -----------------------------------------------------------------------


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
    parser.add_argument("--timeout", action="append", default=[], metavar="STAGE=SECONDS",
                        help="a stage's time limit (repeatable)")
    return parser.parse_args(argv)


def _timeouts(pairs: list[str]) -> dict[str, float]:
    out = {}
    for pair in pairs:
        stage, _, seconds = pair.partition("=")
        try:
            out[stage] = float(seconds)
        except ValueError:
            raise SystemExit(f"imagepipe run: --timeout wants STAGE=SECONDS, got {pair!r}") from None
    return out


@contextlib.contextmanager
def _api() -> Iterator[None]:
    """The Prefect API for this run: the user's (PREFECT_API_URL), else a temporary local one
    started now and stopped when the run ends."""
    global _TEMPORARY_API_URL
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield
        return
    # The first run on a new machine creates Prefect's database (~30 s here): Prefect's
    # default wait of 20 s would fail the run before it starts.
    timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" not in os.environ:
        timeout = max(timeout, STARTUP_TIMEOUT_S)
    api = TemporaryAPI().start()
    atexit.register(api.stop)  # after Prefect's log and event workers drain (they go first)
    try:
        _TEMPORARY_API_URL = api.wait_ready(timeout)
        with temporary_settings(updates={PREFECT_API_URL: _TEMPORARY_API_URL}):
            yield
    finally:
        _TEMPORARY_API_URL = None


def _plan_ahead(root: Path, stages: list[str] | None) -> None:
    """Start DVC's status check in a thread; the flow takes its result if nothing moved."""
    future: Future[Plan] = Future()

    def plan() -> None:
        try:
            future.set_result(dvcstage.plan_stages(root, stages))
        except BaseException as err:  # the flow asks again and reports the error itself
            future.set_exception(err)

    _PLANS[_plan_key(root, stages)] = future
    threading.Thread(target=plan, name="dvc-plan", daemon=True).start()


def _planned(root: Path, stages: list[str] | None) -> Plan:
    future = _PLANS.pop(_plan_key(root, stages), None)
    if future is not None:
        with contextlib.suppress(Exception):
            return future.result()
    return dvcstage.plan_stages(root, stages)


def _plan_key(root: Path, stages: list[str] | None) -> tuple[Any, ...]:
    stamps = tuple((root / f).stat().st_mtime_ns if (root / f).exists() else None
                   for f in ("dvc.yaml", "dvc.lock", "params.yaml"))
    return (str(root), tuple(stages) if stages is not None else None, stamps)


def _exit_code(exc: BaseException | None) -> int:
    if isinstance(exc, StageBadInput):
        return dvcstage.EXIT_BAD_INPUT
    if isinstance(exc, StageTransient):
        return dvcstage.EXIT_TRANSIENT
    return 1


def _project_root(start: Path) -> Path:
    """The DVC project this command runs in: the nearest folder up with a .dvc/ (as dvc does)."""
    for folder in (start.resolve(), *start.resolve().parents):
        if (folder / ".dvc").is_dir():
            return folder
    return start.resolve()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    # A SIGTERM (CI cancelling, `kill`) unwinds like Ctrl-C, so the running stage's process
    # group is killed too instead of being orphaned.
    signal.signal(signal.SIGTERM, _interrupt)
    atexit.register(dvcstage.kill_live_groups)
    start = time.perf_counter()
    root = _project_root(Path.cwd())
    try:
        if not args.set_param:  # overrides change the plan: it is made after them
            _plan_ahead(root, stages)
        with _api():
            state = pipeline(project_dir=str(root), stages=stages, set_params=args.set_param, push=args.push,
                             promote=not args.no_promote, stage_retries=args.retries,
                             retry_delay_s=args.retry_delay, timeouts_s=_timeouts(args.timeout),
                             return_state=True)
    except KeyboardInterrupt:
        print("imagepipe run: interrupted", file=sys.stderr)
        return 130
    except APIUnavailable as err:
        print(f"imagepipe run: {err}", file=sys.stderr)
        return dvcstage.EXIT_TRANSIENT
    if state.is_completed():
        print(f"imagepipe run: done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        return 0
    exc = state.result(raise_on_failure=False)
    print(f"imagepipe run: {state.type.value.lower()}: {exc}", file=sys.stderr)
    return _exit_code(exc if isinstance(exc, BaseException) else None)
