"""export: models/finetuned.pt + data/target/ + params.export -> models/model.onnx,
models/onnx_variants/ (int8, fp16 where CUDA loads), metrics/export.json.

The ONNX file has a dynamic batch axis, a pinned opset and metadata_props that carry what a
server needs (stages.core.onnxio). It is moved into place only after the parity gate: on target
images at batch sizes 1, 7 and 64, ONNX Runtime must match PyTorch to within
export.parity_atol on every logit and agree on every top-1 class. Otherwise the stage exits 2
with the figures and leaves no model.onnx (a previous one is removed: it no longer matches
finetuned.pt). The same run times ORT against torch eager, interleaved, and records medians.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from stages.core import onnxio
from stages.core.dataset import Dataset, file_sha256, load_dataset
from stages.core.errors import BadInput, run_stage
from stages.core.io import atomic_dir, atomic_path, write_json
from stages.core.lineage import git_commit, git_dirty
from stages.core.models import Classifier, ModelFile, load_model_file, preprocess
from stages.params import ExportParams, Params, load_params

log = logging.getLogger("imagepipe.export")

PARITY_BATCH_SIZES = (1, 7, 64)
TIMING_BATCH = 64
INT8_NAME = "model.int8.onnx"
FP16_NAME = "model.fp16.onnx"


class ParityFailed(BadInput):
    """The gate said no: the message holds the figures, `metrics` all of them."""

    def __init__(self, message: str, metrics: dict[str, Any]) -> None:
        super().__init__(message)
        self.metrics = metrics


# ---------------------------------------------------------------- export


def export_onnx(model: Classifier, mf: ModelFile, opset: int) -> onnx.ModelProto:
    """The eval-mode model as ONNX with a dynamic batch axis named "batch".

    The dynamo (torch.export) exporter, torch 2.14's default and the maintained one. The
    TorchScript exporter (dynamo=False) works too and is faster to run (0.1-0.5 s against
    4-15 s here), with the same numbers (a trained resnet_small: 1.7e-6 vs 1.4e-6 max
    |dlogit| against eager; both fold BatchNorm), but it is deprecated, warns on every call
    and is slated for removal, so a pipeline built on it would break on a torch upgrade.
    Checked with dynamo: resnet_small (1 and 3 channels), resnet18, mobilenet_v3_small.
    """
    size, channels = mf.spec.image_size, mf.spec.in_channels
    # Batch 2 in the example: torch.export specialises a dimension whose example size is 1.
    example = torch.zeros(2, channels, size, size)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    # The exporter's optimiser logs each pass at INFO; a stage log needs none of it.
    for name in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations in its own deps)
        program = torch.onnx.export(
            model.eval(), (example,), None, dynamo=True, verbose=False, opset_version=opset,
            input_names=["input"], output_names=["logits"], dynamic_shapes=({0: batch},),
        )
    proto = program.model_proto
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise BadInput(f"the exporter wrote opset {got}, not export.opset={opset}")
    return proto


def model_metadata(mf: ModelFile, model_path: Path | None) -> dict[str, Any]:
    """What a server needs, and where the model came from (see onnxio.METADATA_DOC)."""
    dirty = git_dirty()
    return {
        "classes": list(mf.classes),
        "num_classes": len(mf.classes),
        "image_size": mf.spec.image_size,
        "channels": mf.spec.in_channels,
        "channel_order": "RGB" if mf.spec.in_channels == 3 else "L",
        "layout": "NCHW",
        "mean": [float(v) for v in mf.mean],
        "std": [float(v) for v in mf.std],
        "arch": mf.spec.arch,
        # Set by the flow's MLflow run (and by `mlflow run`); absent under a plain dvc repro.
        "mlflow_run_id": os.environ.get("MLFLOW_RUN_ID"),
        "git_commit": git_commit(),
        "git_dirty": None if dirty is None else str(dirty).lower(),
        "source_model_sha256": file_sha256(model_path) if model_path else None,
        "exporter": f"torch.onnx dynamo, torch {torch.__version__}",
    }


def finish_model(proto: onnx.ModelProto, meta: dict[str, Any]) -> bytes:
    """Attach metadata, run the full checker, return the bytes to write."""
    onnxio.set_metadata(proto, meta)
    proto.doc_string = "imagepipe classifier: " + onnxio.METADATA_DOC
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise BadInput(f"the exported model fails onnx.checker: {err}".splitlines()[0]) from None
    return proto.SerializeToString()


# ---------------------------------------------------------------- parity


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


def _parity_note(used: dict[str, int], wanted: int) -> str | None:
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


def torch_logits(model: Classifier, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Eager PyTorch logits of preprocessed float input, batch by batch."""
    out = []
    with torch.inference_mode():
        for lo in range(0, len(x), batch_size):
            out.append(model(torch.from_numpy(x[lo:lo + batch_size])).numpy())
    return np.concatenate(out)


