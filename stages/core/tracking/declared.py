"""What dvc.yaml declares for one stage: its deps, params keys (and the params file DVC reads
them from), metrics, plots and outs. Input: <root>/dvc.yaml. Output: a StageDecl, or None for
a name dvc.yaml has no stage for (a command such as `imagepipe predict`: never tracked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# DVC's own default: a stage's bare `params:` keys are read from params.yaml beside dvc.yaml.
DVC_PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class StageDecl:
    """The files dvc.yaml names for one stage (paths relative to the project root)."""

    deps: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)  # keys of DVC_PARAMS_FILE
    metrics: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    outs: list[str] = field(default_factory=list)


def _paths(entries: Any) -> list[str]:
    """dvc.yaml lists hold 'path' or {'path': {options}}; keep the paths."""
    out: list[str] = []
    for entry in entries or []:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):
            out.extend(str(k) for k in entry)
    return out


def _param_keys(entries: Any) -> list[str]:
    """params: 'key' entries, or {'file.yaml': [keys]} (only the default file's keys are ours:
    the project's params schema describes that file alone)."""
    keys: list[str] = []
    for entry in entries or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):
            for file, sub in entry.items():
                if Path(str(file)).name == DVC_PARAMS_FILE:
                    keys.extend(str(k) for k in sub or [])
    return keys


def stage_decl(root: Path, stage: str) -> StageDecl | None:
    """What root/dvc.yaml declares for `stage`; None when it has no such stage."""
    import yaml

    try:
        spec = ((yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {})
    except (OSError, yaml.YAMLError):
        return None
    entry = spec.get(stage)
    if not isinstance(entry, dict):
        return None
    return StageDecl(deps=_paths(entry.get("deps")), params=_param_keys(entry.get("params")),
                     metrics=_paths(entry.get("metrics")), plots=_paths(entry.get("plots")),
                     outs=_paths(entry.get("outs")))
