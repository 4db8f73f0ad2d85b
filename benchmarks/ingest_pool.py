"""Where ingest's process pool starts to pay: ingest's core forced inline against forced onto
its pool, in rotated rounds, 2 cores (taskset), each run a cold ingest in a child process.

* `--crossover`: CIFAR-10's JPEGs (../shared/data/cifar10-jpg.tar.gz, or `--tree DIR`) in
  folders of 1,000, 6,000, 20,000 and 60,000 files (hard links), against a plain PIL loop in a
  2-process pool: the crossover that stages/core/engine.py's DECODE_POOL_FROM is taken at.
* `--photos N`: N synthetic camera-sized photos (3000 x 2000, JPEG quality 90, made here with
  PIL, or those already in `--photos-dir DIR`): inline, the pool, and the rule (what
  shards.decode_engine picks for them, run as it picks), with wall seconds, the CPU seconds of
  the process tree and the 1-minute load before and after each run.

Not run by `make bench` (minutes): `python -m benchmarks.ingest_pool --photos 300 --repeat 3`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.bench_ingest import RESULTS, TARBALL, _core, _plain, load

CROSSOVER_SIZES = (1_000, 6_000, 20_000, 60_000)
NEVER = 10**18  # a DECODE_POOL_FROM no work reaches: inline


def _subset(tree: Path, out: Path, n: int) -> Path:
    """The first n / 10 files of each class (5/6 of them train, 1/6 test), as hard links."""
    for split, share in (("train", 5 / 6), ("test", 1 / 6)):
        for cls in sorted((tree / split).iterdir()):
            (out / split / cls.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[:round(n * share / 10)]:
                os.link(f, out / split / cls.name / f.name)
    return out


def _rounds(tmp: Path, runs: dict[str, Callable[[], dict]], repeat: int) -> dict[str, list]:
    """Each run `repeat` times, the order rotated round by round (a machine whose others' load
    comes in waves gives no run the quiet moments every time); each run cold."""
    rows: dict[str, list] = {k: [] for k in runs}
    for i in range(repeat):
        names = list(runs)[i % len(runs):] + list(runs)[:i % len(runs)]
        for name in names:
            shutil.rmtree(tmp / name, ignore_errors=True)
            rows[name].append(runs[name]())
    return rows


def crossover(tmp: Path, tree: Path, repeat: int) -> dict:
    """Per folder size: the plain 2-process pool, ingest inline and ingest on its pool; the
    median ratio of each ingest's images/s to the plain pool's."""
    result: dict = {}
    for n in CROSSOVER_SIZES:
        folder = _subset(tree, tmp / f"sub{n}", n) if n < 60_000 else tree
        print(f" {n:,} files", flush=True)
        rows = _rounds(tmp, {
            "plain_2": lambda folder=folder: _plain(folder, 2, "0,1"),
            "inline": lambda folder=folder: _core(tmp, folder, "inline", "0,1", _pool_from=NEVER),
            "pool": lambda folder=folder: _core(tmp, folder, "pool", "0,1", _pool_from=0)},
            repeat)
        rates = {k: [r["images_per_s"] for r in v] for k, v in rows.items()}
        plain = statistics.median(rates["plain_2"])
        result[n] = {**rates, **{f"{k}_vs_plain": round(statistics.median(rates[k]) / plain, 2)
                                 for k in ("inline", "pool")}}
        print(f"  {n:,}: inline {result[n]['inline_vs_plain']}x, pool "
              f"{result[n]['pool_vs_plain']}x the plain 2-process pool", flush=True)
    return result


def make_photos(root: Path, n: int, size: tuple[int, int] = (3000, 2000)) -> Path:
    """n JPEGs that compress like photos, not like white noise: a smooth random field (a small
    random image upsampled) plus sensor-like noise, quality 90 (~1.4 MB at 6 MP); 5/6 train,
    1/6 test, over 2 classes. Kept where already made."""
    import numpy as np
    from PIL import Image

    if root.exists() and sum(1 for _ in root.rglob("*.jpg")) >= n:
        return root
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        folder = root / ("test" if i % 6 == 5 else "train") / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (h // 50, w // 50, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC),
                           dtype=np.int16)
        noisy = np.clip(field + rng.normal(0, 6, (h, w, 3)).astype(np.int16), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def rule(tree: Path) -> dict:
    """What ingest's rule makes of a tree: its weight (shards.decode_work) and the engine."""
    from stages.core import engine, shards

    files = sorted(str(p) for p in tree.rglob("*") if p.is_file())
    work, weighed = shards.decode_work(os.path.getsize(f) for f in files)
    return {"files": len(files), "weighed": weighed, "work": work,
            "pool_from": engine.DECODE_POOL_FROM,
            "engine": shards.decode_engine("local", True, work)}


def photos(tmp: Path, tree: Path, repeat: int) -> dict:
    """Inline, the pool and the rule on camera-sized photos: wall s, CPU s, load."""
    picked = rule(tree)
    print(f" {picked['files']} photos, {sum(p.stat().st_size for p in tree.rglob('*.jpg')):,} B: "
          f"the rule picks {picked['engine']} (the first {picked['weighed']} weigh "
          f"{picked['work']:,}; the pool from {picked['pool_from']:,})", flush=True)
    rows = _rounds(tmp, {
        "inline": lambda: _core(tmp, tree, "inline", "0,1", _pool_from=NEVER),
        "pool": lambda: _core(tmp, tree, "pool", "0,1", _pool_from=0),
        "rule": lambda: _core(tmp, tree, "rule", "0,1")}, repeat)
    result: dict = {"rule": picked, **rows}
    for name, runs in rows.items():
        result[f"{name}_median_s"] = statistics.median(r["seconds"] for r in runs)
        # CPU seconds of the process tree over wall seconds: the cores the run got (others'
        # load on a shared machine takes the rest)
        result[f"{name}_cores"] = [round(r["cpu_us_per_image"] * r["images"] / 1e6 / r["seconds"], 2)
                                   for r in runs]
    result["pool_speedup"] = round(result["inline_median_s"] / result["pool_median_s"], 2)
    print(f"  median: inline {result['inline_median_s']} s, pool {result['pool_median_s']} s "
          f"({result['pool_speedup']}x), the rule {result['rule_median_s']} s", flush=True)
    return result


def main(tree: Path | None = None, n_photos: int = 0, photos_dir: Path | None = None,
         repeat: int = 1) -> dict:
    result: dict = {"cores": os.cpu_count(), "load_before": round(load(), 2)}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if n_photos:
            made = make_photos(photos_dir or tmp / "photos", n_photos)
            result["photos"] = photos(tmp, made, repeat)
        elif tree is not None or TARBALL.exists():
            if tree is None:
                tree = tmp / "cifar"
                with tarfile.open(TARBALL) as tar:
                    tar.extractall(tree, filter="data")
            result["crossover"] = crossover(tmp, tree, repeat)
    result["load_after"] = round(load(), 2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("ingest_pool_photos.json" if n_photos else "ingest_crossover.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crossover", action="store_true",
                        help="CIFAR: inline vs pool vs the plain pool at 1k/6k/20k/60k files")
    parser.add_argument("--tree", type=Path, help="an extracted CIFAR JPEG tree (read only)")
    parser.add_argument("--photos", type=int, default=0, metavar="N",
                        help="N synthetic 3000 x 2000 photos: inline vs pool vs the rule")
    parser.add_argument("--photos-dir", type=Path, help="where the photos are made or kept")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if not (args.crossover or args.photos):
        parser.error("choose --crossover or --photos N")
    main(args.tree, args.photos, args.photos_dir, args.repeat)
