"""A class-folder tree listed without opening a file: root folder + rules -> the image files'
(path, size, mtime_ns), the names ignored (not images), and the entries skipped with a reason.

Rules: a link out of the root is skipped unless followed (data.follow_symlinks), as are loops,
FIFOs, sockets, devices, files over data.max_file_mb, and folders or entries that cannot be
read (no permission, vanished: a followed link to / reaches /proc). Used by sources.py's
imagefolder listing; the same reasons are what read_image_file gives for a file it refuses.
"""

from __future__ import annotations

import errno
import operator
import os
import stat
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class Walk:
    """Lists a tree by lstat, never opening anything: what it will not read goes to `skipped`
    with the reason (links out of the root, loops, FIFOs, sockets, devices, files too large)."""

    def __init__(self, root: Path, follow_symlinks: bool, max_bytes: int,
                 stat_files: bool = True) -> None:
        self.root, self.follow, self.max_bytes = root, follow_symlinks, max_bytes
        self.stat_files = stat_files
        self.ignored: list[str] = []
        self.skipped: list[dict[str, str]] = []
        self._seen_dirs: set[tuple[int, int]] = set()

    def _skip(self, path: Path, reason: str) -> None:
        self.skipped.append({"path": str(path), "reason": reason})

    def _target(self, path: Path) -> os.stat_result | None:
        """stat of what `path` names, following an admitted link; None (and listed) if refused."""
        try:
            if path.is_symlink():
                target = path.resolve(strict=True)
                if not self.follow and not target.is_relative_to(self.root):
                    self._skip(path, f"symlink to {target}, outside {self.root} "
                                     "(data.follow_symlinks: true follows it)")
                    return None
            return path.stat()
        except RuntimeError:  # Python < 3.13 reports a loop from resolve() this way
            self._skip(path, "symlink loop")
        except FileNotFoundError:
            self._skip(path, "broken symlink (its target does not exist)")
        except OSError as err:
            self._skip(path, "symlink loop" if err.errno == errno.ELOOP else f"unreadable: {err}")
        return None

    def admits(self, folder: Path) -> bool:
        st = self._target(folder)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def files(self, folder: Path) -> list[tuple[str, int, int]]:
        """(path, size, mtime_ns) of the image files under `folder`, in name order.

        By scandir: a plain entry costs one lstat (none for a folder or a non-image name, nor
        for a regular file without stat_files: its d_type says so, and its size and mtime are
        (-1, -1)), where Path.iterdir + is_symlink + stat cost three; links take the checked
        path."""
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in self._seen_dirs:  # a followed link back into the tree
                self._skip(folder, "symlink loop (folder already listed)")
                return []
            self._seen_dirs.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted(it, key=_NAME)
        except OSError as err:  # no permission (a followed link to / reaches /proc), vanished
            self._skip(folder, f"unreadable folder: {err.strerror or err}")
            return []
        out: list[tuple[str, int, int]] = []
        for entry in entries:
            try:
                if not self.stat_files and entry.is_file(follow_symlinks=False):  # by d_type
                    name = entry.name
                    if name[0] != "." and _suffix(name) in IMAGE_SUFFIXES:
                        out.append((entry.path, -1, -1))
                    else:
                        self.ignored.append(entry.path)
                    continue
                link = entry.is_symlink()
                if link:
                    st = self._target(Path(entry.path))
                    if st is None:
                        continue
                    is_dir = stat.S_ISDIR(st.st_mode)
                else:
                    is_dir = entry.is_dir(follow_symlinks=False)
                if is_dir:
                    if not link or self.follow:
                        out += self.files(Path(entry.path))
                    continue
                name = entry.name
                if name.startswith(".") or _suffix(name) not in IMAGE_SUFFIXES:
                    self.ignored.append(entry.path)
                    continue
                st = st if link else entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    self._skip(Path(entry.path), f"{kind(st.st_mode)}, not a regular file")
                elif st.st_size > self.max_bytes:
                    self._skip(Path(entry.path), too_large(st.st_size, self.max_bytes))
                else:
                    out.append((entry.path, st.st_size, st.st_mtime_ns))
            except OSError as err:  # its stat failed: vanished since listed, no permission
                self._skip(Path(entry.path), f"unreadable: {err.strerror or err}")
        return out


_NAME = operator.attrgetter("name")


def _suffix(name: str) -> str:
    """os.path.splitext(name)[1].lower() for a name not starting with a dot, at a third of
    its cost (once per listed file)."""
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a folder" if stat.S_ISDIR(mode) else "not a regular file"


def too_large(size: int, max_bytes: int) -> str:
    return (f"too large: {size / 2**20:,.1f} MB is over data.max_file_mb="
            f"{max_bytes / 2**20:g}")
