"""Image shards: bounded-size .npy files that readers see as one logical N x H x W x C array.

A shard is a plain .npy file (uint8, C order) with a fixed 128-byte header, so a writer can
stream rows after the header before it knows how many will be good, and any reader (numpy,
`np.load(mmap_mode="r")`) opens it. A shard is written by appending rows (never a memory map:
written pages of a map count in the writer's RSS and made `augment` peak at 925 MB on a 110 MB
set), then its header, then it is renamed into place: a killed writer leaves a temporary that
the next run sweeps away, never half a shard.

The file format, its writer (RowWriter) and reader (ShardedArray) are in stages/core/dataset.py.
`build_shards` turns a list of refs into staged shards on a data engine (stages/core/engine.py):
one task per shard, or per piece of a shard where there are fewer than eight shards per
worker (_pieces). The
staging folder (data/.ROLE.shards/) keeps finished shards named by refs and params, with
their files' (size, mtime) in the meta: a killed or repeated ingest decodes only the shards
that are missing or whose inputs changed. The pieces of a shard are joined by the driver in
order as they come back, while the workers decode the rest; each shard's sha256 is taken as
it is written (read back only when a bad file left fewer rows than planned).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.dataset import HEADER, RowWriter
from stages.core.imageform import canonical
from stages.core.sources import BadFile, TooLarge, read_image_file
from stages.core.staging import ShardAssembler, finish_shard, inputs_digest, staged_meta

FORMAT = "shards-1"  # part of every shard's fingerprint: a format change rebuilds them all


@dataclass(frozen=True)
class ShardPart:
    """Rows [part of `parts`] of one staged shard: what one engine task decodes and writes."""

    shard: str  # the staged shard's file name: its input fingerprint, so reruns find it
    part: int
    parts: int
    refs: tuple[str, ...]
    size: int
    channels: int
    max_bytes: int
    staging: str
    batch: int
    root: str = ""  # the driver's cwd: relative refs resolve there, on any node


def fingerprint(refs: Sequence[str], params: Sequence[Any]) -> str:
    """A staged shard's name: its refs in order and the params that change decoding (a rename
    does not change bytes but changes the ref, and so the shard: rare, and safe). The files'
    own part, each one's (size, mtime), is its meta's "inputs" (inputs_digest), checked before
    the shard is reused: known without a stat at listing, from the fstat its reader does."""
    h = hashlib.sha256(json.dumps([FORMAT, *params]).encode())
    # os.fsencode: a file name that is not valid UTF-8 (`good_\xff\xfe.png`, from a disk
    # written elsewhere) is a str with surrogate escapes, which str.encode() refuses (ingest
    # exited 70); fsencode gives back its bytes on disk, and UTF-8 names the same bytes as before.
    h.update(os.fsencode("".join(f"{ref}\n" for ref in refs)))  # one update: a third of the time
    return h.hexdigest()[:32]


def _stamp(ref: str) -> tuple[int, int]:
    """(size, mtime_ns) of what `ref` names, as its reader's fstat gives; (-1, -1) if gone."""
    try:
        st = os.stat(ref)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _code_digest() -> str:
    """The decoding code's own digest (this module and the project files it runs, by
    stages/core/codeid.py, the rule checkpoints follow too): an edit to it (a resize method, a
    mode rule) must not reuse shards staged by the old code, though their inputs did not
    change."""
    from stages.core.codeid import code_digest

    return code_digest("stages.core.shards")


