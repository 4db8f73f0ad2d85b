"""Image shards: bounded-size .npy files that readers see as one logical N x H x W x C array.

A shard is a plain .npy file (uint8, C order) with a fixed 128-byte header, so a writer can
stream rows after the header before it knows how many will be good, and any reader (numpy,
`np.load(mmap_mode="r")`) opens it. A shard is written by appending rows (never a memory map:
written pages of a map count in the writer's RSS and made `augment` peak at 925 MB on a 110 MB
set), then its header, then it is renamed into place: a killed writer leaves a temporary that
the next run sweeps away, never half a shard.

`build_shards` turns a list of refs into staged shards on a data engine (stages/core/engine.py):
one task per shard, or per piece of a shard where there are fewer shards than workers. The
staging folder (data/.ROLE.shards/) keeps finished shards under their input fingerprint, so a
killed or repeated ingest decodes only the shards that are missing or whose inputs changed.
The reader, ShardedArray, is in stages/core/dataset.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "shards-1"  # part of every shard's fingerprint: a format change rebuilds them all
HEADER = 128  # bytes; numpy pads its own headers to 64 and accepts more padding
MAGIC = b"\x93NUMPY\x01\x00"


def npy_header(shape: tuple[int, ...]) -> bytes:
    """A version-1.0 .npy header for uint8 C-order `shape`, padded to exactly HEADER bytes."""
    text = "{'descr': '|u1', 'fortran_order': False, 'shape': " + repr(tuple(shape)) + ", }"
    body_len = HEADER - len(MAGIC) - 2
    if len(text) + 1 > body_len:
        raise ValueError(f"shape {shape} does not fit a {HEADER}-byte .npy header")
    body = text.ljust(body_len - 1) + "\n"
    return MAGIC + body_len.to_bytes(2, "little") + body.encode("latin1")


class RowWriter:
    """Append uint8 rows of one shape to `path` (a temporary), then `close()` writes the header.

    Rows start at byte HEADER whatever `path` later becomes: a whole shard (header written in
    place) or a piece whose rows another writer copies after its own header (`concat`)."""

    def __init__(self, path: Path, row_shape: tuple[int, ...], capacity: int = 0) -> None:
        from stages.core.io import reserve

        self.path, self.row_shape, self.n = path, tuple(row_shape), 0
        self.row = int(np.prod(row_shape))
        # Claim the blocks of every row now: a full disk is DiskFull (exit 75) before decoding.
        path.write_bytes(b"\0" * HEADER)
        if capacity:
            reserve(path, HEADER + capacity * self.row)
        self._f = open(path, "r+b")  # noqa: SIM115 - closed in close()
        self._f.seek(HEADER)

    def write(self, rows: np.ndarray) -> None:
        if rows.shape[1:] != self.row_shape or rows.dtype != np.uint8:
            raise ValueError(f"rows {rows.shape} {rows.dtype} are not uint8 x {self.row_shape}")
        self._f.write(np.ascontiguousarray(rows).data)
        self.n += len(rows)

    def close(self) -> None:
        self._f.seek(0)
        self._f.write(npy_header((self.n, *self.row_shape)))
        self._f.truncate(HEADER + self.n * self.row)  # the reserved rows of bad files
        self._f.close()


def concat(pieces: Sequence[Path], row_shape: tuple[int, ...], dest: Path) -> tuple[int, str]:
    """Rows of `pieces` (RowWriter files, header or not) into the shard `dest`: (rows, sha256).

    The digest is taken while copying, so the shard is not read back."""
    row = int(np.prod(row_shape))
    n = sum((p.stat().st_size - HEADER) // row for p in pieces)
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        head = npy_header((n, *row_shape))
        out.write(head)
        digest.update(head)
        for piece in pieces:
            with open(piece, "rb") as f:
                f.seek(HEADER)
                while block := f.read(8 * 2**20):
                    out.write(block)
                    digest.update(block)
    return n, digest.hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---------------------------------------------------------------- building shards from sources


@dataclass(frozen=True)
class Piece:
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


def fingerprint(refs: Sequence[str], files: bool, params: Sequence[Any]) -> str:
    """What a shard's bytes depend on: its refs in order, each file's (size, mtime) and the
    params that change decoding. A touched or replaced file changes it; a rename does not
    change bytes but changes the ref, and so the shard (rare, and safe)."""
    h = hashlib.sha256(json.dumps([FORMAT, *params]).encode())
    for ref in refs:
        if files:
            st = os.stat(ref)
            h.update(f"{ref}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        else:  # an array shipped by a package or read from fixed archive files
            h.update(f"{ref}\n".encode())
    return h.hexdigest()[:32]


def _code_digest() -> str:
    """The decoding code's own digest: an edit to it (a resize method, a mode rule) must not
    reuse shards staged by the old code, though their inputs did not change."""
    from stages.core import sources

    h = hashlib.sha256()
    for module in (sources.__file__, __file__):
        h.update(Path(module).read_bytes())
    return h.hexdigest()


def decode_piece(piece: Piece, fetch: Callable[[str], tuple[str, Any]] | None = None
                 ) -> dict[str, Any]:
    """Decode a piece's refs into rows of a temporary file in the staging folder.

    Returns {"path", "digests" (None for a bad file), "bad"}; a whole-shard piece is finished
    here (header, rename, meta), so on a cluster the worker, not the driver, writes the shard."""
    from stages.core.sources import read_image_file

    fetch = fetch or functools.partial(read_image_file, max_bytes=piece.max_bytes)
    staging = Path(piece.staging)
    fd, tmp = tempfile.mkstemp(prefix=f".{piece.shard}.p{piece.part}.{os.getpid()}.",
                               suffix=".tmp", dir=staging)
    os.close(fd)
    try:
        return _decode_into(piece, fetch, Path(tmp))
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        from stages.core.io import disk_full, is_disk_full

        if is_disk_full(err):
            raise disk_full(staging, HEADER + len(piece.refs) * piece.size ** 2 * piece.channels,
                            err) from None  # type: ignore[arg-type]
        raise


def _decode_into(piece: Piece, fetch: Callable[[str], tuple[str, Any]], tmp: Path
                 ) -> dict[str, Any]:
    from stages.core.sources import BadFile, canonical

    shape = (piece.size, piece.size, piece.channels)
    writer = RowWriter(tmp, shape, capacity=len(piece.refs))
    buf = np.empty((piece.batch, *shape), dtype=np.uint8)
    digests: list[str | None] = []
    bad: list[dict[str, str]] = []
    k = 0
    for ref in piece.refs:
        try:
            digest, img = fetch(os.path.join(piece.root, ref) if piece.root else ref)
            buf[k] = _canonical(img, piece.size, piece.channels, canonical)
        except BadFile as err:
            digests.append(None)
            bad.append({"path": ref, "reason": str(err)})
            continue
        except OSError as err:  # unreadable on disk (permissions, vanished)
            digests.append(None)
            bad.append({"path": ref, "reason": f"unreadable: {err}"})
            continue
        digests.append(digest)
        k += 1
        if k == piece.batch:
            writer.write(buf)
            k = 0
    writer.write(buf[:k])
    writer.close()
    result = {"path": str(tmp), "digests": digests, "bad": bad}
    if piece.parts == 1:
        finish_shard(Path(piece.staging), piece.shard, [tmp], shape, [result])
    return result


# Keys whose presence may rotate or composite an image: such files take the full path.
_NOT_PLAIN = frozenset({"exif", "xmp", "XML:com.adobe.xmp", "transparency"})


def _canonical(img: Any, size: int, channels: int, full: Callable[..., np.ndarray]
               ) -> np.ndarray:
    """sources.canonical, with its no-op case short-cut: a JPEG or PNG already in the wanted
    mode and size, with nothing that rotates or composites it, is its own pixels (the same
    bytes canonical gives; 1.4x on CIFAR's JPEGs, where exif_transpose and copies dominated)."""
    if (img.mode == ("RGB" if channels == 3 else "L") and img.size == (size, size)
            and img.format in ("JPEG", "PNG") and not (_NOT_PLAIN & img.info.keys())):
        arr = np.asarray(img)
        return arr[:, :, None] if arr.ndim == 2 else arr
    return full(img, size, channels)


def finish_shard(staging: Path, shard: str, pieces: Sequence[Path], row_shape: tuple[int, ...],
                 results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pieces -> staging/shard (renamed into place) and staging/shard.json, written last: a
    shard counts as done only once its meta exists."""
    dest = staging / shard
    for piece in pieces:  # mkstemp makes 0600; a dataset is for others too (a server, a teammate)
        os.chmod(piece, 0o666 & ~_umask())
    if len(pieces) == 1:
        pieces[0].replace(dest)
        n, digest = (dest.stat().st_size - HEADER) // int(np.prod(row_shape)), file_sha256(dest)
    else:
        tmp = staging / f".{shard}.{os.getpid()}.concat00.tmp"
        n, digest = concat(pieces, row_shape, tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        tmp.replace(dest)
        for piece in pieces:
            piece.unlink(missing_ok=True)
    meta = {"n": int(n), "sha256": digest,
            "digests": [d for r in results for d in r["digests"]],
            "bad": [b for r in results for b in r["bad"]]}
    tmp_meta = staging / f".{shard}.json.{os.getpid()}.metadata.tmp"
    tmp_meta.write_text(json.dumps(meta))
    tmp_meta.replace(staging / f"{shard}.json")
    return meta


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staged_meta(staging: Path, shard: str) -> dict[str, Any] | None:
    """A finished staged shard's meta, or None when it is missing or incomplete."""
    try:
        meta = json.loads((staging / f"{shard}.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if (staging / shard).is_file() else None


MIN_PIECE = 512  # images: below this a piece's task start-up outweighs its decoding


@dataclass
class Built:
    """The shards of one dataset, in logical order, and what decoding found."""

    shards: list[tuple[Path, str, int]]  # (staged file, sha256, rows)
    keep: np.ndarray  # bool per input ref: decoded (False: a bad file)
    digests: list[str | None]  # content sha256 per input ref
    bad: list[dict[str, str]]
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
                 advance: Callable[[int], None] = lambda n: None) -> Built:
    """Decode `refs` (class-ordered) into staged shards, reusing those already staged."""
    from stages.core.engine import workers
    from stages.core.io import sweep_stale_temps

    staging = staging.resolve()  # workers on other nodes have another cwd
    staging.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(staging)
    shape = (size, size, channels)
    ranges = plan(labels, int(np.prod(shape)), shard_mb)
    params = [size, channels, max_bytes, _code_digest()]
    names = [f"{fingerprint(refs[lo:hi], files, params)}.npy" for lo, hi in ranges]
    metas: dict[int, dict[str, Any]] = {}
    for k, name in enumerate(names):
        if (meta := staged_meta(staging, name)) is not None:
            metas[k] = meta
            advance(ranges[k][1] - ranges[k][0])
    todo = [k for k in range(len(ranges)) if k not in metas]
    # Array sources (digits, CIFAR's pickles) live in this process: decoded here, fast.
    engine = engine if files else "inline"
    pieces = _pieces(todo, ranges, names, refs, workers(engine) if engine != "inline" else 1,
                     Piece("", 0, 1, (), size, channels, max_bytes, str(staging), batch,
                           os.getcwd() if files else ""))
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


def _run(task: Callable[[Piece], dict[str, Any]], pieces: list[Piece], engine: str,
         ray_address: str | None, staging: Path, shape: tuple[int, ...],
         advance: Callable[[int], None]) -> None:
    """Run the pieces; finish each multi-piece shard as its last piece comes back."""
    from stages.core.engine import run_map

    done: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for i, result in run_map(task, pieces, engine=engine, ray_address=ray_address):
        piece = pieces[i]
        advance(len(piece.refs))
        done.setdefault(piece.shard, []).append((piece.part, result))
        if len(done[piece.shard]) == piece.parts and piece.parts > 1:
            parts = [r for _, r in sorted(done[piece.shard], key=lambda pr: pr[0])]
            finish_shard(staging, piece.shard, [Path(r["path"]) for r in parts], shape, parts)


def _pieces(todo: list[int], ranges: list[tuple[int, int]], names: list[str],
            refs: Sequence[str], n_workers: int, base: Piece) -> list[Piece]:
    """One piece per shard; shards split further when there are fewer of them than four per
    worker (a one-shard CIFAR would otherwise decode on one core; four, not one, per worker so
    that a worker slowed by a busy machine does not leave the others idle at the end)."""
    rows = sum(ranges[k][1] - ranges[k][0] for k in todo)
    out = []
    for k in todo:
        lo, hi = ranges[k]
        n = hi - lo
        parts = 1
        if n_workers > 1 and len(todo) < 4 * n_workers and rows:
            parts = max(1, min(-(-n // MIN_PIECE), round(4 * n_workers * n / rows)))
        edges = np.linspace(lo, hi, parts + 1).round().astype(int)
        out += [dataclasses.replace(base, shard=names[k], part=j, parts=parts,
                                    refs=tuple(refs[edges[j]:edges[j + 1]]))
                for j in range(parts)]
    return out


def _built(ranges: list[tuple[int, int]], names: list[str], metas: dict[int, dict[str, Any]],
           decoded: int, staging: Path) -> Built:
    digests: list[str | None] = []
    bad: list[dict[str, str]] = []
    shards = []
    for k, name in enumerate(names):
        meta = metas[k]
        if len(meta["digests"]) != ranges[k][1] - ranges[k][0]:
            raise RuntimeError(f"staged shard {name} does not match its plan")
        digests += meta["digests"]
        bad += meta["bad"]
        shards.append((staging / name, meta["sha256"], meta["n"]))
    keep = np.array([d is not None for d in digests], dtype=bool)
    return Built(shards, keep, digests, bad, decoded, staging)