def parity(session: ort.InferenceSession, model: Classifier, images: np.ndarray,
           mf: ModelFile, batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES) -> dict[str, Any]:
    """Per batch size: max |logit difference| and top-1 agreement, ORT (with the preprocessing
    its metadata records) against torch (with the model file's mean/std)."""
    x = preprocess(images, mf.mean, mf.std)
    by_batch = {}
    for b in batch_sizes:
        ref = torch_logits(model, x, b)
        got = onnxio.predict_logits(session, images, batch_size=b)
        by_batch[str(b)] = {
            "max_abs_diff": float(np.max(np.abs(got - ref))),
            "top1_agreement": float(np.mean(got.argmax(1) == ref.argmax(1))),
        }
    return {
        "max_abs_diff": max(v["max_abs_diff"] for v in by_batch.values()),
        "top1_agreement": min(v["top1_agreement"] for v in by_batch.values()),
        "by_batch_size": by_batch,
        "max_abs_logit": float(np.max(np.abs(ref))),
    }


def check_gate(figures: dict[str, Any], atol: float) -> None:
    if figures["max_abs_diff"] <= atol and figures["top1_agreement"] == 1.0:
        return
    rows = ", ".join(f"batch {b}: max|dlogit| {v['max_abs_diff']:.3g}, top-1 agreement "
                     f"{v['top1_agreement']:.2%}" for b, v in figures["by_batch_size"].items())
    # fp32 rounding alone grows with the logits' size: say how close that is to the tolerance.
    ulp = float(np.spacing(np.float32(figures["max_abs_logit"])))
    raise ParityFailed(f"parity gate failed (allowed max|dlogit| <= {atol:g} and 100% top-1 "
                       f"agreement): {rows}; logits reach {figures['max_abs_logit']:.3g} where "
                       f"one fp32 step is {ulp:.2g}; no ONNX model written", figures)


# ---------------------------------------------------------------- timing


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_calls(fn: Callable[[], object], n_images: int,
               min_seconds: float) -> tuple[float, list[float]]:
    """Images/s of repeated calls lasting at least min_seconds, and each call's seconds."""
    fn()  # warm-up: first-call allocations and kernel choice are not steady state
    calls: list[float] = []
    start = time.perf_counter()
    while not calls or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        calls.append(time.perf_counter() - t)
    return n_images * len(calls) / sum(calls), calls


def interleaved(runs: dict[str, tuple[Callable[[], object], int]], threads: int, rounds: int,
                min_seconds: float) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """{name: (call, images per call)} timed round by round, every contender once per round (a
    shared machine's load then hits all alike). Returns images/s per round and each call's
    seconds, by name."""
    rates: dict[str, list[float]] = {k: [] for k in runs}
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    with torch_threads(threads):
        for _ in range(rounds):
            for key, (fn, n_images) in runs.items():
                rate, calls = time_calls(fn, n_images, min_seconds)
                rates[key].append(rate)
                seconds[key] += calls
    return rates, seconds


