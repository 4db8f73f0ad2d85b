"""The registry verbs behind `imagepipe promote`, `rollback` and `lineage`: read and move
aliases, tag versions, download a version's ONNX file, serialise alias moves, walk from a
version back to the runs that made it. Input: a connected Store.

Locks: a file lock serialises the processes of this machine; against a server, a second lock
held on the server itself (a registered model NAME.promotion-lock, whose creation is atomic
there) serialises checkouts on other machines too. Its holder beats a heartbeat tag while it
holds it; a waiter breaks it only after seeing that heartbeat stand still for STALE_LOCK_S on
its own clock (no two machines' clocks are compared), the holder checks the lock is still its
own before each alias move (LockLost otherwise), and releases only a lock it holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import socket
import threading
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
    TrackingDown,
    error_code,
    is_local_store,
    redact,
    state_dir,
    store_errors,
)

log = logging.getLogger("imagepipe.tracking")

# A server-held lock whose heartbeat a waiter has seen stand still this long was left by a
# killed (or stopped) holder and is broken. The holder beats every HEARTBEAT_S, so a live one
# is never broken short of a store that failed it STALE_LOCK_S / HEARTBEAT_S times running.
STALE_LOCK_S = 60.0
HEARTBEAT_S = 5.0
HOLDER_TAG, BEAT_TAG = "imagepipe.lock.holder", "imagepipe.lock.beat"


class LockLost(Transient):
    """The promotion lock was broken (its holder stalled) and may be someone else's now."""


# What MLflow answers for a model or version that is not there (RESOURCE_DOES_NOT_EXIST) and
# for an alias that is not (INVALID_PARAMETER_VALUE, "alias ... not found"): a wrong name, not
# an outage, so exit 2 rather than 75.
NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"}


@dataclass(frozen=True)
class VersionInfo:
    version: str
    run_id: str
    tags: dict[str, str]
    aliases: tuple[str, ...]


