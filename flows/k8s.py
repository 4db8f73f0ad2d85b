"""Multi-node training on Kubernetes: an indexed Job of N pods × G GPUs plus a headless Service.

MultiNodeSpec (a flow's arguments; params.yaml has no section for it yet) -> render_multinode()
-> [Service, Job] manifests (plain dicts, validated offline against the Kubernetes schemas by
tests/integration/test_deploy_templates.py) -> multinode_stage, a Prefect task that creates
them, watches the Job and maps the failed pod's exit code to the stage's (0, 2, 70, 75, 130/143).

Every pod runs the stage's own dvc.yaml command in /workspace, a ReadWriteMany volume holding the
checkout with its pulled inputs (rank 0 alone writes the outputs there). The rendezvous is torch
elastic's, read from env: PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK (the pod's completion
index), PET_RDZV_ENDPOINT = <job>-0.<service>:29400, PET_RDZV_BACKEND = c10d, PET_RDZV_ID = <job>.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.dvcstage import StageError, classify
from stages.core.errors import EXIT_BAD_INPUT, EXIT_BUG, EXIT_TRANSIENT

RDZV_PORT = 29400  # torch elastic's default c10d rendezvous port
CONTAINER = "train"
WORKSPACE = "/workspace"
# The Job controller puts a pod's completion index in this annotation (Kubernetes >= 1.21).
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
# An indexed Job's pod hostnames are <job>-<index> (max 63 chars): leave room for the index.
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,50}[a-z0-9])?$")
_NEVER_RETRIED = (EXIT_BAD_INPUT, EXIT_BUG)


@dataclass(frozen=True)
class MultiNodeSpec:
    """One distributed run of a training stage: where, how big, with what."""

    name: str  # the Job's name, also the rendezvous id: unique per run
    image: str
    nodes: int
    gpus_per_node: int
    command: tuple[str, ...]
    workspace_claim: str  # a ReadWriteMany PersistentVolumeClaim holding the checkout and data
    mlflow_tracking_uri: str
    namespace: str = "default"
    credentials_secret: str = "imagepipe-credentials"
    gpu_type: str | None = None  # node selector on nvidia.com/gpu.product
    tolerations: tuple[dict[str, Any], ...] = (
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)
    cpu_request: str = "8"
    memory_request: str = "32Gi"
    memory_limit: str = "64Gi"
    shm_size: str = "16Gi"  # DataLoader workers share batches through /dev/shm
    finished_ttl_s: int = 3600  # Job and pods deleted this long after the end; the Service with them
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"job name {self.name!r}: lowercase letters, digits and '-', "
                             "starting with a letter, at most 52 characters")
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ValueError(f"nodes must be >= 1 and gpus_per_node >= 0 "
                             f"(got {self.nodes} x {self.gpus_per_node})")
        if not self.command:
            raise ValueError("command is empty")

    @property
    def service(self) -> str:
        return f"{self.name}-rdzv"

    @property
    def rdzv_endpoint(self) -> str:
        return f"{self.name}-0.{self.service}:{RDZV_PORT}"


def stage_command(dvc_yaml: Path, stage: str) -> tuple[str, ...]:
    """The stage's `cmd` in dvc.yaml as an argv: the pods run exactly what `dvc repro` runs."""
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    if stage not in stages:
        raise ValueError(f"no stage {stage!r} in {dvc_yaml}; stages: {', '.join(stages)}")
    return tuple(shlex.split(str(stages[stage]["cmd"])))


