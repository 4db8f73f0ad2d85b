"""L2-SP (stages/core/regularize.py): zero at the pretrained weights, a pull back toward them,
and the optimiser groups that replace the backbone's weight decay."""

from __future__ import annotations

import torch
from torch import nn

from stages.core.regularize import l2sp, l2sp_groups


def test_penalty_is_zero_at_the_pretrained_weights() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert l2sp(net, alpha=0.5)().item() == 0.0


def test_penalty_is_half_alpha_times_the_squared_distance() -> None:
    conv = nn.Conv2d(3, 4, 3, bias=True)
    penalty = l2sp(conv, alpha=0.2)
    with torch.no_grad():
        conv.weight.add_(0.5)   # 4*3*3*3 = 108 entries moved by 0.5
        conv.bias.add_(10.0)    # a bias is not anchored (nor decayed by weight decay)
    assert abs(penalty().item() - 0.5 * 0.2 * 108 * 0.25) < 1e-4


def test_gradient_steps_on_the_penalty_pull_back_toward_the_pretrained_weights() -> None:
    conv = nn.Conv2d(3, 4, 3)
    start = conv.weight.detach().clone()
    penalty = l2sp(conv, alpha=1.0)
    with torch.no_grad():
        conv.weight.add_(torch.randn_like(conv.weight))
    opt = torch.optim.SGD([conv.weight], lr=0.1)
    distances = []
    for _ in range(5):
        distances.append(float((conv.weight.detach() - start).norm()))
        opt.zero_grad()
        penalty().backward()
        opt.step()
    # Gradient alpha * (w - w0): each step shrinks the distance by exactly 1 - lr * alpha.
    for before, after in zip(distances, distances[1:], strict=False):
        assert abs(after - 0.9 * before) < 1e-4 * before


def test_groups_move_the_backbone_decay_to_the_penalty_and_keep_the_head_decay() -> None:
    backbone, head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.Linear(4, 2)
    on = l2sp_groups(backbone, head, 0.01, 0.1, 5e-4, alpha=0.01)
    off = l2sp_groups(backbone, head, 0.01, 0.1, 5e-4, alpha=0.0)
    def decays(groups: list[dict[str, object]], lr: float) -> set[float]:
        return {g["weight_decay"] for g in groups if g["lr"] == lr and any(
            p.ndim > 1 for p in g["params"])}  # type: ignore[attr-defined]
    assert decays(on, 0.01) == {0.0} and decays(on, 0.1) == {5e-4}
    assert decays(off, 0.01) == {5e-4} and decays(off, 0.1) == {5e-4}
