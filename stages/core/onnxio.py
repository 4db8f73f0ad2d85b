"""The ONNX Runtime side of imagepipe: which providers load, tuned sessions, the model's own
metadata, and batched logits and probabilities from uint8 images.

An exported model takes raw pixels (input `image`, uint8 N x H x W x C) and does its own
preprocessing in the graph; its outputs are `probabilities` and `logits`. Models exported
before that (float32 NCHW input, one `logits` output) are still read and scored: for them the
preprocessing (from the same metadata) and the softmax run here.

Used by export (parity gate, variants), predict, promote's gate (re-scoring) and the served
model (stages/core/tracking/serving.py). An exported model describes itself in
`metadata_props` (see METADATA_DOC): a server reads the class names, input size, channel order
and mean/std from the file, never from params.
"""

from __future__ import annotations

import json
import logging
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from stages.core.errors import BadInput
from stages.core.host import usable_cores, visible_gpus

log = logging.getLogger("imagepipe.onnx")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# fp32 on the GPU must stay fp32: ORT's CUDA provider otherwise lets Ampere+ GPUs round conv
# and matmul inputs to TF32 (10-bit mantissa), which no 1e-4 parity gate survives.
CUDA_OPTIONS = {"use_tf32": "0"}
# ORT's default logger level; ours is raised only around the CUDA probe.
_ORT_WARNING = 2
_ORT_FATAL = 4

# Version of the metadata layout below; a reader refuses a newer major version. 2: the graph
# takes uint8 NHWC pixels and preprocesses them itself (1: float32 NCHW, preprocessed outside).
METADATA_FORMAT = "2"
_READABLE_FORMATS = frozenset({"1", "2"})
INPUT = "image"
OUTPUTS = ("probabilities", "logits")
METADATA_DOC = (
    "input 'image': uint8 N x H x W x C raw pixels (NHWC), channels in channel_order; the graph "
    "computes x = (image / 255 - mean[c]) / std[c] and transposes to NCHW itself; outputs: "
    "'probabilities' (softmax) and 'logits', N x len(classes), in the order of classes"
)
# Stored as JSON text (metadata_props are strings); everything else is a plain string.
_JSON_KEYS = frozenset({"classes", "mean", "std", "image_size", "channels", "num_classes"})
REQUIRED_KEYS = ("classes", "image_size", "channels", "channel_order", "mean", "std")


# ---------------------------------------------------------------- providers


@cache
def available_providers() -> list[str]:
    """Providers that really load here, best first: CUDA only with a device and its libraries.

    onnxruntime-gpu lists CUDA and TensorRT whether or not a GPU exists, and asking for them
    without one prints two red error lines per session. So: no device, no CUDA; with a device,
    one silent probe session decides. TensorRT is never asked for: building its engines takes
    minutes per model, which a CLI call or a test cannot afford.
    """
    if CUDA not in ort.get_available_providers() or visible_gpus() == 0:
        return [CPU]
    return [CUDA, CPU] if _cuda_provider_loads() else [CPU]


def _cuda_provider_loads() -> bool:
    """One tiny session on CUDA, with ORT's logger silenced so a failure stays quiet."""
    try:
        # The CUDA/cuDNN libraries torch brought (nvidia-* wheels) are not on the loader's
        # path until torch is imported; this finds them without importing torch.
        ort.preload_dlls()
    except Exception as err:  # noqa: BLE001 - missing libraries show up in the probe below
        log.debug("onnxruntime.preload_dlls failed: %s", err)
    ort.set_default_logger_severity(_ORT_FATAL)
    try:
        sess = ort.InferenceSession(_probe_model(), providers=_with_options([CUDA, CPU]))
        ok = CUDA in sess.get_providers()
    except Exception as err:  # noqa: BLE001 - any failure means: not usable here
        log.debug("CUDA provider probe failed: %s", err)
        ok = False
    finally:
        ort.set_default_logger_severity(_ORT_WARNING)
    if not ok:
        log.info("a GPU is present but ONNX Runtime's CUDA provider does not load: using the CPU")
    return ok


def _with_options(providers: list[str]) -> list[str | tuple[str, dict[str, str]]]:
    return [(p, CUDA_OPTIONS) if p == CUDA else p for p in providers]


def _probe_model() -> bytes:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    # IR 10: onnx 1.23 writes IR 14 by default, newer than this ORT reads.
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)],
                                   ir_version=10)
    return model.SerializeToString()


