"""The promotion gate's arithmetic: the test split both models are scored on, per-image hits
of an exported model, and the decision from the scores (the majority-class floor: stats.py).

Inputs: a dataset folder (its test split), an ONNX file. Outputs: arrays and (promote?, why).
No registry here: commands/promote.py fetches the models and moves the aliases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.core.errors import BadInput

# Accuracies are means over the same images: equal counts are equal, whatever the float noise.
_TOLERANCE = 1e-9


def load_test_split(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, true class names) of the dataset's test split."""
    from stages.core.dataset import load_dataset

    ds = load_dataset(folder)
    images, labels = ds.part("test")
    if len(images) == 0:
        raise BadInput(f"{folder}: the test split is empty: nothing to score the models on")
    names = np.asarray(ds.classes, dtype=object)[labels]
    return images, names


def hits(onnx_path: Path, images: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per image, whether an exported model's top-1 class is right, comparing class *names* (a
    model that knows other classes than today's data simply gets those images wrong)."""
    from stages.core.onnxio import make_session, predict_outputs, read_metadata

    session = make_session(onnx_path)  # only providers that load here: no CUDA spam on a CPU
    classes = np.asarray(read_metadata(session)["classes"], dtype=object)
    predicted = classes[predict_outputs(session, images)["logits"].argmax(axis=1)]
    return predicted == truth


def decide(challenger_acc: float, champion_acc: float | None, parity: str,
           min_improvement: float, *, ci: tuple[float, float],
           majority: tuple[float, str]) -> tuple[bool, str]:
    """(promote?, why). `ci`: the challenger's 95% bootstrap interval; `majority`: the
    majority-class accuracy of the same test images and that class. A challenger whose
    interval does not clear the floor is refused, whatever the champion."""
    if parity != "true":
        return False, f"challenger's ONNX parity is {parity!r}, not passed"
    if ci[0] <= majority[0] + _TOLERANCE:
        return False, (f"challenger accuracy {challenger_acc:.4f} (95% CI [{ci[0]:.4f}, "
                       f"{ci[1]:.4f}]) does not clear the majority-class accuracy "
                       f"{majority[0]:.4f} (always answering {majority[1]!r}): not shown to be "
                       "better than a constant answer on these test images")
    if champion_acc is None:
        return True, "no champion yet: the first version becomes champion"
    needed = champion_acc + min_improvement
    if challenger_acc + _TOLERANCE >= needed:
        return True, (f"challenger accuracy {challenger_acc:.4f} >= champion {champion_acc:.4f} "
                      f"+ min_improvement {min_improvement}")
    return False, (f"challenger accuracy {challenger_acc:.4f} < champion {champion_acc:.4f} + "
                   f"min_improvement {min_improvement}")
