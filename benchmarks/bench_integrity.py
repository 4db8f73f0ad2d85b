"""What checking a dataset against its manifest costs a stage (stages/core/integrity.py).

A CIFAR-sized set (60,000 x 32 x 32 x 3 uint8, 184 MB, one shard: the size of CIFAR-10 as
ingest writes it; content does not change hashing speed, so the pixels are random) is written
with write_sharded, then opened by load_dataset with verify_data "sha256" (every file hashed)
and "size" (headers and lengths only), and read whole as a resident stage reads it
(a copy of `ds.images` in memory). Rounds are interleaved so a shared machine's load hits each alike;
medians are reported, and the ratio of the sha256 open to a whole read. The page cache is
warm, as it is for a stage run right after the one that wrote the set: a cold disk costs both
the hash and the read one disk pass more. Writes benchmarks/results/integrity.json.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import integrity
from stages.core.dataset import RowWriter, load_dataset, write_sharded

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
N, SHAPE, ROUNDS = 60_000, (32, 32, 3), 5


def _write_set(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    shard = folder / "shard.npy"
    writer = RowWriter(shard, SHAPE, capacity=N, hashed=True)
    for _ in range(0, N, 5000):
        writer.write(rng.integers(0, 256, (5000, *SHAPE), dtype=np.uint8))
    writer.close()
    labels = np.arange(N) % 10
    split = np.where(np.arange(N) < 50_000, 0, 2).astype(np.uint8)
    out = folder / "set"
    out.mkdir()
    write_sharded(out, [(shard, writer.digest, N)], labels, split, [str(c) for c in range(10)],
                  {"role": "target"})
    return out


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        data = _write_set(Path(tmp))
        size_mb = sum(p.stat().st_size for p in data.rglob("*.npy")) / 2**20

        def open_sha() -> None:
            integrity._verified.clear()  # each round hashes, as a new process does
            load_dataset(data, verify="sha256")

        contenders = {"open_sha256": open_sha,
                      "open_size": lambda: load_dataset(data, verify="size"),
                      "read_whole": lambda: np.array(load_dataset(data, verify="size").images,
                                                     copy=True),
                      "hashlib_only": lambda: integrity.file_sha256(data / "shards" / "00000.npy")}
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(ROUNDS):
            for name, fn in contenders.items():
                times[name].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"set_mb": round(size_mb, 1), "rounds": ROUNDS,
              "median_s": {k: round(v, 4) for k, v in med.items()},
              "sha256_mb_per_s": round(size_mb / med["open_sha256"], 1),
              "sha256_open_vs_whole_read": round(med["open_sha256"] / med["read_whole"], 2)}
    print(f"integrity: {size_mb:.0f} MB set: open with sha256 {med['open_sha256']:.3f} s "
          f"({result['sha256_mb_per_s']:.0f} MB/s), size only {med['open_size']:.4f} s, a whole "
          f"read {med['read_whole']:.3f} s ({result['sha256_open_vs_whole_read']}x it)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "integrity.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
