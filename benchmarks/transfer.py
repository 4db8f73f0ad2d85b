"""Transfer on photos that are not the source's: a recipe's transfer gain over seeds, with intervals.

The measure (issue 12): source = CIFAR-10's first 6 classes at 32 px, all their training images;
target = its last 4 (frog, horse, ship, truck) upscaled to 64 px (bicubic) and JPEG-recompressed
at quality 75, 50 training images a class, 50 val, 250 test (1,000 test images). The target
folder is drawn once (seeded by 0, the same for every seed and recipe) under the cache folder.
A recipe is params/cifar10.yaml plus overrides; each seed runs the stages' own run() in this
process: ingest -> augment -> pretrain -> finetune (+ scratch baseline) -> evaluate. Ingest,
augment and pretrain are cached by a hash of the params they read plus the seed, so recipes that
change only finetune reuse the backbone.

  python -m benchmarks.transfer --recipe baseline --seeds 0,1,2 [--quick] [--pretrain-epochs N]

Prints finetuned / scratch / gain per seed (with evaluate's paired bootstrap interval) and the
mean gain with a 95% t-interval over seeds; writes benchmarks/results/transfer_<recipe>.json.
CIFAR JPEGs: IMAGEPIPE_CIFAR_DIR (default /tmp/cifar10-jpg), class folders under train/ and
test/ (`tar xzf ../shared/data/cifar10-jpg.tar.gz -C /tmp/cifar10-jpg`).
`make bench` runs it (quick, one seed) only when IMAGEPIPE_BENCH_TRANSFER=1: it takes minutes.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SOURCE_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog"]
TARGET_CLASSES = ["frog", "horse", "ship", "truck"]
TARGET_SIZE, JPEG_QUALITY = 64, 75
PER_CLASS = {"train": 50, "val": 50, "test": 250}

# Overrides on params/cifar10.yaml. baseline: the preset as it is, the target at 64 px.
RECIPES: dict[str, dict[str, Any]] = {
    "baseline": {},
    # L2-SP at alpha 0.01: 20x the weight decay it replaces (5e-4), the order of Li et al.'s
    # 0.01-0.1; not tuned.
    "l2sp": {"finetune": {"l2sp": 0.01}},
    # Pretrain near the target's resolution: the source upscaled to 64 px (about 4x the cost).
    "pretrain64": {"data": {"source": {"image_size": 64}}},
    # Both levers at once: the 64-px backbone (same cache key as pretrain64) fine-tuned with L2-SP.
    "pretrain64_l2sp": {"data": {"source": {"image_size": 64}}, "finetune": {"l2sp": 0.01}},
    # Fine-tune at the source's resolution instead: the 64-px target read at 32 px (it holds
    # CIFAR's 32-px detail, upscaled). The scratch baseline trains at 32 px too, so compare its
    # finetuned accuracy with the 64-px recipes' scratch as well.
    "target32": {"data": {"target": {"image_size": 32}}},
    # ... with L2-SP (same backbone cache key as target32).
    "target32_l2sp": {"data": {"target": {"image_size": 32}}, "finetune": {"l2sp": 0.01}},
}
# --quick: a smoke run of the whole chain, not a measurement.
QUICK = {"pretrain": {"epochs": 1}, "finetune": {"head_epochs": 1, "full_epochs": 2}}

log = logging.getLogger("imagepipe.bench.transfer")


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` laid on top, nested mappings merged key by key."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = (merged(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else copy.deepcopy(value))
    return out


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_target(cifar: Path, dest: Path) -> Path:
    """The 64-px JPEG target folder (train/val/test per class), made once."""
    import numpy as np
    from PIL import Image

    done = dest / "done.json"
    if done.exists():
        return dest
    rng = np.random.default_rng(0)
    for cls in TARGET_CLASSES:
        train = sorted((cifar / "train" / cls).iterdir())
        test = sorted((cifar / "test" / cls).iterdir())
        train = [train[i] for i in rng.permutation(len(train))]
        test = [test[i] for i in rng.permutation(len(test))]
        picks = {"train": train[:PER_CLASS["train"]],
                 "val": train[PER_CLASS["train"]:PER_CLASS["train"] + PER_CLASS["val"]],
                 "test": test[:PER_CLASS["test"]]}
        for split, files in picks.items():
            (dest / split / cls).mkdir(parents=True, exist_ok=True)
            for f in files:
                img = Image.open(f).convert("RGB").resize((TARGET_SIZE, TARGET_SIZE),
                                                          Image.Resampling.BICUBIC)
                img.save(dest / split / cls / f.name, quality=JPEG_QUALITY)
    done.write_text(json.dumps({"size": TARGET_SIZE, "quality": JPEG_QUALITY, **PER_CLASS}))
    return dest


def recipe_raw(name: str, cifar: Path, target: Path, quick: bool,
               pretrain_epochs: int | None) -> dict[str, Any]:
    """params/cifar10.yaml + the measure's data + the recipe (+ quick / budget overrides)."""
    if name not in RECIPES:
        raise SystemExit(f"transfer: unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    raw = yaml.safe_load((REPO / "params" / "cifar10.yaml").read_text())
    raw = merged(raw, {"data": {
        "source": {"uri": f"imagefolder:{cifar}", "classes": SOURCE_CLASSES},
        "target": {"uri": f"imagefolder:{target}", "classes": TARGET_CLASSES,
                   "train_per_class": None, "image_size": TARGET_SIZE}}})
    raw = merged(raw, RECIPES[name])
    if quick:
        raw = merged(raw, QUICK)
    if pretrain_epochs is not None:
        raw = merged(raw, {"pretrain": {"epochs": pretrain_epochs}})
    return raw


def cached(folder: Path, make: Any) -> Path:
    """Run `make(folder)` unless a finished run left folder/done.json."""
    if not (folder / "done.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        make(folder)
        (folder / "done.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return folder


def backbone(params: Any, cache: Path) -> tuple[Path, Path]:
    """(target data folder, pretrained model file), reused across recipes that share them."""
    from stages import augment, ingest, pretrain
    from stages.core.codeid import code_digest

    # Every key holds the code of the stage that makes it (the rule checkpoints follow): a
    # backbone from older training code is not a measure of the current one.
    data_key = digest(params.data.model_dump(), params.seed, code_digest("stages.ingest"))
    data = cached(cache / "ingest" / data_key, lambda d: ingest.run(params, d))
    # Keyed by the source's content, not by all data params: recipes that change only the
    # target (target32) reuse the same augmented source and the same pretrained backbone.
    source = json.loads((data / "source" / "manifest.json").read_text())["sha256"]
    aug_key = digest(source, params.augment.model_dump(), params.seed, code_digest("stages.augment"))
    aug = cached(cache / "augment" / aug_key,
                 lambda d: augment.run(params, data / "source", d / "data"))
    pre_key = digest(aug_key, params.pretrain.model_dump(), code_digest("stages.pretrain"))
    pre = cached(cache / "pretrain" / pre_key, lambda d: pretrain.run(
        params, aug / "data", d / "pretrained.pt", d / "checkpoints", d / "pretrain.csv"))
    return data / "target", pre / "pretrained.pt"


def one_seed(raw: dict[str, Any], seed: int, cache: Path, run_dir: Path) -> dict[str, Any]:
    """Every stage for one seed; the figures of evaluate (test split) and the wall time."""
    from stages import evaluate, finetune, scratch
    from stages.params import parse_params

    start = time.perf_counter()
    params = parse_params({**raw, "seed": seed})
    target, pretrained = backbone(params, cache)
    out = run_dir / f"seed{seed}"
    ft = finetune.Outputs(out / "finetuned.pt", out / "probe.pt", out / "checkpoints",
                          out / "finetune.csv")
    finetune.run(params, target, pretrained, ft)
    base = scratch.Outputs(out / "scratch.pt", out / "checkpoints-scratch", out / "scratch.csv")
    scratch.run(params, target, pretrained, base)
    m = evaluate.run(params, target, ft.finetuned, base.model, ft.probe, evaluate.Outputs(
        out / "evaluate.json", out / "per_class.json", out / "confusion.png",
        out / "confusion.csv"))
    keys = ("accuracy", "scratch_accuracy", "probe_accuracy", "transfer_gain",
            "transfer_gain_ci_low", "transfer_gain_ci_high", "mcnemar_p", "n_test")
    return {"seed": seed, **{k: m.get(k) for k in keys},
            "wall_seconds": round(time.perf_counter() - start, 1),
            "loadavg_1min": round(os.getloadavg()[0], 2)}


def t_interval(values: list[float]) -> tuple[float, float | None, float | None]:
    """Mean and its 95% Student-t interval (None with fewer than two values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    from scipy.stats import t

    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def report(name: str, rows: list[dict[str, Any]], budget: dict[str, Any]) -> dict[str, Any]:
    """Print the table and the summary; return the summary."""
    print(f"\nrecipe {name}: pretrain {budget['pretrain_epochs']} epochs, finetune "
          f"{budget['head_epochs']}+{budget['full_epochs']} epochs")
    print("seed  finetuned  scratch  probe   gain (points) [paired bootstrap 95%]  wall s  load")
    for r in rows:
        print(f"{r['seed']:>4}  {r['accuracy']:.4f}     {r['scratch_accuracy']:.4f}   "
              f"{r['probe_accuracy']:.4f}  {pct(r['transfer_gain'])} "
              f"[{pct(r['transfer_gain_ci_low'])}, {pct(r['transfer_gain_ci_high'])}]"
              f"{'':>18}{r['wall_seconds']:>6}  {r['loadavg_1min']}")
    mean, lo, hi = t_interval([r["transfer_gain"] for r in rows])
    acc = statistics.fmean(r["accuracy"] for r in rows)
    scr = statistics.fmean(r["scratch_accuracy"] for r in rows)
    print(f"mean over {len(rows)} seed(s): finetuned {acc:.4f}, scratch {scr:.4f}, gain "
          f"{pct(mean)} points, 95% t-interval [{pct(lo)}, {pct(hi)}]")
    return {"mean_finetuned": acc, "mean_scratch": scr, "mean_gain": mean,
            "gain_t95_low": lo, "gain_t95_high": hi}


def run(name: str, seeds: list[int], *, quick: bool = False, pretrain_epochs: int | None = None,
        cifar: Path, cache: Path) -> dict[str, Any]:
    """The recipe over `seeds`; write and return the results."""
    if not (cifar / "train").is_dir():
        raise SystemExit(f"transfer: no {cifar}/train; extract the CIFAR-10 JPEG archive there "
                         f"or set IMAGEPIPE_CIFAR_DIR")
    target = build_target(cifar, cache / f"target{TARGET_SIZE}q{JPEG_QUALITY}")
    raw = recipe_raw(name, cifar, target, quick, pretrain_epochs)
    run_dir = cache / "runs" / f"{name}-{digest(raw)}"
    rows = [one_seed(raw, s, cache, run_dir) for s in seeds]
    budget = {"pretrain_epochs": raw["pretrain"]["epochs"],
              "head_epochs": raw["finetune"]["head_epochs"],
              "full_epochs": raw["finetune"]["full_epochs"]}
    result = {"recipe": name, "overrides": RECIPES[name], "quick": quick, "budget": budget,
              "seeds": rows, **report(name, rows, budget), "params": raw,
              "cores": os.cpu_count()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"transfer_{name}{'_quick' if quick else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return result


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transfer",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="baseline", help=f"one of {sorted(RECIPES)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets")
    parser.add_argument("--pretrain-epochs", type=int, default=None,
                        help="pretrain budget (default: the preset's 12)")
    parser.add_argument("--cifar", type=Path,
                        default=Path(os.environ.get("IMAGEPIPE_CIFAR_DIR", "/tmp/cifar10-jpg")))
    parser.add_argument("--cache", type=Path, default=RESULTS / "transfer_cache")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`make bench`'s entry: a quick single-seed run only when IMAGEPIPE_BENCH_TRANSFER=1."""
    if argv is None and os.environ.get("IMAGEPIPE_BENCH_TRANSFER") != "1":
        print("transfer: skipped (minutes of training); run it with IMAGEPIPE_BENCH_TRANSFER=1 "
              "make bench, or python -m benchmarks.transfer --recipe baseline --seeds 0,1,2")
        return 0
    args = arguments(argv if argv is not None else ["--quick", "--seeds", "0"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    run(args.recipe, seeds, quick=args.quick, pretrain_epochs=args.pretrain_epochs,
        cifar=args.cifar, cache=args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