def decode_piece(piece: ShardPart, fetch: Callable[[str], tuple[str, Any]] | None = None
                 ) -> dict[str, Any]:
    """Decode a piece's refs into rows of a temporary file in the staging folder.

    Returns {"path", "digests" (None for a bad or skipped file), "bad", "skipped", "stamps"
    (each file's (size, mtime_ns) by its reader's fstat; none for arrays)}; a whole-shard
    piece is finished here (header, rename, meta), so on a cluster the worker, not the driver,
    writes the shard."""
    stamps: list[tuple[int, int]] | None = [] if fetch is None else None
    fetch = fetch or functools.partial(read_image_file, max_bytes=piece.max_bytes, stamps=stamps)
    staging = Path(piece.staging)
    fd, tmp = tempfile.mkstemp(prefix=f".{piece.shard}.p{piece.part}.{os.getpid()}.",
                               suffix=".tmp", dir=staging)
    os.close(fd)
    try:
        return _decode_into(piece, fetch, Path(tmp), stamps)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        from stages.core.io import disk_full, is_disk_full

        if is_disk_full(err):
            raise disk_full(staging, HEADER + len(piece.refs) * piece.size ** 2 * piece.channels,
                            err) from None  # type: ignore[arg-type]
        raise


def _decode_into(piece: ShardPart, fetch: Callable[[str], tuple[str, Any]], tmp: Path,
                 stamps: list[tuple[int, int]] | None) -> dict[str, Any]:
    shape = (piece.size, piece.size, piece.channels)
    # A whole shard is hashed as written; a piece is hashed by the driver as it joins it.
    writer = RowWriter(tmp, shape, capacity=len(piece.refs), hashed=piece.parts == 1)
    buf = np.empty((piece.batch, *shape), dtype=np.uint8)
    digests: list[str | None] = []
    bad: list[dict[str, str]] = []
    skipped: list[dict[str, str]] = []
    k = 0
    for i, ref in enumerate(piece.refs):
        path = os.path.join(piece.root, ref) if piece.root else ref
        try:
            digest, img = fetch(path)
            buf[k] = canonical(img, piece.size, piece.channels)
        except TooLarge as err:  # refused unread, as the listing refuses: not a bad image
            digests.append(None)
            skipped.append({"path": ref, "reason": str(err)})
            continue
        except BadFile as err:
            digests.append(None)
            bad.append({"path": ref, "reason": str(err)})
            continue
        except OSError as err:  # unreadable on disk (permissions, vanished)
            digests.append(None)
            bad.append({"path": ref, "reason": f"unreadable: {err}"})
            continue
        finally:
            if stamps is not None and len(stamps) == i:  # not opened: no fstat
                stamps.append(_stamp(path))
        digests.append(digest)
        k += 1
        if k == piece.batch:
            writer.write(buf)
            k = 0
    writer.write(buf[:k])
    writer.close()
    result = {"path": str(tmp), "digests": digests, "bad": bad, "skipped": skipped,
              "stamps": stamps}
    if piece.parts == 1:
        finish_shard(Path(piece.staging), piece.shard, tmp, writer.n, writer.digest, [result])
    return result


# CIFAR JPEGs' worth of work (0.03 s): below this a piece's task start-up outweighs its
# decoding. A piece of heavier files holds fewer of them: of 6-MP photos, one.
MIN_PIECE = 512


@dataclass
class StagedShards:
    """The shards of one dataset, in logical order, and what decoding found."""

    shards: list[tuple[Path, str, int]]  # (staged file, sha256, rows)
    keep: np.ndarray  # bool per input ref: decoded (False: a bad file)
    digests: list[str | None]  # content sha256 per input ref
    bad: list[dict[str, str]]
    skipped: list[dict[str, str]]  # files over data.max_file_mb, refused by their readers
    decoded: int  # shards decoded by this run (the others were staged already)
    staging: Path

    def prune(self) -> None:
        """Drop staged shards this dataset no longer uses (older inputs or params)."""
        used = {path.name for path, _, _ in self.shards}
        for entry in self.staging.iterdir():
            base = entry.name.removesuffix(".json")
            if not entry.name.startswith(".") and base not in used:
                entry.unlink(missing_ok=True)


