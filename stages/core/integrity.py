"""A dataset folder checked against its own manifest before any stage reads it.

folder (manifest.json, shards/*.npy, labels.npy, split.npy) + how much to check
-> the manifest (a dict), or BadInput naming the file that is missing, truncated or changed and
the fix (restore it from DVC's cache, or rerun the stage that wrote it).

Why: a flipped byte in a shard trained and evaluated with exit 0, and `dvc repro` then recorded
the corrupted data in dvc.lock; a deleted shard or a truncated manifest was a traceback (70).
The manifest already holds every file's sha256 (written as the file was written): checking
them is one sequential read of the set, measured in the README ("Data integrity").

`verify_data` (params.yaml, top level): "sha256" (default) hashes every file; "size" checks only
that each array file is complete (its .npy header's shape against its length), for sets too
large to re-read on each stage; that choice is logged by every stage that makes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stages.core.errors import BadInput

log = logging.getLogger("imagepipe")

Verify = Literal["sha256", "size"]

def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def remedy(folder: Path, manifest: dict[str, Any] | None) -> str:
    """The remedy: DVC's cache holds the bytes the manifest describes; else rerun the maker."""
    stage = {"augmented": "augment", "source": "ingest", "target": "ingest"}.get(
        (manifest or {}).get("role"))
    rerun = f"rerun {stage} (`dvc repro -f {stage}`)" if stage else "rerun the stage that wrote it"
    return f"restore it with `dvc checkout {folder}` or {rerun}"


def read_manifest(folder: Path) -> dict[str, Any]:
    """folder/manifest.json as a dict with the keys readers use; BadInput otherwise."""
    path = folder / "manifest.json"
    if not path.exists():
        raise BadInput(f"{folder} is not a dataset (no manifest.json): run the stage that makes it")
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:  # empty, truncated, not UTF-8: all ValueError
        raise BadInput(f"{path}: unreadable or not valid JSON ({_short(err)}); "
                       f"{remedy(folder, None)}") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    ok = (isinstance(manifest, dict) and isinstance(manifest.get("classes"), list)
          and isinstance(manifest.get("sha256"), dict) and isinstance(shards, list) and shards
          and all(isinstance(s, dict) and isinstance(s.get("file"), str) for s in shards))
    if not ok:
        raise BadInput(f"{path}: not a dataset manifest (classes, sha256 or shards missing); "
                       f"{remedy(folder, manifest if isinstance(manifest, dict) else None)}")
    return manifest


def _short(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def verify(folder: Path, manifest: dict[str, Any], how: Verify = "sha256") -> None:
    """BadInput naming the first file that is missing, incomplete or (with sha256) changed."""
    # (file, its sha256 in the manifest or None) of every array the set consists of
    files = [*((folder / s["file"], s.get("sha256")) for s in manifest["shards"]),
             *((folder / name, manifest["sha256"].get(name)) for name in ("labels.npy", "split.npy"))]
    for path, _ in files:
        if not path.is_file():
            raise BadInput(f"{path}: missing (manifest.json lists it); {remedy(folder, manifest)}")
    if how == "size":
        log.info("%s: shard sha256 not checked (verify_data: size): only that every file is "
                 "complete; a changed byte would go unnoticed", folder)
        for path, _ in files:
            _require_complete(path, folder, manifest)
        return
    for path, want in files:
        if want is not None and file_sha256(path) != want:
            raise BadInput(f"{path}: its sha256 does not match manifest.json (the file changed "
                           f"after it was written: a disk, copy or edit fault); "
                           f"{remedy(folder, manifest)}")


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}


def _require_complete(path: Path, folder: Path, manifest: dict[str, Any]) -> None:
    """The file's length is its .npy header's shape: a truncated or padded file is refused."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in _HEADER_READERS:
                raise ValueError(f".npy format version {version} is not one numpy writes here")
            shape, _, dtype = _HEADER_READERS[version](f)
            expected = f.tell() + int(np.prod(shape)) * dtype.itemsize
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError, EOFError) as err:
        raise BadInput(f"{path}: not a readable .npy file ({_short(err)}); "
                       f"{remedy(folder, manifest)}") from None
    if size != expected:
        raise BadInput(f"{path}: {size:,} bytes where its header says {expected:,} (truncated "
                       f"or padded); {remedy(folder, manifest)}")


def load_array(path: Path, folder: Path, manifest: dict[str, Any], mmap: str | None) -> np.ndarray:
    """np.load, with a damaged file (the size check skipped, or no sha256 listed) as BadInput."""
    try:
        return np.load(path, mmap_mode=mmap, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise BadInput(f"{path}: not a readable .npy file ({_short(err)}); "
                       f"{remedy(folder, manifest)}") from None