def rendezvous_env(spec: MultiNodeSpec) -> list[dict[str, Any]]:
    """torch elastic's env names, which the distributed training stage reads."""
    rank = {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}
    return [
        {"name": "PET_NNODES", "value": str(spec.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(spec.gpus_per_node)},
        {"name": "PET_NODE_RANK", "valueFrom": rank},
        {"name": "PET_RDZV_ENDPOINT", "value": spec.rdzv_endpoint},
        {"name": "PET_RDZV_BACKEND", "value": "c10d"},
        {"name": "PET_RDZV_ID", "value": spec.name},
    ]


def _labels(spec: MultiNodeSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": "imagepipe", "app.kubernetes.io/component": "train",
            "imagepipe.io/train-job": spec.name, **spec.labels}


def render_service(spec: MultiNodeSpec) -> dict[str, Any]:
    """Headless: DNS names per pod (<job>-<i>.<service>), no load balancing. Not-ready pods are
    published because rendezvous happens before any pod could report ready."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": spec.service, "namespace": spec.namespace, "labels": _labels(spec)},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {"imagepipe.io/train-job": spec.name},
                 "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT}]},
    }


def _container(spec: MultiNodeSpec) -> dict[str, Any]:
    gpus = {"nvidia.com/gpu": str(spec.gpus_per_node)}
    return {
        "name": CONTAINER, "image": spec.image, "command": list(spec.command),
        "workingDir": WORKSPACE,
        "env": [*rendezvous_env(spec),
                {"name": "MLFLOW_TRACKING_URI", "value": spec.mlflow_tracking_uri}],
        # Credentials (DVC remote, MLflow login) only ever from the Secret.
        "envFrom": [{"secretRef": {"name": spec.credentials_secret, "optional": False}}],
        "ports": [{"name": "rdzv", "containerPort": RDZV_PORT}],
        "resources": {"requests": {"cpu": spec.cpu_request, "memory": spec.memory_request, **gpus},
                      "limits": {"memory": spec.memory_limit, **gpus}},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"},
                         {"name": "workspace", "mountPath": WORKSPACE}],
        # The stage's one-line reason (its last stderr line) ends up in the pod's status.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _pod_failure_policy() -> dict[str, Any]:
    """Exit 2 or 70 fails the whole Job at once (retrying cannot help); a pod evicted or
    preempted (DisruptionTarget) does not count as a failure and is recreated."""
    return {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                              "values": list(_NEVER_RETRIED)}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def render_job(spec: MultiNodeSpec) -> dict[str, Any]:
    """Indexed Job: N pods at once, each with a stable hostname <job>-<index> under the
    Service's subdomain. backoffLimit 0: any other failure ends the Job; the flow retries."""
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never", "subdomain": spec.service,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                            "fsGroup": 10001},
        "tolerations": [dict(t) for t in spec.tolerations],
        "containers": [_container(spec)],
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
            {"name": "workspace", "persistentVolumeClaim": {"claimName": spec.workspace_claim}},
        ],
    }
    if spec.gpu_type:
        pod_spec["nodeSelector"] = {"nvidia.com/gpu.product": spec.gpu_type}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": _labels(spec)},
        "spec": {
            "completionMode": "Indexed", "completions": spec.nodes, "parallelism": spec.nodes,
            "backoffLimit": 0, "podFailurePolicy": _pod_failure_policy(),
            "ttlSecondsAfterFinished": spec.finished_ttl_s,
            "template": {"metadata": {"labels": _labels(spec)}, "spec": pod_spec},
        },
    }


def render_multinode(spec: MultiNodeSpec) -> list[dict[str, Any]]:
    """The manifests to apply, in order: [Service, Job]."""
    return [render_service(spec), render_job(spec)]


@dataclass
class KubeApis:
    """The two API groups used; tests pass fakes (no cluster exists where they run)."""

    batch: Any  # kubernetes.client.BatchV1Api
    core: Any  # kubernetes.client.CoreV1Api


