"""One stage's MLflow run: opened by the stage door before the body, filled from the files
dvc.yaml declares for the stage after it, and, when the body returned a Registration, the
model version registered from it; then closed.

Inputs: the stage name, <root>/dvc.yaml, the files it names, the store (store.py). Output: a
child run under the pipeline run's parent (grouping.py), tagged with its lineage; the exit
code the stage ends with (a tracking failure after a successful body is 75, or 2 when the
store refused the credentials).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

from stages.core.epochlog import EPOCH_LOG_ENV
from stages.core.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_TRANSIENT, BadInput, Transient
from stages.core.host import export_env, project_root, restore_env, workspace_root
from stages.core.tracking.declared import DVC_PARAMS_FILE, StageDecl, stage_decl
from stages.core.tracking.grouping import parent_run
from stages.core.tracking.journal import close_orphans, journal_add, journal_remove
from stages.core.tracking.live import EpochTail
from stages.core.tracking.metrics import (
    artifacts,
    flat_numbers,
    flat_params,
    metric_key,
    per_epoch_metrics,
    read_json,
)
from stages.core.tracking.parentrun import parent_name, update_parent_metrics
from stages.core.tracking.registration import Registration
from stages.core.tracking.store import Store, state_dir, tracking_enabled

log = logging.getLogger("imagepipe.tracking")

RUN_ID_ENV = "MLFLOW_RUN_ID"  # set while a stage body runs (export stamps it into ONNX)


def _failure(err: Exception) -> tuple[int, str]:
    """What a tracking error makes of a successful stage: exit 2 when the store refused the
    credentials, else 75; a bug is logged with its traceback."""
    if isinstance(err, BadInput):
        return EXIT_BAD_INPUT, str(err)
    if isinstance(err, Transient):
        return EXIT_TRANSIENT, str(err)
    log.exception("tracking failed unexpectedly")
    return EXIT_TRANSIENT, f"unexpected {type(err).__name__}: {err}"


class StageRun:
    """The child run of one stage: opened before the body, filled and closed after it.

    Never raises out of `start`: when the store is down the body still runs (its outputs are
    written) and `finish` turns a success into exit 75 naming the URI.
    """

    def __init__(self, stage: str, root: Path, stage_facts: dict[str, Any],
                 store_root: Path | None = None) -> None:
        # root: the workspace the stage ran in, whose files the run describes (a queued
        # experiment's own clone); store_root: the project whose MLflow store keeps the run.
        self.stage, self.root, self.store_root = stage, root, store_root or root
        # What only the stage's process can tell, wherever the run is kept (remote.py's
        # _stage_facts): {"group": group_key(), "tags": {"device": ...}, "owner": owner()}.
        self.stage_facts = stage_facts
        self.decl = stage_decl(root, stage) or StageDecl()
        self.params_file = root / DVC_PARAMS_FILE
        self.store: Store | None = None
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self.failure: tuple[int, str] | None = None
        self.tags: dict[str, str] = {}
        self.finished = False
        self.tail: EpochTail | None = None  # live epoch metrics while the body runs (live.py)
        self._live_logged: set[tuple[str, int]] = set()  # (key, step) the tail logged
        self._saved_env: dict[str, str | None] = {}  # what `export` replaced

    @classmethod
    def start(cls, stage: str, stage_facts: dict[str, Any], *, root: Path | None = None,
              workspace: Path | None = None,
              reopen: dict[str, Any] | None = None) -> StageRun | None:
        """Open the run of `stage`; None when tracking is off or dvc.yaml has no such stage
        (a command like `imagepipe predict` is not a pipeline stage: no run per call).
        `root`: the project whose store keeps the run; `workspace`: where the stage ran
        (default: both from the working folder, host.py). `reopen`: the run the tracking
        agent opened and died holding (remote.py), finished here instead of a new one."""
        workspace = workspace or workspace_root()
        root = root or project_root(workspace)
        if not tracking_enabled() or stage_decl(workspace, stage) is None:
            return None
        run = cls(stage, workspace, stage_facts, store_root=root)
        try:
            run._open() if reopen is None else run._reopen(reopen)
        except Exception as err:  # noqa: BLE001 - the body runs all the same; finish says it
            run.failure = _failure(err)
        except BaseException:
            run._end_quietly()  # SIGTERM while opening: no run left RUNNING
            raise
        return run

    def _open(self) -> None:
        from stages.core.lineage import lineage_tags

        store = Store.connect(self.store_root)
        self.store = store
        for run_id in close_orphans(store):
            log.warning("ended run %s FAILED: its stage died before closing it", run_id)
        experiment = store.experiment_id()
        given = {**lineage_tags(self.root, self.decl.deps),
                 **self.stage_facts["tags"]}
        self.tags = {metric_key(k): v for k, v in given.items()}
        if "git.commit" in self.tags:  # MLflow's own key: its UI links the run to the commit
            self.tags["mlflow.source.git.commit"] = self.tags["git.commit"]
        key = self.stage_facts["group"]
        self.parent_id = parent_run(store, experiment, key, parent_name(self.tags), self.tags,
                                    self.params_file)
        run = store.call("create run", store.client.create_run, experiment, run_name=self.stage,
                         tags={**self.tags, "mlflow.parentRunId": self.parent_id,
                               "imagepipe.group": key, "imagepipe.stage": self.stage})
        self.run_id = str(run.info.run_id)
        journal_add(store, self.run_id, self.stage_facts["owner"])
        self._log_params()
        self._log_diff()
        self._start_tail()

    def _reopen(self, opened: dict[str, Any]) -> None:
        """The agent's reply to "start": its run's ids and tags, and why tracking failed."""
        self.run_id, self.parent_id = opened["run_id"], opened.get("parent_id")
        self.tags = dict(opened.get("tags") or {})
        self.failure = opened.get("failed")
        self.store = Store.connect(self.store_root)

    def _log_diff(self) -> None:
        """A dirty tree's diff against its commit, as an artifact of the run (airbench keeps its
        own source with its results): the commit tag alone would name code that did not run."""
        from stages.core.lineage import DIFF_ARTIFACT, git_diff

        assert self.store is not None and self.run_id is not None
        text = git_diff(self.root)
        if text is not None:
            self.store.call("log the tree's diff", self.store.client.log_text, self.run_id, text,
                            DIFF_ARTIFACT)

    def _start_tail(self) -> None:
        """The epoch file the training loop appends to (stages/core/epochlog.py), tailed into
        this run while the body runs."""
        assert self.store is not None and self.run_id is not None
        path = state_dir(self.store_root) / "epochs" / f"{self.run_id}.jsonl"
        stems = {Path(rel).stem for rel in self.decl.plots}
        self.tail = EpochTail(self.store, self.run_id, path, self.stage, stems)
        self.tail.start()

    @property
    def env(self) -> dict[str, str]:
        """What the stage's body reads: the run's id and the epoch file the tail reads."""
        env = {RUN_ID_ENV: self.run_id, EPOCH_LOG_ENV: str(self.tail.path) if self.tail else None}
        return {k: v for k, v in env.items() if v}

    def export(self) -> None:
        """`env` set in this process until `finish`: only where the body runs (the tracking
        agent keeps several runs at once; its reply hands `env` to the stage's process)."""
        self._saved_env = export_env(self.env)

    def _log_params(self) -> None:
        from mlflow.entities import Param

        assert self.store is not None and self.run_id is not None
        given = flat_params(self.params_file, self.decl.params)
        # MlflowClient.log_batch splits what it is given into batches of the server's limits.
        self.store.call("log params", self.store.client.log_batch, self.run_id,
                        params=[Param(metric_key(k), v) for k, v in given.items()])

    def finish(self, code: int, outcome: object = None) -> int:
        """Log the stage's files (on success), register `outcome` when the body returned a
        Registration (on success), end the run; return the stage's exit code."""
        self.finished = True
        restore_env(self._saved_env)
        registration = outcome if isinstance(outcome, Registration) else None
        if self.failure is not None:
            return self._report_failure(code, registration)
        try:
            self._stop_tail()  # failed or not: the epochs it finished stay on its curve
            if code == EXIT_OK:
                self._log_outputs()
                if self.parent_id:
                    update_parent_metrics(self.store, self.parent_id, self.root,
                                          self.decl.metrics)
                if registration is not None:
                    self._register(registration)
            self._end(code == EXIT_OK)
        except Exception as err:  # noqa: BLE001 - say what broke, end the run, keep the contract
            self.failure = _failure(err)
            self._end_quietly()
            return self._report_failure(code, registration)
        except BaseException:
            self._end_quietly()
            raise
        return code

    def _report_failure(self, code: int, registration: Registration | None) -> int:
        assert self.failure is not None
        fail_code, message = self.failure
        extra = ", no model version was registered" if registration is not None else ""
        print(f"{self.stage}: tracking failed: {message}; the stage's outputs were written"
              f"{extra}", file=sys.stderr)
        return fail_code if code == EXIT_OK else code

    def _stop_tail(self) -> None:
        tail, self.tail = self.tail, None
        if tail is not None:
            try:
                tail.stop()
            finally:
                self._live_logged = tail.logged

    def _end(self, ok: bool) -> None:
        assert self.store is not None and self.run_id is not None
        status = "FINISHED" if ok else "FAILED"
        self.store.terminate(self.run_id, status)
        journal_remove(self.store_root, self.run_id)
        if self.parent_id:
            # The parent shows the outcome of its latest stage (a retried stage that then
            # succeeds turns it back to FINISHED).
            self.store.terminate(self.parent_id, status)

    def _end_quietly(self) -> None:
        """One try at ending the run FAILED; if the store is down the journal keeps it."""
        restore_env(self._saved_env)
        if self.store is None or self.run_id is None:
            return
        with contextlib.suppress(Exception):
            self._stop_tail()
        with contextlib.suppress(Exception):
            self._end(False)

    # ------------------------------------------------------------ what the stage wrote

    def _log_outputs(self) -> None:
        from mlflow.entities import RunTag

        from stages.core.lineage import path_hashes

        assert self.store is not None and self.run_id is not None
        self.store.call("log metrics", self.store.client.log_batch, self.run_id,
                        metrics=self._file_metrics())
        # Output hashes link runs: the run whose dvc.out.X equals another's dvc.dep.X made X.
        out_tags = [RunTag(metric_key(f"dvc.out.{p}"), h)
                    for p, h in path_hashes(self.root, self.decl.outs).items()]
        self.store.call("tag outputs", self.store.client.log_batch, self.run_id, tags=out_tags)
        for local, artifact_dir in artifacts(self.root, self.decl):
            self.store.call(f"log artifact {local.name}", self.store.client.log_artifact,
                            self.run_id, str(local), artifact_dir)

    def _file_metrics(self) -> list[Any]:
        """The numbers of the metrics files, and the epochs of the plots tables that the live
        tail did not log."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        out = [Metric(k, v, now, 0) for rel in self.decl.metrics
               for k, v in flat_numbers(read_json(self.root / rel)).items()]
        return out + [Metric(k, v, now, step) for rel in self.decl.plots
                      for k, v, step in per_epoch_metrics(self.root / rel)
                      if (k, step) not in self._live_logged]

    def _register(self, registration: Registration) -> None:
        from stages.core.tracking.register import register_model_version

        assert self.store is not None and self.run_id is not None
        version = register_model_version(
            self.store, self.run_id, registration, self.root,
            tags={**self.tags, "imagepipe.pipeline_run_id": self.parent_id or ""})
        print(f"{self.stage}: registered {registration.model_name} version {version} "
              f"from run {self.run_id}", file=sys.stderr)  # the alias: register.py says
