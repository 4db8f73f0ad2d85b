"""ingest: params.data (source and target URIs) -> data/source/, data/target/ (canonical datasets).

Each role is listed, filtered to its classes, split (seeded, stratified) where the source ships
no split, capped per class, then decoded in bounded batches into uint8 shards (RowWriter: rows
appended to a file, no memory map) at the role's own image_size and channels (data.<role>.*,
else data.*). Bad files are skipped and listed in report.json; too many of them, a duplicate
that leaks into the test split, a class left with no training image, or an empty split that a
later stage needs (source: train, val; target: train, val, test) end the stage with exit code 2,
here rather than after pretraining.
A split no stage reads (the source's test split) is carved but not decoded, and the log says so.

A folder that ships train/ and val/ but no test/ (a common layout) gives the target no test
split: its val/ becomes the held-out test split and validation is carved from train/ (seeded,
per class), said in one line. Each role's per-split, per-class counts are logged as a table,
with the classes that train_per_class capped.
"""

from __future__ import annotations

import logging
import sys
import zlib
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import raycluster
from stages.core.dataset import SPLIT_CODE, SPLITS, write_sharded
from stages.core.door import arguments, exit_process, run_stage
from stages.core.errors import BadInput
from stages.core.io import atomic_dir, write_json
from stages.core.progress import progress
from stages.core.shards import StagedShards, build_shards
from stages.core.sources import Listing, open_source
from stages.params import DataParams, DatasetRole, Params, load_params

log = logging.getLogger("imagepipe.ingest")
ROLES = ("source", "target")
# The splits a later stage reads, by role: pretrain validates on the source's val split;
# finetune validates on the target's; evaluate, export and promote score its test split.
NEEDED = {"source": ("train", "val"), "target": ("train", "val", "test")}
READER = {"train": "training", "val": "validation", "test": "evaluate"}
TRAIN, VAL, TEST = SPLIT_CODE["train"], SPLIT_CODE["val"], SPLIT_CODE["test"]
# Class rows of the logged table; the manifest holds every count.
TABLE_ROWS = 20


@dataclass(frozen=True)
class Selection:
    """The items of one role that will be decoded, in output order."""

    classes: list[str]
    refs: list[str]
    labels: np.ndarray
    splits: np.ndarray
    notes: list[str] = field(default_factory=list)  # split decisions worth a line in the log
    capped: dict[str, int] = field(default_factory=dict)  # class -> train images before the cap
    shipped: bool = False  # every split came from the source (folders), none carved here

    def take(self, idx: np.ndarray) -> Selection:
        """The items at `idx`, in that order."""
        return replace(self, refs=[self.refs[i] for i in idx], labels=self.labels[idx],
                       splits=self.splits[idx])


def select(listing: Listing, role: DatasetRole, seed: list[int], role_name: str) -> Selection:
    """Filter classes, assign splits where none shipped, cap training images per class, for a
    filled `role` (DatasetRole.filled).

    Each class draws from a generator of its own, seeded by `seed` and the class name: a change
    to one class's files changes no other class's split or cap (nor its shards)."""
    labels, splits = listing.labels, listing.splits.copy()
    classes = listing.classes
    if role.classes is not None:
        missing = [c for c in role.classes if c not in classes]
        if missing:
            raise BadInput(f"data.{role_name}.classes: {missing} are not in {role.uri}; "
                           f"it has {classes}")
        remap = np.full(len(classes), -1, dtype=np.int64)
        for new, name in enumerate(role.classes):
            remap[classes.index(name)] = new
        labels, classes = remap[labels], list(role.classes)
    keep = labels >= 0
    shipped = bool(np.all(splits[keep] >= 0))
    notes = []
    if "test" in NEEDED[role_name]:
        note = _shipped_val_as_test(splits, keep, role)
        notes += [note] if note else []
    def rng(cls: int, step: int) -> np.random.Generator:
        return np.random.default_rng([*seed, step, zlib.crc32(classes[cls].encode())])

    _assign_splits(labels, splits, keep, role, rng)
    capped: dict[str, int] = {}
    if role.train_per_class is not None:
        mask, before = _cap_train(labels, splits, keep, role.train_per_class, rng)
        keep &= mask
        capped = {classes[c]: n for c, n in before.items()}
    return Selection(classes, listing.refs, labels, splits.astype(np.uint8), notes, capped,
                     shipped).take(np.flatnonzero(keep))


