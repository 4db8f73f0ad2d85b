"""The registered model as `mlflow models serve` runs it: a pyfunc around the exported ONNX file
that checks a request's pixels before anything casts them.

Input (the JSON body's "inputs", or a numpy array in Python): uint8 pixels N x H x W x C at the
model's size, integers 0-255 (NHWC, as the ONNX graph takes them), or a list of base64-encoded
image files of any size (decoded, resized and centre-cropped as `imagepipe predict` does).
Output: one record per image, {"class", "probability", "probabilities": {class: p}}. Anything
else is refused with a 400 naming what the model takes.

Why a wrapper, and why it is logged without an input schema: with the ONNX model's own
signature (uint8 tensor) MLflow's scoring server casts the request to uint8 while parsing it,
before any model code runs, so pixels divided by 255 became zeros and every image got the same
confident class (HTTP 200; measured on `mlflow models serve`, MLflow 3.17). An input schema of
any dtype casts the same way; without one the server hands over the array as sent (int64,
float64 or strings), and the checks here see what the user sent.

mlflow is imported at the top (the class derives from PythonModel): only register.py imports
this module, inside the function that logs, so importing stages.core.tracking stays cheap.
The model's code is SHIPPED: this module and the few it imports (the ONNX session, the image
reader), not all of stages/.
"""

from __future__ import annotations

import base64
import binascii
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

# The key of the ONNX file among the pyfunc's artifacts (Registry.download finds it by suffix).
ARTIFACT = "onnx_model"
# The model's code (mlflow code_paths), relative to the folder above stages/: what a server
# imports, and nothing else of the project. The packages' __init__ files are shipped empty (the
# tracking package's own would import the whole registry side).
SHIPPED = ("stages/core/errors.py", "stages/core/host.py", "stages/core/onnxio.py",
           "stages/core/imageform.py", "stages/core/tracking/serving.py")
# Most images in one request (export.serving_max_images, in the model's model_config): a
# request over it is a 400 before any image is decoded, cast or run, so one request cannot
# hold the server's memory with N decoded files and an N-image ONNX batch. The body itself
# is read by MLflow's scoring server before the model sees it (it has no size limit of its
# own): a bound on bytes belongs in front of the server (a proxy's body-size limit).
DEFAULT_MAX_IMAGES = 1024


class BadRequest(MlflowException):
    """A request this model cannot answer: INVALID_PARAMETER_VALUE, a 400 from the server.

    Its message stays as written: the scoring server puts the repr of the whole request in
    front of a failed prediction's message ("Failed to predict data '[[[[0.933...'"), which
    buries the reason under kilobytes of pixels."""

    def __init__(self, reason: str) -> None:
        self._reason = reason
        super().__init__(reason, error_code=INVALID_PARAMETER_VALUE)

    @property  # type: ignore[override]
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, _prefixed: str) -> None:
        """Ignored: see the class doc."""


def expected_input(size: int, channels: int, order: str) -> str:
    """The contract in words, for every refusal and for the model's metadata."""
    return (f"uint8 pixels N x {size} x {size} x {channels} (NHWC, channel order {order}), integers "
            f"0-255, or a list of base64-encoded image files")


def as_pixels(model_input: Any, size: int, channels: int, order: str, max_images: int
              ) -> np.ndarray:
    """A request as the server or a Python caller hands it -> uint8 N x size x size x channels.
    Raises BadRequest naming the expected input for anything else, before any cast, and for
    more than `max_images` images, before any is decoded."""
    want = expected_input(size, channels, order)
    x = _one_array(model_input, want, max_images)
    if x.dtype.kind in "USO":
        if x.ndim != 1:
            raise BadRequest(f"this model takes {want}; got {x.dtype} values of shape {x.shape}")
        return np.stack([_decode_file(s, i, size, channels, want) for i, s in enumerate(x)])
    if x.dtype.kind not in "iuf":
        raise BadRequest(f"this model takes {want}; got {x.dtype} values")
    if x.ndim != 4 or x.shape[1:] != (size, size, channels):
        raise BadRequest(f"this model takes {want}; got an array of shape {x.shape}")
    if x.size == 0:
        return x.astype(np.uint8)
    lo, hi = x.min(), x.max()
    if x.dtype.kind == "f" and not np.array_equal(x, np.round(x)):
        hint = (" (pixels scaled to 0-1: multiply by 255 and round before sending)"
                if lo >= 0 and hi <= 1 else "")
        raise BadRequest(f"this model takes {want}; got non-integer values in "
                         f"[{lo:.4g}, {hi:.4g}]{hint}")
    if lo < 0 or hi > 255:
        raise BadRequest(f"this model takes {want}; got values in [{lo:.6g}, {hi:.6g}]")
    return x.astype(np.uint8)


