"""The label audit measured on known flips: does it find planted label errors, and does dropping
what it flags give back the accuracy the noise cost?

The measure (issue 25): a target set (`digits`: the embedded default's digits 5-9 with every
image kept, `train_per_class: null`; `cifar10`: params/cifar10.yaml's target, 50 training images
a class) gets a seeded `rate` of its training labels flipped, each to a class drawn uniformly
from the others. Then, with the stages' own run():

  finetune on the noisy labels -> audit (its K-fold probe on that backbone's features, cleanlab)
  -> precision and recall of the flagged train+val images against the flips, beside a random
     flagger that flags as many train+val images (its mean over 2,000 draws)
  -> finetune again with the flagged images dropped; test accuracy of both models, and the
     cleaned minus noisy difference with evaluate's paired bootstrap interval.

Rate 0 is the unflipped set: how many images the audit flags where no label was planted wrong,
and the accuracy the flips are measured against ("the accuracy the noise cost" = clean - noisy;
"recovered" = (cleaned - noisy) / (clean - noisy)). The backbone is pretrained once (cached by
benchmarks/transfer.py's keys); finetune runs without its scratch baseline (not measured here).

  python -m benchmarks.audit [--target digits|cifar10] [--rates 0,0.05,0.1] [--seed 0]
                             [--pretrain-epochs N] [--finetune-epochs HEAD,FULL]

The epoch options shorten the training on a busy machine (the results file records them);
the default is the target's params as they are.

Writes benchmarks/results/audit_<target>.json. CIFAR: IMAGEPIPE_CIFAR_DIR as benchmarks.transfer.
Minutes of training, so not part of `make bench` (which runs benchmarks/bench_*.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.transfer import REPO, RESULTS, backbone, digest, merged

RANDOM_DRAWS = 2000
log = logging.getLogger("imagepipe.bench.audit")


def target_raw(name: str, cifar: Path) -> dict[str, Any]:
    """The params of a measure's target: every digit kept, or the CIFAR preset as it is."""
    if name == "digits":
        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        return merged(raw, {"data": {"target": {"train_per_class": None}}})
    if name == "cifar10":
        if not (cifar / "train").is_dir():
            raise SystemExit(f"audit: no {cifar}/train; extract the CIFAR-10 JPEG archive there "
                             "or set IMAGEPIPE_CIFAR_DIR")
        raw = yaml.safe_load((REPO / "params" / "cifar10.yaml").read_text())
        uri = f"imagefolder:{cifar}"
        return merged(raw, {"data": {"source": {"uri": uri}, "target": {"uri": uri}}})
    raise SystemExit(f"audit: unknown target {name!r}; choose digits or cifar10")


def flip(labels: np.ndarray, split: np.ndarray, n_classes: int, rate: float, seed: int
         ) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped rows): round(rate x train) training rows, seeded, each moved to
    one of the other classes uniformly."""
    rng = np.random.default_rng([seed, round(rate * 1000)])
    train = np.flatnonzero(split == 0)
    rows = np.sort(rng.choice(train, size=round(rate * len(train)), replace=False))
    noisy = labels.copy()
    noisy[rows] = (labels[rows] + rng.integers(1, n_classes, size=len(rows))) % n_classes
    return noisy, rows


def write_variant(src: Path, labels: np.ndarray, keep: np.ndarray, dest: Path) -> Path:
    """A dataset folder with `src`'s images at rows `keep`, these labels, the same splits."""
    from stages.core.dataset import load_dataset
    from tests.helpers import save_dataset

    ds = load_dataset(src)
    save_dataset(dest, ds.images[keep], labels[keep], ds.split[keep], ds.classes,
                  {"uri": f"benchmark:{src.name}", "params": ds.manifest.get("params")})
    return dest


