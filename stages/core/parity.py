"""The export stage's parity gate: ONNX Runtime from uint8 pixels against PyTorch (the
training preprocessing, the model, softmax) on the same target images, at several batch sizes,
with np.allclose's relative + absolute tolerance on every logit and probability and 100%
top-1 agreement. Input: a session, the eager model, its ModelFile, uint8 images. Output: the
figures (what metrics/export.json holds), or ParityFailed with them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from stages.core import onnxio
from stages.core.dataset import Dataset, preprocess
from stages.core.errors import BadInput
from stages.core.models import Classifier, ModelFile

PARITY_BATCH_SIZES = (1, 7, 64)


class ParityFailed(BadInput):
    """The gate said no: the message holds the figures, `metrics` all of them."""

    def __init__(self, message: str, metrics: dict[str, Any]) -> None:
        super().__init__(message)
        self.metrics = metrics


def parity_set(ds: Dataset, n: int) -> tuple[np.ndarray, dict[str, int]]:
    """n target images: the test split first, topped up from val then train if it is smaller
    (parity is a numeric check, any real target image serves). Returns images, count per split."""
    picked, used = [], {}
    for split in ("test", "val", "train"):
        idx = ds.indices(split)[: n - sum(used.values())]
        if len(idx):
            picked.append(idx)
            used[split] = int(len(idx))
        if sum(used.values()) >= n:
            break
    if not picked:
        raise BadInput("the target dataset has no images for the parity gate")
    return np.asarray(ds.images[np.sort(np.concatenate(picked))]), used


def parity_note(used: dict[str, int], wanted: int) -> str | None:
    n_test, n = used.get("test", 0), sum(used.values())
    if n_test >= wanted:
        return None
    note = f"the test split has {n_test} images, fewer than export.parity_images={wanted}"
    others = [k for k in used if k != "test"]
    if others:
        note += f": topped up from {' and '.join(others)}"
    if n < wanted:
        note += f"; the whole target set gives only {n}"
    return note


def torch_outputs(model: Classifier, images: np.ndarray, mf: ModelFile,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference, batch by batch: the training preprocessing (numpy, the model file's
    mean/std), eager PyTorch, softmax. Returns (probabilities, logits)."""
    probs, logits = [], []
    with torch.inference_mode():
        for lo in range(0, len(images), batch_size):
            x = torch.from_numpy(preprocess(images[lo:lo + batch_size], mf.mean, mf.std))
            out = model(x)
            logits.append(out.numpy())
            probs.append(torch.softmax(out, dim=1).numpy())
    return np.concatenate(probs), np.concatenate(logits)


def compare(got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> dict[str, float]:
    """np.allclose's test, |got - ref| <= atol + rtol * |ref|, as figures: the largest
    absolute and relative difference, and `tolerance_used`, the largest share of its allowance
    any element uses (the gate passes at <= 1)."""
    diff = np.abs(got.astype(np.float64) - ref)
    mag = np.abs(ref.astype(np.float64))
    rel = diff / np.maximum(mag, np.finfo(np.float32).tiny)
    return {"max_abs_diff": float(diff.max()), "max_rel_diff": float(rel.max()),
            "tolerance_used": float((diff / (atol + rtol * mag)).max())}


def parity(session: ort.InferenceSession, model: Classifier, images: np.ndarray,
           mf: ModelFile, batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES, *,
           atol: float, rtol: float) -> dict[str, Any]:
    """Per batch size, ORT from uint8 pixels (the graph's own preprocessing) against torch
    (torch_outputs): logit and probability differences (see compare) and top-1 agreement."""
    by_batch = {}
    for b in batch_sizes:
        ref_p, ref = torch_outputs(model, images, mf, b)
        got = onnxio.predict_outputs(session, images, batch_size=b)
        lg, pr = compare(got["logits"], ref, atol, rtol), compare(got["probabilities"], ref_p,
                                                                  atol, rtol)
        by_batch[str(b)] = {
            **lg, "prob_max_abs_diff": pr["max_abs_diff"],
            "tolerance_used": max(lg["tolerance_used"], pr["tolerance_used"]),
            "top1_agreement": float(np.mean(got["logits"].argmax(1) == ref.argmax(1))),
        }
    worst = {k: max(v[k] for v in by_batch.values())
             for k in ("max_abs_diff", "max_rel_diff", "prob_max_abs_diff", "tolerance_used")}
    return {**worst, "top1_agreement": min(v["top1_agreement"] for v in by_batch.values()),
            "by_batch_size": by_batch, "max_abs_logit": float(np.max(np.abs(ref)))}


def check_gate(figures: dict[str, Any], atol: float, rtol: float) -> None:
    if figures["tolerance_used"] <= 1.0 and figures["top1_agreement"] == 1.0:
        return
    rows = ", ".join(f"batch {b}: max|dlogit| {v['max_abs_diff']:.3g}, max|dprob| "
                     f"{v['prob_max_abs_diff']:.3g}, top-1 agreement {v['top1_agreement']:.2%}"
                     for b, v in figures["by_batch_size"].items())
    # fp32 rounding alone grows with the logits' size: say how close that is to the tolerance.
    ulp = float(np.spacing(np.float32(figures["max_abs_logit"])))
    raise ParityFailed(f"parity gate failed (allowed |onnx - torch| <= {atol:g} + {rtol:g} * "
                       f"|torch| on every logit and probability, and 100% top-1 agreement; the "
                       f"worst element used {figures['tolerance_used']:.3g}x its allowance): "
                       f"{rows}; logits reach {figures['max_abs_logit']:.3g} where one fp32 "
                       f"step is {ulp:.2g}; no ONNX model written", figures)


def cuda_parity(path: Path, model: Classifier, images: np.ndarray, mf: ModelFile, *,
                atol: float, rtol: float) -> dict[str, Any] | None:
    """The CUDA provider's figures, for information only (None where CUDA does not load): the
    gate is the CPU's, which every machine that runs the stage has, so a model's verdict does
    not depend on where it was exported."""
    if onnxio.CUDA not in onnxio.available_providers():
        return None
    session = onnxio.make_session(path, providers=[onnxio.CUDA, onnxio.CPU])
    figures = parity(session, model, images, mf, (64,), atol=atol, rtol=rtol)
    return {k: figures[k] for k in ("max_abs_diff", "max_rel_diff", "prob_max_abs_diff",
                                    "tolerance_used", "top1_agreement")}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to n for the duration (parity runs both sides alike)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
