"""audit: data/target/ + models/finetuned.pt -> metrics/audit.json, metrics/audit_issues.csv,
plots/label_issues.png.

Which labels are wrong, and which images should not be there. The finetuned backbone embeds
every target image once; a logistic-regression probe cross-validated over K folds gives each
train and val image class probabilities from a probe that never saw it, and cleanlab's
confident learning ranks the images whose given label those probabilities contradict
(stages/core/labelaudit.py). Image issues (stages/core/imageissues.py): val/test images that
are near-copies of earlier-split images (a resized or re-encoded training photo), and dark,
low-information and blurry images.

The CSV lists every flagged image (dataset row, split, issue, given label, suggested label,
score, why); the picture shows the top label issues captioned given -> suggested. The audit
reports and never blocks, unless `audit.max_issue_fraction` is set: above it the stage exits 2
naming the CSV (after writing every output, so the list is there to read).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.dataset import SPLITS, Dataset, load_dataset
from stages.core.door import arguments, exit_process, run_stage
from stages.core.errors import BadInput
from stages.core.imageissues import (
    ImageIssue,
    Thresholds,
    near_duplicates,
    quality_issues,
    statistics,
    thumbnails,
)
from stages.core.io import atomic_path, write_json
from stages.core.labelaudit import METHOD, LabelIssues, audit_labels
from stages.params import AuditParams, Params, load_params

log = logging.getLogger("imagepipe.audit")

CSV_COLUMNS = ["index", "split", "issue", "given", "suggested", "score", "detail"]
IMAGE_REASONS = ("near_duplicate", "dark", "low_information", "blurry")


@dataclass(frozen=True)
class Outputs:
    metrics: Path
    issues: Path
    grid: Path


def label_rows(ds: Dataset, rows: np.ndarray, found: LabelIssues | None) -> list[dict[str, Any]]:
    """CSV rows of the label issues, most severe first."""
    if found is None:
        return []
    out = []
    for pos in found.ranked:
        i = int(rows[pos])
        given, suggested = ds.classes[ds.labels[i]], ds.classes[found.suggested[pos]]
        out.append({"index": i, "split": SPLITS[ds.split[i]], "issue": "label", "given": given,
                    "suggested": suggested, "score": round(float(found.quality[pos]), 6),
                    "detail": f"out-of-sample probability of {given!r} "
                              f"{found.quality[pos]:.3f}; the probe says {suggested!r}"})
    return out


def image_rows(ds: Dataset, issues: list[ImageIssue]) -> list[dict[str, Any]]:
    out = []
    for it in sorted(issues, key=lambda it: (IMAGE_REASONS.index(it.reason), it.index)):
        detail = it.detail
        if it.other is not None:
            detail += f", {SPLITS[ds.split[it.other]]} {ds.classes[ds.labels[it.other]]!r}"
        out.append({"index": it.index, "split": SPLITS[ds.split[it.index]], "issue": it.reason,
                    "given": ds.classes[ds.labels[it.index]], "suggested": "",
                    "score": round(it.score, 6), "detail": detail})
    return out


def summary(ds: Dataset, rows: np.ndarray, found: LabelIssues | None,
            image_issues: list[ImageIssue], p: AuditParams) -> dict[str, Any]:
    """audit.json: counts, fractions, per class, the method and K. No timings."""
    flagged = set() if found is None else {int(rows[i]) for i in found.ranked}
    labels = ds.labels[rows]
    per_class = {}
    for c, name in enumerate(ds.classes):
        n = int(np.sum(labels == c))
        m = sum(1 for i in flagged if ds.labels[i] == c)
        per_class[name] = {"images": n, "label_issues": m, "fraction": round(m / n, 6) if n else 0.0}
    with_issue = flagged | {it.index for it in image_issues}
    return {"method": METHOD, "k_folds": None if found is None else found.folds,
            "audited_images": int(len(rows)),
            "label_issues": None if found is None else len(flagged),
            "label_issue_fraction": None if found is None else round(len(flagged) / len(rows), 6),
            "probe_oos_accuracy": None if found is None else round(found.oos_accuracy, 6),
            "per_class": per_class,
            **{r: sum(1 for it in image_issues if it.reason == r) for r in IMAGE_REASONS},
            "images": int(len(ds.labels)), "images_with_issues": len(with_issue),
            "issue_fraction": round(len(with_issue) / max(len(ds.labels), 1), 6),
            "max_issue_fraction": p.max_issue_fraction}


def run(params: Params, data: Path, model: Path, out: Outputs) -> dict[str, Any]:
    from stages.core.history import write_csv  # torch: not at load (`--help`, the door)
    from stages.core.scoring import Scorer

    p = params.audit
    ds = load_dataset(data, verify=params.verify_data)
    # Backbone features of every image, in one pass: val and test too, though only train and val
    # are audited (one pass is simpler than three and costs little more).
    features = Scorer(model, ds, p).features(ds.images, ds.labels)
    rows = np.flatnonzero(ds.split < 2)  # train and val: the labels training learns from
    found = audit_labels(features[rows], ds.labels[rows], folds=p.folds, c=p.probe_c,
                         seed=params.seed)
    if found is None:
        log.warning("audit: a class has fewer than 2 train+val images: no label audit")
    t = Thresholds(p.near_duplicate_similarity, p.dark_below, p.low_information_below,
                   p.blurry_below)
    images = np.asarray(ds.images)
    issues = (near_duplicates(thumbnails(images), ds.split, t)
              + quality_issues(statistics(images), t))
    metrics = summary(ds, rows, found, issues, p)
    write_csv(out.issues, label_rows(ds, rows, found) + image_rows(ds, issues), CSV_COLUMNS)
    write_grid(ds, rows, found, p.grid_images, out.grid)
    log.info("audit: %s label issues among %d train+val images (probe %s out of sample, K=%s); "
             "%d near-duplicates, %d dark, %d low-information, %d blurry; list: %s",
             metrics["label_issues"], len(rows), metrics["probe_oos_accuracy"],
             metrics["k_folds"], *(metrics[r] for r in IMAGE_REASONS), out.issues)
    return metrics


def gate(metrics: dict[str, Any], out: Outputs) -> None:
    """Exit 2 (BadInput) when audit.max_issue_fraction is set and exceeded."""
    limit = metrics["max_issue_fraction"]
    if limit is not None and metrics["issue_fraction"] > limit:
        raise BadInput(f"{metrics['images_with_issues']} of {metrics['images']} target images "
                       f"({metrics['issue_fraction']:.4f}) have label or image issues, over "
                       f"audit.max_issue_fraction={limit}; the list: {out.issues} (fix the "
                       "images, or raise the key, or leave it empty to turn the gate off)")


def mosaic(tiles: list[np.ndarray], cols: int, pad: int) -> np.ndarray:
    """Same-shaped H x W x C uint8 tiles as one grid image, `pad` white pixels between."""
    h, w, c = tiles[0].shape
    rows = -(-len(tiles) // cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        r, q = divmod(k, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = tile
    return out


def write_grid(ds: Dataset, rows: np.ndarray, found: LabelIssues | None, count: int,
               path: Path) -> None:
    """The top label issues, each captioned given -> suggested, row and probability.

    One image and a text per tile: a subplot per tile made matplotlib's layout take seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = [] if found is None else [int(i) for i in found.ranked[:count]]
    cols = min(6, max(len(top), 1))
    nrows = max(1, -(-len(top) // cols))
    fig = plt.figure(figsize=(1.9 * cols, 2.1 * nrows + 0.5))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - 0.5 / (2.1 * nrows + 0.5)))
    ax.axis("off")
    if top:
        tiles = [np.asarray(ds.images[rows[pos]]) for pos in top]
        h, w = tiles[0].shape[:2]
        pad = max(h, w) // 2  # room for each caption
        grid = mosaic(tiles, cols, pad)
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        for k, pos in enumerate(top):
            i = int(rows[pos])
            r, q = divmod(k, cols)
            ax.text(pad + q * (w + pad) + w / 2, pad + r * (h + pad) - 0.5,
                    f"{ds.classes[ds.labels[i]]} -> {ds.classes[found.suggested[pos]]}\n"
                    f"row {i}, p={found.quality[pos]:.2f}", ha="center", va="bottom", fontsize=7)
    fig.suptitle(f"top {len(top)} label issues (given -> suggested)" if top
                 else "no label issues found", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = arguments("audit", __doc__, argv, data="data/target", model="models/finetuned.pt",
                     metrics="metrics/audit.json", issues="metrics/audit_issues.csv",
                     grid="plots/label_issues.png")
    out = Outputs(args.metrics, args.issues, args.grid)

    def body() -> None:
        params = load_params(args.params)
        metrics = run(params, args.data, args.model, out)
        write_json(out.metrics, metrics)
        gate(metrics, out)

    return run_stage("audit", body)


if __name__ == "__main__":
    exit_process(main())
