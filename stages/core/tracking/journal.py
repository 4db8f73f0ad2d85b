"""Runs left open: a run this process opened is journaled under <root>/mlruns/imagepipe/
open-runs/ until it is ended; the next tracking session that reaches the store ends FAILED
every journaled run whose process is gone (killed, or its store was down when it tried), so
no run stays RUNNING for good.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

from stages.core.tracking.store import Store, error_code, reraise, state_dir, store_errors


def _folder(root: Path) -> Path:
    return state_dir(root) / "open-runs"


def owner() -> dict[str, Any]:
    """This process as a run's owner: its pid and start time (pids are reused, the pair is not)."""
    import psutil

    me = psutil.Process()
    return {"pid": me.pid, "started": me.create_time()}


def journal_add(store: Store, run_id: str, owned_by: dict[str, Any]) -> None:
    """Journal `run_id` as open, owned by `owned_by` (`owner()` of the stage's process, also
    when the tracking agent keeps its run: the run is an orphan once the stage is gone)."""
    folder = _folder(store.root)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{run_id}.json").write_text(json.dumps({
        "run_id": run_id, "uri_sha256": hashlib.sha256(store.uri.encode()).hexdigest(),
        **owned_by, "host": platform.node()}))


def journal_remove(root: Path, run_id: str) -> None:
    (_folder(root) / f"{run_id}.json").unlink(missing_ok=True)


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
    folder = _folder(store.root)
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
        # Its live epoch file (live.py): the epochs in it were logged up to a few seconds
        # before the process died.
        (state_dir(store.root) / "epochs" / f"{entry.get('run_id')}.jsonl").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    return closed


def _end_if_running(store: Store, run_id: str) -> bool:
    """End the run FAILED if it is still RUNNING; False if it is not (or no longer exists)."""
    try:
        run = store.client.get_run(run_id)
    except store_errors() as err:
        if error_code(err) == "RESOURCE_DOES_NOT_EXIST":
            return False  # deleted since: nothing to close
        return store.call("get run", reraise, err)
    if run.info.status != "RUNNING":
        return False
    store.terminate(run_id, "FAILED")
    return True
