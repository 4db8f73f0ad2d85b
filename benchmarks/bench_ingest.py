"""ingest throughput and peak memory on real CIFAR-10 (60,000 JPEG files via imagefolder:).

Extracts ../shared/data/cifar10-jpg.tar.gz to a temporary folder (skipped when absent), then:

* stage: `python -m stages.ingest` in a child process exactly as DVC runs it (tracked, both
  roles), images/s and the child's peak RSS (the issue's ceiling: 1.5 GB);
* what a user would write, over the same files: a plain single-process PIL loop and a plain
  `multiprocessing.Pool.map` over 2 processes (decode to a uint8 array, nothing else);
* ingest's core (listing, splits, decoding, hashing, validation, shards) with 1 and 2 usable
  cores (taskset) on the local process pool, and on a local 2-CPU Ray; peak RSS of the whole
  process tree (pool workers, Ray's processes) sampled every 50 ms;
* a rerun with nothing changed (every shard staged already), and `augment` with copies: 0
  (a shard-by-shard copy) with its peak RSS;
* `dvc push` to a folder remote of the dataset with shard_mb: 16 (class-local shards), then
  of the same after 100 new images in one class: bytes sent each time, and `dvc add` time.

Figures depend on the machine's load: `uptime`'s 1-minute load is recorded with them, and
the CPU seconds of each run's process tree (less sensitive to others' load than wall time).

`python -m benchmarks.bench_ingest --tree DIR --quick --repeat 3` compares only the plain
2-process pool and ingest's core on 2 cores, alternately, on an already extracted tree.
Where ingest's pool starts to pay (inline against the pool, on CIFAR subsets and on camera-
sized photos) is benchmarks/ingest_pool.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
ENV = {**os.environ, "IMAGEPIPE_TRACKING": "0", "RAY_USAGE_STATS_ENABLED": "0",
       "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(REPO)}

# What the core runs in a child: one role, the whole tree, 32 px RGB.
CORE = """
import sys, time
from pathlib import Path
from stages import ingest
from stages.params import parse_params
import yaml
raw = yaml.safe_load(Path(sys.argv[1]).read_text())
cpus = raw.pop("_ray", None)
pool_from = raw.pop("_pool_from", None)
if pool_from is not None:  # benchmarks/ingest_pool.py: the pool forced on or off
    from stages.core import engine
    engine.DECODE_POOL_FROM = int(pool_from)
