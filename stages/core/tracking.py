"""MLflow, and only here: runs for stages, the model registry and its aliases.

Inputs: the stage's name, what dvc.yaml declares for it (params, metrics, plots, outs, deps),
the files those name, MLFLOW_TRACKING_URI. Outputs: one MLflow child run per stage under one
parent run per pipeline run; for `export`, the logged models and a registry version with the
alias `challenger`. mlflow is imported lazily (inside functions): importing this module costs
nothing, and stages that never track never load it.

Where runs go: MLFLOW_TRACKING_URI when set (a team server), else the SQLite file mlflow.db at
the project root with artifacts in mlartifacts/ beside it. Set IMAGEPIPE_TRACKING=0 to switch
tracking off (unit tests of stage logic; a machine that must not write mlflow.db).

Failure: any tracking error is TrackingDown (exit 75, naming the URI), after bounded retries.
A run this process opened and could not close is journaled under mlruns/ and ended FAILED by
the next tracking session that reaches the store, so no run stays RUNNING for good.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from stages.core.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_TRANSIENT, BadInput, Transient
from stages.core.lineage import lineage_tags, path_hashes
from stages.params import flatten_dict

log = logging.getLogger("imagepipe.tracking")
T = TypeVar("T")

SWITCH_ENV = "IMAGEPIPE_TRACKING"
PIPELINE_ENV = "IMAGEPIPE_PIPELINE_ID"  # set by the Prefect flow to its flow-run id
RUN_ID_ENV = "MLFLOW_RUN_ID"  # exported while a stage body runs (export stamps it into ONNX)
DEFAULT_EXPERIMENT = "imagepipe"
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"

# Bounded retries. MLflow's own defaults retry an unreachable server for ~4 minutes (7 retries,
# factor 2); a stage should fail in seconds and let the flow retry it. Per HTTP call: 2 retries,
# sleeps 0 s then 2 s; per connection probe: ATTEMPTS calls, 1 s then 2 s apart: ~10 s in all.
# Users may override any of these in the environment.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
ATTEMPTS = 3
# MLflow's limits per log_batch call.
_MAX_PARAMS, _MAX_METRICS, _MAX_TAGS = 100, 1000, 100
_PARAM_CHARS = 6000
# Files logged as artifacts: reports and pictures, never models or arrays (DVC versions those).
_ARTIFACT_SUFFIXES = {".png", ".jpg", ".jpeg", ".svg", ".json", ".csv", ".tsv", ".md", ".txt",
                      ".html", ".yaml", ".yml"}
_ARTIFACT_MAX_BYTES = 5 * 2**20
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".svg"}


class TrackingDown(Transient):
    """The tracking store could not be reached (or failed) after bounded retries."""


def tracking_enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in {"0", "off", "false", "no"}


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) holding dvc.yaml, else cwd."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return here


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI, else sqlite:////<root>/mlflow.db (4 slashes: an absolute path)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').as_posix()}"


def redact(uri: str) -> str:
    """The URI without a password (basic-auth in the URI must not reach a log)."""
    return re.sub(r"//([^/@:]+):[^/@]*@", r"//\1:***@", uri)


def is_local_store(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "databricks"))


def state_dir(root: Path) -> Path:
    """Local bookkeeping beside the default store (git- and dvc-ignored): locks, open runs."""
    return root / "mlruns" / "imagepipe"


# ---------------------------------------------------------------- connection


def _errors() -> tuple[type[BaseException], ...]:
    """What a failing store raises: MLflow's wrapper, HTTP, database and file errors."""
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.RequestException, sqlalchemy.exc.SQLAlchemyError, OSError)


def _error_code(err: BaseException) -> str:
    return str(getattr(err, "error_code", "") or "")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def _refused(err: BaseException) -> bool:
    return _error_code(err) in {"UNAUTHENTICATED", "PERMISSION_DENIED"} or any(
        f"{code}" in str(err)[:400] for code in ("401 ", "403 ", "code 401", "code 403"))