def _shipped_val_as_test(splits: np.ndarray, keep: np.ndarray, role: DatasetRole) -> str | None:
    """In place: a val split shipped without a test split becomes the test split, and train
    goes back to "no split yet" so that validation is carved from it. Evaluating on data that
    model selection never saw matters more than keeping the shipper's name for it."""
    shipped = splits[keep]
    if not np.any(shipped == VAL) or np.any(shipped == TEST):
        return None
    n_val = int(np.sum(shipped == VAL))
    splits[keep & (splits == VAL)] = TEST
    splits[keep & (splits == TRAIN)] = -1
    where = ("train/ and val/ but no test/: its val/" if role.uri.startswith("imagefolder:")
             else "a train and a val split but no test split: its val split")
    return (f"{role.uri} ships {where} ({n_val} images) is the test split; validation is "
            f"{role.val_fraction:g} of train (seeded, per class)")


def _share(n: int, fraction: float, spare: int) -> int:
    """Images of a class for a held-out split: round(n x fraction), at least one when the
    fraction is above 0 (a 4-image class at 0.1 would otherwise give none), at most `spare`."""
    k = int(round(n * fraction))
    if fraction > 0:
        k = max(k, 1)
    return max(0, min(k, spare))


def _assign_splits(labels: np.ndarray, splits: np.ndarray, keep: np.ndarray, role: DatasetRole,
                   rng: Callable[[int, int], np.random.Generator]) -> None:
    """In place: items without a split get one, per class, by seeded permutation.

    Per class rather than sklearn's train_test_split(stratify=...), which refuses classes with
    fewer than two members; here a tiny class keeps at least one training image.
    """
    has_test = bool(np.any(splits[keep] == TEST))
    for cls in np.unique(labels[keep]):
        free = np.flatnonzero(keep & (labels == cls) & (splits < 0))
        free = rng(int(cls), 0).permutation(free)
        n = len(free)
        n_test = 0 if has_test else _share(n, role.test_fraction, n - 1)
        n_val = _share(n, role.val_fraction, n - 1 - n_test)
        splits[free[:n_test]] = TEST
        splits[free[n_test:n_test + n_val]] = VAL
        splits[free[n_test + n_val:]] = TRAIN


def _cap_train(labels: np.ndarray, splits: np.ndarray, keep: np.ndarray, cap: int,
               rng: Callable[[int, int], np.random.Generator]
               ) -> tuple[np.ndarray, dict[int, int]]:
    """(mask of the items kept, {class: training images before the cap} of capped classes)."""
    mask = np.ones(len(labels), dtype=bool)
    before: dict[int, int] = {}
    for cls in np.unique(labels[keep]):
        train = np.flatnonzero(keep & (labels == cls) & (splits == TRAIN))
        if len(train) > cap:
            mask[rng(int(cls), 1).choice(train, size=len(train) - cap, replace=False)] = False
            before[int(cls)] = len(train)
    return mask, before


