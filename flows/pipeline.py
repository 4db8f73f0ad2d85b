"""imagepipe-pipeline: the Prefect flow that runs the DVC stages, then the promotion gate.

params overrides (as `dvc exp run -S`) -> one in-process DVC status (the plan) -> one task per
dvc.yaml stage, in dependency order (`dvc repro --single-item STAGE` for those that may need
work) -> `imagepipe promote --json` -> `dvc push` (when asked and a remote is set) -> a markdown
artifact. Prefect decides when, where, how often and how long; DVC decides what is stale, so
dvc.lock stays the truth whichever way a run was started. `imagepipe run` is commands/run.py.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run, task_run
from prefect.states import State
from prefect.tasks import exponential_backoff

from flows import dvcstage, localapi, report, slots
from flows.dvcstage import RETRIES, RETRY_DELAY_S, Plan, StageError, StageTransient
from flows.orphans import kill_group
from stages.core.host import FLOW_RUN_ENV

FLOW_NAME = "imagepipe-pipeline"
ARTIFACT_KEY = "imagepipe-pipeline"
# One slot per GPU: a training stage holds as many as its `devices` for its whole run (slots.py).
GPU_LIMIT = "gpu"
GPU_STAGES = ("pretrain", "finetune", "scratch")
# The stage whose run registers a challenger version (stages/export.py): when it did not run,
# no challenger at all means nothing to promote, not a failure.
REGISTERS = "export"
# Per-stage wall-clock limits; past them the stage's process group is killed.
TIMEOUTS_S = {"pretrain": 6 * 3600.0, "finetune": 6 * 3600.0, "scratch": 6 * 3600.0}
DEFAULT_TIMEOUT_S = 3600.0
STARTUP_TIMEOUT_S = 180  # the first start of Prefect's temporary API creates its database


def _retry_only_transient(task_: Any, run: TaskRun, state: State[Any]) -> bool:
    """Retry a StageTransient only (exit 75, a death by signal, DVC's lock held); never exit
    2, a bug (70), or a timeout."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, StageTransient)


def _lineage_env() -> dict[str, str]:
    """What the stages' MLflow tracking reads to tag its runs and find the parent run."""
    run_id = str(flow_run.get_id() or "")
    return {FLOW_RUN_ENV: run_id} if run_id else {}


# The flow gives every call its retries (stage_retries, doubling from retry_delay_s); the stage
# and promote tasks retry only what may heal (_TRANSIENT), dvc push any failure.
_TASK: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}
_TRANSIENT: dict[str, Any] = {"retry_condition_fn": _retry_only_transient, "retry_jitter_factor": 0.2}


@task(name="stage", task_run_name="{stage}", **_TASK, **_TRANSIENT)
def stage_task(stage: str, project_dir: str, needed: bool,
               timeout_s: float | None) -> dict[str, Any]:
    """One dvc.yaml stage through DVC, holding the GPU slots it trains on; `needed=False` (DVC
    said up to date) spawns nothing."""
    if not needed:
        return {"outcome": "up to date", "seconds": 0.0, "attempts": 0}
    logger = get_run_logger()
    with gpu_slot(_gpus_wanted(Path(project_dir), stage)) as device_env:
        done = dvcstage.run_dvc_stage(Path(project_dir), stage,
                                      dvcstage.child_env({**_lineage_env(), **device_env}),
                                      timeout_s, logger.info)
    skipped = any("didn't change, skipping" in line for line in done.tail)
    return {"outcome": "up to date (DVC)" if skipped else "ran",
            "seconds": round(done.seconds, 2), "attempts": task_run.get_run_count()}


