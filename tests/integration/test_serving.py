"""The registered model as its users call it: a tiny trained model goes through the real
export stage door (gate, MLflow run, registration with signature and input example) into a
SQLite store in tmp, gets alias champion, and then

* `mlflow models serve -m models:/NAME@champion --env-manager local` answers raw uint8 pixels
  and base64-encoded image files posted as JSON with class names and per-class probabilities
  whose argmax is the torch path's class, and refuses pixels divided by 255 (which MLflow
  would otherwise cast to uint8 zeros) with a 400 naming the input the model takes;
* the same wrapper loaded in Python refuses the same way;
* `imagepipe predict models:/NAME@champion FOLDER` downloads it and classifies the same way.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.integration.tracking_kit import EXPORT_STAGE, _free_port, write_dvc_yaml

pytestmark = pytest.mark.slow

CLASSES = ["zero", "one", "two", "three"]
SIZE, CHANNELS = 12, 1
MEAN, STD = [0.3], [0.4]
MODEL_NAME = "serving-test"


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class k is a bright band k on dark noise: learnable in a few dozen steps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    imgs = rng.integers(0, 60, (n, SIZE, SIZE, CHANNELS), dtype=np.uint8)
    band = SIZE // len(CLASSES)
    for i, k in enumerate(labels):
        imgs[i, k * band:(k + 1) * band] += 180
    return imgs, labels


def _train(path: Path) -> None:
    import torch

    from stages.core.dataset import preprocess
    from stages.core.models import ModelFile, ModelSpec, build_model, save_model_file

    torch.manual_seed(0)
    spec = ModelSpec("resnet_small", len(CLASSES), CHANNELS, SIZE, width=8)
    model = build_model(spec)
    x, y = _images(64, 1)
    xt, yt = torch.from_numpy(preprocess(x, MEAN, STD)), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    save_model_file(path, model.eval(), ModelFile(spec, CLASSES, MEAN, STD))


def _write_target(folder: Path) -> None:
    from stages.core.dataset import SPLIT_CODE
    from tests.helpers import save_dataset

    imgs, labels = _images(24, 2)
    save_dataset(folder, imgs, labels, np.full(len(imgs), SPLIT_CODE["test"], np.uint8),
                  CLASSES, {"uri": "test:bands", "role": "target"})


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, empty_mlflow_db: Path) -> Iterator[dict]:
    """Export + register through the real door, champion set; the project as cwd for the
    module, tracking on its own SQLite store."""
    import shutil

    from stages import export
    from stages.core.tracking import CHAMPION, Registry

    root = tmp_path_factory.mktemp("serving")
    shutil.copy(empty_mlflow_db, root / "mlflow.db")
    write_dvc_yaml(root, {"export": EXPORT_STAGE})
    (root / "params.yaml").write_text(yaml.safe_dump({
        "data": {"source": {"uri": "sklearn:digits"}, "target": {"uri": "sklearn:digits"}},
        "export": {"parity_images": 24, "quantize_int8": False, "fp16": False, "threads": 1,
                   "model": "finetuned",  # no scratch model here
                   "serving_max_images": 4},  # a request of 5 images is refused
        "registry": {"model_name": MODEL_NAME}}))
    (root / "models").mkdir()
    _train(root / "models" / "finetuned.pt")
    _write_target(root / "data" / "target")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("IMAGEPIPE_TRACKING", "1")
        for var in ("MLFLOW_TRACKING_URI", "IMAGEPIPE_PIPELINE_ID", "IMAGEPIPE_FLOW_RUN_ID",
                    "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        assert export.main([]) == 0
        reg = Registry.connect(root)
        version = reg.alias(MODEL_NAME, "challenger").version
        reg.set_alias(MODEL_NAME, CHAMPION, version)
        images, labels = _images(8, 3)
        yield {"root": root, "uri": f"sqlite:///{(root / 'mlflow.db').as_posix()}",
               "version": version, "images": images, "labels": labels,
               "torch": _torch_classes(root / "models" / "finetuned.pt", images)}


def _torch_classes(path: Path, images: np.ndarray) -> np.ndarray:
    import torch

    from stages.core.dataset import preprocess
    from stages.core.models import load_model_file

    model, mf = load_model_file(path)
    with torch.inference_mode():
        return model(torch.from_numpy(preprocess(images, mf.mean, mf.std))).argmax(1).numpy()


def _post(url: str, body: dict) -> tuple[int, dict]:
    """(HTTP status, JSON answer), for refusals too."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _png_b64(img: np.ndarray, size: int) -> str:
    """One grey image as a base64 PNG file of size x size pixels (not the model's size)."""
    buf = io.BytesIO()
    Image.fromarray(img[..., 0], "L").resize((size, size), Image.Resampling.NEAREST).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _classes_of_files(files: list[str], path: Path) -> list[str]:
    """What the torch path says for posted files after predict's canonical form."""
    from stages.core.imageform import canonical

    imgs = np.stack([canonical(Image.open(io.BytesIO(base64.b64decode(f))), SIZE, CHANNELS)
                     for f in files])
    return [CLASSES[k] for k in _torch_classes(path, imgs)]


