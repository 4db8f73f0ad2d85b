"""Atomic writes: a temporary sibling, then os.replace, so a reader sees old or new, never half.

Temporary names are `.NAME.PID.XXXXXXXX.tmp` beside NAME: the writer's pid in the name lets the
next writer of NAME remove what a killed one left (sweep_stale_temps), and nothing else. A full
disk is DiskFull (one line, exit 75), with the temporary removed, never a traceback or a bus error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from stages.core.errors import DiskFull

# ENOSPC: the file system is full; EDQUOT: the user's quota is; EFBIG: a file-size limit
# (RLIMIT_FSIZE, the file system's maximum). The same remedy for the user in each case.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in _NO_ROOM


def disk_full(folder: Path, needed: int | None, err: OSError) -> DiskFull:
    """The one line for a write that found no room in `folder` (a temporary folder of ours is
    named by the folder it is in: the one the user knows and can free space on)."""
    while _TEMP.match(folder.name):
        folder = folder.parent
    need = f"needs {needed:,} bytes" if needed else "needs more space"
    if err.errno == errno.EFBIG:  # not the disk: a limit on one file's size
        return DiskFull(f"file too large: writing into {folder} {need}, over {_size_limit()} "
                        f"({os.strerror(errno.EFBIG)}); raise it or write less, and run again")
    free = "?"
    with contextlib.suppress(OSError):
        free = f"{shutil.disk_usage(folder).free:,}"
    return DiskFull(f"disk full: {folder} {need}, {free} bytes free "
                    f"({os.strerror(err.errno or errno.ENOSPC)}); free some space and run again")


def _size_limit() -> str:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft == resource.RLIM_INFINITY:
        return "the file system's largest file size"
    return f"the file-size limit (RLIMIT_FSIZE, `ulimit -f`) of {soft:,} bytes"


def reserve(path: Path, nbytes: int) -> None:
    """Allocate `nbytes` of disk blocks for `path` now (posix_fallocate), so a full disk is
    DiskFull here, before the work that would have filled it (a shard's decoding)."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as err:
            if is_disk_full(err):
                raise disk_full(path.parent, nbytes, err) from None
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # A file system that cannot preallocate (glibc emulates it on most): write as before.


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it into place, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path.parent, path.name)
    fd, tmp = _no_room_is_disk_full(path, lambda: tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file 0600; an output is for others too (a server, a teammate).
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(err):
            raise disk_full(path.parent, None, err) from None  # type: ignore[arg-type]
        raise


def _no_room_is_disk_full(path: Path, make: Any) -> Any:
    try:
        return make()
    except OSError as err:
        if is_disk_full(err):
            raise disk_full(path.parent, None, err) from None
        raise


@cache
def umask() -> int:
    """This process's umask, read once, without changing it where Linux says it
    (/proc/self/status): reading it by setting it and back is racy under threads (a file another
    thread creates in between gets mode 0666), so that is only the fallback elsewhere."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("Umask:"))
        return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_torch(obj: Any, path: str | Path) -> None:
    """torch.save(obj) to `path` atomically, the same bytes for the same tensors.

    torch.save given a file *name* calls the zip's records after it (".pretrained.pt.1843.
    wyt_23ej/data.pkl" for our temporary), so identical weights gave a new md5 on every run
    and `dvc checkout` of an earlier commit found none of its models in the cache. Through a
    file object the records are "archive/...": the bytes are the tensors' and nothing else's.
    torch's zip writer reports a failed write (a full disk) as RuntimeError, not OSError: it is
    DiskFull here when the disk is what failed.
    """
    import torch

    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
            f.flush()
        except RuntimeError as err:
            no_room = _failed_write(f)
            if no_room is not None:
                raise disk_full(path.parent, None, no_room) from err
            raise


def _failed_write(f: Any) -> OSError | None:
    """The OSError a write to `f` gives now, if it is a full disk or a size limit: what torch's
    writer met but did not say."""
    try:
        f.write(b"\0")
        f.flush()
    except OSError as err:
        return err if is_disk_full(err) else None
    return None


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` whole.

    rename(2) cannot replace a non-empty folder, so the old one is first moved aside: an
    interruption between the two renames leaves the previous output or none, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path.parent, path.name)
    tmp = Path(_no_room_is_disk_full(path, lambda: tempfile.mkdtemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)))
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            raise disk_full(path.parent, None, err) from None  # type: ignore[arg-type]
        raise
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# -- what killed writers leave ----------------------------------------------------------------

# mkstemp/mkdtemp's random part: 8 of [a-z0-9_] (tempfile._RandomNameSequence).
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")


def sweep_stale_temps(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove the temporaries of NAME (of any name when None) in `folder` whose writer is gone:
    its pid is dead, or now belongs to a process that started after the temporary was last
    written (the pid was reused). A live writer's temporaries are kept. Returns what it removed.
    Also removes `.NAME.old`, what atomic_dir moved aside, once NAME itself is in place.
    """
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if not match or (name is not None and match["name"] != name):
            continue
        with contextlib.suppress(OSError):
            if _writer_gone(int(match["pid"]), entry.stat(follow_symlinks=False).st_mtime):
                if entry.is_dir(follow_symlinks=False):  # atomic_dir's
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
    if name is not None and (folder / name).exists() and (folder / f".{name}.old").is_dir():
        shutil.rmtree(folder / f".{name}.old", ignore_errors=True)
        removed.append(folder / f".{name}.old")
    return removed


def _writer_gone(pid: int, mtime: float) -> bool:
    import psutil

    try:
        started = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # alive, and its start cannot be read: kept
        return False
    # A live writer created its temporary after it started; 2 s covers btime's 1 s resolution.
    return started > mtime + 2.0
