"""Every architecture by name: the output shape for grey and colour inputs, and a new head."""

from __future__ import annotations

import pytest
import torch

from stages.core.errors import BadInput
from stages.core.models import ARCHS, ModelSpec, _adapt_in_channels, build_model


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shape(arch: str, channels: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch, num_classes=7, in_channels=channels, image_size=16,
                                  width=8, dropout=0.1)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, 16, 16))
        features = model.backbone(torch.randn(2, channels, 16, 16))
    assert out.shape == (2, 7)
    assert features.shape == (2, model.head.in_features)
    assert torch.isfinite(out).all()
    model.replace_head(3)
    with torch.no_grad():
        assert model(torch.randn(2, channels, 16, 16)).shape == (2, 3)


def test_resnet_small_takes_any_size_from_8_px() -> None:
    model = build_model(ModelSpec("resnet_small", num_classes=4, in_channels=3, width=8)).eval()
    with torch.no_grad():
        for size in (8, 32, 40):
            assert model(torch.randn(1, 3, size, size)).shape == (1, 4)


def test_unknown_arch_and_weights_for_resnet_small_are_bad_input() -> None:
    with pytest.raises(BadInput, match="choose one of"):
        build_model(ModelSpec("vgg", num_classes=2))
    with pytest.raises(BadInput, match="no ImageNet weights"):
        build_model(ModelSpec("resnet_small", num_classes=2), weights="imagenet")


def test_a_grey_stem_is_the_rgb_kernels_summed() -> None:
    rgb = torch.nn.Conv2d(3, 8, 3, 2, 1, bias=False)
    grey = _adapt_in_channels(rgb, 1)
    assert (grey.in_channels, grey.stride, grey.bias) == (1, (2, 2), None)
    torch.testing.assert_close(grey.weight, rgb.weight.sum(dim=1, keepdim=True))
    assert _adapt_in_channels(rgb, 3) is rgb


def test_the_architectures_are_params_choices() -> None:
    from typing import get_args

    from stages.params import Arch

    assert get_args(Arch) == ARCHS


def test_the_model_module_loads_without_params_or_pydantic() -> None:
    """The logged PyTorch model unpickles stages.core.models with only torch, torchvision and
    numpy required: importing it once pulled in stages.params, pydantic and yaml."""
    import subprocess
    import sys

    code = ("import sys, stages.core.models; "
            "print(sorted(m for m in ('pydantic', 'yaml', 'stages.params') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
