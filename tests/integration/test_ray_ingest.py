"""ingest and augment on a real (local, 2-CPU) Ray: the same shards and manifest, byte for byte,
as the local process pool. Ray comes with the dev extra; the test skips where it is missing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import augment, ingest
from stages.core import engine, shards
from stages.core.dataset import load_dataset
from stages.params import parse_params
from tests.helpers import default_params

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, address="local",
             _node_ip_address="127.0.0.1", runtime_env={
                 "env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    yield
    ray.shutdown()


def _params(root: Path, engine_name: str, **data: object):
    raw = default_params()
    raw["data"].update({"image_size": 64, "channels": 3, "shard_mb": 1, "engine": engine_name,
                        "max_bad_fraction": 0.1, **data})
    raw["data"]["source"] = {"uri": f"imagefolder:{root}"}
    raw["data"]["target"] = {"uri": f"imagefolder:{root}"}
    raw["augment"]["copies"] = 1
    return parse_params(raw)


def _tree(root: Path) -> None:
    for cls, n in {"a": 100, "b": 70, "c": 30}.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(RNG.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(
                root / cls / f"{i}.jpg", quality=90)
    (root / "c" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + RNG.bytes(300))


def test_ray_and_the_local_pool_write_the_same_bytes(tmp_path: Path, local_ray: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "imgs"
    _tree(root)
    monkeypatch.setattr(shards, "MIN_PIECE", 16)  # pieces of shards too, not just shards
    monkeypatch.setattr(engine, "DECODE_POOL_FROM", 0)  # the local pool, for 200 small files
    monkeypatch.setattr(engine, "usable_cores", lambda: 2)
    out = {}
    for name in ("local", "ray"):
        params = _params(root, name)
        report = ingest.ingest_role("source", params.data.source, params, tmp_path / name / "src")
        assert len(report["bad"]) == 1
        out[name] = load_dataset(tmp_path / name / "src")
    a, b = out["local"], out["ray"]
    assert a.manifest == b.manifest
    assert len(a.manifest["shards"]) >= 3  # 200 images of 12 KB over 1 MB shards
    for entry in a.manifest["shards"]:
        assert (tmp_path / "local" / "src" / entry["file"]).read_bytes() == \
            (tmp_path / "ray" / "src" / entry["file"]).read_bytes()
    # augment's copies on Ray: one task per copy and shard, the same seeded bytes
    monkeypatch.setattr(engine, "AUGMENT_POOL_FROM", 0)
    for name in ("local", "ray"):
        augment.run(_params(root, name), tmp_path / "local" / "src", tmp_path / name / "aug")
    assert load_dataset(tmp_path / "local" / "aug").manifest["sha256"] == \
        load_dataset(tmp_path / "ray" / "aug").manifest["sha256"]


def test_dvc_push_of_a_one_class_change_sends_only_its_shards(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """Class-local shards, end to end through DVC: a folder remote receives the changed
    class's shard and the small arrays, not the set again."""
    import subprocess
    import sys

    root = tmp_path / "imgs"
    _tree(root)
    monkeypatch.setattr(engine, "usable_cores", lambda: 1)
    project = tmp_path / "project"
    project.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc_bin = str(Path(sys.executable).parent / "dvc")

    def dvc(*args: str) -> None:
        subprocess.run([dvc_bin, *args], cwd=project, env=env, check=True, capture_output=True)

    def remote_bytes() -> int:
        return sum(p.stat().st_size for p in (tmp_path / "remote").rglob("*") if p.is_file())

    dvc("init", "--no-scm", "-q")
    dvc("remote", "add", "-d", "r", str(tmp_path / "remote"))
    params = _params(root, "local")
    ingest.ingest_role("source", params.data.source, params, project / "data" / "source")
    dvc("add", "-q", "data/source")
    dvc("push", "-q")
    whole = remote_bytes()
    before = load_dataset(project / "data" / "source").manifest["shards"]
    for i in range(5):
        Image.fromarray(RNG.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(root / "c" / f"new{i}.jpg")
    ingest.ingest_role("source", params.data.source, params, project / "data" / "source")
    after = load_dataset(project / "data" / "source").manifest["shards"]
    changed = {s["sha256"] for s in after} - {s["sha256"] for s in before}
    assert len(changed) == 1 and len(after) == len(before)  # class c: one shard of 35 images
    dvc("add", "-q", "data/source")
    dvc("push", "-q")
    sent = remote_bytes() - whole
    shard_bytes = next(s["n"] for s in after if s["sha256"] in changed) * 64 * 64 * 3
    # the new shard + labels, split, manifest and DVC's directory listing: a few KB over it
    assert shard_bytes < sent < shard_bytes + 64 * 1024 < whole / 3, (sent, whole)
