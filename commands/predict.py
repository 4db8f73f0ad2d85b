"""Classify image files with an ONNX model written by the export stage.

MODEL is an .onnx file or a registered version, models:/NAME@ALIAS or models:/NAME/VERSION
(MLflow's two forms; downloaded from the project's tracking store, MLFLOW_TRACKING_URI where
set; one that is not there is exit 2). Of a registered version only the
ONNX file is used (it sits inside the serving wrapper that `mlflow models serve` runs, see
stages/core/tracking/serving.py), run here with ONNX Runtime as a local file is. A folder
stands for every image file under it, recursively, in sorted path order (hidden files and
folders skipped).

Images of any size and mode go through the same canonical form as ingest (EXIF orientation,
alpha over white, grey or RGB, resize and centre crop), at the size and channel count the
model's metadata records; the model normalises the uint8 pixels itself (stages.core.onnxio).
Nothing about preprocessing is hard-coded here. An image that cannot be read gets an error
line, the others are still predicted, and the exit code is 2 at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import onnxio
from stages.core.door import run_stage
from stages.core.errors import BadInput
from stages.core.imageform import canonical
from stages.core.sources import BadFile, read_image_file
from stages.core.walk import IMAGE_SUFFIXES

# Images decoded and run per batch: bounds memory whatever the number of files given.
CHUNK = 64
REGISTERED = re.compile(r"models:/(?P<name>[^/@]+)(@(?P<alias>[^/@]+)|/(?P<version>\d+))")


def load_image(path: str, size: int, channels: int) -> np.ndarray:
    """One file -> uint8 size x size x channels; BadInput with the reason when it cannot."""
    if Path(path).is_dir():  # a folder argument whose walk found no image file
        raise BadInput("a folder without image files")
    try:
        _, img = read_image_file(path)  # the same reader and checks as ingest
    except FileNotFoundError:
        raise BadInput("no such file") from None
    except PermissionError:
        raise BadInput("permission denied") from None
    except BadFile as err:
        raise BadInput(str(err)) from None
    except OSError as err:
        raise BadInput(f"unreadable: {err}") from None
    return canonical(img, size, channels)


def predict_files(session: Any, paths: list[str], top_k: int
                  ) -> Iterator[tuple[str, list[tuple[str, float]] | str]]:
    """(path, its top classes and their probabilities, or why it could not be read) in the
    order of `paths`, CHUNK images decoded and run at a time."""
    meta = onnxio.read_metadata(session)
    size, _, channels = onnxio.input_shape(meta)
    classes = list(meta["classes"])
    for lo in range(0, len(paths), CHUNK):
        chunk = paths[lo:lo + CHUNK]
        read: list[np.ndarray | str] = []
        for path in chunk:
            try:
                read.append(load_image(path, size, channels))
            except BadInput as err:
                read.append(str(err))
        loaded = [x for x in read if not isinstance(x, str)]
        probs = iter(onnxio.predict_outputs(session, np.stack(loaded))["probabilities"]
                     if loaded else [])
        for path, x in zip(chunk, read, strict=True):
            if isinstance(x, str):
                yield path, x
                continue
            p = next(probs)
            yield path, [(classes[j], float(p[j])) for j in np.argsort(-p, kind="stable")[:top_k]]


def expand(args: list[str]) -> list[str]:
    """Files as given; a folder becomes the image files under it, sorted, recursively. A folder
    without any stays in the list, so it gets its error line."""
    out: list[str] = []
    for arg in args:
        folder = Path(arg)
        if not folder.is_dir():
            out.append(arg)
            continue
        found = sorted(str(p) for p in folder.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        out.extend(found or [arg])
    return out


def open_model(model: str, scratch: Path) -> Any:
    """A session for an .onnx path, models:/NAME@ALIAS or models:/NAME/VERSION (downloaded
    into `scratch`)."""
    if not model.startswith("models:/"):
        return onnxio.make_session(Path(model))
    match = REGISTERED.fullmatch(model)
    if not match:
        raise BadInput(f"{model}: a registered model is models:/NAME@ALIAS or "
                       "models:/NAME/VERSION (e.g. models:/imagepipe-classifier@champion)")
    from stages.core.tracking import Registry

    version, path = Registry.connect().download(
        match["name"], match["alias"] or match["version"], scratch,
        by_version=match["version"] is not None)
    print(f"predict: {model} is version {version}", file=sys.stderr)
    return onnxio.make_session(path)


def run(model: str, images: list[str], top_k: int, as_json: bool) -> None:
    """Print one line per image; BadInput at the end when any image could not be read."""
    with tempfile.TemporaryDirectory(prefix="imagepipe-predict-") as scratch:
        session = open_model(model, Path(scratch))
    images = expand(images)
    failed = 0
    for path, top in predict_files(session, images, top_k):
        if isinstance(top, str):
            failed += 1
            print(f"predict: error: {path}: {top}", file=sys.stderr)
            if as_json:
                print(json.dumps({"image": path, "error": top}), flush=True)
        elif as_json:
            print(json.dumps({"image": path, "top_k": [{"class": c, "probability": round(p, 6)}
                                                        for c, p in top]}), flush=True)
        else:
            print(f"{path}: " + "  ".join(f"{c} {p:.1%}" for c, p in top), flush=True)
    if failed:
        raise BadInput(f"{failed} of {len(images)} images could not be read")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagepipe predict", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an ONNX model written by the export stage, or "
                        "models:/NAME@ALIAS or models:/NAME/VERSION from the registry")
    parser.add_argument("images", nargs="+", help="image files (any format Pillow reads) or "
                        "folders (every image file under them, sorted)")
    parser.add_argument("--top-k", type=int, default=3, help="classes shown per image (default 3)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k must be at least 1 (got {args.top_k})")
    # Not a pipeline stage: no MLflow run for a prediction.
    return run_stage("predict", lambda: run(args.model, args.images, args.top_k, args.json),
                     track=False)
