"""Model architectures by name, and the model file every later stage loads.

Every model is a `Classifier`: a backbone that maps N x C x H x W to pooled features N x F,
then dropout and a linear head. Transfer swaps the head; freezing means the backbone.

Model file (models/*.pt, torch.save of a plain dict, loaded with weights_only=True):
  state_dict, spec (ModelSpec as dict), classes, mean, std, extra

Input contract, the same in training, ONNX and serving: float32 N x C x H x W, channels in
RGB order (or one grey channel), x = (uint8 / 255 - mean[c]) / std[c]: stages.core.dataset's
`preprocess` (numpy only, so serving need not import torch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.core.errors import BadInput
from stages.core.io import save_torch

# params.yaml's choices (stages.params.Arch; a test keeps the two equal). Not imported from there:
# the logged PyTorch model unpickles this module where only torch, torchvision and numpy are.
ARCHS = ("resnet_small", "resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0")
# Above this input size the torchvision stems keep their ImageNet downsampling.
SMALL_INPUT = 64


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    num_classes: int
    in_channels: int = 3
    image_size: int = 32
    width: int = 32
    dropout: float = 0.0
    # torchvision archs: the CIFAR-style stem (3x3 stride 1, no max-pool) or ImageNet's. None:
    # decided by image_size (<= SMALL_INPUT). Finetune pins it when the target's size differs
    # from the source's, so the pretrained stem's weights still fit.
    small_stem: bool | None = None

    @property
    def uses_small_stem(self) -> bool:
        return self.small_stem if self.small_stem is not None else self.image_size <= SMALL_INPUT


@dataclass
class ModelFile:
    spec: ModelSpec
    classes: list[str]
    mean: list[float]
    std: list[float]
    extra: dict[str, Any] = field(default_factory=dict)


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, features: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))

    def replace_head(self, num_classes: int) -> None:
        self.head = nn.Linear(self.head.in_features, num_classes)


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def resnet_small(in_channels: int, width: int) -> tuple[nn.Module, int]:
    """ResNet-9 style (the DAWNBench/airbench family, scaled by `width`): conv, then three
    stages of conv + 2x2 max-pool, two with a residual block. Pooling instead of strided
    convs keeps it cheap on a CPU; adaptive pooling makes it work at any input size >= 8."""
    w = width
    backbone = nn.Sequential(
        _conv_bn(in_channels, w),
        _conv_bn(w, 2 * w), nn.MaxPool2d(2), _Residual(2 * w),
        _conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
        _conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), _Residual(8 * w),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(),
    )
    return backbone, 8 * w


def _torchvision_backbone(spec: ModelSpec, weights: str) -> tuple[nn.Module, int]:
    import torchvision.models as tvm

    builder = getattr(tvm, spec.arch)
    w = "DEFAULT" if weights == "imagenet" else None
    try:
        net = builder(weights=w)
    except Exception as err:  # noqa: BLE001 - a failed weight download, whatever the cause
        raise BadInput(f"{spec.arch}: ImageNet weights could not be loaded ({type(err).__name__}: "
                       f"{err}); needs a network once, or set pretrain.weights: none") from None
    small = spec.uses_small_stem
    if spec.arch.startswith("resnet"):
        feats = net.fc.in_features
        net.fc = nn.Identity()
        if small:  # CIFAR-style stem: 3x3 stride 1 and no max-pool keep small inputs' detail
            net.conv1 = nn.Conv2d(spec.in_channels, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif spec.in_channels != 3:
            net.conv1 = _adapt_in_channels(net.conv1, spec.in_channels)
        return net, feats
    stem = net.features[0][0]
    last = -1 if spec.arch == "efficientnet_b0" else 0  # the Linear after pooling
    feats = net.classifier[last].in_features
    net.classifier = nn.Identity()
    new_stem = _adapt_in_channels(stem, spec.in_channels)
    if small:
        new_stem.stride = (1, 1)
    net.features[0][0] = new_stem
    return net, feats


def _adapt_in_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A torchvision RGB stem conv for `in_channels` (1 or 3, params.yaml's choices), its
    weights converted as convert_in_channels does."""
    if conv.in_channels == in_channels:
        return conv
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None)
    want = {k: v.shape for k, v in new.state_dict().items()}
    new.load_state_dict(convert_in_channels(conv.state_dict(), want)[0])
    return new


def convert_in_channels(state: dict[str, torch.Tensor], want: dict[str, torch.Size]
                        ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A state dict for the same network with other input channels (1 <-> 3: finetune's adapted
    spec changes nothing else): the weights whose shapes differ, the first conv's, are converted.

    Grey -> colour repeats the grey kernel over R, G and B divided by 3, so an image with
    R = G = B gives the pretrained response; colour -> grey sums the three kernels.
    Returns the state dict and the converted keys."""
    out, converted = dict(state), []
    for key, shape in want.items():
        have = state[key]
        if have.shape != shape:
            out[key] = have.repeat(1, 3, 1, 1) / 3.0 if shape[1] == 3 else have.sum(dim=1, keepdim=True)
            converted.append(key)
    return out, converted


def build_model(spec: ModelSpec, weights: str = "none") -> Classifier:
    if spec.arch not in ARCHS:
        raise BadInput(f"unknown model {spec.arch!r}: choose one of {ARCHS}")
    if spec.arch == "resnet_small":
        if weights != "none":
            raise BadInput("resnet_small has no ImageNet weights: set pretrain.weights: none")
        backbone, feats = resnet_small(spec.in_channels, spec.width)
    else:
        backbone, feats = _torchvision_backbone(spec, weights)
    return Classifier(backbone, feats, spec.num_classes, spec.dropout)


def save_model_file(path: str | Path, model: Classifier, mf: ModelFile) -> None:
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "spec": asdict(mf.spec), "classes": list(mf.classes),
        "mean": list(mf.mean), "std": list(mf.std), "extra": dict(mf.extra),
    }
    save_torch(payload, path)


def load_model_file(path: str | Path) -> tuple[Classifier, ModelFile]:
    """Load a model file into an eval-mode model on the CPU."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path} does not exist: run the stage that makes it")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    mf = ModelFile(spec=ModelSpec(**raw["spec"]), classes=list(raw["classes"]),
                   mean=list(raw["mean"]), std=list(raw["std"]), extra=dict(raw.get("extra", {})))
    model = build_model(mf.spec)
    model.load_state_dict(raw["state_dict"])
    return model.eval(), mf