def _one_array(model_input: Any, want: str, max_images: int) -> np.ndarray:
    """The one array in a request: as sent, {"image": array} (the ONNX input's name), or a
    one-column DataFrame (dataframe_split/records bodies; base64 files only fit that way)."""
    import pandas as pd

    if isinstance(model_input, dict):
        if len(model_input) != 1:
            raise BadRequest(f"this model takes one input, {want}; got {sorted(model_input)}")
        model_input = next(iter(model_input.values()))
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] != 1:
            raise BadRequest(f"this model takes {want}; got a table of "
                             f"{model_input.shape[1]} columns")
        model_input = model_input.iloc[:, 0].to_numpy()
    n = len(model_input) if hasattr(model_input, "__len__") else 1
    if n > max_images:
        raise BadRequest(f"{n} images in one request; this model takes at most {max_images} "
                         "(export.serving_max_images): send them in smaller requests")
    try:
        return np.asarray(model_input)
    except ValueError:  # ragged nested lists
        raise BadRequest(f"this model takes {want}; got nested lists of uneven length") from None


def _decode_file(text: Any, i: int, size: int, channels: int, want: str) -> np.ndarray:
    """One base64-encoded image file -> uint8 size x size x channels (ingest's canonical form),
    with ingest's limits on file size and pixel count."""
    from PIL import Image, UnidentifiedImageError

    from stages.core.imageform import DEFAULT_MAX_FILE_BYTES, MAX_PIXELS, canonical

    if not isinstance(text, (str, bytes)):
        raise BadRequest(f"this model takes {want}; item {i} is {type(text).__name__}")
    if len(text) > DEFAULT_MAX_FILE_BYTES * 4 // 3 + 4:
        raise BadRequest(f"item {i}: an image file over {DEFAULT_MAX_FILE_BYTES / 2**20:g} MiB")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"this model takes {want}; item {i} is not base64") from None
    try:
        img = Image.open(io.BytesIO(raw))
        if img.size[0] * img.size[1] > MAX_PIXELS:
            raise BadRequest(f"item {i}: {img.size[0]}x{img.size[1]} pixels is over the "
                             f"{MAX_PIXELS:,} limit")
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError):
        raise BadRequest(f"item {i}: not an image file Pillow can read") from None
    return canonical(img, size, channels)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Pixels or image files in, class names and probabilities out (see the module doc)."""

    # predict's input is checked here, as sent. MLflow reads an annotation of model_input as
    # an input schema (it would then cast or refuse the request first, with its own message),
    # so model_input has none, and this switch stops MLflow asking for one at import.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from stages.core import onnxio

        self._session = onnxio.make_session(Path(context.artifacts[ARTIFACT]))
        meta = onnxio.read_metadata(self._session)
        self._classes = [str(c) for c in meta["classes"]]
        self._size, _, self._channels = onnxio.input_shape(meta)
        self._order = str(meta.get("channel_order", "RGB"))
        config = getattr(context, "model_config", None) or {}
        self._max_images = int(config.get("max_images", DEFAULT_MAX_IMAGES))

    def predict(self, context: Any, model_input,  # unannotated: see the class attribute
                params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        from stages.core import onnxio

        pixels = as_pixels(model_input, self._size, self._channels, self._order, self._max_images)
        if not len(pixels):
            return []
        probs = onnxio.predict_outputs(self._session, pixels)["probabilities"]
        best = probs.argmax(1)
        return [{"class": self._classes[k], "probability": float(p[k]),
                 "probabilities": dict(zip(self._classes, map(float, p), strict=True))}
                for k, p in zip(best, probs, strict=True)]


def shipped_tree(dest: Path) -> Path:
    """SHIPPED copied under `dest`, with an empty __init__.py in each package folder; return
    dest/stages, the folder the model's code_paths names."""
    root = Path(__file__).resolve().parents[3]
    for rel in SHIPPED:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel)
    for folder in {(dest / rel).parent for rel in SHIPPED}:
        while folder != dest:
            (folder / "__init__.py").touch()
            folder = folder.parent
    return dest / "stages"


def log_serving_model(onnx_path: Path, input_example: Any, meta: dict[str, Any],
                      pip_requirements: list[str], max_images: int) -> Any:
    """Log the wrapper (name "serving") into the active run, the ONNX file as its artifact and
    the serving package (SHIPPED) as its code; return MLflow's ModelInfo. `meta`: the ONNX
    metadata; `max_images`: the most images a request may carry."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Map, Schema

    size, channels = int(meta["image_size"]), int(meta["channels"])
    # Outputs only: an input schema would make the scoring server cast the request to its dtype
    # before predict sees it (the module doc).
    outputs = Schema([ColSpec(DataType.string, "class"), ColSpec(DataType.double, "probability"),
                      ColSpec(Map(DataType.double), "probabilities")])
    with tempfile.TemporaryDirectory(prefix="imagepipe-serving.") as tmp:
        return mlflow.pyfunc.log_model(
            name="serving", python_model=ImageClassifier(), artifacts={ARTIFACT: str(onnx_path)},
            signature=ModelSignature(inputs=None, outputs=outputs), input_example=input_example,
            pip_requirements=pip_requirements, code_paths=[str(shipped_tree(Path(tmp)))],
            model_config={"max_images": max_images},
            metadata={"input": expected_input(size, channels,
                                              str(meta.get("channel_order", "RGB"))),
                      "classes": [str(c) for c in meta["classes"]]})
