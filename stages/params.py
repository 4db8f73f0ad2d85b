"""params.yaml -> typed, frozen, validated objects. The only reader of params.yaml.

Every stage loads and validates the whole file, so a typo in any section stops any stage
before it does work. Errors are one line naming the dotted key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stages.core.errors import BadInput

DEFAULT_PATH = Path("params.yaml")

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]


class _Section(BaseModel):
    # Unknown keys are refused (nanoGPT's habit): a typo must not silently become a default.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DatasetRole(_Section):
    """One dataset role: where the images come from and which of them to keep."""

    uri: str = Field(pattern=r"^(sklearn|imagefolder|torchvision):.+$")
    # None keeps every class; a list keeps only these (by class name), in this order.
    classes: list[str] | None = Field(default=None, min_length=1)
    # Keep at most this many training images per class (seeded choice); None keeps all.
    train_per_class: PositiveInt | None = None
    # torchvision: folder that holds (or receives) the files; relative to the project.
    root: str = "data/raw"
    download: bool = True

    @model_validator(mode="after")
    def _unique_classes(self) -> DatasetRole:
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("class names must be unique")
        return self


class DataParams(_Section):
    source: DatasetRole
    target: DatasetRole
    image_size: Annotated[int, Field(ge=8, le=1024)] = 32
    channels: Literal[1, 3] = 3
    # Used only when a source has no split of its own (sklearn:digits, a flat imagefolder).
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    max_bad_fraction: Fraction = 0.01
    allow_leakage: bool = False
    # Images decoded per batch: bounds ingest's memory whatever the input size.
    batch_size: PositiveInt = 512

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> DataParams:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1 (train would be empty)")
        return self


class AugmentParams(_Section):
    copies: Annotated[int, Field(ge=0, le=100)] = 2
    # Random resized crop: area fraction kept, as [min, max].
    crop_scale: tuple[Fraction, Fraction] = (0.8, 1.0)
    hflip: bool = False
    rotation: Annotated[float, Field(ge=0.0, le=180.0)] = 10.0
    # Colour jitter strength for brightness, contrast and saturation (hue is a tenth of it).
    color_jitter: Fraction = 0.2
    # Probability of erasing one random rectangle.
    erasing: Fraction = 0.0
    # Gaussian noise std on the [0, 1] scale.
    noise_std: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    batch_size: PositiveInt = 256
    preview_per_class: Annotated[int, Field(ge=1, le=16)] = 4

    @model_validator(mode="after")
    def _ordered_scale(self) -> AugmentParams:
        lo, hi = self.crop_scale
        if lo <= 0 or lo > hi:
            raise ValueError("crop_scale must be [min, max] with 0 < min <= max <= 1")
        return self


Arch = Literal["resnet_small", "resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0"]


class TrainParams(_Section):
    """What pretrain and finetune share: optimiser, schedule, online augmentation, device."""

    batch_size: PositiveInt = 128
    optimizer: Literal["sgd", "adamw"] = "sgd"
    # Peak learning rate (after warm-up). SGD uses Nesterov momentum when momentum > 0.
    lr: PositiveFloat = 0.1
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: NonNegFloat = 5e-4
    # onecycle: linear warm-up then linear decay to 0; cosine: linear warm-up then cosine to 0.
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    warmup_epochs: Annotated[float, Field(ge=0.0)] = 0.0
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    # Online augmentation on the training device, every epoch: crop with reflect padding, flip.
    crop_padding: Annotated[int, Field(ge=0, le=16)] = 2
    hflip: bool = False
    # Checkpoint every N optimiser steps as well as every epoch (0: every epoch only).
    checkpoint_every_steps: Annotated[int, Field(ge=0)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch.compile the model (CUDA mostly: on a CPU the compile time rarely pays back).
    compile: bool = False


class PretrainParams(TrainParams):
    epochs: Annotated[int, Field(ge=0)] = 5
    model: Arch = "resnet_small"
    # Channels of resnet_small's first layer (the others are 2x, 4x, 8x); other models ignore it.
    width: PositiveInt = 32
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    # imagenet: start from torchvision's ImageNet weights (needs a network once).
    weights: Literal["none", "imagenet"] = "none"


class FinetuneParams(TrainParams):
    # Phase 1: new head only, backbone frozen (BatchNorm statistics included), lr = lr.
    head_epochs: Annotated[int, Field(ge=0)] = 3
    # Phase 2: everything trains; backbone lr = backbone_lr_scale x lr.
    full_epochs: Annotated[int, Field(ge=0)] = 5
    backbone_lr_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    # The same network trained from scratch on the same data, epochs (head + full) and schedule.
    baseline: bool = True
    # Learning rate of the from-scratch baseline (tuned on its own, never weakened).
    scratch_lr: PositiveFloat = 0.1

    @model_validator(mode="after")
    def _some_training(self) -> FinetuneParams:
        if self.head_epochs + self.full_epochs == 0:
            raise ValueError("head_epochs + full_epochs must be at least 1")
        return self


class EvaluateParams(_Section):
    batch_size: PositiveInt = 256
    # Equal-width confidence bins of the expected calibration error.
    ece_bins: Annotated[int, Field(ge=2, le=100)] = 15
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ExportParams(_Section):
    # 18: the opset torch 2.14's dynamo exporter writes natively (others go through onnx's
    # version converter) and that onnxruntime 1.20+ runs in full.
    opset: Annotated[int, Field(ge=13, le=23)] = 18
    # Target images for the parity gate: the test split, topped up from val/train if smaller.
    parity_images: Annotated[int, Field(ge=1)] = 256
    parity_atol: PositiveFloat = 1e-4
    # Extra artifacts in models/onnx_variants/, each with its accuracy delta on the test split.
    quantize_int8: bool = True
    calibration_images: Annotated[int, Field(ge=1)] = 256
    fp16: bool = True  # written only where the CUDA provider loads (fp16 runs on GPUs only)
    # Threads for the ORT-vs-torch timing, the same on both sides; 0 = every usable core.
    threads: Annotated[int, Field(ge=0)] = 0
    # Interleaved timing rounds (ORT, torch, ORT, ...); metrics report the medians.
    timing_repeats: Annotated[int, Field(ge=1, le=100)] = 7


class RegistryParams(_Section):
    model_name: str = Field(default="imagepipe-classifier", min_length=1)
    min_improvement: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


class Params(_Section):
    seed: Annotated[int, Field(ge=0)] = 0
    data: DataParams
    augment: AugmentParams = AugmentParams()
    pretrain: PretrainParams = PretrainParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    registry: RegistryParams = RegistryParams()


def _explain(err: ValidationError) -> str:
    """One line: the dotted key of the first problem and what is allowed there."""
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{key}: unknown key (check the spelling; see params.yaml for the allowed keys)"
    if first["type"] == "missing":
        return f"{key}: required key is missing"
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
    return f"{key}: {msg}{shown}"


def parse_params(raw: Any) -> Params:
    """Validate an already-loaded mapping; raise BadInput with one clear line."""
    if not isinstance(raw, dict):
        raise BadInput("params: the file must hold a mapping of sections")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise BadInput(f"params.{_explain(err)}") from None


def load_params(path: str | Path = DEFAULT_PATH) -> Params:
    """Read and validate params.yaml; raise BadInput naming the bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"params: {path} does not exist") from None
    except yaml.YAMLError as err:
        raise BadInput(f"params: {path} is not valid YAML: {err}".splitlines()[0]) from None
    return parse_params(raw)


def flatten(section: BaseModel, prefix: str = "") -> dict[str, Any]:
    """A section as flat dotted keys (for MLflow params)."""
    return {f"{prefix}{key}": value for key, value in flatten_dict(section.model_dump()).items()}


def flatten_dict(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys ({"a": {"b": 1}} -> {"a.b": 1}); anything
    that is not a mapping (lists included) is a leaf."""
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten_dict(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