def _wait_until_up(proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited {proc.returncode}:\n"
                                 + log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise AssertionError(f"mlflow models serve not up after {timeout_s} s:\n"
                         + log.read_text()[-3000:])


def test_logged_with_signature_and_input_example(registered: dict) -> None:
    """The registered version is the serving wrapper: outputs declared, no input schema (one
    would make the server cast the request), the contract in its metadata, a real example. The
    ONNX model in the same run keeps its uint8 tensor signature for ONNX consumers."""
    import mlflow.artifacts
    from mlflow.models import Model

    from stages.core.tracking import Registry

    reg = Registry.connect(registered["root"])
    served = Model.load(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{MODEL_NAME}@champion",
        dst_path=str(registered["root"] / "dl-serving"), tracking_uri=registered["uri"]))
    assert served.signature.inputs is None
    assert [o["name"] for o in served.signature.outputs.to_dict()] == [
        "class", "probability", "probabilities"]
    assert f"N x {SIZE} x {SIZE} x {CHANNELS}" in served.metadata["input"]
    assert served.metadata["classes"] == CLASSES
    assert served.saved_input_example_info is not None

    tags = reg.find(MODEL_NAME, registered["version"], by_version=True).tags
    onnx_dir = mlflow.artifacts.download_artifacts(
        artifact_uri=tags["onnx_model_uri"], dst_path=str(registered["root"] / "dl-onnx"),
        tracking_uri=registered["uri"])
    mlmodel = Model.load(onnx_dir)
    assert "onnx" in mlmodel.flavors
    inputs = mlmodel.signature.inputs.to_dict()
    outputs = {o["name"] for o in mlmodel.signature.outputs.to_dict()}
    spec = inputs[0]["tensor-spec"]
    assert spec["dtype"] == "uint8" and list(spec["shape"]) == [-1, SIZE, SIZE, CHANNELS]
    assert outputs == {"probabilities", "logits"}
    assert mlmodel.saved_input_example_info is not None
    # The PyTorch model's example is the same two images, preprocessed as it takes them.
    from stages.core.dataset import preprocess
    from stages.core.models import load_model_file

    torch_dir = mlflow.artifacts.download_artifacts(
        artifact_uri=tags["pytorch_model_uri"], dst_path=str(registered["root"] / "dl-torch"),
        tracking_uri=registered["uri"])
    mf = load_model_file(registered["root"] / "models" / "finetuned.pt")[1]
    pixels = mlmodel.load_input_example(onnx_dir)
    assert np.allclose(Model.load(torch_dir).load_input_example(torch_dir),
                       preprocess(np.asarray(pixels), mf.mean, mf.std))


def test_the_wrapper_in_python_answers_pixels_and_refuses_floats(registered: dict) -> None:
    import mlflow.artifacts
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{MODEL_NAME}@champion",
        dst_path=str(registered["root"] / "dl-python"), tracking_uri=registered["uri"]))
    images = registered["images"][:3]
    rows = model.predict(images)
    assert [r["class"] for r in rows] == [CLASSES[k] for k in registered["torch"][:3]]
    for r in rows:
        assert set(r["probabilities"]) == set(CLASSES)
        assert r["probability"] == pytest.approx(max(r["probabilities"].values()))
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    # Integral floats are pixels too (JSON has one number type); fractions and 300 are not.
    assert model.predict(images.astype(np.float64)) == rows
    for bad, why in [(images / 255.0, "multiply by 255"), (images.astype(int) + 200, "got values in ["),
                     (images[..., 0], "shape (3, 12, 12)")]:
        with pytest.raises(MlflowException, match=r"this model takes uint8 pixels") as err:
            model.predict(bad)
        assert why in err.value.message and f"N x {SIZE} x {SIZE} x {CHANNELS}" in err.value.message
    # Over export.serving_max_images (4 here): refused before any image is cast or run.
    assert len(model.predict(registered["images"][:4])) == 4
    with pytest.raises(MlflowException, match=r"^5 images in one request; this model takes at "
                                              r"most 4 \(export.serving_max_images\)"):
        model.predict(registered["images"][:5])