def ingest_role(role_name: str, role: DatasetRole, params: Params, out: Path, *,
                skip_unread: bool = False) -> dict[str, Any]:
    """Ingest one role into `out`; return its report. `skip_unread` (the stage's run): the
    splits no later stage reads are not decoded (_drop_unread)."""
    data = params.data
    role = role.filled(data)
    # No fork server started ahead of the listing: most folders are too light for the pool
    # to pay (engine.DECODE_POOL_FROM, by their bytes), and for those it was a second of two
    # cores spent for nothing.
    # No stat per file while listing; shards.decode_work stats the files to decode until they
    # weigh enough for the pool, each worker's fstat stamps its files for the shards' meta and
    # refuses those over data.max_file_mb ("skipped").
    listing = open_source(role.uri, root=role.root, download=role.download,
                          key=f"data.{role_name}.uri", follow_symlinks=data.follow_symlinks,
                          max_file_bytes=int(data.max_file_mb * 2**20), classes=role.classes)
    sel = select(listing, role, [params.seed, ROLES.index(role_name)], role_name)
    sel = sel.take(np.argsort(sel.labels, kind="stable"))  # class order: shards are class-local
    for note in sel.notes:
        log.info("ingest %s: %s", role_name, note)
    _require_training_images(sel, sel.labels, sel.splits, role.uri)
    _require_splits(role_name, role, sel, sel.labels, sel.splits, after_decoding=False)
    if skip_unread:
        sel = _drop_unread(role_name, sel)
    built = _decode(role_name, listing, sel, role, data, out.parent / f".{out.name}.shards")
    labels, splits, bad = sel.labels[built.keep], sel.splits[built.keep], built.bad
    digests: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for digest, split, ref in zip(built.digests, sel.splits.tolist(), sel.refs, strict=True):
        if digest is not None:  # a bad file has none
            digests[digest].append((split, ref))
    with atomic_dir(out) as tmp:
        report = _validate(role_name, role, data, sel, bad, digests, listing, built.skipped,
                           out.parent / f"{out.name}.report.json")
        _require_training_images(sel, labels, splits, role.uri)
        _require_splits(role_name, role, sel, labels, splits, after_decoding=True)
        manifest = write_sharded(tmp, built.shards, labels, splits, sel.classes, {
            "uri": role.uri, "role": role_name, "image_size": role.image_size,
            "channels": role.channels, "seed": params.seed,
            "params": {"data": data.model_dump(exclude={"source", "target", "engine",
                                                        "ray_address"}),
                       role_name: role.model_dump()},
        })
        write_json(tmp / "report.json", report)
    built.prune()
    log.info("%s", counts_table(role_name, role, manifest["counts"], sel.capped))
    log.info("%s: %d images in %d shard(s) (%d decoded now), %d classes, %d bad, %d duplicate "
             "groups -> %s", role_name, manifest["n"], len(built.shards), built.decoded,
             len(sel.classes), len(bad), len(report["duplicates"]), out)
    return report


def _drop_unread(role_name: str, sel: Selection) -> Selection:
    """The selection without the splits no stage reads (NEEDED: the source's test split), said
    in the log. They are still carved out first, so train and val hold the same images as with
    them; decoding them cost time and disk (6,000 CIFAR-10 source test images) for nothing."""
    wanted = np.isin(sel.splits, [SPLIT_CODE[s] for s in NEEDED[role_name]])
    if wanted.all():
        return sel
    left = np.bincount(sel.splits[~wanted], minlength=len(SPLITS))
    said = ", ".join(f"{int(n)} {SPLITS[k]}" for k, n in enumerate(left) if n)
    log.info("ingest %s: %s images not decoded: no stage reads the %s's %s split", role_name,
             said, role_name, " or ".join(SPLITS[k] for k, n in enumerate(left) if n))
    return sel.take(np.flatnonzero(wanted))


def _decode(role_name: str, listing: Listing, sel: Selection, role: DatasetRole,
            data: DataParams, staging: Path) -> StagedShards:
    """Staged shards of the selection on data.engine; only missing or changed ones decoded."""
    with _cluster(data), progress(f"ingest {role_name}", len(sel.refs)) as advance:
        return build_shards(
            sel.refs, sel.labels, files=role.uri.startswith("imagefolder:"), fetch=listing.fetch,
            size=role.image_size, channels=role.channels,  # type: ignore[arg-type]
            max_bytes=int(data.max_file_mb * 2**20), shard_mb=data.shard_mb,
            batch=data.batch_size, engine=data.engine, ray_address=data.ray_address,
            staging=staging, advance=advance)