def measure_speed(session: ort.InferenceSession, model: Classifier, mf: ModelFile, threads: int,
                  repeats: int, min_seconds: float = 0.2) -> dict[str, Any]:
    """ORT vs torch eager on the same preprocessed input, same thread count, interleaved
    round by round (a shared machine's load then hits both sides alike); medians.
    Preprocessing is outside both clocks: it is the same numpy code on either side."""
    rng = np.random.default_rng(0)
    shape = (TIMING_BATCH, mf.spec.image_size, mf.spec.image_size, mf.spec.in_channels)
    x64 = preprocess(rng.integers(0, 256, shape, dtype=np.uint8), mf.mean, mf.std)
    x1 = np.ascontiguousarray(x64[:1])
    name = session.get_inputs()[0].name
    rates, latencies = interleaved({
        "ort_b64": (lambda: session.run(None, {name: x64}), TIMING_BATCH),
        "torch_b64": (lambda: torch_logits(model, x64, TIMING_BATCH), TIMING_BATCH),
        "ort_b1": (lambda: session.run(None, {name: x1}), 1),
        "torch_b1": (lambda: torch_logits(model, x1, 1), 1),
    }, threads, repeats, min_seconds)
    ort_ips, torch_ips = statistics.median(rates["ort_b64"]), statistics.median(rates["torch_b64"])
    return {
        "ort_images_per_s": round(ort_ips, 1),
        "torch_images_per_s": round(torch_ips, 1),
        "ort_speedup_b64": round(ort_ips / torch_ips, 2),
        "ort_latency_ms_b1": round(1000 * statistics.median(latencies["ort_b1"]), 4),
        "torch_latency_ms_b1": round(1000 * statistics.median(latencies["torch_b1"]), 4),
        "timing": {"threads": threads, "rounds": repeats, "batch": TIMING_BATCH,
                   "ort_images_per_s_rounds": [round(r, 1) for r in rates["ort_b64"]],
                   "torch_images_per_s_rounds": [round(r, 1) for r in rates["torch_b64"]]},
    }


def measure_ort(tag: str, session: ort.InferenceSession, mf: ModelFile,
                repeats: int) -> dict[str, float]:
    """One session alone (the CUDA provider's figures): batch-64 images/s, batch-1 latency."""
    shape = (TIMING_BATCH, mf.spec.image_size, mf.spec.image_size, mf.spec.in_channels)
    rng = np.random.default_rng(0)
    x64 = preprocess(rng.integers(0, 256, shape, dtype=np.uint8), mf.mean, mf.std)
    x1, name = np.ascontiguousarray(x64[:1]), session.get_inputs()[0].name
    rates = [time_calls(lambda: session.run(None, {name: x64}), TIMING_BATCH, 0.2)[0]
             for _ in range(repeats)]
    calls = [t for _ in range(repeats)
             for t in time_calls(lambda: session.run(None, {name: x1}), 1, 0.2)[1]]
    return {f"{tag}_images_per_s": round(statistics.median(rates), 1),
            f"{tag}_latency_ms_b1": round(1000 * statistics.median(calls), 4)}


# ---------------------------------------------------------------- optional variants


