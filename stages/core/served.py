"""The exported graph's module: a classifier behind its own preprocessing (stages/export.py).

Input: uint8 N x H x W x C pixels. Output: (probabilities, logits). Its own module so that
export.py imports torch only when it exports.
"""

from __future__ import annotations

import torch
from torch import nn

from stages.core.models import Classifier


class Served(nn.Module):
    """The classifier behind its own preprocessing: uint8 N x H x W x C pixels in,
    (probabilities, logits) out. The same arithmetic as dataset.preprocess, in float32 and in
    the same order (x / 255, then (x - mean) / std), so the graph matches the training input."""

    def __init__(self, model: Classifier, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        logits = self.model((x - self.mean) / self.std)
        return torch.softmax(logits, dim=1), logits
