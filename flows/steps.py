"""Deployment pull steps named in prefect.yaml. They run in the flow-run process on the
worker, after the repository was cloned and before the flow is loaded."""

from __future__ import annotations

import logging

log = logging.getLogger("imagepipe.flow")


def dvc_pull(directory: str) -> dict[str, str]:
    """`dvc pull --allow-missing` in the fresh clone, so the stages that are up to date on the
    default DVC remote are fetched instead of recomputed. Without a remote there is nothing to
    fetch: the stages then run from scratch, which is said, not failed."""
    from dvc.repo import Repo

    with Repo(directory) as repo:
        remote = repo.config["core"].get("remote")
        if not remote:
            print(f"no default DVC remote in {directory}: nothing to pull, stages run from scratch")
            return {"dvc_remote": ""}
        stats = repo.pull(allow_missing=True)
    print(f"dvc pull from {remote!r}: {stats}")
    return {"dvc_remote": str(remote)}
