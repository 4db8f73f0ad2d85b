"""The staging folder of stages/core/shards.py (data/.ROLE.shards/): finished shards and their
metas, and the pieces of a shard joined into it in order as they come back.

A shard counts as staged once its meta (`SHARD.json`: rows, sha256, per-file digests, bad and
skipped files, the digest of its files' (size, mtime)) exists beside it; both are renamed into
place, so a killed ingest leaves temporaries the next run sweeps, never half a shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stages.core.dataset import RowWriter, iter_rows
from stages.core.io import umask


def inputs_digest(stamps: Sequence[Sequence[int]]) -> str:
    """The digest of files' (size, mtime_ns) in order: a touched or replaced file changes it."""
    return hashlib.sha256("".join(f"{s}\0{m}\n" for s, m in stamps).encode()).hexdigest()


class ShardAssembler:
    """The pieces of one shard appended in order, as they come back, to a RowWriter of the
    planned rows (hashed as written; a bad file in a piece makes it read the shard back once)."""

    def __init__(self, staging: Path, shard: str, rows: int, row_shape: tuple[int, ...]) -> None:
        self.staging, self.shard = staging, shard
        self.writer = RowWriter(staging / f".{shard}.{os.getpid()}.concat00.tmp", row_shape,
                                capacity=rows, hashed=True)
        self.results: dict[int, dict[str, Any]] = {}
        self.next = 0

    def add(self, part: int, result: dict[str, Any]) -> None:
        self.results[part] = result
        while self.next in self.results:
            path = Path(self.results[self.next]["path"])
            # 8 MB reads into one buffer
            for _, rows in iter_rows(path, self.writer.row_shape, max(1, 2**23 // self.writer.row)):
                self.writer.write(rows)
            path.unlink()
            self.next += 1

    def finish(self) -> dict[str, Any]:
        self.writer.close()
        results = [self.results[k] for k in sorted(self.results)]
        return finish_shard(self.staging, self.shard, self.writer.path, self.writer.n,
                            self.writer.digest, results)

    def abandon(self) -> None:
        self.writer.discard()
        for result in self.results.values():
            Path(result["path"]).unlink(missing_ok=True)


def finish_shard(staging: Path, shard: str, tmp: Path, n: int, digest: str,
                 results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A finished temporary (n rows, its sha256) -> staging/shard, renamed into place, and
    staging/shard.json, written last: a shard counts as done only once its meta exists."""
    # mkstemp makes 0600; a dataset is for others too (a server, a teammate)
    os.chmod(tmp, 0o666 & ~umask())
    tmp.replace(staging / shard)
    meta = {"n": int(n), "sha256": digest,  # "inputs": checked for files only (build_shards)
            "digests": [d for r in results for d in r["digests"]],
            "bad": [b for r in results for b in r["bad"]],
            "skipped": [b for r in results for b in r["skipped"]],
            "inputs": inputs_digest([s for r in results for s in r["stamps"] or ()])}
    tmp_meta = staging / f".{shard}.json.{os.getpid()}.metadata.tmp"
    tmp_meta.write_text(json.dumps(meta))
    tmp_meta.replace(staging / f"{shard}.json")
    return meta


def staged_meta(staging: Path, shard: str) -> dict[str, Any] | None:
    """A finished staged shard's meta, or None when it is missing or incomplete."""
    try:
        meta = json.loads((staging / f"{shard}.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if (staging / shard).is_file() else None