params = parse_params(raw)
if cpus:
    import ray
    ray.init(num_cpus=int(cpus), include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": sys.argv[3]}})
start = time.perf_counter()
report = ingest.ingest_role("source", params.data.source, params, Path(sys.argv[2]))
print(report["candidates"], time.perf_counter() - start)
"""

PLAIN = """
import sys, time, glob
import numpy as np
from multiprocessing import Pool
from PIL import Image
def load(path):
    return np.asarray(Image.open(path).convert("RGB"))
if __name__ == "__main__":
    files = sorted(glob.glob(sys.argv[1] + "/*/*/*.jpg"))
    start = time.perf_counter()
    if sys.argv[2] == "1":
        images = [load(f) for f in files]
    else:
        with Pool(int(sys.argv[2])) as pool:
            images = pool.map(load, files, chunksize=256)
    out = np.stack(images)
    print(len(files), time.perf_counter() - start)
"""


def load() -> float:
    return os.getloadavg()[0]


_CPU: dict[str, float] = {"last": 0.0}  # CPU seconds of the last _child's process tree


def _tree_peak(proc: subprocess.Popen) -> float:
    """Peak summed RSS (MB) of `proc` and all its descendants, sampled every 50 ms; their CPU
    seconds (the last sample of each process: up to 50 ms of a process's end is missed) go to
    _CPU["last"]."""
    import psutil

    root, peak = psutil.Process(proc.pid), 0
    cpu: dict[int, float] = {}
    while proc.poll() is None:
        total = 0
        for p in [root, *_children(root)]:
            try:
                total += p.memory_info().rss
                times = p.cpu_times()
                cpu[p.pid] = times.user + times.system
            except psutil.Error:
                pass
        peak = max(peak, total)
        time.sleep(0.05)
    _CPU["last"] = sum(cpu.values())
    return peak / 2**20


def _children(root: object) -> list:
    import psutil

    try:
        return root.children(recursive=True)  # type: ignore[attr-defined]
    except psutil.Error:
        return []


def _child(args: list[str], cpus: str | None = None) -> tuple[str, float]:
    cmd = ["taskset", "-c", cpus, *args] if cpus else args
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = _tree_peak(proc)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"bench_ingest: {args[:3]} failed:\n{err[-3000:]}")
    return out.strip().splitlines()[-1], peak


def _core(tmp: Path, tree: Path, name: str, cpus: str, **data: object) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(image_size=32, channels=3, **{k: v for k, v in data.items()
                                                        if not k.startswith("_")})
    params["data"]["source"] = {"uri": f"imagefolder:{tree}"}
    params.update({k: v for k, v in data.items() if k.startswith("_")})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params))
    out = tmp / name / "source"
    before = load()
    line, peak = _child([sys.executable, "-c", CORE, str(path), str(out), str(REPO)], cpus)
    n, seconds = line.split()
    row = {"images": int(n), "seconds": round(float(seconds), 2),
           "images_per_s": round(int(n) / float(seconds)), "peak_rss_mb": round(peak),
           "cpu_us_per_image": round(_CPU["last"] / int(n) * 1e6, 1),
           "load_before": round(before, 2), "load_after": round(load(), 2)}
    print(f"  {name:<22} {row['images_per_s']:>7,} images/s  {row['seconds']:>6} s  "
          f"peak RSS {row['peak_rss_mb']:>5,} MB  {row['cpu_us_per_image']:>5} CPU us/image  "
          f"(load {before:.1f})", flush=True)
    return row


def _plain(tree: Path, workers: int, cpus: str) -> dict:
    before = load()
    line, peak = _child([sys.executable, "-c", PLAIN, str(tree), str(workers)], cpus)
    n, seconds = line.split()
    row = {"images": int(n), "seconds": round(float(seconds), 2),
           "images_per_s": round(int(n) / float(seconds)), "peak_rss_mb": round(peak),
           "cpu_us_per_image": round(_CPU["last"] / int(n) * 1e6, 1),
           "load_before": round(before, 2)}
    print(f"  plain PIL, {workers} proc(s)     {row['images_per_s']:>7,} images/s  "
          f"{row['seconds']:>6} s  peak RSS {row['peak_rss_mb']:>5,} MB  "
          f"{row['cpu_us_per_image']:>5} CPU us/image  (load {before:.1f})", flush=True)
    return row


def _stage(tmp: Path, tree: Path) -> dict:
    """The whole stage as DVC runs it, tracked, both roles (the figure this bench had)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(image_size=32, channels=3)
    params["data"]["source"] = {"uri": f"imagefolder:{tree}"}
    params["data"]["target"] = {"uri": f"imagefolder:{tree}", "classes": ["cat", "dog"],
                                "train_per_class": 10}
    (tmp / "stage.yaml").write_text(yaml.safe_dump(params))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stages.ingest", "--params",
                             str(tmp / "stage.yaml"), "--out", str(tmp / "stage")], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "IMAGEPIPE_TRACKING": "1",
                                 "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/runs.db"})
    peak = _tree_peak(proc)
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench_ingest: ingest failed:\n{err[-3000:]}")
    n = sum(json.loads((tmp / "stage" / r / "manifest.json").read_text())["n"]
            for r in ("source", "target"))
    row = {"images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds),
           "peak_rss_mb": round(peak)}
    print(f"  stage (tracked, imports) {row['images_per_s']:>7,} images/s  {row['seconds']:>6} s  "
          f"peak RSS {row['peak_rss_mb']:>5,} MB")
    return row


def _augment_copy(tmp: Path, source: Path) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["augment"]["copies"] = 0
    (tmp / "aug.yaml").write_text(yaml.safe_dump(params))
    code = ("import sys; from pathlib import Path; from stages import augment; "
            "from stages.params import load_params; "
            "augment.run(load_params(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])); print('ok')")
    start = time.perf_counter()
    _, peak = _child([sys.executable, "-c", code, str(tmp / "aug.yaml"), str(source),
                      str(tmp / "augmented")])
    size = sum(p.stat().st_size for p in source.rglob("*.npy")) / 2**20
    row = {"set_mb": round(size), "seconds": round(time.perf_counter() - start, 2),
           "peak_rss_mb": round(peak)}
    print(f"  augment copies=0: {row['set_mb']} MB set copied, peak RSS {row['peak_rss_mb']} MB")
    return row