def counts_table(role_name: str, role: DatasetRole, counts: dict[str, dict[str, int]],
                 capped: dict[str, int]) -> str:
    """The per-split, per-class counts of one role as a small table, then the capped classes."""
    classes = list(counts["train"])
    grey = "grey" if role.channels == 1 else "colour"
    lines = [f"ingest {role_name}: {role.uri} -> {role.image_size} px, {role.channels} channel(s) "
             f"({grey}), {len(classes)} classes"]
    width = max([5, *(len(c) for c in classes[:TABLE_ROWS])])
    lines.append(f"  {'class':<{width}} {'train':>6} {'val':>6} {'test':>6}")
    for cls in classes[:TABLE_ROWS]:
        lines.append(f"  {cls:<{width}} " + " ".join(f"{counts[s][cls]:>6}" for s in SPLITS))
    if len(classes) > TABLE_ROWS:
        lines.append(f"  ... {len(classes) - TABLE_ROWS} more classes (manifest.json has them all)")
    lines.append(f"  {'total':<{width}} " + " ".join(f"{sum(counts[s].values()):>6}" for s in SPLITS))
    if capped:
        unused = sum(n - role.train_per_class for n in capped.values())  # type: ignore[operator]
        shown = ", ".join(f"{c} {n}->{role.train_per_class}" for c, n in list(capped.items())[:8])
        more = f", ... ({len(capped) - 8} more)" if len(capped) > 8 else ""
        lines.append(f"  train_per_class={role.train_per_class} capped {len(capped)} of "
                     f"{len(classes)} classes ({shown}{more}): {unused} training images unused; "
                     f"raise or remove data.{role_name}.train_per_class to use them")
    return "\n".join(lines)


def _require_training_images(sel: Selection, labels: np.ndarray, splits: np.ndarray, uri: str) -> None:
    train = np.bincount(labels[splits == TRAIN], minlength=len(sel.classes))
    empty = [c for c, n in zip(sel.classes, train, strict=True) if n == 0]
    if empty:
        raise BadInput(f"{uri}: classes {empty} have no usable training image")


def _require_splits(role_name: str, role: DatasetRole, sel: Selection, labels: np.ndarray,
                    splits: np.ndarray, *, after_decoding: bool) -> None:
    """Exit 2 now, naming the fix, for an empty split a later stage reads (see NEEDED).
    val_fraction: 0 is a choice (train without validation), not a mistake."""
    for name in NEEDED[role_name]:
        if np.any(splits == SPLIT_CODE[name]):
            continue
        if name == "val" and role.val_fraction == 0 and not sel.shipped:
            log.info("ingest %s: no val split (data.%s.val_fraction is 0): training reports no "
                     "validation accuracy", role_name, role_name)
            continue
        why = " once the bad files are skipped" if after_decoding else ""
        raise BadInput(f"{role_name} ({role.uri}): the {name} split would be empty{why}, and "
                       f"{READER[name]} needs it; {_fix(role_name, role, sel, name, labels)}")


def _fix(role_name: str, role: DatasetRole, sel: Selection, split: str, labels: np.ndarray
         ) -> str:
    if sel.shipped and split != "train":
        return (f"{role.uri} ships its splits as folders and its {split}/ holds no usable "
                f"image of these classes: add images there, or remove the empty {split}/ so "
                f"that it is carved from train/ (data.{role_name}.{split}_fraction)")
    smallest = int(np.bincount(labels).min()) if len(labels) else 0
    key = f"data.{role_name}.{split}_fraction"
    folder = {"val": "ship a val/ folder beside train/",
              "test": "ship a test/ folder (or a val/ folder: with no test/ it becomes the test "
                      "split)",
              "train": "ship a train/ folder"}[split]
    if split == "train":
        return f"{folder} or lower data.{role_name}.val_fraction and test_fraction"
    return (f"{folder}, or set {key} above 0 with at least 3 images in every class (the "
            f"smallest has {smallest}: one each for train, val and test)")


