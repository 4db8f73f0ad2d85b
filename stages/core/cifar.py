"""torchvision:CIFAR10 / CIFAR100 read without running code from the data: the pickled batches
are loaded by an unpickler that builds only what a CIFAR batch holds.

Why: torchvision unpickles CIFAR batches with plain pickle.load, which runs whatever a crafted
file asks for (a data_batch_1 whose __reduce__ calls os.system ran its command). Its md5
check would refuse such a file, but it also refuses every converted or re-written copy, so
it was off. Instead the batches are read by an unpickler that builds only dicts, lists,
strings, numbers and numpy arrays (the globals torch.load's weights_only=True admits for
numpy). Anything else is refused, naming the file, before it is built.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from stages.core.errors import BadInput

T = TypeVar("T")


def download_or_refuse(name: str, root: Path, download: bool, fetch: Callable[[], T],
                       where: str) -> T:
    """fetch() where download is on; BadInput naming `where` to fetch the files by hand when it
    is off or fails."""
    reason = "download is off (data.<role>.download: false)"
    if download:
        try:
            return fetch()
        except Exception as err:  # noqa: BLE001 - any network or archive failure means the same
            reason = f"download failed ({type(err).__name__}: {err})".splitlines()[0]
    raise BadInput(f"torchvision:{name}: no files under {root} and {reason}; download {where} "
                   f"and extract it into {root} (or run once with a network and download: true)")


# The globals a CIFAR batch may name (see the module docstring for why only these).
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol 2 pickles bytes (a Python 3 copy of a batch)
}
# (folder, train files, test files, meta file, label key, class-names key) per dataset.
_CIFAR_LAYOUT = {
    "CIFAR10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "labels", "label_names"),
    "CIFAR100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels",
                 "fine_label_names"),
}


class _RefusingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it asks for {module}.{name}, which a CIFAR batch never holds (only numpy arrays, "
            "lists, dicts, strings and numbers are loaded)")


def load_pickle_safely(path: Path) -> Any:
    """Unpickle `path` admitting only builtins and numpy arrays; BadInput naming the file."""
    try:
        with open(path, "rb") as f:
            return _RefusingUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OverflowError, MemoryError, UnicodeError) as err:
        raise BadInput(f"{path}: refused, not a CIFAR pickle: {err}".splitlines()[0]) from None


def read_cifar(name: str, root: Path, download: bool) -> tuple[np.ndarray, np.ndarray, int, list[str]]:
    folder, train_files, test_files, meta_file, label_key, names_key = _CIFAR_LAYOUT[name]
    base = root / folder
    needed = [base / f for f in [*train_files, *test_files, meta_file]]
    if not all(p.is_file() for p in needed):
        _download_cifar(name, root, download)
    images, labels = zip(*(_cifar_batch(path, label_key) for path in needed[:-1]), strict=True)
    meta = load_pickle_safely(needed[-1])
    classes = meta.get(names_key) if isinstance(meta, dict) else None
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise BadInput(f"{needed[-1]}: not a CIFAR meta file (no list of names under {names_key!r})")
    all_labels = np.concatenate(labels)
    if all_labels.size and (all_labels.min() < 0 or all_labels.max() >= len(classes)):
        raise BadInput(f"{base}: labels outside 0..{len(classes) - 1} ({len(classes)} classes)")
    n_train = sum(len(t) for t in labels[:len(train_files)])
    # Batches hold N x 3072 rows, channel-major (R plane, G plane, B plane): to N x 32 x 32 x 3.
    stacked = np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return stacked, all_labels, n_train, classes


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    entry = load_pickle_safely(path)
    data = entry.get("data") if isinstance(entry, dict) else None
    targets = entry.get(label_key) if isinstance(entry, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3072):
        raise BadInput(f"{path}: not a CIFAR batch (want 'data': uint8 N x 3072)")
    if not (isinstance(targets, list) and len(targets) == len(data)
            and all(type(t) is int for t in targets)):
        raise BadInput(f"{path}: not a CIFAR batch (want {label_key!r}: {len(data)} integers)")
    return data, np.asarray(targets, dtype=np.int64)


def _download_cifar(name: str, root: Path, download: bool) -> None:
    """Fetch and unpack the archive; torchvision checks its published md5 before extracting."""
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import download_and_extract_archive

    cls = getattr(tvd, name)
    download_or_refuse(name, root, download, lambda: download_and_extract_archive(
        cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5), cls.url)
