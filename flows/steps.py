"""Deployment pull steps named in prefect.yaml. They run in the flow-run process on the
worker before the flow is loaded: check_tracking_uri before the repository is cloned, dvc_pull
in the clone."""

from __future__ import annotations

import os


def check_tracking_uri() -> dict[str, str]:
    """A deployment made with MLFLOW_TRACKING_URI unset keeps prefect.yaml's `{{ $... }}`
    placeholder as its value (Prefect fills it only from the environment of `prefect deploy`):
    stop before cloning, naming the fix, instead of tracking into a store named by a template."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if "{{" in uri:
        raise ValueError(f"MLFLOW_TRACKING_URI is {uri!r}, prefect.yaml's unfilled placeholder: "
                         "deploy again with MLFLOW_TRACKING_URI set to the project's MLflow store "
                         "(make deploy sets it)")
    return {"mlflow_tracking_uri": uri}


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