def cluster_apis() -> KubeApis:
    """In a pod: its service account; elsewhere: the current kubeconfig context."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return KubeApis(batch=client.BatchV1Api(), core=client.CoreV1Api())


def submit(apis: KubeApis, spec: MultiNodeSpec) -> None:
    """Create the Job, then the Service owned by it, so Kubernetes' garbage collector deletes
    the Service with the Job when its TTL runs out: nothing left behind."""
    service, job = render_multinode(spec)
    created = apis.batch.create_namespaced_job(namespace=spec.namespace, body=job)
    service["metadata"]["ownerReferences"] = [{
        "apiVersion": "batch/v1", "kind": "Job", "name": spec.name,
        "uid": created.metadata.uid, "blockOwnerDeletion": False}]
    apis.core.create_namespaced_service(namespace=spec.namespace, body=service)


def job_outcome(job: Any) -> str | None:
    """'Complete', 'Failed', or None while the Job runs."""
    for cond in (job.status.conditions or []) if job.status else []:
        if cond.type in ("Complete", "Failed") and cond.status == "True":
            return str(cond.type)
    return None


def failed_exit(apis: KubeApis, spec: MultiNodeSpec) -> tuple[int, str]:
    """The stage's exit code and reason, from the failed pods' training containers. When ranks
    disagree, a never-retried code (2, 70) wins over a retryable one: the same code whichever
    rank failed. No terminated container (image pull, deadline, deleted): transient."""
    pods = apis.core.list_namespaced_pod(namespace=spec.namespace,
                                         label_selector=f"{JOB_NAME_LABEL}={spec.name}")
    exits: list[tuple[int, str]] = []
    for pod in pods.items:
        for status in (pod.status.container_statuses or []) if pod.status else []:
            term = status.state.terminated if status.state else None
            if status.name == CONTAINER and term is not None and term.exit_code != 0:
                reason = (term.message or term.reason or "").strip().splitlines()
                exits.append((int(term.exit_code),
                              f"{pod.metadata.name}: {reason[-1] if reason else 'no message'}"))
    if not exits:
        return EXIT_TRANSIENT, f"job {spec.name} failed with no container exit (see its events)"
    exits.sort(key=lambda e: (e[0] not in _NEVER_RETRIED, e[0] == EXIT_TRANSIENT))
    return exits[0]


def watch(apis: KubeApis, spec: MultiNodeSpec, timeout_s: float, poll_s: float = 10.0,
          clock: Any = time) -> int:
    """Poll the Job to its end; 0 or the mapped stage exit code. Past timeout_s, TimeoutError."""
    deadline = clock.monotonic() + timeout_s
    while clock.monotonic() < deadline:
        job = apis.batch.read_namespaced_job_status(name=spec.name, namespace=spec.namespace)
        outcome = job_outcome(job)
        if outcome == "Complete":
            return 0
        if outcome == "Failed":
            return failed_exit(apis, spec)[0]
        clock.sleep(poll_s)
    raise TimeoutError(f"job {spec.name} still running after {timeout_s:.0f} s")


def delete(apis: KubeApis, spec: MultiNodeSpec) -> None:
    """Delete the Job now, with its pods and (through ownership) its Service."""
    apis.batch.delete_namespaced_job(name=spec.name, namespace=spec.namespace,
                                     propagation_policy="Foreground")


def run_multinode(spec: MultiNodeSpec, stage: str, timeout_s: float,
                  apis: KubeApis | None = None, poll_s: float = 10.0, clock: Any = time) -> int:
    """Submit, watch, map. Returns 0; a failure raises the StageError its exit code deserves
    (as a local `dvc repro` of the stage would). A timeout or an interrupt deletes the Job."""
    apis = apis or cluster_apis()
    submit(apis, spec)
    try:
        code = watch(apis, spec, timeout_s, poll_s, clock)
    except BaseException:
        delete(apis, spec)
        raise
    if code == 0:
        return 0
    _, reason = failed_exit(apis, spec)
    raise classify(stage, code, [reason])


def _transient_only(task_: Any, run: Any, state: Any) -> bool:
    """Retry exit 75 and deaths by signal only (as flows/pipeline.py does for local stages)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        with contextlib.suppress(Exception):
            exc = state.result(raise_on_failure=False)
    return isinstance(exc, StageError) and exc.retryable


@task(name="multinode-stage", retries=3, retry_delay_seconds=[10, 20, 40],
      retry_condition_fn=_transient_only, cache_policy=NO_CACHE)
def multinode_stage(spec: MultiNodeSpec, stage: str = "pretrain",
                    timeout_s: float = 6 * 3600.0) -> int:
    """A training stage over spec.nodes × spec.gpus_per_node GPUs as one Kubernetes Job.
    A retry needs a new Job name (a Job's pods never restart here): the attempt is appended."""
    from prefect.runtime import task_run

    attempt = int(getattr(task_run, "run_count", 1) or 1)
    run_spec = spec if attempt <= 1 else replace(spec, name=f"{spec.name[:48]}-r{attempt}")
    get_run_logger().info("%s on %d node(s) x %d GPU(s): job %s, rendezvous %s", stage,
                          spec.nodes, spec.gpus_per_node, run_spec.name, run_spec.rdzv_endpoint)
    return run_multinode(run_spec, stage, timeout_s)