def accuracy(session: ort.InferenceSession, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(onnxio.predict_logits(session, images).argmax(1) == labels))


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray, meta: dict[str, Any]) -> None:
    """Static int8 (onnxruntime.quantization), calibrated on target train images.

    QOperator format with uint8 activations and per-channel int8 weights (U8S8): on the
    project's x86 CPU (AVX-512 VNNI), resnet_small width 32 at 1 thread ran 7,029 images/s
    against 2,136 for fp32, where the QDQ format ran 1,548 (slower than fp32). The shape
    inference of quant_pre_process is skipped: its symbolic pass fails on dynamo's Reshape,
    and the exporter already wrote every shape.
    """
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = "input"
    batches = iter([{name: preprocess(calibration[lo:lo + 64], meta["mean"], meta["std"])}
                    for lo in range(0, len(calibration), 64)])

    class Reader(q.CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre, quant = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        q.quantize_static(str(pre), str(quant), Reader(), quant_format=q.QuantFormat.QOperator,
                          per_channel=True, activation_type=q.QuantType.QUInt8,
                          weight_type=q.QuantType.QInt8)
        proto = onnx.load(quant)
    extra = {"variant": "int8", "quantization": f"static U8S8 QOperator, per-channel, "
             f"calibrated on {len(calibration)} target train images"}
    with atomic_path(out) as tmp_out:
        tmp_out.write_bytes(finish_model(proto, {**meta, **extra}))


def to_fp16(proto: onnx.ModelProto, meta: dict[str, Any]) -> bytes:
    """fp16 weights and activations, float32 input/output (callers need not change)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    half = convert_float_to_float16(proto, keep_io_types=True)
    # The converter appends the output Casts after their consumers; the checker wants order.
    graph = OnnxModel(half)
    graph.topological_sort(is_deterministic=True)
    return finish_model(graph.model, {**meta, "variant": "fp16"})


def variants(p: ExportParams, fp32: Path, folder: Path, ds: Dataset, meta: dict[str, Any],
             fp32_session: ort.InferenceSession) -> dict[str, Any]:
    """The optional artifacts, each scored on the test split against the fp32 model."""
    test_x, test_y = ds.part("test")
    base = accuracy(fp32_session, test_x, test_y) if len(test_y) else None
    metrics: dict[str, Any] = {"test_accuracy_fp32": base, "variants": []}
    # Always a folder, possibly empty: DVC then tracks one output whatever this machine makes.
    with atomic_dir(folder) as tmp:
        if p.quantize_int8:
            calib = np.asarray(ds.images[ds.indices("train")[: p.calibration_images]])
            quantize_int8(fp32, tmp / INT8_NAME, calib if len(calib) else test_x, meta)
            metrics |= _score("int8", tmp / INT8_NAME, [onnxio.CPU], test_x, test_y, base, p)
            metrics["variants"].append(INT8_NAME)
        if p.fp16 and onnxio.CUDA in onnxio.available_providers():
            (tmp / FP16_NAME).write_bytes(to_fp16(onnx.load(fp32), meta))
            metrics |= _score("fp16", tmp / FP16_NAME, [onnxio.CUDA], test_x, test_y, base, p)
            metrics["variants"].append(FP16_NAME)
        elif p.fp16:
            metrics["fp16_skipped"] = "no CUDA provider here: fp16 runs on GPUs only"
    return metrics


def _score(tag: str, path: Path, providers: list[str], x: np.ndarray, y: np.ndarray,
           base: float | None, p: ExportParams) -> dict[str, Any]:
    """Accuracy on the test split, its delta to fp32, size, and batch-64 images/s timed like
    the fp32 figure (session.run on preprocessed input)."""
    session = onnxio.make_session(path, providers=providers, threads=p.threads or None)
    acc = accuracy(session, x, y) if len(y) else None
    out: dict[str, Any] = {f"{tag}_accuracy": acc,
                           f"{tag}_accuracy_delta": None if acc is None or base is None
                           else round(acc - base, 6),
                           f"{tag}_bytes": path.stat().st_size}
    if len(x):
        meta = onnxio.read_metadata(session)
        batch = preprocess(np.resize(x, (TIMING_BATCH, *x.shape[1:])), meta["mean"], meta["std"])
        feed = {session.get_inputs()[0].name: batch}
        rates = [time_calls(lambda: session.run(None, feed), TIMING_BATCH, 0.2)[0]
                 for _ in range(p.timing_repeats)]
        out[f"{tag}_images_per_s"] = round(statistics.median(rates), 1)
    return out


# ---------------------------------------------------------------- the stage


def run(params: Params, model_path: Path, target: Path, out: Path,
        variants_dir: Path | None = None) -> dict[str, Any]:
    """Export, gate, time; write `out` (and the variants) only when the gate passes.

    Raises ParityFailed (a BadInput: exit 2) with the figures when it does not.
    """
    p = params.export
    model, mf = load_model_file(model_path)
    ds = load_dataset(target)
    want = (mf.spec.image_size, mf.spec.image_size, mf.spec.in_channels)
    if ds.image_shape != want:
        raise BadInput(f"{target} holds {ds.image_shape} images but {model_path} takes {want}")
    images, used = parity_set(ds, p.parity_images)
    start = time.perf_counter()
    proto = export_onnx(model, mf, p.opset)
    meta = model_metadata(mf, model_path)
    data = finish_model(proto, meta)
    export_s = time.perf_counter() - start
    threads = p.threads or onnxio.usable_cores()
    metrics: dict[str, Any] = {
        "opset": p.opset, "exporter": "dynamo", "parity_atol": p.parity_atol,
        "parity_images": int(len(images)), "parity_images_by_split": used,
        "parity_note": _parity_note(used, p.parity_images),
        "export_seconds": round(export_s, 2), "onnx_bytes": len(data),
    }
    try:
        with atomic_path(out) as tmp:
            tmp.write_bytes(data)
            session = onnxio.make_session(tmp, threads=threads)
            metrics["providers"] = session.get_providers()
            with torch_threads(threads):
                figures = parity(session, model, images, mf)
            metrics |= figures
            check_gate(figures, p.parity_atol)
            cpu = session if session.get_providers() == [onnxio.CPU] else \
                onnxio.make_session(tmp, providers=[onnxio.CPU], threads=threads)
            metrics |= measure_speed(cpu, model, mf, threads, p.timing_repeats)
            if onnxio.CUDA in session.get_providers():
                metrics |= measure_ort("cuda", session, mf, p.timing_repeats)
            metrics["gate_passed"] = True
            if variants_dir is not None:
                metrics |= variants(p, tmp, variants_dir, ds, meta, session)
    except ParityFailed as err:
        # Artifacts from an earlier finetuned.pt would now be served as this one: remove them.
        out.unlink(missing_ok=True)
        if variants_dir is not None:
            shutil.rmtree(variants_dir, ignore_errors=True)
        err.metrics = {**metrics, "gate_passed": False}
        raise
    _log_summary(metrics, out)
    return metrics


def _log_summary(m: dict[str, Any], out: Path) -> None:
    log.info("export: %s (opset %d) parity max|dlogit| %.2e, top-1 agreement %.0f%% on %d "
             "images; ORT %.0f vs torch %.0f images/s at batch %d (x%.2f), batch-1 latency "
             "%.3f vs %.3f ms", out, m["opset"], m["max_abs_diff"], 100 * m["top1_agreement"],
             m["parity_images"], m["ort_images_per_s"], m["torch_images_per_s"], TIMING_BATCH,
             m["ort_speedup_b64"], m["ort_latency_ms_b1"], m["torch_latency_ms_b1"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.export",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="models/finetuned.pt", type=Path)
    parser.add_argument("--target", default="data/target", type=Path)
    parser.add_argument("--out", default="models/model.onnx", type=Path)
    parser.add_argument("--variants", default="models/onnx_variants", type=Path)
    parser.add_argument("--metrics", default="metrics/export.json", type=Path)
    args = parser.parse_args(argv)

    def body() -> None:
        params = load_params(args.params)
        try:
            metrics = run(params, args.model, args.target, args.out, args.variants)
        except ParityFailed as err:
            write_json(args.metrics, err.metrics)  # the figures, for whoever asks why
            raise
        write_json(args.metrics, metrics)

    return run_stage("export", body)


if __name__ == "__main__":
    sys.exit(main())
