"""What a stage's declared files say, as MLflow wants it: params as flat text, numbers of a
metrics file under dotted keys, per-epoch series of a plots table, the small files worth an
artifact. Inputs: the params file and the files dvc.yaml declares. No MLflow here.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from stages.core.errors import BadInput
from stages.core.tracking.declared import StageDecl

_PARAM_CHARS = 6000  # MLflow's limit on a param value
# Files logged as artifacts: reports and pictures, never models or arrays (DVC versions those).
_ARTIFACT_SUFFIXES = {".png", ".jpg", ".jpeg", ".svg", ".json", ".csv", ".tsv", ".md", ".txt",
                      ".html", ".yaml", ".yml"}
_ARTIFACT_MAX_BYTES = 5 * 2**20
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".svg"}
_KEY_BAD = re.compile(r"[^\w\-. /:]")


def flat_params(params_file: Path, keys: list[str] | None = None) -> dict[str, str]:
    """The entries of `params_file` under dotted keys, as MLflow params: all of them (the parent
    run's), or those under `keys` (a stage's: whole sections or single entries); {} if the file
    is bad (the stage itself reports that, with exit code 2)."""
    from stages.core.flat import flatten_dict
    from stages.params import load_params

    try:
        flat = flatten_dict(load_params(params_file).model_dump())
    except BadInput:
        return {}
    return {k: param_text(v) for k, v in flat.items()
            if keys is None or any(k == key or k.startswith(f"{key}.") for key in keys)}


def param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)
    return text[:_PARAM_CHARS]


def metric_key(text: str) -> str:
    """A string MLflow accepts as a metric/tag key (letters, digits, _ - . space / :)."""
    return _KEY_BAD.sub("_", text)[:250]


def number(value: Any) -> float | None:
    """A JSON value as a metric: ints and floats; None for bools (flags) and everything else."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def flat_numbers(obj: Any) -> dict[str, float]:
    """Numbers of a nested JSON object under dotted keys (bools, strings, lists skipped)."""
    from stages.core.flat import flatten_dict

    numbers = {metric_key(k): number(v) for k, v in flatten_dict(obj).items()}
    return {k: v for k, v in numbers.items() if v is not None}


def read_json(path: Path) -> Any:
    """A metrics file's content (every stage writes JSON); None when unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _as_float(text: str | None) -> float | None:
    """A table cell as a number; None for text or a missing cell."""
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def per_epoch_metrics(path: Path) -> list[tuple[str, float, int]]:
    """(key, value, step) for every numeric cell of an epoch table.

    Key: '<file stem>/<column>', with the row's text columns (a phase, a model name) inserted
    so that 'finetune/head/val_acc' and 'finetune/full/val_acc' stay apart. Step: the epoch,
    or the row number when epochs repeat (two phases each counting from 1)."""
    if path.suffix != ".csv":  # every stage's epoch table is a CSV
        return []
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return []
    if not rows or "epoch" not in rows[0]:  # a table without epochs
        return []
    epochs = [_as_float(r.get("epoch")) for r in rows]
    by_epoch = len(set(epochs)) == len(epochs) and None not in epochs
    out: list[tuple[str, float, int]] = []
    for i, row in enumerate(rows):
        step = int(epochs[i]) if by_epoch else i  # type: ignore[arg-type]
        values = {k: _as_float(v) for k, v in row.items() if k and k != "epoch"}
        groups = [str(row[k]) for k, v in values.items()
                  if v is None and row[k] not in (None, "", path.stem)]
        for col, value in values.items():
            if value is not None:
                out.append((metric_key("/".join([path.stem, *groups, col])), value, step))
    return out


def artifacts(root: Path, decl: StageDecl) -> list[tuple[Path, str]]:
    """(file, artifact folder): metrics, plots, pictures and reports among the outs, the
    manifest and report of each dataset the stage wrote."""
    out: list[tuple[Path, str]] = []
    for rel in decl.metrics:
        out += _small_files(root / rel, "metrics")
    for rel in decl.plots:
        out += _small_files(root / rel, "plots")
    for rel in decl.outs:
        path = root / rel
        if path.is_dir() and (path / "manifest.json").is_file():
            out += [(path / n, f"data/{path.name}") for n in ("manifest.json", "report.json")
                    if (path / n).is_file()]
        elif path.is_file():
            folder = "plots" if path.suffix in _IMAGE_SUFFIXES else Path(rel).parent.name
            out += _small_files(path, folder or "outputs")
    return list(dict(out).items())  # a file both in plots and outs is logged once


def _small_files(path: Path, folder: str) -> list[tuple[Path, str]]:
    """A file (or the files at the top of a folder) worth keeping as an artifact."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [(p, folder) for p in files if p.is_file() and p.suffix.lower() in _ARTIFACT_SUFFIXES
            and p.stat().st_size <= _ARTIFACT_MAX_BYTES]
