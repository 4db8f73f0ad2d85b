"""ingest: params.data (source and target URIs) -> data/source/, data/target/ (canonical datasets).

Each role is listed, filtered to its classes, split (seeded, stratified) where the source ships
no split, capped per class, then decoded in bounded batches into a memory-mapped uint8 array.
Bad files are skipped and listed in report.json; too many of them, a duplicate that leaks into
the test split, or a class left with no training image end the stage with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.dataset import SPLIT_CODE, SPLITS, dataset_writer
from stages.core.errors import BadInput, run_stage
from stages.core.io import write_json
from stages.core.progress import progress
from stages.core.sources import BadFile, Listing, canonical, open_source
from stages.params import DataParams, DatasetRole, Params, load_params

log = logging.getLogger("imagepipe.ingest")
ROLES = ("source", "target")


@dataclass(frozen=True)
class Selection:
    """The items of one role that will be decoded, in output order."""

    classes: list[str]
    refs: list[str]
    labels: np.ndarray
    splits: np.ndarray


def select(listing: Listing, role: DatasetRole, data: DataParams, rng: np.random.Generator) -> Selection:
    """Filter classes, assign splits where none shipped, cap training images per class."""
    labels, splits = listing.labels, listing.splits.copy()
    classes = listing.classes
    if role.classes is not None:
        missing = [c for c in role.classes if c not in classes]
        if missing:
            raise BadInput(f"classes {missing} are not in {role.uri}; it has {classes}")
        remap = np.full(len(classes), -1, dtype=np.int64)
        for new, name in enumerate(role.classes):
            remap[classes.index(name)] = new
        labels, classes = remap[labels], list(role.classes)
    keep = labels >= 0
    _assign_splits(labels, splits, keep, data, rng)
    if role.train_per_class is not None:
        keep &= _cap_train(labels, splits, keep, role.train_per_class, rng)
    idx = np.flatnonzero(keep)
    return Selection(classes, [listing.refs[i] for i in idx], labels[idx], splits[idx].astype(np.uint8))


def _assign_splits(labels: np.ndarray, splits: np.ndarray, keep: np.ndarray, data: DataParams,
                   rng: np.random.Generator) -> None:
    """In place: items without a split get one, per class, by seeded permutation.

    Per class rather than sklearn's train_test_split(stratify=...), which refuses classes with
    fewer than two members; here a tiny class keeps at least one training image.
    """
    has_test = bool(np.any(splits[keep] == SPLIT_CODE["test"]))
    for cls in np.unique(labels[keep]):
        free = np.flatnonzero(keep & (labels == cls) & (splits < 0))
        free = rng.permutation(free)
        n = len(free)
        n_test = 0 if has_test else min(int(round(n * data.test_fraction)), max(n - 1, 0))
        n_val = min(int(round(n * data.val_fraction)), max(n - 1 - n_test, 0))
        splits[free[:n_test]] = SPLIT_CODE["test"]
        splits[free[n_test:n_test + n_val]] = SPLIT_CODE["val"]
        splits[free[n_test + n_val:]] = SPLIT_CODE["train"]


def _cap_train(labels: np.ndarray, splits: np.ndarray, keep: np.ndarray, cap: int,
               rng: np.random.Generator) -> np.ndarray:
    mask = np.ones(len(labels), dtype=bool)
    for cls in np.unique(labels[keep]):
        train = np.flatnonzero(keep & (labels == cls) & (splits == SPLIT_CODE["train"]))
        if len(train) > cap:
            mask[rng.choice(train, size=len(train) - cap, replace=False)] = False
    return mask


def _decode_batches(listing: Listing, refs: list[str], size: int, channels: int, batch: int
                    ) -> Iterator[list[tuple[str, str | None, np.ndarray | str]]]:
    """Yield batches of (ref, digest or None, image or reason), in input order.

    Threads, not processes: Pillow releases the GIL while decoding, and threads share the
    listing without pickling it.
    """
    def one(ref: str) -> tuple[str, str | None, np.ndarray | str]:
        try:
            digest, img = listing.fetch(ref)
            return ref, digest, canonical(img, size, channels)
        except BadFile as err:
            return ref, None, str(err)
        except OSError as err:  # unreadable on disk (permissions, vanished)
            return ref, None, f"unreadable: {err}"

    with ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, 2)) as pool:
        for start in range(0, len(refs), batch):
            yield list(pool.map(one, refs[start:start + batch]))


def ingest_role(role_name: str, role: DatasetRole, params: Params, out: Path) -> dict[str, Any]:
    """Ingest one role into `out`; return its report."""
    data = params.data
    rng = np.random.default_rng([params.seed, ROLES.index(role_name)])
    listing = open_source(role.uri, root=role.root, download=role.download)
    sel = select(listing, role, data, rng)
    _require_training_images(sel, sel.labels, sel.splits, role.uri)
    shape = (data.image_size, data.image_size, data.channels)
    bad: list[dict[str, str]] = []
    digests: dict[str, list[tuple[int, str]]] = defaultdict(list)
    with dataset_writer(out, len(sel.refs), shape) as writer:
        kept = 0
        with progress(f"ingest {role_name}", len(sel.refs)) as advance:
            for offset, results in _batched_with_offset(listing, sel, shape, data.batch_size):
                for i, (ref, digest, result) in enumerate(results, start=offset):
                    if digest is None:
                        bad.append({"path": ref, "reason": str(result)})
                        continue
                    writer.images[kept] = result
                    writer.labels[kept] = sel.labels[i]
                    writer.split[kept] = sel.splits[i]
                    digests[digest].append((int(sel.splits[i]), ref))
                    kept += 1
                advance(len(results))
        report = _validate(role_name, role, data, sel, bad, digests, listing.ignored)
        writer.truncate(kept)
        _require_training_images(sel, writer.labels, writer.split, role.uri)
        manifest = writer.finish(sel.classes, {
            "uri": role.uri, "role": role_name, "image_size": data.image_size,
            "channels": data.channels, "seed": params.seed,
            "params": {"data": data.model_dump(exclude={"source", "target"}), role_name: role.model_dump()},
        })
        write_json(writer.folder / "report.json", report)
    log.info("%s: %d images, %d classes, %d bad, %d duplicate groups -> %s", role_name,
             manifest["n"], len(sel.classes), len(bad), len(report["duplicates"]), out)
    return report


def _batched_with_offset(listing: Listing, sel: Selection, shape: tuple[int, int, int], batch: int
                         ) -> Iterator[tuple[int, list[tuple[str, str | None, np.ndarray | str]]]]:
    offset = 0
    for results in _decode_batches(listing, sel.refs, shape[0], shape[2], batch):
        yield offset, results
        offset += len(results)


def _require_training_images(sel: Selection, labels: np.ndarray, splits: np.ndarray, uri: str) -> None:
    train = np.bincount(labels[splits == SPLIT_CODE["train"]], minlength=len(sel.classes))
    empty = [c for c, n in zip(sel.classes, train, strict=True) if n == 0]
    if empty:
        raise BadInput(f"{uri}: classes {empty} have no usable training image")


def _validate(role_name: str, role: DatasetRole, data: DataParams, sel: Selection,
              bad: list[dict[str, str]], digests: dict[str, list[tuple[int, str]]],
              ignored: list[str]) -> dict[str, Any]:
    duplicates = [
        {"sha256": d, "items": [{"split": SPLITS[s], "path": p} for s, p in group]}
        for d, group in digests.items() if len(group) > 1
    ]
    leaks = [g for g in duplicates
             if {i["split"] for i in g["items"]} & {"test"} and len({i["split"] for i in g["items"]}) > 1]
    report = {"role": role_name, "uri": role.uri, "candidates": len(sel.refs), "bad": bad,
              "duplicates": duplicates, "leaks_into_test": len(leaks), "ignored_files": ignored}
    for item in bad[:5]:
        print(f"ingest {role_name}: skipped {item['path']}: {item['reason']}", file=sys.stderr)
    if len(bad) > 5:
        print(f"ingest {role_name}: ... and {len(bad) - 5} more (see report.json)", file=sys.stderr)
    if sel.refs and len(bad) / len(sel.refs) > data.max_bad_fraction:
        first = ", ".join(b["path"] for b in bad[:3])
        raise BadInput(f"{role_name}: {len(bad)} of {len(sel.refs)} files are bad, over "
                       f"data.max_bad_fraction={data.max_bad_fraction}; first: {first}")
    if leaks and not data.allow_leakage:
        paths = ", ".join(i["path"] for i in leaks[0]["items"])
        raise BadInput(f"{role_name}: {len(leaks)} images in the test split also stand in "
                       f"train/val (first: {paths}); remove them or set data.allow_leakage: true")
    return report


def run(params: Params, out_dir: Path) -> dict[str, dict[str, Any]]:
    """Ingest both roles into out_dir/<role>/; return the reports by role."""
    return {name: ingest_role(name, getattr(params.data, name), params, out_dir / name)
            for name in ROLES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data", type=Path, help="folder that receives source/ and target/")
    args = parser.parse_args(argv)
    return run_stage("ingest", lambda: run(load_params(args.params), args.out))


if __name__ == "__main__":
    sys.exit(main())
