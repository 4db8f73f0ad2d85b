"""What a stage hands tracking to register a model version, and the registry's aliases.

The export stage's body returns a `Registration`; the stage door passes it to
`StageRun.finish`, which registers it after the run's files are logged (stagerun.py,
register.py). Nothing is guessed from file names: the stage names every file. Imports no
MLflow, so the stage imports it for free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Registry aliases: export's version becomes challenger; only the promotion gate moves
# champion (the one before it is kept as previous-champion for rollback).
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime against PyTorch on the same target images (stages/export.py's gate)."""

    passed: bool
    max_abs_diff: float  # largest |logit difference| over every batch size checked
    top1_agreement: float  # lowest share of images with the same top-1 class
    atol: float  # the tolerance the gate allowed (export.parity_atol)
    images: int  # how many target images were compared
    rtol: float  # the relative tolerance (export.parity_rtol)

    def tags(self) -> dict[str, str]:
        """The verdict as model-version tags (the promotion gate reads parity_passed)."""
        return {"parity_passed": str(self.passed).lower(),
                "parity_max_abs_diff": f"{self.max_abs_diff:.3g}",
                "parity_top1_agreement": f"{self.top1_agreement:.6g}",
                "parity_atol": f"{self.atol:g}", "parity_images": str(self.images),
                "parity_rtol": f"{self.rtol:g}"}


@dataclass(frozen=True)
class Registration:
    """One model version to register under `model_name` with alias challenger.

    onnx_path: the model served; torch_path: the PyTorch model it was exported from (logged
    beside it, with a signature); dataset: the target data folder (named in the version's
    description). Paths as the stage was given them: relative ones are relative to the working
    directory the stage runs in (the project root under DVC).
    input_example / output_example: what the models are logged with, so MLflow records their
    signatures and `mlflow models serve` documents a real request: two target images as the
    ONNX model takes them (uint8 N x H x W x C) and its outputs for them
    ({"probabilities": ..., "logits": ...}).
    """

    onnx_path: Path
    torch_path: Path
    parity: Parity
    model_name: str  # params.registry.model_name
    dataset: Path
    # Most images a request to the served model may carry (export.serving_max_images).
    serving_max_images: int
    # Arrays: left out of ==, which numpy cannot answer for them.
    input_example: Any = field(compare=False)
    output_example: Any = field(compare=False)
    # Which trained model was exported (finetuned or scratch) and why (export.model), one
    # sentence for the version's description; selection None: the why is said nowhere.
    shipped: str = "finetuned"
    selection: str | None = None
    # The DVC stage that runs this export (DVC sets DVC_STAGE for every command; None: not
    # under DVC). The version records it with its model's md5, and promote refuses the version
    # until dvc.lock records that md5: a DVC run that failed after the stage registered it (a
    # full disk in the cache copy) left a version DVC never kept.
    dvc_stage: str | None = field(default_factory=lambda: os.environ.get("DVC_STAGE") or None)


# Version tags of an export run under DVC (register.py), checked by promote (`not_kept`).
DVC_STAGE_TAG = "dvc.stage"
DVC_OUT_TAG = "dvc.model_path"
DVC_MD5_TAG = "dvc.model_md5"


def not_kept(tags: dict[str, str], version: str, model: Path) -> str | None:
    """Why version `version` (its tags) is not a model DVC kept as `model` (the workspace's
    file at the path the version names, in the project whose dvc.lock says), or None.

    A version registered by a stage under DVC counts once dvc.lock records its model's md5 for
    that stage: DVC writes the entry only when the run succeeded (outputs checked, cached), so
    a run that failed after the stage registered leaves a version that is no stage's output.
    Versions registered outside DVC carry no such tags and are left to the other checks."""
    from stages.core.lineage import dvc_lock_outs

    stage, rel, md5 = (tags.get(k) for k in (DVC_STAGE_TAG, DVC_OUT_TAG, DVC_MD5_TAG))
    if not (stage and rel and md5):
        return None
    model = model.resolve()
    project = model.parents[len(Path(rel).parts) - 1] if model.as_posix().endswith(
        "/" + rel) else Path.cwd()
    recorded = dvc_lock_outs(project, stage.rpartition(":")[2]).get(rel)
    if recorded == md5:
        return None
    said = f"records md5 {recorded[:12]}" if recorded else "has no entry"
    return (f"DVC did not keep the challenger v{version}: stage {stage!r} registered it from "
            f"{rel} with md5 {md5[:12]}, but {project / 'dvc.lock'} {said} for it (the DVC run "
            f"failed after the stage registered: rerun `dvc repro {stage}`, or --force)")