def plan(labels: np.ndarray, row_bytes: int, shard_mb: int) -> list[tuple[int, int]]:
    """[lo, hi) row ranges of the shards of class-ordered rows.

    One shard when everything fits in shard_mb (the digits and CIFAR sets); otherwise each
    class has shards of its own, of near-equal size, so changing one class's files changes
    that class's shards only (and DVC re-hashes and pushes only those)."""
    per = max(1, shard_mb * 2**20 // row_bytes)
    if len(labels) <= per:
        return [(0, len(labels))]
    ranges = []
    bounds = np.flatnonzero(np.diff(labels)) + 1
    for lo, hi in zip([0, *bounds], [*bounds, len(labels)], strict=True):
        k = -(-(hi - lo) // per)
        edges = np.linspace(lo, hi, k + 1).round().astype(int)
        ranges += [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return ranges


def build_shards(refs: Sequence[str], labels: np.ndarray, *, files: bool,
                 fetch: Callable[[str], tuple[str, Any]], size: int, channels: int,
                 max_bytes: int, shard_mb: int, batch: int, engine: str,
                 ray_address: str | None, staging: Path,
                 advance: Callable[[int], None] = lambda n: None) -> StagedShards:
    """Decode `refs` (class-ordered) into staged shards, reusing those already staged whose
    files are unchanged (each staged shard's files are stat'ed; of the files to decode, only
    as many as decode_work weighs: their workers' fstat stamps them)."""
    from stages.core.engine import workers
    from stages.core.io import sweep_stale_temps

    staging = staging.resolve()  # workers on other nodes have another cwd
    staging.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(staging)
    shape = (size, size, channels)
    ranges = plan(labels, int(np.prod(shape)), shard_mb)
    params = [size, channels, max_bytes, _code_digest()]
    names = [f"{fingerprint(refs[lo:hi], params)}.npy" for lo, hi in ranges]
    metas: dict[int, dict[str, Any]] = {}
    for k, (name, (lo, hi)) in enumerate(zip(names, ranges, strict=True)):
        meta = staged_meta(staging, name)
        if meta is not None and (not files or meta.get("inputs") == inputs_digest(
                map(_stamp, refs[lo:hi]))):
            metas[k] = meta
            advance(hi - lo)
    todo = [k for k in range(len(ranges)) if k not in metas]
    # A generator: decode_work stops stat-ing once the files weigh enough for the pool.
    sizes = (_stamp(refs[i])[0] for k in todo for i in range(*ranges[k]))
    work, weighed = decode_work(sizes if files else (), max_bytes)
    engine = decode_engine(engine, files, work)
    pieces = _pieces(todo, ranges, names, refs, workers(engine) if engine != "inline" else 1,
                     ShardPart("", 0, 1, (), size, channels, max_bytes, str(staging), batch,
                           os.getcwd() if files else ""), per_file=work / max(weighed, 1))
    task = decode_piece if files else functools.partial(decode_piece, fetch=fetch)
    try:
        _run(task, pieces, engine, ray_address, staging, shape, advance)
    except BaseException:
        sweep_stale_temps(staging)
        with contextlib.suppress(OSError):  # nothing finished to resume from: leave no folder
            staging.rmdir()
        raise
    for k in todo:
        meta = staged_meta(staging, names[k])
        if meta is None:
            raise RuntimeError(f"shard {names[k]} was not written to {staging}")
        metas[k] = meta
    return _built(ranges, names, metas, len(todo), staging)


def decode_work(sizes: Iterable[int], max_bytes: int = 2**63) -> tuple[int, int]:
    """(work, files weighed) of decoding files of `sizes` (-1: vanished): each weighs its size
    plus engine.FILE_COST_BYTES (its fixed cost), summed until the total reaches
    engine.DECODE_POOL_FROM, where the pool pays (on 60,000 CIFAR JPEGs the first 30,000). A
    file over `max_bytes` weighs its fixed cost only: its reader refuses it unread.

    `sizes` is lazy (build_shards stats a file as it is weighed): one stat a file, 0.17 s at
    load 5 for the 30,096 of CIFAR's 60,000 it stops at, some 2% of their decoding, as the
    files' count cannot tell a folder of 32-px JPEGs from one of camera photos."""
    from stages.core.engine import DECODE_POOL_FROM, FILE_COST_BYTES

    work = weighed = 0
    for size in sizes:
        work += (size if 0 <= size <= max_bytes else 0) + FILE_COST_BYTES
        weighed += 1
        if work >= DECODE_POOL_FROM:
            break
    return work, weighed


def decode_engine(engine: str, files: bool, work: int) -> str:
    """Where refs of `work` (decode_work) decode: array sources (digits, CIFAR's pickles)
    live in this process and decode here, fast; so do files too light to pay for the local
    pool (engine.DECODE_POOL_FROM)."""
    from stages.core import engine as engines

    if not files or (engine == "local" and work < engines.DECODE_POOL_FROM):
        return "inline"
    return engine


def _run(task: Callable[[ShardPart], dict[str, Any]], pieces: list[ShardPart], engine: str,
         ray_address: str | None, staging: Path, shape: tuple[int, ...],
         advance: Callable[[int], None]) -> None:
    """Run the pieces; join each multi-piece shard's pieces as they come back (the driver
    works while the workers decode), finish it with its last."""
    from stages.core.engine import run_map

    rows: dict[str, int] = {}
    for piece in pieces:
        rows[piece.shard] = rows.get(piece.shard, 0) + len(piece.refs)
    joiners: dict[str, ShardAssembler] = {}
    try:
        for i, result in run_map(task, pieces, engine=engine, ray_address=ray_address):
            piece = pieces[i]
            advance(len(piece.refs))
            if piece.parts == 1:
                continue
            if piece.shard not in joiners:
                joiners[piece.shard] = ShardAssembler(staging, piece.shard, rows[piece.shard], shape)
            joiners[piece.shard].add(piece.part, result)
            if len(joiners[piece.shard].results) == piece.parts:
                joiners.pop(piece.shard).finish()
    finally:
        for joiner in joiners.values():
            joiner.abandon()


def _pieces(todo: list[int], ranges: list[tuple[int, int]], names: list[str],
            refs: Sequence[str], n_workers: int, base: ShardPart, *,
            per_file: float) -> list[ShardPart]:
    """One piece per shard; shards split further when there are fewer of them than eight per
    worker (a one-shard CIFAR would otherwise decode on one core; eight, not one, per worker so
    that a worker slowed by a busy machine does not leave the others idle long at the end:
    with four, CIFAR's last piece ran 0.2 s alone on 2 cores). `per_file`: a file's mean work
    (decode_work): a piece holds at least MIN_PIECE CIFAR JPEGs' worth (300 camera photos are
    one small shard, which must still split, else it decodes on one core)."""
    from stages.core.engine import CIFAR_JPEG_BYTES, FILE_COST_BYTES

    rows = sum(ranges[k][1] - ranges[k][0] for k in todo)
    min_files = max(1, round(MIN_PIECE * (CIFAR_JPEG_BYTES + FILE_COST_BYTES)
                             / max(per_file, 1.0)))
    out = []
    for k in todo:
        lo, hi = ranges[k]
        n = hi - lo
        parts = 1
        if n_workers > 1 and len(todo) < 8 * n_workers and rows:
            parts = max(1, min(-(-n // min_files), round(8 * n_workers * n / rows)))
        edges = np.linspace(lo, hi, parts + 1).round().astype(int)
        out += [dataclasses.replace(base, shard=names[k], part=j, parts=parts,
                                    refs=tuple(refs[edges[j]:edges[j + 1]]))
                for j in range(parts)]
    return out


def _built(ranges: list[tuple[int, int]], names: list[str], metas: dict[int, dict[str, Any]],
           decoded: int, staging: Path) -> StagedShards:
    digests: list[str | None] = []
    bad: list[dict[str, str]] = []
    skipped: list[dict[str, str]] = []
    shards = []
    for k, name in enumerate(names):
        meta = metas[k]
        if len(meta["digests"]) != ranges[k][1] - ranges[k][0]:
            raise RuntimeError(f"staged shard {name} does not match its plan")
        digests += meta["digests"]
        bad += meta["bad"]
        skipped += meta["skipped"]
        shards.append((staging / name, meta["sha256"], meta["n"]))
    keep = np.array([d is not None for d in digests], dtype=bool)
    return StagedShards(shards, keep, digests, bad, skipped, decoded, staging)