class Store:
    """A connected MLflow client (tracking and registry on the same URI) and its URI."""

    def __init__(self, root: Path, uri: str, client: Any) -> None:
        self.root, self.uri, self.client = root, uri, client

    @classmethod
    def connect(cls, root: Path | None = None, attempts: int = ATTEMPTS) -> Store:
        """Reach the store with bounded retries; TrackingDown naming the URI if it never answers."""
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        # "Creating initial MLflow database tables..." on a new mlflow.db: noise in a stage's
        # stderr, whose contract is one line per failure.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        root = root or project_root()
        uri = tracking_uri(root)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        store = cls(root, uri, client)
        last: BaseException | None = None
        for attempt in range(1, attempts + 1):
            try:
                client.search_experiments(max_results=1)
                return store
            except _errors() as err:
                if _refused(err):
                    raise BadInput(f"tracking at {redact(uri)} refused the credentials "
                                   "(MLFLOW_TRACKING_USERNAME/PASSWORD)") from None
                last = err
                log.warning("tracking at %s: attempt %d/%d failed: %s", redact(uri), attempt,
                            attempts, _first_line(err))
                if attempt < attempts:
                    time.sleep(attempt)
        raise TrackingDown(f"tracking at {redact(uri)} unreachable after {attempts} attempts: "
                           f"{_first_line(last) if last else '?'}")

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args) with store failures turned into TrackingDown naming the URI."""
        try:
            return fn(*args, **kwargs)
        except _errors() as err:
            if _refused(err):
                raise BadInput(f"tracking at {redact(self.uri)} refused {what}: "
                               f"{_first_line(err)}") from None
            raise TrackingDown(f"tracking at {redact(self.uri)} failed ({what}): "
                               f"{_first_line(err)}") from err

    def experiment_id(self) -> str:
        """The project's experiment (MLFLOW_EXPERIMENT_NAME or 'imagepipe'), created if absent.

        On the local default its artifacts go to <root>/mlartifacts (MLflow would otherwise
        pick ./mlruns relative to whatever folder the first run happened in).
        """
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        exp = self.call("get experiment", self.client.get_experiment_by_name, name)
        if exp is not None:
            return str(exp.experiment_id)
        location = (self.root / "mlartifacts").as_uri() if is_local_store(self.uri) else None
        try:
            return str(self.client.create_experiment(name, artifact_location=location))
        except _errors():  # a concurrent stage created it first
            exp = self.call("get experiment", self.client.get_experiment_by_name, name)
            if exp is None:
                raise
            return str(exp.experiment_id)

    def use_fluent(self) -> None:
        """Point mlflow's module-level API (log_model, register_model) at this store."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)


def terminate(store: Store, run_id: str, status: str) -> None:
    """End a run. MLflow prints "View run ... at: URL" on stdout when it ends a run on a
    server: that goes to stderr here, so stdout stays the command's own (promote --json)."""
    with contextlib.redirect_stdout(sys.stderr):
        store.call("end run", store.client.set_terminated, run_id, status)


# ---------------------------------------------------------------- what dvc.yaml declares


@dataclass(frozen=True)
class StageDecl:
    """The files dvc.yaml names for one stage (paths relative to the project root)."""

    deps: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)  # keys of params.yaml
    metrics: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    outs: list[str] = field(default_factory=list)


def _paths(entries: Any) -> list[str]:
    """dvc.yaml lists hold 'path' or {'path': {options}}; keep the paths."""
    out: list[str] = []
    for entry in entries or []:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):
            out.extend(str(k) for k in entry)
    return out


def _param_keys(entries: Any) -> list[str]:
    """params: 'key' entries, or {'file.yaml': [keys]} (only params.yaml's are ours)."""
    keys: list[str] = []
    for entry in entries or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):
            for file, sub in entry.items():
                if Path(str(file)).name == "params.yaml":
                    keys.extend(str(k) for k in sub or [])
    return keys


def stage_decl(root: Path, stage: str) -> StageDecl | None:
    """What root/dvc.yaml declares for `stage`; None when it has no such stage."""
    try:
        spec = ((yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {})
    except (OSError, yaml.YAMLError):
        return None
    entry = spec.get(stage)
    if not isinstance(entry, dict):
        return None
    return StageDecl(deps=_paths(entry.get("deps")), params=_param_keys(entry.get("params")),
                     metrics=_paths(entry.get("metrics")), plots=_paths(entry.get("plots")),
                     outs=_paths(entry.get("outs")))


# ---------------------------------------------------------------- params, metrics, plots


def stage_params(root: Path, keys: list[str]) -> dict[str, str]:
    """The stage's params.yaml sections, flattened to dotted keys; {} if params.yaml is bad
    (the stage itself reports that, with exit code 2)."""
    from stages.params import flatten, load_params

    try:
        params = load_params(root / "params.yaml")
    except BadInput:
        return {}
    out: dict[str, str] = {}
    for key in keys:
        value: Any = params
        for part in key.split("."):
            value = getattr(value, part, None)
        if hasattr(value, "model_dump"):
            out.update({k: _param_text(v) for k, v in flatten(value, f"{key}.").items()})
        elif value is not None:
            out[key] = _param_text(value)
    return out


def _param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)
    return text[:_PARAM_CHARS]