class Registry:
    """The registry operations promote and rollback need, on a connected store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.held: _Heartbeat | None = None  # the server lock this process holds, if any

    @classmethod
    def connect(cls, root: Path | None = None) -> Registry:
        store = Store.connect(root)
        close_orphans(store)
        return cls(store)

    def alias(self, name: str, alias: str) -> VersionInfo | None:
        """The version behind `alias` (fresh from the store), None when unset or no model."""
        mv = self._get(f"models:/{name}@{alias}", self.store.client.get_model_version_by_alias,
                       name, alias)
        return None if mv is None else _info(mv)

    def find(self, name: str, ref: str, *, by_version: bool = False) -> VersionInfo:
        """The version `ref` names: an alias (models:/NAME@ALIAS), or with by_version a version
        number (models:/NAME/VERSION; MLflow allows all-digit aliases, so the caller says
        which). BadInput naming it when it is not there."""
        if by_version:
            shown, fn = f"models:/{name}/{ref}", self.store.client.get_model_version
        else:
            shown, fn = f"models:/{name}@{ref}", self.store.client.get_model_version_by_alias
        mv = self._get(shown, fn, name, ref)
        if mv is None:
            raise BadInput(f"{shown} is not in the registry at {redact(self.store.uri)}: check "
                           "the name, version or alias (imagepipe lineage champion lists a "
                           "version's aliases)")
        return _info(mv)

    def _get(self, what: str, fn: Any, *args: Any) -> Any:
        """fn(*args) through Store.call, except that "not there" (NOT_FOUND) is None."""
        from mlflow.exceptions import MlflowException

        def read() -> Any:
            try:
                return fn(*args)
            except MlflowException as err:
                if error_code(err) in NOT_FOUND:
                    return None
                raise

        return self.store.call(f"read {what}", read)

    def tagged(self, name: str, key: str, value: str) -> VersionInfo | None:
        """The newest version of `name` whose tag `key` is `value`; None when there is none."""
        found = self.store.call(f"search versions of {name}", self.store.client.search_model_versions,
                                f"name = '{name}' and tags.`{key}` = '{value}'")
        return _info(max(found, key=lambda v: int(v.version))) if found else None

    def download(self, name: str, ref: str, dst: Path, *, by_version: bool = False
                 ) -> tuple[str, Path]:
        """Download the version `ref` names (as `find`); return (the version it was, the .onnx
        file). A version is the serving wrapper with the exported file among its artifacts
        (register.py), or, registered before the wrapper, the onnx flavour itself: either
        holds one .onnx file."""
        import mlflow.artifacts

        # Not a models:/ URI: MLflow resolves those through its process-wide registry URI,
        # whatever registry_uri says (ModelsArtifactRepository._get_model_uri_infos), and in the
        # tracking agent that is whichever project it served last; setting it would leak into
        # the process's environment (set_tracking_uri exports MLFLOW_TRACKING_URI). So: the
        # alias and the version's location from this store's client, then the files.
        version = self.find(name, ref, by_version=by_version).version
        uri = self.store.call(f"locate {name} v{version}",
                              self.store.client.get_model_version_download_uri, name, version)
        local = Path(self.store.call(
            f"download {name} v{version}", mlflow.artifacts.download_artifacts,
            artifact_uri=uri, dst_path=str(dst), tracking_uri=self.store.uri))
        onnx_files = sorted(local.rglob("*.onnx"))
        if not onnx_files:
            raise BadInput(f"{name} v{version} holds no .onnx file")
        return version, onnx_files[0]

    def set_alias(self, name: str, alias: str, version: str | None) -> None:
        """`alias` to `version`; None deletes it."""
        if self.held is not None:  # LockLost unless the server lock (if any) is still ours
            self.held.verify()
        if version is None:
            self.store.call(f"delete alias {alias}",
                            self.store.client.delete_registered_model_alias, name, alias)
        else:
            self.store.call(f"set alias {alias}", self.store.client.set_registered_model_alias,
                            name, alias, version)

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
        """Hold the registered model NAME.promotion-lock (the module doc says how)."""
        key = f"{name}.promotion-lock"
        me = f"{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:8]}"
        seen: tuple[str, str] | None = None
        since = time.monotonic()
        while not self._try_lock(key, me):
            state = self._lock_state(key)
            if state != seen:  # a new holder, or its heartbeat moved: alive
                seen, since = state, time.monotonic()
            elif state is not None and time.monotonic() - since > STALE_LOCK_S:
                self._break(key, state, time.monotonic() - since)
                seen = None
            if time.monotonic() > deadline:
                raise Transient(f"another promotion of {name} holds {key!r} on "
                                f"{self.store.uri} (holder {seen[0] if seen else '?'}, its "
                                "heartbeat moving): try again later")
            time.sleep(0.2 + random.random() * 0.3)
        self.held = _Heartbeat(self, key, me)
        self.held.start()
        try:
            yield
        finally:
            self.held.stop()
            self.held = None
            self._release(key, me)

    def _lock_state(self, key: str) -> tuple[str, str] | None:
        """(holder, heartbeat) of the lock as the server has it; None when nobody holds it."""
        held = self._get("the promotion lock", self.store.client.get_registered_model, key)
        if held is None:
            return None
        tags = dict(held.tags or {})
        return tags.get(HOLDER_TAG, "?"), tags.get(BEAT_TAG, "")

    def _break(self, key: str, state: tuple[str, str], still_s: float) -> None:
        """Delete a stale lock, unless it changed since it was judged stale (a waiter beside us
        broke it already and holds it now)."""
        if self._lock_state(key) != state:
            return
        log.warning("breaking the promotion lock %s held by %s: its heartbeat stood still for "
                    "%.0f s (holder killed or stopped)", key, state[0], still_s)
        with contextlib.suppress(*store_errors()):
            self.store.client.delete_registered_model(key)

    def _release(self, key: str, me: str) -> None:
        try:
            state = self._lock_state(key)
        except Transient:  # unreadable: left to go stale and be broken
            return
        if state is not None and state[0] == me:
            with contextlib.suppress(*store_errors()):
                self.store.client.delete_registered_model(key)
        elif state is not None:
            log.warning("the promotion lock %s was broken while this process held it; now "
                        "%s holds it: left alone", key, state[0])

    def _try_lock(self, key: str, me: str) -> bool:
        try:
            self.store.call("take the promotion lock", self.store.client.create_registered_model,
                            key, tags={HOLDER_TAG: me, BEAT_TAG: "0"},
                            description="held by imagepipe promote/rollback while it moves "
                                        "aliases; delete it only if no promotion is running")
            return True
        except TrackingDown as err:
            # DOES_NOT_EXIST: the server found the name taken, then could not read it back: the
            # holder released it in between. Not ours; the caller's loop tries again.
            if error_code(err.__cause__) == "RESOURCE_DOES_NOT_EXIST":
                return False
            if error_code(err.__cause__) != "RESOURCE_ALREADY_EXISTS":
                raise
        # A create retried after a lost response finds our own lock.
        state = self._lock_state(key)
        return state is not None and state[0] == me

    def walk_back(self, name: str, version: str, max_runs: int = 20) -> dict[str, Any]:
        """From a model version to the runs that made it: the export run, then for each input
        hash (dvc.dep.*) the latest run whose output hash (dvc.out.*) is the same, and so on
        up to ingest. Each run with its stage, params, git commit and data hashes."""
        info = self.find(name, version, by_version=True)
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


class _Heartbeat(threading.Thread):
    """While a server lock is held: its beat tag moves every HEARTBEAT_S (waiters see the
    holder alive); a beat that finds another holder marks the lock lost."""

    def __init__(self, registry: Registry, key: str, me: str) -> None:
        super().__init__(name="promotion-lock-heartbeat", daemon=True)
        self.registry, self.key, self.me = registry, key, me
        self.lost: str | None = None
        self.stopped = threading.Event()

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=30)

    def run(self) -> None:
        beat = 0
        while not self.stopped.wait(HEARTBEAT_S):
            beat += 1
            with contextlib.suppress(Exception):  # a missed beat: the next one may land
                if self._holder() != self.me:
                    return
                self.registry.store.client.set_registered_model_tag(self.key, BEAT_TAG,
                                                                    str(beat))

    def _holder(self) -> str | None:
        state = self.registry._lock_state(self.key)
        holder = state[0] if state else None
        if holder != self.me:
            self.lost = f"now held by {holder}" if holder else "deleted"
        return holder

    def verify(self) -> None:
        """LockLost unless the server still names us as the holder (read fresh)."""
        if self.lost is None:
            self._holder()
        if self.lost is not None:
            raise LockLost(f"the promotion lock {self.key} was broken as stale while this "
                           f"process held it ({self.lost}): nothing moved")


def _info(mv: Any) -> VersionInfo:
    return VersionInfo(str(mv.version), str(mv.run_id or ""), dict(mv.tags or {}),
                       tuple(sorted(mv.aliases or ())))


def _run_summary(run: Any) -> dict[str, Any]:
    tags = run.data.tags
    keep = ("git.", "dvc.dep.", "dvc.out.", "data.", "prefect.", "device", "imagepipe.stage")
    return {"run_id": run.info.run_id, "stage": tags.get("imagepipe.stage", run.info.run_name),
            "status": run.info.status, "parent_run_id": tags.get("mlflow.parentRunId"),
            "params": dict(run.data.params), "metrics": dict(run.data.metrics),
            "lineage": {k: v for k, v in sorted(tags.items()) if k.startswith(keep)}}