def test_the_model_ships_only_the_serving_modules_and_loads_from_them(registered: dict,
                                                                       tmp_path: Path) -> None:
    """The version's code is the serving modules alone (not all of stages/), and a fresh
    interpreter outside the project loads the wrapper from them and answers as torch does."""
    import mlflow.artifacts

    from stages.core.tracking.serving import SHIPPED

    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{MODEL_NAME}@champion", dst_path=str(tmp_path / "dl"),
        tracking_uri=registered["uri"]))
    files = {p.relative_to(local / "code").as_posix() for p in (local / "code").rglob("*.py")}
    assert {f for f in files if not f.endswith("__init__.py")} == set(SHIPPED)
    np.save(tmp_path / "x.npy", registered["images"][:4])  # export.serving_max_images here
    child = ("import json, sys, numpy as np, mlflow.pyfunc\n"
             f"m = mlflow.pyfunc.load_model({str(local)!r})\n"
             f"rows = m.predict(np.load({str(tmp_path / 'x.npy')!r}))\n"
             "print(json.dumps([[r['class'] for r in rows], sorted(\n"
             "    v.__file__ for k, v in sys.modules.items() if k.startswith('stages'))]))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", child], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    classes, modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert classes == [CLASSES[k] for k in registered["torch"][:4]]
    assert modules and all(Path(f).is_relative_to(local / "code") for f in modules)


def test_mlflow_models_serve_answers_raw_pixels(registered: dict, tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "serve.log"
    # The server runs `uvicorn` by name: the venv's bin first on PATH, as when it is active.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "PATH": path}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m",
           f"models:/{MODEL_NAME}@champion", "--env-manager", "local", "-h", "127.0.0.1",
           "-p", str(port), "-w", "1"]
    with open(log, "wb") as out:
        # Own session: the server's workers are stopped with it, by its process group.
        proc = subprocess.Popen(cmd, cwd=registered["root"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_up(proc, f"http://127.0.0.1:{port}/ping", log, timeout_s=180)
        url = f"http://127.0.0.1:{port}/invocations"
        two = registered["images"][:2]
        status, answer = _post(url, {"inputs": two.tolist()})
        assert status == 200, answer
        rows = answer["predictions"]
        probs = np.asarray([[r["probabilities"][c] for c in CLASSES] for r in rows])
        assert probs.shape == (2, len(CLASSES))
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        assert [r["class"] for r in rows] == [CLASSES[k] for k in registered["torch"][:2]]
        assert list(probs.argmax(1)) == list(registered["labels"][:2])  # trained: right too

        # Pixels divided by 255: MLflow's uint8 signature cast these to zeros and answered 200.
        status, answer = _post(url, {"inputs": (two / 255.0).tolist()})
        assert status == 400, answer
        assert answer["message"].startswith(
            f"this model takes uint8 pixels N x {SIZE} x {SIZE} x {CHANNELS}")
        assert "multiply by 255" in answer["message"]

        # More images than export.serving_max_images (4): a 400 before any is decoded or run.
        files = [_png_b64(img, 3 * SIZE) for img in registered["images"][:5]]
        status, answer = _post(url, {"inputs": files})
        assert status == 400 and "5 images in one request" in answer["message"], answer

        # Image files, at another size than the model's: decoded and resized by the wrapper.
        files = [_png_b64(img, 3 * SIZE) for img in registered["images"][2:4]]
        status, answer = _post(url, {"inputs": files})
        assert status == 200, answer
        want = _classes_of_files(files, registered["root"] / "models" / "finetuned.pt")
        assert [r["class"] for r in answer["predictions"]] == want
    finally:
        with_group = proc.poll() is None
        if with_group:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_predict_a_registered_model_on_a_folder(registered: dict, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from commands import predict

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    names = []
    for i, img in enumerate(registered["images"]):
        name = f"sub/img{i}.png" if i % 2 else f"img{i}.png"
        Image.fromarray(img[..., 0], "L").save(folder / name)
        names.append(str(folder / name))
    code = predict.main([f"models:/{MODEL_NAME}@champion", str(folder), "--json",
                         "--top-k", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"is version {registered['version']}" in err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in rows] == sorted(names)
    got = {r["image"]: r["top_k"][0]["class"] for r in rows}
    want = {n: CLASSES[k] for n, k in zip(names, registered["torch"], strict=True)}
    assert got == want


def test_predict_refuses_a_malformed_registry_uri(capsys: pytest.CaptureFixture[str]) -> None:
    from commands import predict

    assert predict.main(["models:/only-a-name", "x.png"]) == 2
    assert "models:/NAME@ALIAS" in capsys.readouterr().err