_KEY_BAD = re.compile(r"[^\w\-. /:]")


def metric_key(text: str) -> str:
    """A string MLflow accepts as a metric/tag key (letters, digits, _ - . space / :)."""
    return _KEY_BAD.sub("_", text)[:250]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def flat_numbers(obj: Any) -> dict[str, float]:
    """Numbers of a nested JSON object under dotted keys (bools, strings, lists skipped)."""
    numbers = {metric_key(k): _number(v) for k, v in flatten_dict(obj).items()}
    return {k: v for k, v in numbers.items() if v is not None}


def read_structured(path: Path) -> Any:
    """A metrics file's content (JSON, or YAML for .yaml/.yml); None when unreadable."""
    try:
        text = path.read_text()
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return None


def epoch_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a plots file (CSV/TSV, or a JSON list of records) that has an `epoch` column."""
    import csv

    rows: list[dict[str, Any]]
    if path.suffix in {".csv", ".tsv"}:
        try:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
        except OSError:
            return []
    elif path.suffix == ".json":
        data = read_structured(path)
        rows = data if isinstance(data, list) and all(isinstance(r, dict) for r in data) else []
    else:
        return []
    return rows if rows and "epoch" in rows[0] else []


def _as_float(text: Any) -> float | None:
    """A table cell as a number; None for text (and for bools, which are flags, not values)."""
    if isinstance(text, bool) or text is None:
        return None
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def per_epoch_metrics(path: Path) -> list[tuple[str, float, int]]:
    """(key, value, step) for every numeric cell of an epoch table.

    Key: '<file stem>/<column>', with the row's text columns (a phase, a model name) inserted
    so that 'finetune/head/val_acc' and 'finetune/full/val_acc' stay apart. Step: the epoch,
    or the row number when epochs repeat (two phases each counting from 1)."""
    rows = epoch_rows(path)
    if not rows:
        return []
    epochs = [_as_float(r.get("epoch")) for r in rows]
    by_epoch = len(set(epochs)) == len(epochs) and None not in epochs
    out: list[tuple[str, float, int]] = []
    for i, row in enumerate(rows):
        step = int(epochs[i]) if by_epoch else i  # type: ignore[arg-type]
        values = {k: _as_float(v) for k, v in row.items() if k and k != "epoch"}
        groups = [str(row[k]) for k, v in values.items()
                  if v is None and row[k] not in (None, "", path.stem)]
        for col, value in values.items():
            if value is not None:
                out.append((metric_key("/".join([path.stem, *groups, col])), value, step))
    return out


# ---------------------------------------------------------------- which runs to group under


def group_key() -> tuple[str, str]:
    """(key, parent run name) that groups the stages of one pipeline run.

    - Prefect sets IMAGEPIPE_PIPELINE_ID to its flow-run id: every stage of the flow shares it.
    - Under `dvc repro`/`dvc exp run`, every stage is a child (via a shell) of the one dvc
      process: its pid plus its start time (pids are reused, the pair is not) plus the host
      name (a shared server sees many machines) name that repro uniquely.
    - Otherwise a stage run by hand is a group of its own: this process, named the same way.
    """
    flow = os.environ.get(PIPELINE_ENV)
    if flow:
        return f"pipeline:{flow}", f"pipeline {flow}"
    import psutil

    host = platform.node()
    proc = _dvc_ancestor() or psutil.Process()
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(proc.create_time()))
    kind = "dvc" if proc.pid != os.getpid() else "process"
    what = "dvc " + " ".join(_dvc_args(proc)) if kind == "dvc" else "stage run by hand"
    return f"{kind}:{host}:{proc.pid}:{proc.create_time():.3f}", f"{what} ({started})"


def _dvc_args(proc: Any) -> list[str]:
    cmd = proc.cmdline()
    for i, arg in enumerate(cmd):
        if Path(arg).name == "dvc":
            return cmd[i + 1:i + 3]
    return cmd[-2:]


def _dvc_ancestor() -> Any:
    """The nearest ancestor process that is DVC (`dvc ...` or `python -m dvc ...`)."""
    import psutil

    try:
        for proc in psutil.Process().parents():
            with contextlib.suppress(psutil.Error):
                cmd = proc.cmdline()
                if any(Path(a).name == "dvc" for a in cmd[:2]) or cmd[1:3] == ["-m", "dvc"]:
                    return proc
    except psutil.Error:
        pass
    return None


def parent_run(store: Store, experiment_id: str, key: str, name: str, tags: dict[str, str]) -> str:
    """The parent run of group `key`, created on first use (with the code/device tags of
    `tags`; the stage-specific input hashes belong to the children).

    Two stages starting at once may both create one; both then pick the oldest (start time,
    then id) and the other is deleted, so the group converges on one parent.
    """
    def find() -> list[Any]:
        return store.call("search runs", store.client.search_runs, [experiment_id],
                          filter_string=f"tags.`imagepipe.group` = '{key}' and "
                                        "tags.`imagepipe.role` = 'pipeline'",
                          order_by=["attributes.start_time ASC", "attributes.run_id ASC"],
                          max_results=10)

    found = find()
    if found:
        return str(found[0].info.run_id)
    general = {k: v for k, v in tags.items() if not k.startswith(("dvc.", "data."))}
    run = store.call("create parent run", store.client.create_run, experiment_id,
                     tags={**general, "imagepipe.group": key, "imagepipe.role": "pipeline"},
                     run_name=name)
    # A parent has no process of its own: it is never left RUNNING; children set its status.
    terminate(store, run.info.run_id, "FINISHED")
    first = find()[0].info.run_id
    if first != run.info.run_id:
        store.call("delete duplicate parent", store.client.delete_run, run.info.run_id)
    return str(first)


# ---------------------------------------------------------------- runs left open


def _journal(root: Path) -> Path:
    return state_dir(root) / "open-runs"


def _journal_add(store: Store, run_id: str) -> None:
    import psutil

    me = psutil.Process()
    folder = _journal(store.root)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{run_id}.json").write_text(json.dumps({
        "run_id": run_id, "uri_sha256": hashlib.sha256(store.uri.encode()).hexdigest(),
        "pid": me.pid, "started": me.create_time(), "host": platform.node()}))


def _journal_remove(root: Path, run_id: str) -> None:
    (_journal(root) / f"{run_id}.json").unlink(missing_ok=True)


def _owner_alive(entry: dict[str, Any]) -> bool:
    import psutil

    if entry.get("host") != platform.node():
        return True  # cannot tell for another machine: leave it to that machine
    try:
        return abs(psutil.Process(int(entry["pid"])).create_time() - float(entry["started"])) < 1
    except (psutil.Error, KeyError, ValueError):
        return False


def close_orphans(store: Store) -> list[str]:
    """End FAILED the runs this project journaled as open whose process is gone (killed,
    or its store was down when it tried to end them); return their ids."""
    folder = _journal(store.root)
    uri_hash = hashlib.sha256(store.uri.encode()).hexdigest()
    closed: list[str] = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if entry.get("uri_sha256") != uri_hash or _owner_alive(entry):
            continue
        if _end_if_running(store, str(entry.get("run_id"))):
            closed.append(str(entry["run_id"]))
        path.unlink(missing_ok=True)
    return closed


def _end_if_running(store: Store, run_id: str) -> bool:
    """End the run FAILED if it is still RUNNING; False if it is not (or no longer exists)."""
    from mlflow.exceptions import MlflowException

    try:
        run = store.client.get_run(run_id)
    except MlflowException as err:
        if _error_code(err) == "RESOURCE_DOES_NOT_EXIST":
            return False  # deleted since: nothing to close
        return store.call("get run", _raise, err)
    except _errors() as err:
        return store.call("get run", _raise, err)
    if run.info.status != "RUNNING":
        return False
    terminate(store, run_id, "FAILED")
    return True


# ---------------------------------------------------------------- one stage's run


class StageRun:
    """The child run of one stage: opened before the body, filled and closed after it.

    Never raises out of `start`: when the store is down the body still runs (its outputs are
    written) and `finish` turns a success into exit 75 naming the URI.
    """

    def __init__(self, stage: str, root: Path) -> None:
        self.stage, self.root = stage, root
        self.decl = stage_decl(root, stage) or StageDecl()
        self.store: Store | None = None
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self.failure: tuple[int, str] | None = None
        self.tags: dict[str, str] = {}
        self.finished = False
        self._saved_env: str | None = os.environ.get(RUN_ID_ENV)

    @classmethod
    def start(cls, stage: str) -> StageRun | None:
        """Open the run of `stage`; None when tracking is off or dvc.yaml has no such stage
        (a command like `imagepipe predict` is not a pipeline stage: no run per call)."""
        root = project_root()
        if not tracking_enabled() or stage_decl(root, stage) is None:
            return None
        run = cls(stage, root)
        try:
            run._open()
        except BadInput as err:
            run.failure = (EXIT_BAD_INPUT, str(err))
        except Transient as err:
            run.failure = (EXIT_TRANSIENT, str(err))
        except Exception as err:  # noqa: BLE001 - a tracking bug must not stop the stage itself
            log.exception("tracking failed unexpectedly")
            run.failure = (EXIT_TRANSIENT, f"unexpected {type(err).__name__}: {err}")
        except BaseException:
            run._end_quietly()  # SIGTERM while opening: no run left RUNNING
            raise
        return run

    def _open(self) -> None:
        store = Store.connect(self.root)
        self.store = store
        for run_id in close_orphans(store):
            log.warning("ended run %s FAILED: its stage died before closing it", run_id)
        experiment = store.experiment_id()
        self.tags = {metric_key(k): v for k, v in
                     lineage_tags(self.root, self.stage, self.decl.deps).items()}
        key, name = group_key()
        self.parent_id = parent_run(store, experiment, key, name, self.tags)
        run = store.call("create run", store.client.create_run, experiment, run_name=self.stage,
                         tags={**self.tags, "mlflow.parentRunId": self.parent_id,
                               "imagepipe.group": key, "imagepipe.stage": self.stage})
        self.run_id = str(run.info.run_id)
        _journal_add(store, self.run_id)
        os.environ[RUN_ID_ENV] = self.run_id
        self._log_params()

    def _log_params(self) -> None:
        from mlflow.entities import Param

        assert self.store is not None and self.run_id is not None
        items = [Param(metric_key(k), v) for k, v in stage_params(self.root, self.decl.params).items()]
        for lo in range(0, len(items), _MAX_PARAMS):
            self.store.call("log params", self.store.client.log_batch, self.run_id,
                            params=items[lo:lo + _MAX_PARAMS])

    def finish(self, code: int) -> int:
        """Log the stage's files (on success), end the run; return the stage's exit code."""
        self.finished = True
        self._restore_env()
        if self.failure is not None:
            return self._report_failure(code)
        try:
            if code == EXIT_OK:
                self._log_outputs()
                if self.stage == "export":
                    self._register_export()
            self._end(code == EXIT_OK)
        except (TrackingDown, BadInput) as err:
            self.failure = (EXIT_BAD_INPUT if isinstance(err, BadInput) else EXIT_TRANSIENT,
                            str(err))
            self._end_quietly()
            return self._report_failure(code)
        except Exception as err:  # noqa: BLE001 - say what broke, end the run, keep the contract
            log.exception("tracking failed unexpectedly")
            self.failure = (EXIT_TRANSIENT, f"unexpected {type(err).__name__}: {err}")
            self._end_quietly()
            return self._report_failure(code)
        except BaseException:
            self._end_quietly()
            raise
        return code

    def _report_failure(self, code: int) -> int:
        assert self.failure is not None
        fail_code, message = self.failure
        extra = ", no model version was registered" if self.stage == "export" else ""
        print(f"{self.stage}: tracking failed: {message}; the stage's outputs were written"
              f"{extra}", file=sys.stderr)
        return fail_code if code == EXIT_OK else code

    def _restore_env(self) -> None:
        if self._saved_env is None:
            os.environ.pop(RUN_ID_ENV, None)
        else:
            os.environ[RUN_ID_ENV] = self._saved_env

    def _end(self, ok: bool) -> None:
        assert self.store is not None and self.run_id is not None
        status = "FINISHED" if ok else "FAILED"
        terminate(self.store, self.run_id, status)
        _journal_remove(self.root, self.run_id)
        if self.parent_id:
            # The parent shows the outcome of its latest stage (a retried stage that then
            # succeeds turns it back to FINISHED).
            terminate(self.store, self.parent_id, status)

    def _end_quietly(self) -> None:
        """One try at ending the run FAILED; if the store is down the journal keeps it."""
        self._restore_env()
        if self.store is None or self.run_id is None:
            return
        with contextlib.suppress(Exception):
            terminate(self.store, self.run_id, "FAILED")
            _journal_remove(self.root, self.run_id)
            if self.parent_id:
                terminate(self.store, self.parent_id, "FAILED")

    # ------------------------------------------------------------ what the stage wrote

    def _log_outputs(self) -> None:
        assert self.store is not None and self.run_id is not None
        metrics = self._final_metrics() + self._epoch_metrics()
        for lo in range(0, len(metrics), _MAX_METRICS):
            self.store.call("log metrics", self.store.client.log_batch, self.run_id,
                            metrics=metrics[lo:lo + _MAX_METRICS])
        from mlflow.entities import RunTag

        # Output hashes link runs: the run whose dvc.out.X equals another's dvc.dep.X made X.
        out_tags = [RunTag(metric_key(f"dvc.out.{p}"), h)
                    for p, h in path_hashes(self.root, self.decl.outs).items()]
        for lo in range(0, len(out_tags), _MAX_TAGS):
            self.store.call("tag outputs", self.store.client.log_batch, self.run_id,
                            tags=out_tags[lo:lo + _MAX_TAGS])
        for local, artifact_dir in self._artifacts():
            self.store.call(f"log artifact {local.name}", self.store.client.log_artifact,
                            self.run_id, str(local), artifact_dir)

    def _final_metrics(self) -> list[Any]:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        out: list[Any] = []
        for rel in self.decl.metrics:
            numbers = flat_numbers(read_structured(self.root / rel))
            out += [Metric(k, v, now, 0) for k, v in numbers.items()]
        return out

    def _epoch_metrics(self) -> list[Any]:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        out: list[Any] = []
        for rel in self.decl.plots:
            out += [Metric(k, v, now, step) for k, v, step in per_epoch_metrics(self.root / rel)]
        return out

    def _artifacts(self) -> list[tuple[Path, str]]:
        """(file, artifact folder): metrics, plots, pictures and reports among the outs, the
        manifest and report of each dataset the stage wrote."""
        out: list[tuple[Path, str]] = []
        for rel in self.decl.metrics:
            out += _small_files(self.root / rel, "metrics")
        for rel in self.decl.plots:
            out += _small_files(self.root / rel, "plots")
        for rel in self.decl.outs:
            path = self.root / rel
            if path.is_dir() and (path / "manifest.json").is_file():
                out += [(path / n, f"data/{path.name}") for n in ("manifest.json", "report.json")
                        if (path / n).is_file()]
            elif path.is_file():
                folder = "plots" if path.suffix in _IMAGE_SUFFIXES else Path(rel).parent.name
                out += _small_files(path, folder or "outputs")
        return list(dict(out).items())  # a file both in plots and outs is logged once

    # ------------------------------------------------------------ registry

    def _register_export(self) -> None:
        onnx_path = _pick(self.decl.outs, ".onnx", "model") or "models/model.onnx"
        if not (self.root / onnx_path).is_file():
            return
        assert self.store is not None and self.run_id is not None
        from stages.params import load_params

        params = load_params(self.root / "params.yaml")
        export_metrics: dict[str, float] = {}
        flags: dict[str, Any] = {}
        for rel in self.decl.metrics:
            content = read_structured(self.root / rel)
            export_metrics.update(flat_numbers(content))
            flags.update(flatten_dict(content))
        version = register_model_version(
            self.store, self.run_id, name=params.registry.model_name,
            onnx_path=self.root / onnx_path,
            torch_path=self.root / (_pick(self.decl.deps, ".pt", "finetun") or "models/finetuned.pt"),
            parity=parity_of(flags), tags={**self.tags, "imagepipe.pipeline_run_id":
                                           self.parent_id or ""},
            dataset=self.root / "data" / "target")
        print(f"export: registered {params.registry.model_name} version {version} "
              f"(alias {CHALLENGER}) from run {self.run_id}", file=sys.stderr)


def _small_files(path: Path, folder: str) -> list[tuple[Path, str]]:
    """A file (or the files at the top of a folder) worth keeping as an artifact."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [(p, folder) for p in files if p.is_file() and p.suffix.lower() in _ARTIFACT_SUFFIXES
            and p.stat().st_size <= _ARTIFACT_MAX_BYTES]