def finetune_and_predict(params: Any, data: Path, pretrained: Path, out: Path
                         ) -> tuple[Path, np.ndarray, np.ndarray]:
    """(finetuned model file, test labels, test predictions)."""
    from stages import finetune
    from stages.core.dataset import load_dataset
    from stages.core.scoring import Scorer
    from stages.evaluate import test_split

    ft = finetune.Outputs(out / "finetuned.pt", out / "probe.pt", out / "scratch.pt",
                          out / "checkpoints", out / "finetune.csv", out / "scratch.csv")
    finetune.run(params, data, pretrained, ft)
    ds = load_dataset(data)
    images, y = test_split(ds)
    pred = Scorer(ft.finetuned, ds, params.evaluate).logits(images, y).argmax(axis=1)
    return ft.finetuned, y, pred


def flagged_rows(params: Any, data: Path, model: Path, out: Path) -> tuple[np.ndarray, float]:
    """(rows the audit flags as label issues, the audit's wall seconds)."""
    from stages import audit

    files = audit.Outputs(out / "audit.json", out / "audit_issues.csv", out / "label_issues.png")
    start = time.perf_counter()
    audit.run(params, data, model, files)
    seconds = time.perf_counter() - start
    with open(files.issues, newline="") as f:
        rows = [int(r["index"]) for r in csv.DictReader(f) if r["issue"] == "label"]
    return np.array(sorted(rows), dtype=np.int64), seconds


def against_flips(flagged: np.ndarray, flips: np.ndarray, audited: np.ndarray, seed: int
                  ) -> dict[str, Any]:
    """Precision and recall of `flagged` vs the planted flips, and a random flagger's (mean of
    RANDOM_DRAWS draws of as many audited rows) at the same count."""
    hits = len(np.intersect1d(flagged, flips))
    rng = np.random.default_rng(seed)
    is_flip = np.isin(audited, flips)
    draws = [int(is_flip[rng.choice(len(audited), size=len(flagged), replace=False)].sum())
             for _ in range(RANDOM_DRAWS)] if len(flagged) else [0]
    rand_hits = float(np.mean(draws))
    return {"flips": int(len(flips)), "flagged": int(len(flagged)), "true_flags": hits,
            "precision": hits / len(flagged) if len(flagged) else None,
            "recall": hits / len(flips) if len(flips) else None,
            "random_precision": rand_hits / len(flagged) if len(flagged) else None,
            "random_recall": rand_hits / len(flips) if len(flips) else None}


def one_rate(params: Any, target: Path, pretrained: Path, rate: float, seed: int, work: Path,
             clean_pred: np.ndarray | None) -> dict[str, Any]:
    """Flip, finetune, audit, drop the flagged, finetune again; the figures of one rate."""
    from stages.core.dataset import load_dataset
    from stages.core.stats import bootstrap_intervals

    ds = load_dataset(target)
    noisy_labels, flips = flip(ds.labels, ds.split, len(ds.classes), rate, seed)
    every = np.arange(len(ds.labels))
    noisy = write_variant(target, noisy_labels, every, work / "noisy" / "data")
    model, y, noisy_pred = finetune_and_predict(params, noisy, pretrained, work / "noisy")
    flagged, audit_s = flagged_rows(params, noisy, model, work / "noisy")
    audited = np.flatnonzero(ds.split < 2)
    row = {"rate": rate, **against_flips(flagged, flips, audited, seed),
           "audit_seconds": round(audit_s, 1), "noisy_accuracy": float(np.mean(noisy_pred == y))}
    if rate == 0:
        return {**row, "clean_pred": noisy_pred}
    cleaned = write_variant(target, noisy_labels, np.setdiff1d(every, flagged),
                            work / "cleaned" / "data")
    _, y2, cleaned_pred = finetune_and_predict(params, cleaned, pretrained, work / "cleaned")
    assert np.array_equal(y, y2), "dropping train/val rows must leave the test split as it is"
    # evaluate's paired bootstrap: its "transfer_gain" is accuracy(pred) - accuracy(baseline).
    ci = bootstrap_intervals(y, cleaned_pred, len(ds.classes), noisy_pred, seed=seed)
    row.update(cleaned_accuracy=float(np.mean(cleaned_pred == y)),
               gain_ci=[ci["transfer_gain_ci_low"], ci["transfer_gain_ci_high"]])
    row["gain"] = row["cleaned_accuracy"] - row["noisy_accuracy"]
    if clean_pred is not None:
        clean = float(np.mean(clean_pred == y))
        cost = clean - row["noisy_accuracy"]
        row.update(clean_accuracy=clean, noise_cost=cost,
                   recovered=row["gain"] / cost if cost > 0 else None)
    return row


def fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}" if pct else f"{x:.3f}"


def report(name: str, rows: list[dict[str, Any]]) -> None:
    print(f"\naudit measure on {name}: rate, flips, flagged, precision (random), recall (random), "
          "accuracy clean / noisy / cleaned, cleaned - noisy [paired 95% CI], recovered")
    for r in rows:
        line = (f"{r['rate']:.2f}  flips {r['flips']:>3}  flagged {r['flagged']:>3}  "
                f"P {fmt(r['precision'])} ({fmt(r['random_precision'])})  "
                f"R {fmt(r['recall'])} ({fmt(r['random_recall'])})  noisy {r['noisy_accuracy']:.4f}")
        if "cleaned_accuracy" in r:
            lo, hi = r["gain_ci"]
            line += (f"  clean {fmt(r.get('clean_accuracy'))} cleaned {r['cleaned_accuracy']:.4f}"
                     f"  gain {fmt(r['gain'], True)} [{fmt(lo, True)}, {fmt(hi, True)}] points"
                     f"  recovered {fmt(r.get('recovered'))}")
        print(line + f"  (audit {r['audit_seconds']} s)")


def run(name: str, rates: list[float], seed: int, cifar: Path, cache: Path,
        budget: dict[str, Any]) -> dict[str, Any]:
    from stages.params import parse_params

    raw = merged(target_raw(name, cifar), budget)
    raw["finetune"] = {**raw["finetune"], "baseline": False}
    params = parse_params({**raw, "seed": seed})
    target, pretrained = backbone(params, cache)
    work = cache / "runs" / f"{name}-{digest(raw, seed)}"
    rows: list[dict[str, Any]] = []
    clean_pred = None
    result = {"target": name, "seed": seed, "rows": rows, "audit_params": raw["audit"],
              "pretrain_epochs": raw["pretrain"]["epochs"],
              "finetune_epochs": [raw["finetune"]["head_epochs"], raw["finetune"]["full_epochs"]],
              "cores": os.cpu_count()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"audit_{name}.json"
    # Rate 0 first (the others' clean reference), then in the order given; the file is
    # rewritten after each rate, so a run cut short keeps what it measured.
    for rate in sorted(rates, key=lambda r: r != 0):
        row = one_rate(params, target, pretrained, rate, seed, work / f"rate{rate}", clean_pred)
        if rate == 0:
            clean_pred = row.pop("clean_pred")
        rows.append({**row, "loadavg_1min": round(os.getloadavg()[0], 2)})
        log.info("audit measure: %s", rows[-1])
        path.write_text(json.dumps(result, indent=2, default=float))
    report(name, rows)
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.audit",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="digits", help="digits or cifar10")
    parser.add_argument("--rates", default="0,0.05,0.1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cifar", type=Path,
                        default=Path(os.environ.get("IMAGEPIPE_CIFAR_DIR", "/tmp/cifar10-jpg")))
    parser.add_argument("--cache", type=Path, default=RESULTS / "audit_cache")
    parser.add_argument("--pretrain-epochs", type=int, default=None)
    parser.add_argument("--finetune-epochs", default=None, help="HEAD,FULL, e.g. 3,9")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    budget: dict[str, Any] = {}
    if args.pretrain_epochs is not None:
        budget["pretrain"] = {"epochs": args.pretrain_epochs}
    if args.finetune_epochs:
        head, full = (int(x) for x in args.finetune_epochs.split(","))
        budget["finetune"] = {"head_epochs": head, "full_epochs": full}
    run(args.target, rates, args.seed, args.cifar, args.cache, budget)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