@task(name="promote", **_TASK, **_TRANSIENT)
def promote_task(project_dir: str, timeout_s: float, exported: bool = True) -> dict[str, Any]:
    """`imagepipe promote --json`: 0 promoted or not, 2 bad input, 75 tracking unreachable.
    exported=False (this run exported nothing): no challenger at all is "nothing to promote"
    (a fresh clone's store, say), not a failure."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "commands.cli", "promote", "--json"]
    cmd += [] if exported else ["--missing-ok"]
    done = dvcstage.run_killable(cmd, Path(project_dir), dvcstage.child_env(_lineage_env()),
                                 timeout_s, logger.info, capture_stdout=True)
    if done.code != 0:
        raise dvcstage.classify("promote", done.code, done.tail)
    lines = [ln for ln in done.stdout.splitlines() if ln.strip().startswith("{")]
    if not lines:
        raise StageError("promote", 0, "printed no JSON object on stdout")
    decision = json.loads(lines[-1])
    from commands.promote import said  # the words `imagepipe promote` prints

    logger.info("promotion: %s", said(decision))
    return decision


@task(name="dvc-push", **_TASK)
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
             project_dir: str = ".") -> dict[str, Any]:
    """Run the dvc.yaml stages (all, or `stages`) in dependency order, then the promotion gate.

    set_params: `key=value` overrides, applied to params.yaml as `dvc exp run -S` does.
    push: `dvc push` at the end when a DVC remote is set. timeouts_s: per-stage limits.
    """
    logger = get_run_logger()
    began = time.perf_counter()
    root = Path(project_dir).resolve()
    overrides = dvcstage.apply_overrides(root, set_params or [])
    for line in overrides:
        logger.info("params override: %s", line)
    plan = _planned(root, stages)
    _log_plan(plan)
    if plan.to_run or promote:
        _prewarm_tracking(root)
    limits = {**TIMEOUTS_S, **(timeouts_s or {})}
    results: dict[str, dict[str, Any]] = {s: {"outcome": "not reached"} for s in plan.order}
    decision: dict[str, Any] | None = None
    note = ""
    try:
        options = {"retries": stage_retries,
                   "retry_delay_seconds": exponential_backoff(retry_delay_s)}
        for name in plan.order:
            results[name] = {"outcome": "failed"}
            try:
                results[name] = stage_task.with_options(**options)(
                    name, str(root), name in plan.to_run, limits.get(name, DEFAULT_TIMEOUT_S))
            except StageError as err:
                results[name] = {"outcome": f"failed: {err}"}
                raise
        try:
            decision, note = _promotion(root, plan, promote, options,
                                        limits.get("promote", DEFAULT_TIMEOUT_S),
                                        exported=results.get(REGISTERS, {}).get("outcome")
                                        == "ran")
        except StageError as err:  # the artifact says it ran and failed, not "Not run."
            note = f"**Failed**: {err}"
            raise
        if push:
            _push(root, plan, options, limits.get("push", DEFAULT_TIMEOUT_S))
    finally:
        _artifact(root, results, overrides, decision, note)
        busy = sum(r.get("seconds", 0.0) for r in results.values() if "seconds" in r)
        logger.info("stage processes %.1f s of this flow's %.1f s", busy,
                    time.perf_counter() - began)
    return {"stages": results, "promotion": decision, "overrides": overrides}


def _prewarm_tracking(root: Path) -> None:
    """Start the project's tracking agent now (stages/core/tracking/remote.py): its mlflow import
    overlaps DVC's start-up instead of delaying the first stage (or the promotion, which runs
    there too). Only with tracking on, for the code the stages run (this project's `stages`)."""
    from stages.core.tracking import remote
    from stages.core.tracking.store import tracking_enabled

    if tracking_enabled() and remote.CODE == root:
        # The stages' environment: it names their agent (channel.code_key).
        remote.prewarm(dvcstage.child_env(_lineage_env()))


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


def _promotion(root: Path, plan: Plan, promote: bool, options: dict[str, Any],
               timeout_s: float, exported: bool) -> tuple[dict[str, Any] | None, str]:
    """Run the gate when the pipeline's last stage was part of this run; else say why not.

    Always re-scored, never cached here: the registry can change without dvc.lock changing (a
    rollback, a challenger registered from another machine), and caching is DVC's job."""
    if not promote:
        return None, "Skipped (promote=False)."
    from stages.core.tracking.store import SWITCH_ENV, tracking_enabled

    if not tracking_enabled():
        return None, f"Skipped: tracking is off ({SWITCH_ENV}=0), so no version was registered."
    if not plan.order or plan.order[-1] != plan.all_stages[-1]:
        return None, f"Skipped: the run stopped before {plan.all_stages[-1]!r}."
    return promote_task.with_options(**options)(str(root), timeout_s, exported), ""


def _push(root: Path, plan: Plan, options: dict[str, Any], timeout_s: float) -> None:
    if not plan.remote:
        get_run_logger().warning("push requested but no default DVC remote is set: skipped "
                                 "(dvc remote add -d NAME URL)")
        return
    push_task.with_options(**options)(str(root), plan.remote, timeout_s)


def _artifact(root: Path, results: dict[str, dict[str, Any]], overrides: list[str],
              decision: dict[str, Any] | None, note: str) -> None:
    """The run's summary (decision and headline figures first) and, as a table, every metric."""
    metrics = report.read_metrics(root / "metrics")
    markdown = report.render(
        title=f"imagepipe pipeline: {flow_run.get_name() or 'run'}", flow_run_id=flow_run.get_id(),
        stages=results, overrides=overrides, metrics=metrics, decision=decision,
        promotion_note=note)
    create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY,
                             description="Promotion decision, headline figures, stages, MLflow runs")
    rows = report.metric_rows(metrics)
    if rows:
        create_table_artifact(table=rows, key=report.METRICS_KEY,
                              description="Every scalar of metrics/*.json")


