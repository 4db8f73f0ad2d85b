"""The project image run for real: its CLI and every stage's `--help` as uid 10001, its size
and contents, and a project checkout bind-mounted from the host (owned by another uid: one
clear line and exit 2; with `--user` as the README says: `dvc repro` works)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.containers.kit import REPO, docker, run_in, step
from tests.helpers import project_copy

pytestmark = pytest.mark.slow

HOST_UID = 20002  # a host user that is neither root nor the image's 10001


def stage_modules() -> list[str]:
    """The modules dvc.yaml runs: `python -m stages.NAME ...`."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return [s["cmd"].split()[2] for s in stages.values()]


def test_cli_and_stages_start_as_uid_10001(image: str) -> None:
    modules = stage_modules()
    assert len(modules) >= 6 and all(m.startswith("stages.") for m in modules)
    # One container, one shell: each command's exit code and first line, as uid 10001.
    script = "id -u; id -g; imagepipe --help >/dev/null && echo cli-ok; " + "; ".join(
        f"python -m {m} --help >/dev/null && echo {m}-ok" for m in modules)
    script += "; python -c 'import ray, prefect_docker, prefect_kubernetes, dvc_s3; print(\"extras-ok\")'"
    with step("CLI and stages --help in the image"):
        done = run_in(image, "sh", "-c", script)
    lines = done.stdout.split()
    assert done.returncode == 0, done.stdout + done.stderr
    assert lines[:2] == ["10001", "10001"]
    assert lines[2:] == ["cli-ok", *(f"{m}-ok" for m in modules), "extras-ok"]


def test_a_container_under_cpus_1_counts_one_core(image: str) -> None:
    """`docker run --cpus 1` (the cgroup's CPU quota; the affinity still lists every host core):
    a stage inside counts 1 usable core, so its pools and torch threads fit the quota. Without
    the quota the same container counts the host's cores."""
    probe = ("import os; from stages.core.host import usable_cores, cpu_quota; "
             "print(len(os.sched_getaffinity(0)), usable_cores(), cpu_quota())")
    with step("usable_cores() in the image, with and without --cpus 1"):
        free = run_in(image, "python", "-c", probe)
        capped = run_in(image, "python", "-c", probe, options=("--cpus", "1"))
    assert free.returncode == 0 and capped.returncode == 0, free.stderr + capped.stderr
    host_cores = len(os.sched_getaffinity(0))
    if host_cores < 2:
        pytest.fail("this check needs a host with 2 cores or more (a quota of 1 must be the "
                    "tighter bound)", pytrace=False)
    assert free.stdout.split() == [str(host_cores), str(host_cores), "None"], free.stdout
    assert capped.stdout.split() == [str(host_cores), "1", "1.0"], capped.stdout


def test_no_build_secret_is_left_in_the_image(image: str) -> None:
    """pip's configuration and CA bundle were BuildKit secrets: no layer has them, and the
    image's pip has no configuration of its own."""
    with step("no pip secret in the image"):
        done = run_in(image, "sh", "-c", "ls /run/secrets 2>&1; pip config list; "
                                         "cat /etc/pip.conf 2>&1 | head -1")
        history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    assert "pip_cert" not in done.stdout and "cert" not in done.stdout, done.stdout
    assert "No such file" in done.stdout
    assert "ca-certificates.crt" not in history


def checkout_owned_by(folder: Path, uid: int) -> Path:
    """A project checkout like a user's on the host: everything owned by uid, writable only by it."""
    project_copy(folder)
    subprocess.run(["chown", "-R", f"{uid}:{uid}", str(folder)], check=True)
    folder.chmod(0o755)
    return folder


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown the checkout to another uid")
def test_bind_mounted_checkout_of_another_uid(image: str, tmp_path: Path) -> None:
    checkout = checkout_owned_by(tmp_path / "checkout", HOST_UID)
    mount = ("-v", f"{checkout}:/work", "-w", "/work", "-e", "IMAGEPIPE_TRACKING=0")
    with step("bind-mounted checkout as uid 10001 (refused)"):
        refused = run_in(image, "dvc", "repro", "ingest", options=mount)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert f"owner {HOST_UID}:{HOST_UID}" in line and f"--user {HOST_UID}:{HOST_UID}" in line

    # The README's way: the container runs as the folder's owner (HOME: a writable folder;
    # USER: the image's /etc/passwd has no such uid, and DVC's getpwuid() fails without it).
    as_owner = ("--user", f"{HOST_UID}:{HOST_UID}", "-e", "HOME=/tmp", "-e", "USER=owner", *mount)
    with step("bind-mounted checkout with --user (dvc repro ingest)"):
        done = run_in(image, "dvc", "repro", "ingest", options=as_owner)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    made = [p for p in (checkout / "data").rglob("*") if p.is_file()]
    assert (checkout / "data" / "source").is_dir() and (checkout / "data" / "target").is_dir()
    assert made and {p.stat().st_uid for p in made} == {HOST_UID}
