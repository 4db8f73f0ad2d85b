"""L2-SP (Li, Grandvalet & Davoine 2018): an L2 penalty toward the pretrained weights instead of
toward zero. module + alpha -> a callable returning alpha/2 * ||w - w_pretrained||^2.

Why: with 50 labels a class, weight decay toward zero pulls the backbone away from the features
that make transfer worth doing; anchoring it at its starting point keeps them unless the target
data pays for the change. The anchor is the weights when `l2sp` is called (finetune calls it
at the start of phase 2, when the backbone is still the pretrained one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def l2sp(module: nn.Module, alpha: float) -> Callable[[], torch.Tensor]:
    """The penalty alpha/2 * sum ||w - w0||^2 over `module`'s weights of two or more dimensions:
    those that weight decay would touch (biases and norm scales are not decayed either way)."""
    weights = [p for p in module.parameters() if p.ndim > 1]
    anchors = [p.detach().clone() for p in weights]

    def penalty() -> torch.Tensor:
        total = sum((w.float() - a.float()).pow(2).sum() for w, a in zip(weights, anchors, strict=True))
        return 0.5 * alpha * total  # type: ignore[return-value]

    return penalty


def l2sp_groups(backbone: nn.Module, head: nn.Module, backbone_lr: float, head_lr: float,
                weight_decay: float, alpha: float) -> list[dict[str, object]]:
    """Optimiser groups for phase 2: with alpha > 0 the backbone gets no weight decay (L2-SP
    replaces it), the head keeps the ordinary one. Biases and norm weights are never decayed."""
    from stages.core.train import param_groups

    backbone_decay = 0.0 if alpha > 0 else weight_decay
    return (param_groups(backbone, backbone_lr, backbone_decay)
            + param_groups(head, head_lr, weight_decay))
