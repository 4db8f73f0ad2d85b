"""The registry verbs behind `imagepipe promote`, `rollback` and `lineage`: read and move
aliases, tag versions, download a version's ONNX file, serialise alias moves, walk from a
version back to the runs that made it. Input: a connected Store.

Locks: a file lock serialises the processes of this machine; against a server, a second lock
held on the server itself (a registered model NAME.promotion-lock, whose creation is atomic
there) serialises checkouts on other machines too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.core.errors import BadInput, Transient
from stages.core.tracking.journal import close_orphans
from stages.core.tracking.store import (
    Store,
    error_code,
    is_local_store,
    redact,
    reraise,
    state_dir,
    store_errors,
)

# A server-held lock older than this is taken to be left by a killed process and broken (a
# promotion downloads and scores two models: seconds to a few minutes, never this long).
STALE_LOCK_S = 900
# What MLflow answers for a model or version that is not there (RESOURCE_DOES_NOT_EXIST) and
# for an alias that is not (INVALID_PARAMETER_VALUE, "alias ... not found"): a wrong name, not
# an outage, so exit 2 rather than 75.
NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"}


@dataclass(frozen=True)
class VersionInfo:
    version: str
    run_id: str
    tags: dict[str, str]
    aliases: tuple[str, ...] = ()


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
            if error_code(err) in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}:
                return None
            return self.store.call("read alias", reraise, err)
        except store_errors() as err:
            return self.store.call("read alias", reraise, err)
        return VersionInfo(str(mv.version), str(mv.run_id or ""), dict(mv.tags or {}))

    def version(self, name: str, version: str) -> VersionInfo:
        mv = self._found(f"models:/{name}/{version}", self.store.client.get_model_version,
                         name, version)
        return VersionInfo(str(mv.version), str(mv.run_id or ""), dict(mv.tags or {}),
                           tuple(sorted(getattr(mv, "aliases", None) or ())))

    def _found(self, what: str, fn: Any, *args: Any) -> Any:
        """fn(*args) through Store.call, except that "not there" is BadInput naming `what`."""
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args)
        except MlflowException as err:
            if error_code(err) in NOT_FOUND:
                raise BadInput(f"{what} is not in the registry at {redact(self.store.uri)}: "
                               "check the name, version or alias (imagepipe lineage champion "
                               "lists a version's aliases)") from None
            return self.store.call(f"read {what}", reraise, err)
        except store_errors() as err:
            return self.store.call(f"read {what}", reraise, err)

    def tagged(self, name: str, key: str, value: str) -> VersionInfo | None:
        """The newest version of `name` whose tag `key` is `value`; None when there is none."""
        found = self.store.call(f"search versions of {name}", self.store.client.search_model_versions,
                                f"name = '{name}' and tags.`{key}` = '{value}'")
        if not found:
            return None
        mv = max(found, key=lambda v: int(v.version))
        return VersionInfo(str(mv.version), str(mv.run_id or ""), dict(mv.tags or {}))

    def download(self, name: str, ref: str, dst: Path, *, by_version: bool = False
                 ) -> tuple[str, Path]:
        """Download a version of `name`: `ref` an alias (models:/NAME@ALIAS), or with
        by_version a version number (models:/NAME/VERSION; MLflow allows all-digit aliases, so
        the caller says which); return (the version it was, the .onnx file). A version is the
        serving wrapper with the exported file among its artifacts (register.py), or,
        registered before the wrapper, the onnx flavour itself: either holds one .onnx file."""
        import mlflow.artifacts

        # Not a models:/ URI: MLflow resolves those through its process-wide registry URI,
        # whatever registry_uri says (ModelsArtifactRepository._get_model_uri_infos), and in the
        # tracking agent that is whichever project it served last; setting it would leak into
        # the process's environment (set_tracking_uri exports MLFLOW_TRACKING_URI). So: the
        # alias and the version's location from this store's client, then the files.
        client = self.store.client
        shown = f"models:/{name}/{ref}" if by_version else f"models:/{name}@{ref}"
        if by_version:
            mv = self._found(shown, client.get_model_version, name, ref)
        else:
            mv = self._found(shown, client.get_model_version_by_alias, name, ref)
        uri = self.store.call(f"locate {name} v{mv.version}",
                              client.get_model_version_download_uri, name, mv.version)
        local = Path(self.store.call(
            f"download {shown}", mlflow.artifacts.download_artifacts,
            artifact_uri=uri, dst_path=str(dst), tracking_uri=self.store.uri))
        onnx_files = sorted(local.rglob("*.onnx"))
        if not onnx_files:
            raise BadInput(f"{shown} holds no .onnx file")
        return str(mv.version), onnx_files[0]

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
        """Serialise alias moves of one model: among processes of this machine (a file lock;
        for the SQLite default that is everyone) and, against a server, among all checkouts
        that use it (a lock held on the server, see _server_lock). Callers still re-read the
        alias just before moving it (compare-and-set) and verify it after."""
        from filelock import FileLock, Timeout

        folder = state_dir(self.store.root) / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(f"{self.store.uri}|{name}".encode()).hexdigest()[:16]
        began = time.monotonic()
        try:
            with FileLock(str(folder / f"registry-{digest}.lock"), timeout=timeout_s):
                if is_local_store(self.store.uri):
                    yield
                else:
                    with self._server_lock(name, began + timeout_s):
                        yield
        except Timeout:
            raise Transient(f"another promotion of {name} held the lock for {timeout_s:.0f} s"
                            ) from None

    @contextlib.contextmanager
    def _server_lock(self, name: str, deadline: float) -> Iterator[None]:
        """Hold the registered model NAME.promotion-lock: creating a registered model is atomic
        on the server (a unique name), so exactly one checkout holds it. Deleted on release; one
        a killed process left is broken after STALE_LOCK_S (documented race: two waiters may
        both break the same stale lock; it needs a process killed inside a promotion first)."""
        key = f"{name}.promotion-lock"
        me = f"{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:8]}"
        while not self._try_lock(key, me):
            self._break_if_stale(key)
            if time.monotonic() > deadline:
                raise Transient(f"another promotion of {name} holds {key!r} on "
                                f"{self.store.uri}; if none runs, delete that registered model")
            time.sleep(0.2 + random.random() * 0.3)
        try:
            yield
        finally:
            with contextlib.suppress(*store_errors()):
                self.store.client.delete_registered_model(key)

    def _try_lock(self, key: str, me: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.store.client.create_registered_model(
                key, tags={"imagepipe.lock.holder": me},
                description="held by imagepipe promote/rollback while it moves aliases; "
                            "delete it only if no promotion is running")
            return True
        except MlflowException as err:
            # DOES_NOT_EXIST: the server found the name taken, then could not read it back: the
            # holder released it in between. Not ours; the caller's loop tries again.
            if error_code(err) == "RESOURCE_DOES_NOT_EXIST":
                return False
            if error_code(err) != "RESOURCE_ALREADY_EXISTS":
                return self.store.call("take the promotion lock", reraise, err)
        except store_errors() as err:
            return self.store.call("take the promotion lock", reraise, err)
        # A create retried after a lost response finds our own lock.
        holder = self._lock_model(key)
        return holder is not None and holder.tags.get("imagepipe.lock.holder") == me

    def _lock_model(self, key: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.store.client.get_registered_model(key)
        except MlflowException as err:
            if error_code(err) == "RESOURCE_DOES_NOT_EXIST":
                return None
            return self.store.call("read the promotion lock", reraise, err)
        except store_errors() as err:
            return self.store.call("read the promotion lock", reraise, err)

    def _break_if_stale(self, key: str) -> None:
        held = self._lock_model(key)
        since_ms = getattr(held, "creation_timestamp", None) if held is not None else None
        if since_ms and time.time() - since_ms / 1000 > STALE_LOCK_S:
            with contextlib.suppress(*store_errors()):
                self.store.client.delete_registered_model(key)

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
        return {"model": name, "version": version, "aliases": list(info.aliases),
                "tags": info.tags, "runs": chain}

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
            "params": dict(run.data.params), "metrics": dict(run.data.metrics),
            "lineage": {k: v for k, v in sorted(tags.items()) if k.startswith(keep)}}
