"""The exported ONNX file's bytes and its optional variants: metadata attached and the full
onnx.checker run (finish_model), static int8 for CPUs and fp16 for GPUs, each scored on the
target's test split against the fp32 model.

Inputs: an ONNX ModelProto or file, its metadata (stages/export.py model_metadata), the target
dataset, params.export. Outputs: the bytes to write, models/onnx_variants/ and their figures.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from stages.core import onnxio
from stages.core.dataset import Dataset
from stages.core.errors import BadInput
from stages.core.io import atomic_dir, atomic_path
from stages.params import ExportParams

INT8_NAME = "model.int8.onnx"
FP16_NAME = "model.fp16.onnx"


def finish_model(proto: onnx.ModelProto, meta: dict[str, Any]) -> bytes:
    onnx.helper.set_model_props(proto, onnxio.metadata_props(meta))  # replaces any there
    proto.doc_string = "imagepipe classifier: " + onnxio.METADATA_DOC
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise BadInput(f"the exported model fails onnx.checker: {err}".splitlines()[0]) from None
    return proto.SerializeToString()


def accuracy(session: ort.InferenceSession, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(onnxio.predict_outputs(session, images)["logits"].argmax(1) == labels))


# The ops Served's preprocessing exports to (dynamo: Transpose, Cast, Div, Sub, Div).
_PREPROCESS_OPS = frozenset({"Transpose", "Cast", "Div", "Sub", "Mul"})


def float_nodes(path: Path) -> list[str]:
    """Names of the nodes int8 leaves in float: the leading preprocessing run (uint8 pixels
    are no activation to calibrate) and the softmax."""
    nodes = onnx.load(path, load_external_data=False).graph.node
    lead = []
    for node in nodes:
        if node.op_type not in _PREPROCESS_OPS:
            break
        lead.append(node.name)
    return lead + [n.name for n in nodes if n.op_type == "Softmax"]


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray, meta: dict[str, Any]) -> None:
    """Static int8 (onnxruntime.quantization), calibrated on target train images.

    QOperator format with uint8 activations and per-channel int8 weights (U8S8): on the
    project's x86 CPU (AVX-512 VNNI), resnet_small width 32 at 1 thread ran 7,029 images/s
    against 2,136 for fp32, where the QDQ format ran 1,548 (slower than fp32). The symbolic
    shape inference of quant_pre_process is skipped (it fails on dynamo's Reshape; ONNX's own
    still runs), and the exporter already wrote every shape. The in-graph preprocessing and the softmax
    stay float (float_nodes): the first QuantizeLinear sits where the float model's input was,
    and probabilities keep fp32 resolution instead of 1/256 steps.
    """
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = iter([{onnxio.INPUT: calibration[lo:lo + 64]}
                    for lo in range(0, len(calibration), 64)])

    class Reader(q.CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre, quant = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        q.quantize_static(str(pre), str(quant), Reader(), quant_format=q.QuantFormat.QOperator,
                          per_channel=True, activation_type=q.QuantType.QUInt8,
                          weight_type=q.QuantType.QInt8, nodes_to_exclude=float_nodes(pre))
        proto = onnx.load(quant)
    extra = {"variant": "int8", "quantization": f"static U8S8 QOperator, per-channel, "
             f"calibrated on {len(calibration)} target train images"}
    with atomic_path(out) as tmp_out:
        tmp_out.write_bytes(finish_model(proto, {**meta, **extra}))


def to_fp16(proto: onnx.ModelProto, meta: dict[str, Any]) -> bytes:
    """fp16 weights and activations; the input and outputs keep their types (uint8 pixels in,
    float32 out), so callers need not change."""
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
    session = onnxio.make_session(path, providers=providers, threads=p.threads or None)
    acc = accuracy(session, x, y) if len(y) else None
    return {f"{tag}_accuracy": acc,
            f"{tag}_accuracy_delta": None if acc is None or base is None
            else round(acc - base, 6),
            f"{tag}_bytes": path.stat().st_size}
