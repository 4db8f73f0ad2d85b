"""The connection to the MLflow store: where it is, reaching it with bounded retries, and
every store failure turned into one error that names the URI.

Inputs: MLFLOW_TRACKING_URI (a team server) or the project root (the SQLite default
<root>/mlflow.db, artifacts in <root>/mlartifacts). Outputs: a connected `Store`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from stages.core.errors import BadInput, Transient
from stages.core.host import project_root, restore_env

log = logging.getLogger("imagepipe.tracking")
T = TypeVar("T")

SWITCH_ENV = "IMAGEPIPE_TRACKING"  # 0/off/false/no: no tracking (unit tests, a machine that
#                                    must not write mlflow.db)
DEFAULT_EXPERIMENT = "imagepipe"

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


class TrackingDown(Transient):
    """The tracking store could not be reached (or failed) after bounded retries."""


def tracking_enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in {"0", "off", "false", "no"}


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


def _creation_lock(root: Path, uri: str) -> contextlib.AbstractContextManager[object]:
    """A file lock around the first touch of a SQLite store: two stages starting at once (queued
    experiments, `dvc queue start -j 2`) would otherwise both create mlflow.db's tables, and
    one fails ("No such index ..."). Other stores need none."""
    if not uri.startswith("sqlite:"):
        return contextlib.nullcontext()
    from filelock import FileLock

    folder = state_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / "store-create.lock"), timeout=300)


def store_errors() -> tuple[type[BaseException], ...]:
    """What a failing store raises: MLflow's wrapper, HTTP, database and file errors."""
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.RequestException, sqlalchemy.exc.SQLAlchemyError, OSError)


def error_code(err: BaseException) -> str:
    return str(getattr(err, "error_code", "") or "")


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def reraise(err: BaseException) -> NoReturn:
    """For Store.call: an error already caught, passed through the same translation."""
    raise err


class Store:
    """A connected MLflow client (tracking and registry on the same URI) and its URI."""

    def __init__(self, root: Path, uri: str, client: Any) -> None:
        self.root, self.uri, self.client = root, uri, client

    @classmethod
    def connect(cls, root: Path | None = None) -> Store:
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
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with _creation_lock(root, uri):
                    store.call("the credentials (MLFLOW_TRACKING_USERNAME/PASSWORD)",
                               client.search_experiments, max_results=1)
                return store
            except TrackingDown as err:
                last = first_line(err.__cause__ or err)
                log.warning("tracking at %s: attempt %d/%d failed: %s", redact(uri), attempt,
                            ATTEMPTS, last)
                if attempt < ATTEMPTS:
                    time.sleep(attempt)
        raise TrackingDown(f"tracking at {redact(uri)} unreachable after {ATTEMPTS} attempts: "
                           f"{last}")

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args) with store failures turned into TrackingDown naming the URI."""
        try:
            return fn(*args, **kwargs)
        except store_errors() as err:
            if error_code(err) in {"UNAUTHENTICATED", "PERMISSION_DENIED"} or any(
                    code in str(err)[:400] for code in ("401 ", "403 ", "code 401", "code 403")):
                raise BadInput(f"tracking at {redact(self.uri)} refused {what}: "
                               f"{first_line(err)}") from None
            raise TrackingDown(f"tracking at {redact(self.uri)} failed ({what}): "
                               f"{first_line(err)}") from err

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
        except store_errors():  # a concurrent stage created it first
            exp = self.call("get experiment", self.client.get_experiment_by_name, name)
            if exp is None:
                raise
            return str(exp.experiment_id)

    @contextlib.contextmanager
    def fluent(self) -> Iterator[None]:
        """mlflow's module-level API (log_model, register_model) pointed at this store while the
        block runs. mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI (and the registry's)
        "so that subprocesses inherit it": left there, every later run of this process, and of
        every process it starts, would go to this store (the tests' process sent a deployment's
        runs to the previous test's store that way). Both are put back as they were."""
        import mlflow

        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(None)  # the module's own choice gone: the environment's
            mlflow.set_registry_uri(None)
            restore_env(saved)

    def terminate(self, run_id: str, status: str) -> None:
        """End a run. MLflow prints "View run ... at: URL" on stdout when it ends a run on a
        server: that goes to stderr here, so stdout stays the command's own (promote --json)."""
        with contextlib.redirect_stdout(sys.stderr):
            self.call("end run", self.client.set_terminated, run_id, status)