# ---------------------------------------------------------------- sessions


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Session options, measured with benchmarks/bench_export.py (resnet_small width 32,
    16 px, batch 64, on the project's 2-core machine shared with other jobs):

    - ORT_ENABLE_ALL (ORT's default, kept explicit): on x86 it adds the NCHWc layout
      transform, which fuses Conv+bias+ReLU(+Add) into blocked-layout kernels: 2,297 against
      1,104 images/s at ORT_ENABLE_EXTENDED (1 thread, same run). Without it ORT is no
      faster than torch eager.
    - sequential execution, one inter-op thread: a CNN is a chain; a second pool only
      competes for the cores.
    - intra-op threads = usable cores: ORT counts the host's physical cores and ignores
      affinity and container limits, so it oversubscribes a container.
    - no spinning: idle pool threads otherwise spin for work on cores that other processes
      (or the web server in front of the model) need. At 2 threads on the loaded machine:
      1,076-1,186 against 918-934 images/s with spinning; batch-1 latency 0.54-0.56 against
      0.48-0.49 ms (the price); at 1 thread no difference.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    so.intra_op_num_threads = threads or usable_cores()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # warnings about unused initializers etc. are noise to a user
    return so


def make_session(
    model: str | Path, providers: list[str] | None = None, threads: int | None = None
) -> ort.InferenceSession:
    """An inference session on the model file, on the best provider that loads here (or on
    `providers`)."""
    providers = list(providers) if providers else available_providers()
    if not Path(model).is_file():
        raise BadInput(f"{model}: no such ONNX model file")
    try:
        return ort.InferenceSession(str(model), session_options(threads),
                                    providers=_with_options(providers))
    except Exception as err:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph/... types
        raise BadInput(f"{model}: ONNX Runtime cannot load it: {err}".splitlines()[0]) from None


# ---------------------------------------------------------------- metadata


def metadata_props(meta: dict[str, Any]) -> dict[str, str]:
    """Encode a metadata dict as metadata_props strings (lists and numbers as JSON)."""
    out = {"imagepipe_format": METADATA_FORMAT, "preprocess": METADATA_DOC}
    for key, value in meta.items():
        if value is None:
            continue  # absent, not the string "None" (a model exported without its file)
        out[key] = json.dumps(value) if key in _JSON_KEYS else str(value)
    return out


def read_metadata(model: onnx.ModelProto | ort.InferenceSession) -> dict[str, Any]:
    """The decoded metadata_props of a session (what serving, predict and promote hold) or a
    ModelProto (what registering holds).

    Raises BadInput when the model was not written by imagepipe's export (keys missing).
    """
    if isinstance(model, ort.InferenceSession):
        raw = dict(model.get_modelmeta().custom_metadata_map)
    else:
        raw = {p.key: p.value for p in model.metadata_props}
    meta = {key: json.loads(value) if key in _JSON_KEYS else value for key, value in raw.items()}
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise BadInput(f"not an imagepipe model: metadata_props lack {missing} "
                       "(export it with python -m stages.export)")
    if str(meta.get("imagepipe_format", "1")).split(".")[0] not in _READABLE_FORMATS:
        raise BadInput(f"metadata format {meta['imagepipe_format']} is newer than this "
                       f"imagepipe reads ({METADATA_FORMAT}): upgrade imagepipe")
    return meta


# ---------------------------------------------------------------- inference


def input_shape(meta: dict[str, Any]) -> tuple[int, int, int]:
    """The H x W x C of uint8 images this model takes."""
    size = int(meta["image_size"])
    return size, size, int(meta["channels"])


def predict_outputs(
    session: ort.InferenceSession, images_uint8_nhwc: np.ndarray, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """uint8 N x H x W x C images -> {"logits", "probabilities"}, float32 N x classes each.
    Batched, so memory is one batch of floats whatever N is. A format-1 model (float input,
    logits out) gets the metadata's preprocessing and the softmax here instead."""
    meta = read_metadata(session)
    images = np.asarray(images_uint8_nhwc)
    expected = input_shape(meta)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
        raise BadInput(f"images must be uint8 N x {' x '.join(map(str, expected))} for this "
                       f"model; got {images.dtype} {images.shape}")
    inp = session.get_inputs()[0]
    pixels = inp.type == "tensor(uint8)"  # format 2 preprocesses in its graph
    names = [o.name for o in session.get_outputs()]
    wanted = [n for n in OUTPUTS if n in names]  # format 1: `logits` alone (every export of it)
    if not pixels:  # here, not at the top: the serving artifact ships no dataset module
        from stages.core.dataset import preprocess
    out = {n: np.empty((len(images), len(meta["classes"])), dtype=np.float32) for n in wanted}
    for lo in range(0, len(images), batch_size):
        batch = images[lo:lo + batch_size]
        x = batch if pixels else preprocess(batch, meta["mean"], meta["std"])
        for n, got in zip(wanted, session.run(wanted, {inp.name: x}), strict=True):
            out[n][lo:lo + len(x)] = got
    if "probabilities" not in out:
        from scipy.special import softmax

        out["probabilities"] = softmax(out["logits"], axis=1)
    return out
