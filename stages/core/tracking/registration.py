"""What a stage hands tracking to register a model version, and the registry's aliases.

The export stage's body returns a `Registration`; the stage door passes it to
`StageRun.finish`, which registers it after the run's files are logged (stagerun.py,
register.py). Nothing is guessed from file names: the stage names every file. Imports no
MLflow, so the stage imports it for free.
"""

from __future__ import annotations

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
    rtol: float | None = None  # the relative tolerance (export.parity_rtol); None: absolute only

    def tags(self) -> dict[str, str]:
        """The verdict as model-version tags (the promotion gate reads parity_passed)."""
        tags = {"parity_passed": str(self.passed).lower(),
                "parity_max_abs_diff": f"{self.max_abs_diff:.3g}",
                "parity_top1_agreement": f"{self.top1_agreement:.6g}",
                "parity_atol": f"{self.atol:g}", "parity_images": str(self.images)}
        if self.rtol is not None:
            tags["parity_rtol"] = f"{self.rtol:g}"
        return tags


@dataclass(frozen=True)
class Registration:
    """One model version to register under `model_name` with alias challenger.

    onnx_path: the model served; torch_path: the PyTorch model it was exported from (logged
    beside it, with a signature); dataset: the target data folder (two of its test images
    become the PyTorch model's input example). Paths as the stage was given them: relative
    ones are relative to the working directory the stage runs in (the project root under DVC).
    input_example / output_example: what the ONNX model is logged with, so MLflow records its
    signature and `mlflow models serve` documents a real request: two target images as the
    model takes them (uint8 N x H x W x C) and the model's outputs for them
    ({"probabilities": ..., "logits": ...}). None: logged without (as before).
    """

    onnx_path: Path
    torch_path: Path
    parity: Parity
    model_name: str  # params.registry.model_name
    dataset: Path | None = None
    # Which trained model was exported (finetuned or scratch) and why (export.model), one
    # sentence for the version's description; None: said nowhere (as before).
    shipped: str = "finetuned"
    selection: str | None = None
    # Arrays: left out of ==, which numpy cannot answer for them.
    input_example: Any = field(default=None, compare=False)
    output_example: Any = field(default=None, compare=False)
