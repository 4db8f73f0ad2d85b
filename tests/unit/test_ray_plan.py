"""How many Ray Train workers a training section asks for, and whether they take GPUs (no Ray
needed: the cluster's GPU count is an argument); the params that choose the engine."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from stages.core.errors import BadInput, Transient
from stages.core.raytrain import workers
from stages.params import PretrainParams, parse_params
from tests.helpers import REPO, default_params


@pytest.mark.parametrize(("params", "gpus", "want"), [
    (dict(device="cpu", devices=1, nodes=2), 8, (2, False)),  # device cpu: GPUs left alone
    (dict(device="auto", devices=1, nodes=2), 0, (2, False)),  # a CPU cluster: gloo
    (dict(device="auto", devices="auto", nodes=2), 8, (8, True)),  # one worker per GPU
    (dict(device="cuda", devices=4, nodes=2), 8, (8, True)),
])
def test_workers_are_nodes_times_devices(params: dict, gpus: float, want: tuple[int, bool]) -> None:
    assert workers(PretrainParams(engine="ray", **params), gpus) == want


def test_more_gpu_workers_than_the_cluster_has_is_bad_input() -> None:
    with pytest.raises(BadInput, match="nodes x devices = 16 GPU workers but the Ray cluster has 8"):
        workers(PretrainParams(device="cuda", devices=8, nodes=2, engine="ray"), 8)
    with pytest.raises(BadInput, match="the Ray cluster has no GPU"):
        workers(PretrainParams(device="cuda", devices=1, nodes=2, engine="ray"), 0)


def test_engine_and_restarts_are_validated() -> None:
    assert (PretrainParams().engine, PretrainParams().restarts) == ("local", 2)
    raw = default_params()
    raw["pretrain"]["engine"] = "kubernetes"
    with pytest.raises(BadInput, match="pretrain.engine"):
        parse_params(raw)
    raw["pretrain"].update(engine="ray", restarts=-1)
    with pytest.raises(BadInput, match="pretrain.restarts"):
        parse_params(raw)


def test_a_connect_timeout_that_is_no_number_is_the_default_not_a_crash_at_import() -> None:
    """Read by host.env_seconds as the other durations from the environment are: a float() of
    the variable raised ValueError when any stage imported the module."""
    probe = "from stages.core import raycluster; print(raycluster.CONNECT_TIMEOUT_S)"
    for value, want in (("ten", "60.0"), ("5", "5.0")):
        done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                              text=True, timeout=60,
                              env={**os.environ, "IMAGEPIPE_RAY_CONNECT_TIMEOUT_S": value})
        assert done.returncode == 0 and done.stdout.strip() == want, done.stderr


@pytest.mark.parametrize(("where", "named"), [
    ("127.0.0.1:1", "127.0.0.1:1"),
    ("ray://127.0.0.1:1/", "127.0.0.1:1"),  # the client scheme and a trailing slash
    ("[::1]:1", "::1:1"),  # an IPv6 head, bracketed
])
def test_the_probe_reads_the_head_s_host_and_port_from_the_address(where: str, named: str) -> None:
    """The bounded probe connects where the address says, and a refusal names that place."""
    from stages.core import raycluster

    with pytest.raises(Transient, match=re.escape(f"no Ray cluster answers at {named} (")):
        raycluster._probe(where, 5.0)


@pytest.mark.parametrize("where", ["127.0.0.1:head", ":6379", "ray://:6379"])
def test_an_address_without_a_host_or_a_numeric_port_is_bad_input(where: str) -> None:
    from stages.core import raycluster

    with pytest.raises(BadInput, match="is not host:port"):
        raycluster._probe(where, 5.0)
