"""Past one machine on this one: ingest on a 2-node Ray cluster against the local process pool,
and pretrain as Ray Train workers against the in-stage DDP launch and one process.

A real Ray cluster of two nodes on 127.0.0.1 (tests/integration/raykit.py: two `ray start`,
token auth on, one CPU each), driven as the README's recipe says (RAY_ADDRESS, RAY_AUTH_MODE,
RAY_AUTH_TOKEN). Data: the first `--per-class` training images of each CIFAR-10 class from
../shared/data/cifar10-jpg.tar.gz (skipped when absent), 32 px colour.

* ingest: `python -m stages.ingest` (both roles from the same tree), data.engine local vs ray,
  interleaved `--repeat` times: wall seconds and images/s (images decoded / wall);
* pretrain on the ingested source set (resnet_small, width 16, batch 64, 2 epochs, CPU): one
  process, in-stage DDP over 2 processes, Ray Train with 2 workers (one per node), interleaved:
  training images/s (the per-epoch figure of plots/pretrain.csv, mean of the epochs) and the
  stage's wall seconds (start-up included).

Every configuration shares the same 2 cores: these are overheads and parity, not scaling.
The machine's load (`os.getloadavg`) is recorded before and after each run.

`python -m benchmarks.bench_ray [--tar PATH] [--per-class N] [--repeat N]`
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TARBALL = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
RESULTS = REPO / "benchmarks" / "results"


def _subset(tar_path: Path, dest: Path, per_class: int) -> int:
    """The first `per_class` train images of each class, extracted to dest/<class>/."""
    n = 0
    with tarfile.open(tar_path) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and parts[0] == "train" and \
                    int(parts[2].split(".")[0]) < per_class:
                member.name = "/".join(parts[1:])
                tar.extract(member, dest, filter="data")
                n += 1
    return n


def _params(base: Path, **sections: dict) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, values in sections.items():
        raw[key].update(values)
    path = base / f"params-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _run(args: list[str], env: dict[str, str]) -> dict:
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} exited {done.returncode}: {done.stderr[-2000:]}")
    return {"wall_s": round(wall, 2), "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def _ingest(tmp: Path, tree: Path, engine: str, env: dict[str, str], i: int) -> dict:
    params = _params(tmp, data={"image_size": 32, "channels": 3, "engine": engine,
                                "source": {"uri": f"imagefolder:{tree}"},
                                "target": {"uri": f"imagefolder:{tree}"}})
    out = tmp / f"ingest-{engine}-{i}"
    figures = _run(["stages.ingest", "--params", str(params), "--out", str(out)], env)
    n = sum(json.loads((out / role / "manifest.json").read_text())["n"] for role in ("source", "target"))
    return {**figures, "images": n, "images_per_s": round(n / figures["wall_s"], 1)}


def _pretrain(tmp: Path, data: Path, name: str, train: dict, env: dict[str, str], i: int) -> dict:
    params = _params(tmp, pretrain={"model": "resnet_small", "width": 16, "batch_size": 64,
                                    "epochs": 2, "device": "cpu", "checkpoint_every_steps": 0,
                                    **train})
    out = tmp / f"pretrain-{name}-{i}"
    args = ["stages.pretrain", "--params", str(params), "--data", str(data), "--model",
            str(out / "m.pt"), "--checkpoints", str(out / "ck"), "--metrics", str(out / "m.json"),
            "--plot", str(out / "p.csv")]
    figures = _run(args, env)
    rows = list(csv.DictReader((out / "p.csv").open()))
    rates = [float(r["images_per_s"]) for r in rows]
    return {**figures, "train_images_per_s": round(sum(rates) / len(rates), 1)}


TRAINING = {"one_process": {"devices": 1, "nodes": 1, "engine": "local"},
            "in_stage_ddp_2": {"devices": 2, "nodes": 1, "engine": "local"},
            "ray_train_2": {"devices": 1, "nodes": 2, "engine": "ray", "restarts": 0}}


def main(tar_path: Path = TARBALL, per_class: int = 300, repeat: int = 2) -> dict | None:
    if not tar_path.exists():
        print(f"bench_ray: skipped ({tar_path} not found)")
        return None
    sys.path.insert(0, str(REPO))
    from tests.integration.raykit import two_nodes

    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base_env = {**clean, "IMAGEPIPE_TRACKING": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    result: dict = {"cores": os.cpu_count(), "per_class": per_class, "ingest": {}, "pretrain": {}}
    with tempfile.TemporaryDirectory() as name, two_nodes(cpus_per_node=1) as cluster:
        tmp = Path(name)
        result["images"] = _subset(tar_path, tmp / "tree", per_class)
        ray_env = {**base_env, **cluster.driver_env()}
        for i in range(repeat):  # interleaved: the load drifts alike over both
            for engine in ("local", "ray"):
                env = ray_env if engine == "ray" else base_env
                result["ingest"].setdefault(engine, []).append(_ingest(tmp, tmp / "tree", engine, env, i))
        data = tmp / "ingest-local-0" / "source"
        for i in range(repeat):
            for label, train in TRAINING.items():
                env = ray_env if train["engine"] == "ray" else base_env
                result["pretrain"].setdefault(label, []).append(_pretrain(tmp, data, label, train, env, i))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ray.json").write_text(json.dumps(result, indent=2) + "\n")
    for part in ("ingest", "pretrain"):
        for label, runs in result[part].items():
            key = "images_per_s" if part == "ingest" else "train_images_per_s"
            print(f"{part:8} {label:15} " + "  ".join(
                f"{r[key]:>7} img/s {r['wall_s']:>6} s (load {r['load_before']})" for r in runs))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tar", type=Path, default=TARBALL)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=2)
    a = parser.parse_args()
    main(a.tar, a.per_class, a.repeat)
