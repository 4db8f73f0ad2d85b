"""A model file's network run on a dataset's uint8 images: logits (evaluate scores the test
split with them) or backbone features (audit's probe learns from them).

Input: a model file, the dataset it is to score, batch size and device. Output: float32 arrays,
N x classes or N x features, in the order of the images given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from stages.core.dataset import Dataset
from stages.core.device import Runtime, select_device
from stages.core.errors import BadInput
from stages.core.models import load_model_file
from stages.core.stream import batches
from stages.core.train import predict, prepare
from stages.params import AuditParams, EvaluateParams


class Scorer:
    """The model file's network on the device `p.device` names, checked against the dataset:
    the same classes, in the same order, and images of the size and channels it takes."""

    def __init__(self, path: Path, ds: Dataset, p: EvaluateParams | AuditParams) -> None:
        self.model, self.mf = load_model_file(path)
        if self.mf.classes != ds.classes:
            raise BadInput(f"{path} predicts {self.mf.classes} but the dataset has {ds.classes}: "
                           "run finetune on this target set")
        want = (self.mf.spec.image_size, self.mf.spec.image_size, self.mf.spec.in_channels)
        if ds.image_shape != want:
            raise BadInput(f"{path} takes {want[0]} px x {want[2]} channels but the dataset's images "
                           f"are {ds.image_shape[0]} px x {ds.image_shape[2]}: run finetune on "
                           "this target set")
        device = select_device(p.device)
        self.rt = Runtime(device, bf16=device.type == "cuda", channels_last=False, compile=False)
        self.net = prepare(self.model, self.rt)
        self.batch_size = p.batch_size

    def logits(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self._run(self.net, images, labels)

    def features(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The backbone's output, before the head (fp32)."""
        return self._run(self.model.backbone, images, labels)

    def _run(self, net: nn.Module, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        # Resident where the images fit on the device, else streamed (stream.py).
        feed = batches(images, labels, np.arange(len(labels)), device=self.rt.device,
                       mean=self.mf.mean, std=self.mf.std, batch_size=self.batch_size,
                       train=False)
        return predict(net, feed, self.rt)
