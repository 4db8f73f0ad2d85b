"""flows/k8s.py: submitting and watching the multi-node Job, and mapping its end to the stage's
exit code. FakeCluster below is a MOCK of the two Kubernetes API objects (BatchV1Api,
CoreV1Api): no Kubernetes cluster exists where these tests run, so nothing here talks to one.
It answers with the shapes the `kubernetes` client returns (attribute objects, snake_case)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

import pytest

from flows import k8s
from flows.dvcstage import StageBadInput, StageError, StageTransient

REPO = Path(__file__).resolve().parents[2]


def spec(**extra: Any) -> k8s.MultiNodeSpec:
    values: dict[str, Any] = dict(name="pretrain-1", image="registry.example.com/imagepipe:1",
                                  nodes=2, gpus_per_node=4, command=("python", "-m", "stages.pretrain"),
                                  workspace_claim="ws", mlflow_tracking_uri="http://mlflow:5000")
    return k8s.MultiNodeSpec(**{**values, **extra})


def pod(name: str, code: int | None, message: str = "", container: str = "train") -> NS:
    terminated = None if code is None else NS(exit_code=code, reason="Error", message=message)
    return NS(metadata=NS(name=name), status=NS(container_statuses=[
        NS(name=container, state=NS(terminated=terminated))]))


class FakeCluster:
    """Mock BatchV1Api + CoreV1Api: records what was created and deleted, and answers the Job's
    status from a script of condition lists (one per poll; the last one repeats)."""

    def __init__(self, polls: list[list[tuple[str, str]]], pods: list[NS] | None = None) -> None:
        self.polls, self.pods = polls, pods or []
        self.created: list[tuple[str, dict[str, Any]]] = []
        self.deleted: list[str] = []
        self.reads = 0

    def create_namespaced_job(self, namespace: str, body: dict[str, Any]) -> NS:
        self.created.append(("Job", body))
        return NS(metadata=NS(uid="uid-1234", name=body["metadata"]["name"]))

    def create_namespaced_service(self, namespace: str, body: dict[str, Any]) -> NS:
        self.created.append(("Service", body))
        return NS(metadata=NS(name=body["metadata"]["name"]))

    def read_namespaced_job_status(self, name: str, namespace: str) -> NS:
        conditions = self.polls[min(self.reads, len(self.polls) - 1)]
        self.reads += 1
        return NS(status=NS(conditions=[NS(type=t, status=s) for t, s in conditions] or None))

    def list_namespaced_pod(self, namespace: str, label_selector: str) -> NS:
        assert label_selector == "batch.kubernetes.io/job-name=pretrain-1"
        return NS(items=self.pods)

    def delete_namespaced_job(self, name: str, namespace: str, propagation_policy: str) -> None:
        self.deleted.append(name)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def run(cluster: FakeCluster, timeout_s: float = 600.0) -> int:
    apis = k8s.KubeApis(batch=cluster, core=cluster)
    return k8s.run_multinode(spec(), "pretrain", timeout_s, apis=apis, poll_s=5, clock=FakeClock())


def test_complete_job_is_exit_0_and_the_service_is_owned_by_the_job() -> None:
    cluster = FakeCluster([[], [("Complete", "False")], [("Complete", "True")]])
    assert run(cluster) == 0
    assert [kind for kind, _ in cluster.created] == ["Job", "Service"]
    service = cluster.created[1][1]
    assert service["metadata"]["ownerReferences"][0]["uid"] == "uid-1234"
    assert cluster.reads == 3 and cluster.deleted == []


@pytest.mark.parametrize(("pods", "error", "code"), [
    ([pod("p-0", 2, "pretrain: error: params.pretrain.epochs must be > 0")], StageBadInput, 2),
    ([pod("p-1", 70, "Traceback ...\nZeroDivisionError")], StageError, 70),
    ([pod("p-0", 75, "pretrain: transient failure: tracking unreachable")], StageTransient, 75),
    ([pod("p-1", 137, "OOMKilled")], StageTransient, 137),
    # Ranks disagree: the never-retried code wins, whichever rank reported it.
    ([pod("p-0", 75), pod("p-1", 2, "pretrain: error: bad shard")], StageBadInput, 2),
    ([pod("p-0", 143), pod("p-1", 70)], StageError, 70),
    # Failed before any training container ended (image pull, deadline): transient.
    ([pod("p-0", None)], StageTransient, 75),
    ([pod("p-0", 2, container="sidecar")], StageTransient, 75),
])
def test_failed_job_maps_to_the_stage_exit(pods: list[NS], error: type[StageError], code: int) -> None:
    cluster = FakeCluster([[("Failed", "True")]], pods)
    with pytest.raises(error) as raised:
        run(cluster)
    assert type(raised.value) is error and raised.value.code == code
    assert raised.value.retryable is (error is StageTransient)


def test_the_reason_is_the_failed_pod_s_last_line() -> None:
    cluster = FakeCluster([[("Failed", "True")]],
                          [pod("pretrain-1-1-x", 2, "loading\npretrain: error: bad shard 3")])
    with pytest.raises(StageBadInput, match="pretrain-1-1-x: pretrain: error: bad shard 3"):
        run(cluster)


def test_timeout_deletes_the_job() -> None:
    cluster = FakeCluster([[]])
    with pytest.raises(TimeoutError, match="still running after 60 s"):
        run(cluster, timeout_s=60)
    assert cluster.deleted == ["pretrain-1"]
    assert cluster.reads == 12  # every 5 s for 60 s


def test_stage_command_is_dvc_yaml_s() -> None:
    assert k8s.stage_command(REPO / "dvc.yaml", "pretrain")[:3] == ("python", "-m", "stages.pretrain")
    with pytest.raises(ValueError, match="no stage 'pretrian'"):
        k8s.stage_command(REPO / "dvc.yaml", "pretrian")


@pytest.mark.parametrize(("extra", "message"), [
    ({"name": "Pretrain_1"}, "lowercase"), ({"name": "p" * 53}, "at most 52"),
    ({"nodes": 0}, "nodes must be >= 1"), ({"command": ()}, "command is empty"),
])
def test_bad_specs_are_refused(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec(**extra)


def test_gpu_type_is_a_node_selector_only_when_given() -> None:
    assert "nodeSelector" not in k8s.render_job(spec())["spec"]["template"]["spec"]
    job = k8s.render_job(spec(gpu_type="NVIDIA-L4"))
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}


@pytest.mark.parametrize(("exc", "retried"), [
    (StageTransient("pretrain", 75, "x"), True), (StageBadInput("pretrain", 2, "x"), False),
    (StageError("pretrain", 70, "x"), False), (TimeoutError("x"), False)])
def test_the_task_retries_only_transient_failures(exc: BaseException, retried: bool) -> None:
    assert k8s._transient_only(None, None, NS(data=exc)) is retried
