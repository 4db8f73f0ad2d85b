"""The description of a registered model version: one paragraph that says what the 24-33
lineage tags say (which data, which run and code, which trained model was exported and why,
how accurate, how much transfer helped, whether ONNX Runtime agrees), so the registry page
reads without opening the tags.

Inputs: the Registration, the version's tags, the project's metrics/evaluate.json. Output: a
string. No MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.core.tracking.parentrun import headline_metrics
from stages.core.tracking.registration import Registration

EVALUATE_METRICS = "metrics/evaluate.json"


def _interval(m: dict[str, float], key: str, fmt: str) -> str:
    lo, hi = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    return f" (95% CI {lo:{fmt}} to {hi:{fmt}})" if lo is not None and hi is not None else ""


def _data_sentence(reg: Registration, tags: dict[str, str]) -> str:
    name = Path(reg.dataset).name
    digest = tags.get(f"data.{name}.images.sha256")
    md5 = next((v for k, v in tags.items() if k.startswith("dvc.dep.") and k.endswith(name)),
               None)
    ids = ", ".join(x for x in (f"images sha256 {digest[:12]}" if digest else "",
                                f"DVC {md5}" if md5 else "") if x)
    return f"Fine-tuned and tested on the target set `{name}`" + (f" ({ids})." if ids else ".")


def _accuracy_sentence(m: dict[str, Any], shipped: str) -> str:
    if "accuracy" not in m:
        return "No evaluation figures were found (metrics/evaluate.json)."
    if shipped == "scratch" and "scratch_accuracy" in m:
        return (f"Test accuracy {m['scratch_accuracy']:.3f}"
                f"{_interval(m, 'scratch_accuracy', '.3f')} for this from-scratch model, against "
                f"{m['accuracy']:.3f} for the finetuned one.")
    text = f"Test accuracy {m['accuracy']:.3f}{_interval(m, 'accuracy', '.3f')}"
    if "scratch_accuracy" in m:
        text += f" against {m['scratch_accuracy']:.3f} for the same network trained from scratch"
    if "transfer_gain" in m:
        text += (f": transfer gain {m['transfer_gain']:+.3f}"
                 f"{_interval(m, 'transfer_gain', '+.3f')}")
    if "ece" in m:
        text += f"; calibration error (ECE) {m['ece']:.3f}"
    return text + "."


def version_description(root: Path, run_id: str, reg: Registration, tags: dict[str, str]
                        ) -> str:
    """One paragraph: run and code, data, accuracy and gain, parity."""
    commit = tags.get("git.commit", "")
    code = f" at commit {commit[:7]}" + (" (uncommitted changes)"
                                         if tags.get("git.dirty") == "true" else "")
    pipeline = tags.get("imagepipe.pipeline_run_id")
    p = reg.parity
    parts = [
        f"ONNX classifier exported from {Path(reg.torch_path).name} by run {run_id}"
        + (f" of pipeline run {pipeline}" if pipeline else "") + (code if commit else "") + ".",
        *([reg.selection] if reg.selection else []),
        _data_sentence(reg, tags),
        _accuracy_sentence(headline_metrics(root, [EVALUATE_METRICS]), reg.shipped),
        f"ONNX Runtime {'agrees' if p.passed else 'disagrees'} with PyTorch on {p.images} "
        f"target images (max |logit difference| {p.max_abs_diff:.2g}, tolerance {p.atol:g}, "
        f"top-1 agreement {p.top1_agreement:.1%}).",
    ]
    return " ".join(parts)
