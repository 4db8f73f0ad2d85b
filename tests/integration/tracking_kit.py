"""Helpers of the tracking and registry tests: a real `mlflow server` on 127.0.0.1, and tiny
ONNX/PyTorch models whose accuracy on a tiny target set is known in advance (1.0, 0.0 or the
share of one class), so a test can say which one must win a promotion. The fixtures that use
them are in conftest.py; subprocesses of the tests import this module too."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
SIZE, CHANNELS, CLASSES = 8, 1, ["a", "b"]
MEAN, STD = [0.5], [0.25]


# ---------------------------------------------------------------- an mlflow server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MlflowServer:
    """A running `mlflow server`; `restart` brings the same store back on the same address."""

    folder: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.folder / "server.db"

    def start(self, timeout_s: float = 120) -> MlflowServer:
        """Start it and return once /health answers. The job runner (genai jobs: six extra
        processes) is switched off: nothing here uses it."""
        log = self.folder / "server.log"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.db.as_posix()}",
               "--artifacts-destination", str(self.folder / "artifacts")]
        self.proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)  # a group: stop() gets all
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.proc.returncode}:\n"
                                   f"{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.25)
        self.kill()
        raise RuntimeError(f"mlflow server not up in {timeout_s} s:\n{log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the server and its workers (the whole process group it leads)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self) -> MlflowServer:
        self.kill()
        return self.start()


def start_mlflow_server(folder: Path, template_db: Path | None = None) -> MlflowServer:
    """`mlflow server` on 127.0.0.1 and a free port, SQLite backend and artifacts in `folder`
    (the backend copied from `template_db`, an empty store, when given: it skips the 5-8 s of
    table creation)."""
    folder.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(folder, _free_port())
    if template_db is not None:
        shutil.copy(template_db, server.db)
    return server.start()


def write_dvc_yaml(root: Path, stages: dict[str, Any]) -> None:
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))


# ---------------------------------------------------------------- tiny data and models


def tiny_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, CHANNELS), dtype=np.uint8)


def write_target(folder: Path, labels: np.ndarray, images: np.ndarray) -> None:
    """A canonical dataset whose every image is in the test split."""
    from stages.core.dataset import SPLIT_CODE
    from tests.helpers import save_dataset

    save_dataset(folder, images, labels, np.full(len(images), SPLIT_CODE["test"], np.uint8),
                  CLASSES, {"uri": "test:tiny", "role": "target"})


def tiny_model(kind: str, seed: int = 0) -> Any:
    """A resnet_small whose predictions on tiny_images() are known:

    'good' defines the labels (accuracy 1.0), 'bad' predicts the other class of two (its head
    negated: 0.0), 'medium' always says class 'b' (accuracy = the share of b, about 0.5).
    """
    import torch

    from stages.core.dataset import preprocess
    from stages.core.models import ModelSpec, build_model

    torch.manual_seed(seed)
    model = build_model(ModelSpec("resnet_small", len(CLASSES), CHANNELS, SIZE, width=2)).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(preprocess(tiny_images(64), MEAN, STD)))
        margin = logits[:, 1] - logits[:, 0]
        # Centre the decision so that both classes occur (a random net often says one class).
        model.head.bias[1] -= float(margin.median()) + 1e-4
        if kind == "bad":
            model.head.weight.neg_()
            model.head.bias.neg_()
        elif kind == "medium":
            model.head.bias[1] += 1e6
    return model


def labels_of(model: Any, images: np.ndarray) -> np.ndarray:
    import torch

    from stages.core.dataset import preprocess

    with torch.no_grad():
        return model(torch.from_numpy(preprocess(images, MEAN, STD))).argmax(1).numpy()


def save_tiny(model: Any, pt: Path, onnx_path: Path) -> None:
    """The model file (stages.core.models format) and an ONNX file with imagepipe metadata."""
    import onnx
    import torch

    from stages.core import onnxio
    from stages.core.models import ModelFile, save_model_file

    mf = ModelFile(spec=_spec(), classes=CLASSES, mean=MEAN, std=STD)
    save_model_file(pt, model, mf)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(1, CHANNELS, SIZE, SIZE)
    torch.onnx.export(model, (x,), str(onnx_path), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    proto = onnx.load(str(onnx_path))
    meta = {"classes": CLASSES, "image_size": SIZE, "channels": CHANNELS, "channel_order": "L",
            "mean": MEAN, "std": STD}
    onnx.helper.set_model_props(proto, onnxio.metadata_props(meta))
    onnx.save(proto, str(onnx_path))


def _spec() -> Any:
    from stages.core.models import ModelSpec

    return ModelSpec("resnet_small", len(CLASSES), CHANNELS, SIZE, width=2)


EXPORT_STAGE = {
    "cmd": "python -m stages.export",
    "deps": ["models/finetuned.pt", "data/target"],
    "params": ["export", "registry"],
    "outs": ["models/model.onnx"],
    "metrics": [{"metrics/export.json": {"cache": False}}],
}


def registration(onnx_path: Path, torch_path: Path, parity: Any, model_name: str,
                 target: Path) -> Any:
    """A Registration as stages/export.py builds it: two target images as the input example,
    the ONNX model's outputs for them, and export's default bound on a request's images."""
    from stages.core.tracking import Registration
    from stages.export import serving_example
    from stages.params import ExportParams

    example, outputs = serving_example(onnx_path, target)
    return Registration(onnx_path, torch_path, parity, model_name, target,
                        ExportParams().serving_max_images, example, outputs)