# Plans that `imagepipe run` started before the flow (DVC's status check overlaps the API's start-up
# and the flow run's creation); valid while dvc.yaml, dvc.lock and params.yaml keep their
# modification times (a second later, in practice).
_PLANS: dict[tuple[Any, ...], Future[Plan]] = {}


# -- GPU slots ----------------------------------------------------------------------------

# The URL of the temporary API that `api()` started, if any: there the `gpu` limit is not used.
_TEMPORARY_API_URL: str | None = None


def uses_server_limit() -> bool:
    """True against a real Prefect server (PREFECT_API_URL set by the user, a worker, a test)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return bool(url) and url != _TEMPORARY_API_URL


def _gpus_wanted(root: Path, stage: str) -> int:
    """GPU slots `stage` holds: a training stage's `devices` param (`auto`: every slot of this
    machine), none for the others. A params.yaml that does not load (the stage itself reports
    it) asks for one."""
    if stage not in GPU_STAGES:
        return 0
    from stages.params import load_params

    try:
        params = load_params(root / "params.yaml")
    except Exception:  # noqa: BLE001 - the stage says what is wrong, with its exit code
        return 1
    section = "finetune" if stage == "scratch" else stage  # the baseline trains as finetune
    devices = getattr(params, section).devices
    return slots.gpu_slots() if devices == "auto" else int(devices)


@contextlib.contextmanager
def gpu_slot(gpus: int) -> Iterator[dict[str, str]]:
    """Hold `gpus` GPU slots of this machine (and as many of the server's `gpu` limit); yield
    the env that points the stage at them. See flows/slots.py for why two layers."""
    if gpus <= 0:
        yield {}
        return
    logger = get_run_logger()
    count = slots.gpu_slots()
    want = min(gpus, count)
    if want < gpus:
        logger.warning("the stage asks for %d GPUs; this machine has %d slot(s): it gets %d",
                       gpus, count, want)
    with contextlib.ExitStack() as held:
        indices = held.enter_context(slots.local_gpu_slots(count, want, on_wait=logger.info))
        if uses_server_limit():
            ensure_concurrency_limit(GPU_LIMIT, count)
            held.enter_context(concurrency(GPU_LIMIT, occupy=want, strict=True,
                                           raise_on_lease_renewal_failure=False))
        yield slots.device_env(indices, count)


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


# -- what `imagepipe run` (commands/run.py) starts around the flow ------------------------


@contextlib.contextmanager
def api() -> Iterator[None]:
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
    proc, url = localapi.start()
    # Stopped after Prefect's log and event workers drain (their atexit hooks run first).
    atexit.register(kill_group, proc, 10.0)
    try:
        _TEMPORARY_API_URL = localapi.ready(proc, url, timeout)
        with temporary_settings(updates={PREFECT_API_URL: _TEMPORARY_API_URL}):
            yield
    finally:
        _TEMPORARY_API_URL = None


def plan_ahead(root: Path, stages: list[str] | None) -> None:
    """Start DVC's status check in a thread; the flow takes its result if nothing moved. A
    daemon thread, not an executor's: a Ctrl-C or SIGTERM during the check must not wait for
    it (an executor's threads are joined at exit; the flow asks DVC again if it needs to)."""
    future: Future[Plan] = Future()

    def plan() -> None:
        try:
            future.set_result(dvcstage.plan_stages(root, stages))
        except BaseException as err:  # noqa: BLE001 - the flow asks again and reports the error itself
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
