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
The model's code is SHIPPED: this package and the few modules it imports (the ONNX session,
the image reader), not all of stages/.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from stages.core.tracking.serving.pixels import DEFAULT_MAX_IMAGES, as_pixels, expected_input

# The key of the ONNX file among the pyfunc's artifacts (Registry.download finds it by suffix).
ARTIFACT = "onnx_model"
# The model's code (mlflow code_paths), relative to the folder above stages/: what a server
# imports, and nothing else of the project. The packages' __init__ files are shipped empty (the
# tracking package's own would import the whole registry side).
SHIPPED = ("stages/core/errors.py", "stages/core/host.py", "stages/core/onnxio.py",
           "stages/core/imageform.py", "stages/core/tracking/serving/pixels.py",
           "stages/core/tracking/serving/pyfunc.py")


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

        pixels = as_pixels(model_input, self._size, self._channels, self._order,
                           getattr(self, "_max_images", DEFAULT_MAX_IMAGES))
        if not len(pixels):
            return []
        out = onnxio.predict_outputs(self._session, pixels)
        probs = out.get("probabilities")
        if probs is None:  # a format-1 model (logits only): its softmax, as predict takes it
            from scipy.special import softmax

            probs = softmax(out["logits"].astype(np.float64), axis=1)
        best = probs.argmax(1)
        return [{"class": self._classes[k], "probability": float(p[k]),
                 "probabilities": dict(zip(self._classes, map(float, p), strict=True))}
                for k, p in zip(best, probs, strict=True)]


def signature() -> Any:
    """Outputs only: an input schema would make the scoring server cast the request to its dtype
    before predict sees it (the module doc)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Map, Schema

    return ModelSignature(inputs=None, outputs=Schema([
        ColSpec(DataType.string, "class"), ColSpec(DataType.double, "probability"),
        ColSpec(Map(DataType.double), "probabilities")]))


def shipped_tree(dest: Path) -> Path:
    """SHIPPED copied under `dest`, with an empty __init__.py in each package folder; return
    dest/stages, the folder the model's code_paths names."""
    root = Path(__file__).resolve().parents[4]
    for rel in SHIPPED:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel)
    for folder in {(dest / rel).parent for rel in SHIPPED}:
        while folder != dest:
            (folder / "__init__.py").touch()
            folder = folder.parent
    return dest / "stages"


def log_serving_model(onnx_path: Path, input_example: Any, meta: dict[str, Any],
                      pip_requirements: list[str], max_images: int | None = None) -> Any:
    """Log the wrapper (name "serving") into the active run, the ONNX file as its artifact and
    the serving package (SHIPPED) as its code; return MLflow's ModelInfo. `meta`: the ONNX
    metadata; `max_images`: the most images a request may carry (None: DEFAULT_MAX_IMAGES)."""
    size, channels = int(meta["image_size"]), int(meta["channels"])
    with tempfile.TemporaryDirectory(prefix="imagepipe-serving.") as tmp:
        return mlflow.pyfunc.log_model(
            name="serving", python_model=ImageClassifier(), artifacts={ARTIFACT: str(onnx_path)},
            signature=signature(), input_example=input_example,
            pip_requirements=pip_requirements, code_paths=[str(shipped_tree(Path(tmp)))],
            model_config={"max_images": max_images or DEFAULT_MAX_IMAGES},
            metadata={"input": expected_input(size, channels,
                                              str(meta.get("channel_order", "RGB"))),
                      "classes": [str(c) for c in meta["classes"]]})
