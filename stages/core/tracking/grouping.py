"""Which runs belong together: one parent run per pipeline run, a child run per stage.

Input: the environment (the flow-run id Prefect sets, else the `dvc` process this stage runs
under, else this process). Output: the group's key and the parent run's id in the store.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

from stages.core.host import FLOW_RUN_ENV
from stages.core.tracking.parentrun import EXP_NAME_ENV, log_parent_params
from stages.core.tracking.store import Store


def group_key() -> str:
    """The key that groups the stages of one pipeline run.

    - The Prefect flow sets FLOW_RUN_ENV to its flow-run id: every stage of the flow shares it.
    - Under `dvc repro`/`dvc exp run`, every stage is a child (via a shell) of the one dvc
      process: its pid plus its start time (pids are reused, the pair is not) plus the host
      name (a shared server sees many machines) name that repro uniquely.
    - Otherwise a stage run by hand is a group of its own: this process, named the same way.
    """
    flow = os.environ.get(FLOW_RUN_ENV)
    if flow:
        return f"pipeline:{flow}"
    import psutil

    proc = _dvc_ancestor() or psutil.Process()
    kind = "dvc" if proc.pid != os.getpid() else "process"
    return f"{kind}:{platform.node()}:{proc.pid}:{proc.create_time():.3f}"


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


def parent_run(store: Store, experiment_id: str, key: str, name: str, tags: dict[str, str],
               params_file: Path) -> str:
    """The parent run of group `key`, created on first use (with the code/device tags of
    `tags`, the DVC experiment name, and every parameter of `params_file`; the stage-specific
    input hashes belong to the children).

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
    if os.environ.get(EXP_NAME_ENV):
        general["dvc.exp_name"] = os.environ[EXP_NAME_ENV]
    run = store.call("create parent run", store.client.create_run, experiment_id,
                     tags={**general, "imagepipe.group": key,
                           "imagepipe.role": "pipeline"},
                     run_name=name)
    log_parent_params(store, run.info.run_id, params_file)
    # A parent has no process of its own: it is never left RUNNING; children set its status.
    store.terminate(run.info.run_id, "FINISHED")
    first = find()[0].info.run_id
    if first != run.info.run_id:
        store.call("delete duplicate parent", store.client.delete_run, run.info.run_id)
    return str(first)