def _validate(role_name: str, role: DatasetRole, data: DataParams, sel: Selection,
              bad: list[dict[str, str]], digests: dict[str, list[tuple[int, str]]],
              listing: Listing, refused: list[dict[str, str]], failed_report: Path
              ) -> dict[str, Any]:
    """The role's report; BadInput past the bad-file threshold or on a leak into test, after
    writing the report to `failed_report` (beside the output, which is not written then).
    `refused`: the files the workers found over data.max_file_mb, skipped as the listing's."""
    duplicates = [
        {"sha256": d, "items": [{"split": SPLITS[s], "path": p} for s, p in group]}
        for d, group in digests.items() if len(group) > 1
    ]
    leaks = [g for g in duplicates
             if {i["split"] for i in g["items"]} & {"test"} and len({i["split"] for i in g["items"]}) > 1]
    skipped, candidates = [*listing.skipped, *refused], len(sel.refs) - len(refused)
    report = {"role": role_name, "uri": role.uri, "candidates": candidates, "bad": bad,
              "duplicates": duplicates, "leaks_into_test": len(leaks),
              "ignored_files": listing.ignored,
              # Links out of the tree, FIFOs, sockets, devices, files over data.max_file_mb: never
              # opened, so not "bad" images and not counted against data.max_bad_fraction.
              "skipped": skipped, "notes": sel.notes, "capped": sel.capped}
    _say_skipped(role_name, "skipped", bad)
    _say_skipped(role_name, "not read", skipped)
    failure = None
    if candidates and len(bad) / candidates > data.max_bad_fraction:
        first = ", ".join(b["path"] for b in bad[:3])
        failure = (f"{role_name}: {len(bad)} of {candidates} files are bad, over "
                   f"data.max_bad_fraction={data.max_bad_fraction}; first: {first}")
    elif leaks and not data.allow_leakage:
        paths = ", ".join(i["path"] for i in leaks[0]["items"])
        failure = (f"{role_name}: {len(leaks)} images in the test split also stand in "
                   f"train/val (first: {paths}); remove them or set data.allow_leakage: true")
    if failure:
        write_json(failed_report, report)
        raise BadInput(f"{failure}; every file and reason: {failed_report}")
    return report


def _say_skipped(role_name: str, what: str, items: list[dict[str, str]]) -> None:
    for item in items[:5]:
        print(f"ingest {role_name}: {what} {item['path']}: {item['reason']}", file=sys.stderr)
    if len(items) > 5:
        print(f"ingest {role_name}: ... and {len(items) - 5} more (data/<role>/report.json)",
              file=sys.stderr)


def _cluster(data: DataParams) -> AbstractContextManager[object]:
    """On data.engine ray, a connection to the cluster (bounded, its failures exit 75 or 2);
    an outer one is reused, so the stage connects once for both roles and its pieces are
    sized by the cluster's CPUs."""
    return raycluster.connected(data.ray_address) if data.engine == "ray" else nullcontext()


def run(params: Params, out_dir: Path) -> dict[str, dict[str, Any]]:
    """Ingest both roles into out_dir/<role>/; return the reports by role."""
    with _cluster(params.data):
        return {name: ingest_role(name, getattr(params.data, name), params, out_dir / name,
                                  skip_unread=True)
                for name in ROLES}


def main(argv: list[str] | None = None) -> int:
    args = arguments("ingest", __doc__, argv, out="data")  # it receives source/ and target/
    return run_stage("ingest", lambda: run(load_params(args.params), args.out))


if __name__ == "__main__":
    exit_process(main())