def _pick(paths: list[str], suffix: str, prefer: str) -> str | None:
    """The path with this suffix, preferring one whose name contains `prefer`."""
    hits = [p for p in paths if p.endswith(suffix)]
    hits.sort(key=lambda p: prefer not in Path(p).name)
    return hits[0] if hits else None


def parity_of(flags: dict[str, Any]) -> dict[str, str]:
    """The ONNX parity verdict in export's metrics (stages/export.py writes `gate_passed` and
    `max_abs_diff`), as version tags. No verdict is 'unknown', which the promotion gate
    refuses like a failure."""
    passed = flags.get("gate_passed")
    passed = passed if isinstance(passed, bool) else None
    diff = _number(flags.get("max_abs_diff"))
    tags = {"parity_passed": "unknown" if passed is None else str(passed).lower()}
    if diff is not None:
        tags["parity_max_abs_diff"] = f"{diff:.3g}"
    return tags


def _versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = version(name).split("+")[0]  # '+cu128': a local build tag pip cannot find
        except PackageNotFoundError:
            continue
    return out


def register_model_version(store: Store, run_id: str, *, name: str, onnx_path: Path,
                           torch_path: Path, parity: dict[str, str], tags: dict[str, str],
                           dataset: Path | None = None) -> str:
    """Log the PyTorch model and the ONNX file into run `run_id`, register the ONNX one under
    `name` with alias `challenger`; return the new version. A version whose alias could not
    be set is deleted again, so a failure never leaves a half-registered version."""
    import mlflow
    import onnx

    from stages.core.dataset import file_sha256

    store.use_fluent()
    # stdout to stderr: ending the fluent run prints "View run ..." (see `terminate`).
    with contextlib.redirect_stdout(sys.stderr), \
            store.call("open run for models", mlflow.start_run, run_id=run_id):
        torch_uri = _log_torch(store, torch_path, dataset) if torch_path.is_file() else ""
        onnx_info = store.call("log onnx model", mlflow.onnx.log_model, onnx.load(onnx_path),
                               name="onnx", pip_requirements=_onnx_requirements(),
                               onnx_execution_providers=["CPUExecutionProvider"],
                               save_as_external_data=False)
    version_tags = {**{k: v for k, v in tags.items() if not k.startswith("mlflow.")}, **parity,
                    "imagepipe.run_id": run_id, "onnx.sha256": file_sha256(onnx_path),
                    "pytorch_model_uri": torch_uri}
    mv = store.call("register model", mlflow.register_model, onnx_info.model_uri, name,
                    tags=version_tags)
    try:
        store.call("set alias", store.client.set_registered_model_alias, name, CHALLENGER,
                   mv.version)
    except TrackingDown:
        with contextlib.suppress(Exception):
            store.client.delete_model_version(name, mv.version)
        raise
    return str(mv.version)


