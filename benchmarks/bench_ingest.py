"""ingest throughput and peak memory on real CIFAR-10 (60,000 JPEG files via imagefolder:).

Extracts ../shared/data/cifar10-jpg.tar.gz to a temporary folder (skipped when absent), runs
`python -m stages.ingest` in a child process exactly as DVC would, and reports images/s and the
child's peak RSS (the issue's ceiling: 1.5 GB).
"""

from __future__ import annotations

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


def main() -> dict | None:
    if not TARBALL.exists():
        print(f"bench_ingest: skipped ({TARBALL.name} not found beside the repo)")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "cifar"
        with tarfile.open(TARBALL) as tar:
            tar.extractall(tree, filter="data")
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        # Source: all 60,000 files at CIFAR's native 32 px RGB. Target: a token 2-class slice.
        params["data"].update(image_size=32, channels=3)
        params["data"]["source"] = {"uri": f"imagefolder:{tree}"}
        params["data"]["target"] = {"uri": f"imagefolder:{tree}", "classes": ["cat", "dog"],
                                    "train_per_class": 10}
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(params))
        start = time.perf_counter()
        with open(Path(tmp) / "stderr.txt", "w+") as err:
            proc = subprocess.Popen([sys.executable, "-m", "stages.ingest", "--params",
                                     f"{tmp}/params.yaml", "--out", f"{tmp}/data"],
                                    cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                                    # Tracked, as users run it, into a store of its own.
                                    env={**os.environ,
                                         "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"})
            # wait4 gives this child's own peak RSS (KiB on Linux); RUSAGE_CHILDREN would give
            # the largest child this process ever had, e.g. another benchmark's worker.
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - start
            if os.waitstatus_to_exitcode(status) != 0:
                err.seek(0)
                raise SystemExit(f"bench_ingest: ingest failed:\n{err.read()}")
        peak_mb = usage.ru_maxrss / 1024
        n = sum(json.loads((Path(tmp) / "data" / role / "manifest.json").read_text())["n"]
                for role in ("source", "target"))
    result = {"files": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1),
              "peak_rss_mb": round(peak_mb, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"bench_ingest: {n} images in {seconds:.1f} s = {result['images_per_s']:,.0f} images/s "
          f"(whole stage, imports included); peak RSS {peak_mb:,.0f} MB")
    return result


if __name__ == "__main__":
    main()
