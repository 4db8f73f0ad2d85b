"""ingest throughput and peak memory on real CIFAR-10 (60,000 JPEG files via imagefolder:).

Extracts ../shared/data/cifar10-jpg.tar.gz to a temporary folder (skipped when absent), runs
`python -m stages.ingest` in a child process exactly as DVC would, and reports images/s and the
child's peak RSS (the issue's ceiling: 1.5 GB).
"""

from __future__ import annotations

import json
import resource
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
        proc = subprocess.run([sys.executable, "-m", "stages.ingest", "--params", f"{tmp}/params.yaml",
                               "--out", f"{tmp}/data"], cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"bench_ingest: ingest failed:\n{proc.stderr}")
        # ru_maxrss of children is in KiB on Linux: the largest child, here the ingest process.
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
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