def _log_torch(store: Store, path: Path, dataset: Path | None) -> str:
    """Log the finetuned model (pytorch flavour) with a signature and a real input example."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    import stages
    from stages.core.models import load_model_file

    model, mf = load_model_file(path)
    x = _input_example(mf, dataset)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()
    info = store.call("log pytorch model", mlflow.pytorch.log_model, model, name="pytorch",
                      signature=infer_signature(x, y), input_example=x,
                      pip_requirements=_torch_requirements(),
                      # The pickled model refers to stages.core.models: ship the package.
                      code_paths=[str(Path(stages.__file__).parent)])
    return str(info.model_uri)


def _input_example(mf: Any, dataset: Path | None) -> Any:
    """Two test images of the target set, preprocessed as the model expects (zeros without)."""
    import numpy as np

    from stages.core.dataset import load_dataset
    from stages.core.models import preprocess

    spec = mf.spec
    shape = (spec.image_size, spec.image_size, spec.in_channels)
    with contextlib.suppress(Exception):
        if dataset is not None:
            images, _ = load_dataset(dataset).part("test")
            if images.shape[1:] == shape and len(images):
                return preprocess(images[:2], mf.mean, mf.std)
    return np.zeros((2, spec.in_channels, spec.image_size, spec.image_size), dtype=np.float32)


def _torch_requirements() -> list[str]:
    # Explicit: inferring them costs ~15 s per log_model (MLflow imports the model in a
    # subprocess to see what it touches).
    return [f"{n}=={v}" for n, v in _versions("torch", "torchvision", "numpy").items()]


def _onnx_requirements() -> list[str]:
    found = _versions("onnx", "numpy", "onnxruntime", "onnxruntime-gpu")
    ort = found.pop("onnxruntime", None) or found.pop("onnxruntime-gpu", None)
    found.pop("onnxruntime-gpu", None)
    # The CPU wheel: it runs anywhere, and the version that passed parity here is the floor.
    reqs = [f"onnx=={found['onnx']}"] if "onnx" in found else []
    reqs += [f"onnxruntime>={ort}"] if ort else ["onnxruntime"]
    return reqs + ([f"numpy=={found['numpy']}"] if "numpy" in found else [])


# ---------------------------------------------------------------- registry for promote/rollback


@dataclass(frozen=True)
class VersionInfo:
    version: str
    run_id: str
    tags: dict[str, str]


class Registry:
    """The registry operations promote and rollback need, on a connected store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @classmethod
    def connect(cls, root: Path | None = None) -> Registry:
        store = Store.connect(root)
        close_orphans(store)
        return cls(store)

    def alias(self, name: str, alias: str) -> VersionInfo | None:
        """The version behind `alias` (fresh from the store), None when unset or no model."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.store.client.get_model_version_by_alias(name, alias)
        except MlflowException as err:
            if _error_code(err) in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}:
                return None
            return self.store.call("read alias", _raise, err)
        except _errors() as err:
            return self.store.call("read alias", _raise, err)
        return VersionInfo(str(mv.version), str(mv.run_id or ""), dict(mv.tags or {}))

    def version(self, name: str, version: str) -> VersionInfo:
        mv = self.store.call("read version", self.store.client.get_model_version, name, version)
        return VersionInfo(str(mv.version), str(mv.run_id or ""), dict(mv.tags or {}))

    def download(self, name: str, alias: str, dst: Path) -> tuple[str, Path]:
        """Download models:/NAME@ALIAS; return (the version it was, the .onnx file)."""
        import mlflow.artifacts

        local = Path(self.store.call(
            f"download models:/{name}@{alias}", mlflow.artifacts.download_artifacts,
            artifact_uri=f"models:/{name}@{alias}", dst_path=str(dst),
            tracking_uri=self.store.uri, registry_uri=self.store.uri))
        meta = yaml.safe_load((local / "registered_model_meta").read_text()) or {}
        onnx_files = sorted(local.rglob("*.onnx"))
        if not onnx_files:
            raise BadInput(f"models:/{name}@{alias} holds no .onnx file")
        return str(meta.get("model_version", "")), onnx_files[0]

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.store.call(f"set alias {alias}", self.store.client.set_registered_model_alias,
                        name, alias, version)

    def delete_alias(self, name: str, alias: str) -> None:
        self.store.call(f"delete alias {alias}", self.store.client.delete_registered_model_alias,
                        name, alias)

    def tag(self, name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.store.call("tag version", self.store.client.set_model_version_tag, name,
                            version, key, value)

    @contextlib.contextmanager
    def lock(self, name: str, timeout_s: float = 600) -> Iterator[None]:
        """Serialise alias moves of one model among processes of this machine.

        For the SQLite default that is everyone (the file is local). For a server, processes
        on other machines are not covered: the callers re-read the alias just before moving it
        (compare-and-set) and verify it after.
        """
        from filelock import FileLock, Timeout

        folder = state_dir(self.store.root) / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(f"{self.store.uri}|{name}".encode()).hexdigest()[:16]
        try:
            with FileLock(str(folder / f"registry-{digest}.lock"), timeout=timeout_s):
                yield
        except Timeout:
            raise Transient(f"another promotion of {name} held the lock for {timeout_s:.0f} s"
                            ) from None

    def walk_back(self, name: str, version: str, max_runs: int = 20) -> dict[str, Any]:
        """From a model version to the runs that made it: the export run, then for each input
        hash (dvc.dep.*) the latest run whose output hash (dvc.out.*) is the same, and so on
        up to ingest. Each run with its stage, params, git commit and data hashes."""
        info = self.version(name, version)
        chain: list[dict[str, Any]] = []
        queue, seen = [info.run_id], set()
        while queue and len(chain) < max_runs:
            run_id = queue.pop(0)
            if not run_id or run_id in seen:
                continue
            seen.add(run_id)
            run = self.store.call("read run", self.store.client.get_run, run_id)
            chain.append(_run_summary(run))
            for key, md5 in run.data.tags.items():
                if key.startswith("dvc.dep."):
                    maker = self._maker(run.info.experiment_id, key[len("dvc.dep."):], md5)
                    if maker:
                        queue.append(maker)
        return {"model": name, "version": version, "tags": info.tags, "runs": chain}

    def _maker(self, experiment_id: str, path: str, md5: str) -> str | None:
        """The latest finished run that wrote `path` with this hash."""
        runs = self.store.call("search runs", self.store.client.search_runs, [experiment_id],
                               filter_string=f"tags.`dvc.out.{path}` = '{md5}' "
                                             "and attributes.status = 'FINISHED'",
                               order_by=["attributes.start_time DESC"], max_results=1)
        return str(runs[0].info.run_id) if runs else None

    def scratch_dir(self) -> tempfile.TemporaryDirectory[str]:
        return tempfile.TemporaryDirectory(prefix="imagepipe-registry-")


def _run_summary(run: Any) -> dict[str, Any]:
    tags = run.data.tags
    keep = ("git.", "dvc.dep.", "dvc.out.", "data.", "prefect.", "device", "imagepipe.stage")
    return {"run_id": run.info.run_id, "stage": tags.get("imagepipe.stage", run.info.run_name),
            "status": run.info.status, "parent_run_id": tags.get("mlflow.parentRunId"),
            "params": dict(run.data.params),
            "lineage": {k: v for k, v in sorted(tags.items()) if k.startswith(keep)}}


def _raise(err: BaseException) -> Any:
    raise err
