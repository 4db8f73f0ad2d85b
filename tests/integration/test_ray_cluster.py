"""ingest on a real two-node Ray cluster on 127.0.0.1 (tests/integration/raykit.py: two
`ray start`, separate temp dirs, token auth on): the same bytes as the local pool with tasks
on both nodes, one connection per ingest, pieces sized by the cluster's CPUs; a cluster that is
not there is 75 within seconds, a driver without the token is 2. Each names its fix."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages import ingest
from stages.core import engine, shards
from stages.core.dataset import load_dataset
from tests.helpers import REPO, default_params, write_params
from tests.integration.raykit import Cluster, free_port, two_nodes
from tests.integration.test_ray_ingest import _params, _tree

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with two_nodes(cpus_per_node=2) as c:
        yield c


def spied_ingest(root: str, out: str, engine_name: str) -> None:
    """ingest.run in this process with the driver on one core, printing how many times it
    connected to Ray and the worker counts its pieces were sized by (a test's child process:
    Ray reads RAY_AUTH_MODE and the token when it is imported, so the driver's environment
    must be there before, as it is for a stage)."""
    import json

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(shards, "MIN_PIECE", 16)
    monkeypatch.setattr(engine, "usable_cores", lambda: 1)  # the driver: one core
    inits: list[str] = []
    sized: list[int] = []
    real_init, real_pieces = ray.init, shards._pieces
    monkeypatch.setattr(ray, "init", lambda *a, **k: inits.append(str(k.get("address"))) or
                        real_init(*a, **k))
    monkeypatch.setattr(shards, "_pieces", lambda *a, **k: sized.append(a[4]) or real_pieces(*a, **k))
    ingest.run(_params(Path(root), engine_name), Path(out))
    print(json.dumps({"inits": inits, "sized": sized}))


def spy(tmp_path: Path, engine_name: str, env: dict[str, str]) -> dict[str, list]:
    import json

    done = subprocess.run([sys.executable, "-c", "import sys; from tests.integration.test_ray_cluster "
                           "import spied_ingest; spied_ingest(*sys.argv[1:])", str(tmp_path / "imgs"),
                           str(tmp_path / engine_name), engine_name], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**clean_env(), **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def clean_env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
            "IMAGEPIPE_TRACKING": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def test_ingest_on_two_nodes_writes_the_local_pool_s_bytes(tmp_path: Path, cluster: Cluster) -> None:
    _tree(tmp_path / "imgs")
    spy(tmp_path, "local", {})
    seen = spy(tmp_path, "ray", cluster.driver_env())
    for role in ("source", "target"):
        a, b = load_dataset(tmp_path / "local" / role), load_dataset(tmp_path / "ray" / role)
        assert a.manifest == b.manifest
        for entry in a.manifest["shards"]:
            assert (tmp_path / "local" / role / entry["file"]).read_bytes() == \
                (tmp_path / "ray" / role / entry["file"]).read_bytes()
    assert seen["inits"] == [cluster.address], "one connection per ingest, not one per role"
    # pieces sized by the cluster's 4 CPUs (2 nodes x 2), not the driver's one core
    assert seen["sized"] == [4, 4], seen
    assert cluster.nodes_that_ran("decode_piece") == 2


def run_ingest(tmp_path: Path, env: dict[str, str]) -> tuple[int, str, float]:
    root = tmp_path / "imgs"
    _tree(root)
    raw = default_params()
    raw["data"].update({"image_size": 16, "engine": "ray", "max_bad_fraction": 0.1})
    raw["data"]["source"] = raw["data"]["target"] = {"uri": f"imagefolder:{root}"}
    params = write_params(tmp_path / "params.yaml", raw)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "stages.ingest", "--params", str(params),
                           "--out", str(tmp_path / "data")], cwd=REPO, capture_output=True,
                          text=True, timeout=300,
                          env={**clean_env(), **env})
    return done.returncode, done.stderr, time.monotonic() - start


def test_an_address_nothing_listens_on_is_75_at_once(tmp_path: Path) -> None:
    code, err, took = run_ingest(tmp_path, {"RAY_ADDRESS": f"127.0.0.1:{free_port()}"})
    assert code == 75, err
    assert "no Ray cluster answers at 127.0.0.1" in err and "ray start --head" in err
    assert took < 60, took  # Ray's own loop was still waiting after 120 s


def test_a_driver_without_the_token_is_2_naming_it(tmp_path: Path, cluster: Cluster) -> None:
    code, err, _ = run_ingest(tmp_path, {"RAY_ADDRESS": cluster.address})
    assert code == 2, err
    assert "RAY_AUTH_MODE=token" in err and "refused this driver's token" in err


def test_token_mode_without_a_token_is_2(tmp_path: Path, cluster: Cluster) -> None:
    code, err, took = run_ingest(tmp_path, {"RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "token",
                                            "HOME": str(tmp_path)})
    assert code == 2, err
    assert "no token is set" in err and "RAY_AUTH_TOKEN" in err
    assert took < 60