def _dvc(cwd: Path, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=ENV,
                   check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def _push(tmp: Path, tree: Path) -> dict:
    """Bytes a one-class change sends to a folder remote, against the whole set."""
    from PIL import Image, ImageOps

    project, remote = tmp / "dvcproj", tmp / "remote"
    project.mkdir()
    _dvc(project, "init", "--no-scm", "-q")
    _dvc(project, "remote", "add", "-d", "r", str(remote))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(image_size=32, channels=3, shard_mb=16)
    params["data"]["source"] = {"uri": f"imagefolder:{tree}"}
    (tmp / "push.yaml").write_text(yaml.safe_dump(params))
    out = project / "data" / "source"

    def ingest_add_push() -> tuple[int, float]:
        _child([sys.executable, "-c", CORE, str(tmp / "push.yaml"), str(out), str(REPO)])
        hashing = _dvc(project, "add", "-q", "data/source")
        before = sum(p.stat().st_size for p in remote.rglob("*") if p.is_file()) if remote.exists() else 0
        _dvc(project, "push", "-q")
        return sum(p.stat().st_size for p in remote.rglob("*") if p.is_file()) - before, hashing

    whole, hash_all = ingest_add_push()
    shards_before = len(json.loads((out / "manifest.json").read_text())["shards"])
    for i, src in enumerate(sorted((tree / "train" / "cat").iterdir())[:100]):
        ImageOps.mirror(Image.open(src)).save(tree / "train" / "cat" / f"new-{i}.png")
    change, hash_change = ingest_add_push()
    for new in (tree / "train" / "cat").glob("new-*.png"):
        new.unlink()
    row = {"shards": shards_before, "whole_set_bytes": whole, "one_class_change_bytes": change,
           "fraction": round(change / whole, 4), "dvc_add_s_first": round(hash_all, 2),
           "dvc_add_s_after_change": round(hash_change, 2)}
    print(f"  dvc push: whole set {whole:,} B in {shards_before} shards; +100 images in one class "
          f"sends {change:,} B ({100 * row['fraction']:.1f}%); dvc add {hash_all:.1f} s / "
          f"{hash_change:.1f} s")
    return row


def _quick(tmp: Path, tree: Path, repeat: int) -> dict:
    """Plain 2-process pool and ingest's core on the same 2 cores, alternately, `repeat`
    times: the ratio of their images/s is the figure (each pair ran under the same load).
    Which goes first alternates (ABBA): on a shared machine whose others' load comes in waves,
    a fixed order kept giving the same one the quiet moments."""
    rows: dict = {"plain_2": [], "local_2": [], "ratio": [], "first": []}
    for i in range(repeat):
        shutil.rmtree(tmp / "local_2", ignore_errors=True)  # a cold ingest each time
        if i % 2 == 0:
            rows["plain_2"].append(_plain(tree, 2, "0,1"))
            rows["local_2"].append(_core(tmp, tree, "local_2", "0,1"))
        else:
            rows["local_2"].append(_core(tmp, tree, "local_2", "0,1"))
            rows["plain_2"].append(_plain(tree, 2, "0,1"))
        rows["first"].append("plain" if i % 2 == 0 else "ingest")
        rows["ratio"].append(round(rows["local_2"][-1]["images_per_s"]
                                   / rows["plain_2"][-1]["images_per_s"], 2))
    print(f"  ingest / plain pool, images/s: {rows['ratio']}")
    return rows


def main(tree: Path | None = None, quick: bool = False, repeat: int = 1) -> dict | None:
    if tree is None and not TARBALL.exists():
        print(f"bench_ingest: skipped ({TARBALL.name} not found beside the repo)")
        return None
    result: dict = {"cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if tree is None:
            tree = tmp / "cifar"
            with tarfile.open(TARBALL) as tar:
                tar.extractall(tree, filter="data")
        if quick:
            result["quick"] = _quick(tmp, tree, repeat)
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "ingest_quick.json").write_text(json.dumps(result, indent=2) + "\n")
            return result
        result["plain_1"] = _plain(tree, 1, "0")
        result["plain_2"] = _plain(tree, 2, "0,1")
        result["local_1"] = _core(tmp, tree, "local_1", "0")
        result["local_2"] = _core(tmp, tree, "local_2", "0,1")
        result["rerun_unchanged"] = _core(tmp, tree, "local_2", "0,1")
        try:
            import ray  # noqa: F401

            result["ray_1"] = _core(tmp, tree, "ray_1", "0,1", engine="ray", _ray=1)
            result["ray_2"] = _core(tmp, tree, "ray_2", "0,1", engine="ray", _ray=2)
        except ImportError:
            print("  ray: skipped (pip install -e '.[ray]')")
        result["augment_copy"] = _augment_copy(tmp, tmp / "local_2" / "source")
        result["stage"] = _stage(tmp, tree)
        result["dvc_push"] = _push(tmp, tree)
        if tree.is_relative_to(tmp):
            shutil.rmtree(tree, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, help="an extracted CIFAR JPEG tree (read only)")
    parser.add_argument("--quick", action="store_true", help="plain pool vs ingest only")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    main(args.tree, args.quick, args.repeat)
