"""imagepipe predict on images the test writes: RGB, grey, large, tiny, transparent, plus a
missing and a broken file (an error line each, the rest predicted, exit code 2 at the end), and
folders (every image file under them, sorted). The model takes uint8 pixels and normalises them
itself; the reference is the training preprocessing in numpy and eager torch. (A registered
models:/NAME@ALIAS is predicted in tests/integration/test_serving.py, on a real registry.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from commands import cli, predict
from stages import export
from stages.core import onnxio, onnxvariants
from stages.core.dataset import preprocess
from stages.core.imageform import canonical
from stages.core.models import ModelFile, ModelSpec, build_model, save_model_file

CLASSES = ["cat", "dog", "ship", "frog"]
# Unusual numbers on purpose: predict must take them from the model's metadata.
MEAN, STD = [0.6, 0.3, 0.45], [0.15, 0.35, 0.22]
SIZE = 16


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    spec = ModelSpec("resnet_small", len(CLASSES), in_channels=3, image_size=SIZE, width=8)
    model = build_model(spec).eval()
    # Spread the head so the probabilities differ clearly between images.
    with torch.no_grad():
        model.head.weight.mul_(20.0)
    mf = ModelFile(spec, CLASSES, MEAN, STD)
    save_model_file(root / "m.pt", model, mf)
    proto = export.export_onnx(model, mf, opset=18)
    meta = export.model_metadata(mf, root / "m.pt")
    (root / "model.onnx").write_bytes(onnxvariants.finish_model(proto, meta))
    rng = np.random.default_rng(0)
    images = {
        "rgb.png": Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)),
        "grey.jpg": Image.fromarray(rng.integers(0, 256, (25, 20), dtype=np.uint8), "L"),
        "large.jpg": Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)),
        "tiny.png": Image.fromarray(rng.integers(0, 256, (2, 3, 4), dtype=np.uint8), "RGBA"),
    }
    for name, img in images.items():
        img.save(root / name)
    (root / "broken.png").write_text("this is not a PNG")
    return {"root": root, "model": model, "onnx": root / "model.onnx", "good": list(images)}


def _torch_probs(model: torch.nn.Module, path: Path) -> np.ndarray:
    """The reference: canonical form, the training preprocessing, eager torch, softmax."""
    with Image.open(path) as img:
        arr = canonical(img, SIZE, 3)[None]
    with torch.inference_mode():
        logits = model(torch.from_numpy(preprocess(arr, MEAN, STD)))
    return torch.softmax(logits.double(), 1).numpy()[0]


def test_text_output_errors_and_exit_code(served: dict, capsys: pytest.CaptureFixture[str]) -> None:
    root = served["root"]
    files = [str(root / "rgb.png"), str(root / "missing.png"), str(root / "grey.jpg"),
             str(root / "broken.png"), str(root / "large.jpg"), str(root / "tiny.png")]
    code = predict.main([str(served["onnx"]), *files, "--top-k", "2"])
    out, err = capsys.readouterr()
    assert code == 2
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == [files[0], files[2], files[4], files[5]]
    for line in lines:
        shown = line.split(": ", 1)[1].split("  ")
        assert len(shown) == 2 and all(s.split()[0] in CLASSES and s.endswith("%") for s in shown)
    assert f"{files[1]}: no such file" in err
    assert f"{files[3]}: not an image" in err
    assert "predict: error: 2 of 6 images could not be read" in err  # the door's line, exit 2


def test_json_matches_torch_with_the_metadata_preprocessing(
        served: dict, capsys: pytest.CaptureFixture[str]) -> None:
    root = served["root"]
    files = [str(root / name) for name in served["good"]] + [str(root / "missing.png")]
    code = predict.main([str(served["onnx"]), *files, "--json", "--top-k", "10"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 2 and [r["image"] for r in rows] == files
    assert rows[-1]["error"] == "no such file"
    tops = []
    for row in rows[:-1]:
        top = row["top_k"]
        assert len(top) == len(CLASSES)  # k is capped at the number of classes
        probs = [t["probability"] for t in top]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
        ref = _torch_probs(served["model"], Path(row["image"]))
        got = np.array([dict((t["class"], t["probability"]) for t in top)[c] for c in CLASSES])
        assert np.abs(got - ref).max() < 1e-4, row["image"]
        tops.append(top[0]["probability"])
    assert max(tops) - min(tops) > 1e-3  # images are told apart: the comparison means something


def test_all_readable_exits_zero_through_the_cli(served: dict,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    image = str(served["root"] / "rgb.png")
    code = cli.main(["predict", str(served["onnx"]), image, "--top-k", "1"])
    out = capsys.readouterr().out
    assert code == 0 and len(out.splitlines()) == 1 and out.split(": ")[1].split()[0] in CLASSES


def test_a_model_without_metadata_is_refused(tmp_path: Path, served: dict,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bare = onnx.load(served["onnx"])
    del bare.metadata_props[:]
    onnx.save(bare, tmp_path / "bare.onnx")
    code = predict.main([str(tmp_path / "bare.onnx"), str(served["root"] / "rgb.png")])
    assert code == 2 and "not an imagepipe model" in capsys.readouterr().err


def test_model_input_shape_comes_from_metadata(served: dict) -> None:
    meta = onnxio.read_metadata(onnx.load(served["onnx"]))
    assert onnxio.input_shape(meta) == (SIZE, SIZE, 3) and meta["mean"] == MEAN
    session = onnxio.make_session(served["onnx"])
    with pytest.raises(onnxio.BadInput, match="uint8 N x 16 x 16 x 3"):
        onnxio.predict_outputs(session, np.zeros((1, 8, 8, 3), np.uint8))


def test_a_folder_is_every_image_under_it_sorted(served: dict, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "photos"
    for sub in ("b", "a/deeper", ".hidden"):
        (folder / sub).mkdir(parents=True)
    rgb = Image.open(served["root"] / "rgb.png")
    for name in ("z.png", "b/y.BMP", "a/deeper/x.tiff", "a/w.png", ".hidden/v.png", ".dot.png"):
        rgb.convert("RGB").save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    single = served["root"] / "grey.jpg"
    code = predict.main([str(served["onnx"]), str(single), str(folder), str(empty), "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = [str(single)] + [str(folder / n) for n in
                                ("a/deeper/x.tiff", "a/w.png", "b/y.BMP", "z.png")]
    assert [r["image"] for r in rows] == [*expected, str(empty)]
    assert rows[-1]["error"] == "a folder without image files" and code == 2
    # The same pixels (lossless formats), wherever they sit, get the same answer.
    assert len({json.dumps(r["top_k"]) for r in rows[1:-1]}) == 1


def test_the_model_takes_uint8_pixels(served: dict) -> None:
    """The input contract predict relies on: uint8 NHWC `image` in, probabilities that are the
    softmax of the logits out."""
    session = onnxio.make_session(served["onnx"])
    (inp,) = session.get_inputs()
    assert inp.name == "image" and inp.type == "tensor(uint8)" and inp.shape[1:] == [SIZE, SIZE, 3]
    pixels = np.random.default_rng(9).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    out = onnxio.predict_outputs(session, pixels)
    ref = torch.softmax(torch.from_numpy(out["logits"]).double(), 1).numpy()
    assert np.abs(out["probabilities"] - ref).max() < 1e-6


# ---------------------------------------------------------------- the registered serving wrapper
# stages/core/tracking/serving.py, in process with its real ONNX session (no MLflow store, no
# server: tests/integration/test_serving.py posts to the real `mlflow models serve`).


@pytest.fixture(scope="module")
def wrapper(served: dict) -> Any:
    """An ImageClassifier on the served ONNX file (importing it loads mlflow: imported here)."""
    from mlflow.pyfunc import PythonModelContext

    from stages.core.tracking.serving import ARTIFACT, ImageClassifier

    model = ImageClassifier()
    model.load_context(PythonModelContext({ARTIFACT: str(served["onnx"])}, None))
    return model


def test_the_wrapper_answers_pixels_and_image_files_as_predict_does(served: dict,
                                                                    wrapper: Any) -> None:
    import base64

    pixels = np.random.default_rng(4).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    rows = wrapper.predict(None, pixels.astype(np.int64))  # JSON integers arrive as int64
    want = onnxio.predict_outputs(onnxio.make_session(served["onnx"]), pixels)["probabilities"]
    got = np.array([[r["probabilities"][c] for c in CLASSES] for r in rows])
    assert np.abs(got - want).max() < 1e-6
    assert [r["class"] for r in rows] == [CLASSES[k] for k in want.argmax(1)]
    # A file of another size and mode (30 x 40 RGB, 2 x 3 RGBA): the canonical form of predict.
    files = [base64.b64encode((served["root"] / n).read_bytes()).decode()
             for n in ("rgb.png", "tiny.png")]
    rows = wrapper.predict(None, np.array(files))
    for name, row in zip(("rgb.png", "tiny.png"), rows, strict=True):
        ref = _torch_probs(served["model"], served["root"] / name)
        got = np.array([row["probabilities"][c] for c in CLASSES])
        assert np.abs(got - ref).max() < 1e-4 and row["class"] == CLASSES[ref.argmax()]


@pytest.mark.parametrize(("sent", "why"), [
    (np.full((2, SIZE, SIZE, 3), 0.5), "non-integer values in [0.5, 0.5] (pixels scaled to 0-1"),
    (np.full((1, SIZE, SIZE, 3), 12.5), "non-integer values in [12.5, 12.5]"),
    (np.full((1, SIZE, SIZE, 3), 256), "got values in [256, 256]"),
    (np.full((1, SIZE, SIZE, 3), -1), "got values in [-1, -1]"),
    (np.zeros((1, 8, 8, 3), np.uint8), "got an array of shape (1, 8, 8, 3)"),
    (np.zeros((SIZE, SIZE, 3), np.uint8), "got an array of shape (16, 16, 3)"),
    (np.zeros((1, SIZE, SIZE, 3), bool), "got bool values"),
    ({"image": np.zeros((1, SIZE, SIZE, 3)), "extra": 1}, "got ['extra', 'image']"),
    (np.array(["not base64!"]), "item 0 is not base64"),
    (np.array(["aGVsbG8="]), "item 0: not an image file"),
])
def test_the_wrapper_refuses_what_is_not_pixels(wrapper: Any, sent: object, why: str) -> None:
    from stages.core.tracking.serving import BadRequest

    with pytest.raises(BadRequest) as err:
        wrapper.predict(None, sent)
    assert why in err.value.message
    assert ("multiply by 255" in err.value.message) == ("0-1" in why)
    if "item 0:" not in why:  # a refusal of the request's form names the form it should have
        assert f"uint8 pixels N x {SIZE} x {SIZE} x 3 (NHWC, channel order RGB)" in err.value.message
    assert err.value.get_http_status_code() == 400


def test_the_wrapper_takes_the_onnx_input_name_and_integral_floats(wrapper: Any) -> None:
    pixels = np.random.default_rng(5).integers(0, 256, (2, SIZE, SIZE, 3))
    plain = wrapper.predict(None, pixels)
    assert wrapper.predict(None, {"image": pixels}) == plain
    assert wrapper.predict(None, pixels.astype(np.float64)) == plain
