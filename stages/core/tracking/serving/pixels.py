"""The pixel contract of the served model: what a request may hold, refused with a 400 naming
the input the model takes before anything casts it (stages/core/tracking/serving/pyfunc.py runs it).
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

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


def as_pixels(model_input: Any, size: int, channels: int, order: str = "RGB",
              max_images: int = DEFAULT_MAX_IMAGES) -> np.ndarray:
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


def _one_array(model_input: Any, want: str, max_images: int = DEFAULT_MAX_IMAGES) -> np.ndarray:
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
