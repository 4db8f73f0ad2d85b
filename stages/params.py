"""params.yaml -> typed, frozen, validated objects. The only reader of params.yaml.

Every stage loads and validates the whole file, so a typo in any section stops any stage
before it does work. Errors are one line naming the dotted key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from stages.core.errors import BadInput
from stages.paramsfile import read_yaml

# Every number has an upper bound: `pretrain.width: 1.0e30` passed validation (pydantic takes
# an integral float as an int) and crashed pretrain with exit 70; `seed: 1.0e30` overflowed
# torch.manual_seed. The bounds are far above any sensible value, below any that breaks a stage.
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
BatchSize = Annotated[int, Field(gt=0, le=65_536)]
Epochs = Annotated[int, Field(ge=0, le=100_000)]
Images = Annotated[int, Field(ge=1, le=10_000_000)]
LearningRate = Annotated[float, Field(gt=0.0, le=100.0)]
Decay = Annotated[float, Field(ge=0.0, le=100.0)]


class _Section(BaseModel):
    # Unknown keys are refused (nanoGPT's habit): a typo must not silently become a default.
    # Every float is finite: `lr: .inf` and `export.parity_atol: .inf` were accepted, and the
    # second passed any model through the parity gate.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Pydantic's lax mode takes `epochs: true` as 1 (and `channels: true` as 1, `hflip: 1`
        as true); YAML's true/false are refused wherever the key is not a boolean, and a
        boolean key takes only true/false. Generic, so keys added later are covered too."""
        field = cls.model_fields.get(info.field_name or "")
        if field is None or value is None:
            return value
        if _mentions_bool(field.annotation):
            if not isinstance(value, bool):
                raise ValueError("must be true or false")
        elif isinstance(value, bool) or (
                isinstance(value, list | tuple) and any(isinstance(v, bool) for v in value)):
            raise ValueError("true/false is not allowed here (a boolean is not a number)")
        return value


def _mentions_bool(annotation: Any) -> bool:
    return annotation is bool or any(_mentions_bool(arg) for arg in get_args(annotation))


class DatasetRole(_Section):
    """One dataset role: where the images come from and which of them to keep."""

    uri: str = Field(pattern=r"^(sklearn|imagefolder|torchvision):.+$")
    # None keeps every class; a list keeps only these (by class name), in this order. At least
    # two: with one class, finetune and evaluate reported accuracy 1.0 for any model.
    classes: Annotated[list[str], Field(min_length=2)] | None = None
    # Keep at most this many training images per class (seeded choice); None keeps all.
    train_per_class: Images | None = None
    # torchvision: folder that holds (or receives) the files; relative to the project.
    root: str = "data/raw"
    download: bool = True
    # Per-role overrides of data.* (None: the data.* value). A role may be ingested at its own
    # size and channel count; finetune adapts the pretrained backbone (see stages/finetune.py).
    image_size: Annotated[int, Field(ge=8, le=1024)] | None = None
    channels: Literal[1, 3] | None = None
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None

    def filled(self, data: DataParams) -> DatasetRole:
        """This role with each per-role setting it leaves unset taken from `data`."""
        keys = ("image_size", "channels", "val_fraction", "test_fraction")
        return self.model_copy(update={k: getattr(data, k) for k in keys if getattr(self, k) is None})

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, classes: list[str] | None) -> list[str] | None:
        if classes is not None and len(set(classes)) != len(classes):
            raise ValueError("class names must be unique")
        return classes


class DataParams(_Section):
    source: DatasetRole
    target: DatasetRole
    image_size: Annotated[int, Field(ge=8, le=1024)] = 32
    channels: Literal[1, 3] = 3
    # Carved from the images a source ships without a split: all of sklearn:digits and of a flat
    # imagefolder; val only from the train images of torchvision sets and of folders with no
    # val/ (or no test/: their val/ becomes test). image_size, channels and both fractions are
    # defaults: data.<role>.<key> overrides them.
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    max_bad_fraction: Fraction = 0.01
    allow_leakage: bool = False
    # Images decoded per batch: bounds ingest's memory whatever the input size.
    batch_size: BatchSize = 512
    # imagefolder: a link that resolves outside the folder is skipped (and listed in
    # report.json) unless this is true: a class folder's a.png -> /etc/... was ingested.
    follow_symlinks: bool = False
    # Files over this size are skipped unread (report.json says so): a 2 GB ".png" raised
    # ingest's peak memory from 0.55 to 2.3 GB. The default is generous for the photos a
    # classifier ingests, and finite.
    max_file_mb: Annotated[float, Field(gt=0.0, le=1_000_000.0)] = 64.0
    # Images are stored in shards of at most this many MB (a set that fits is one shard; a
    # larger one has shards per class, so a change to one class rewrites only its shards).
    shard_mb: Annotated[int, Field(ge=1, le=16384)] = 256
    # Where decoding runs: a process pool over this machine's usable cores, or a Ray cluster
    # (RAY_ADDRESS, else ray_address, else a Ray started here) with the workspace on storage
    # every node mounts at the same path. Same params, same bytes on either.
    engine: Literal["local", "ray"] = "local"
    ray_address: str | None = None

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> DataParams:
        for name in ("source", "target"):
            r = getattr(self, name).filled(self)
            if r.val_fraction + r.test_fraction >= 1.0:
                raise ValueError(f"{name}: val_fraction ({r.val_fraction}) + test_fraction "
                                 f"({r.test_fraction}) must be below 1 (train would be empty)")
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
    batch_size: BatchSize = 256
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

    batch_size: BatchSize = 128
    optimizer: Literal["sgd", "adamw"] = "sgd"
    # Peak learning rate (after warm-up). SGD uses Nesterov momentum when momentum > 0.
    lr: LearningRate = 0.1
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: Decay = 5e-4
    # onecycle: linear warm-up then linear decay to 0; cosine: linear warm-up then cosine to 0.
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    warmup_epochs: Annotated[float, Field(ge=0.0, le=100_000.0)] = 0.0
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    # Online augmentation on the training device, every epoch: crop with reflect padding, flip.
    crop_padding: Annotated[int, Field(ge=0, le=16)] = 2
    hflip: bool = False
    # Checkpoint every N optimiser steps as well as every epoch (0: every epoch only).
    checkpoint_every_steps: Annotated[int, Field(ge=0, le=10**9)] = 0
    # Forward/backward passes per optimiser step, each on 1/N of the (per-process) batch, their
    # gradients summed (nanoGPT's gradient_accumulation_steps): the same effective batch in less
    # device memory. The fix when several processes run out of memory (one halves by itself).
    micro_batches: Annotated[int, Field(ge=1, le=4096)] = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch.compile the model (CUDA mostly: on a CPU the compile time rarely pays back).
    compile: bool = False
    # Training processes per machine (DistributedDataParallel when more than one): auto = every
    # visible GPU (1 on a CPU). batch_size stays the global batch: each process takes 1/N of it.
    devices: Annotated[int, Field(gt=0, le=1024)] | Literal["auto"] = 1
    # Minutes a collective (or joining the process group) may wait for the other processes
    # before the stage gives up with exit 75: a stopped or lost peer costs this, not NCCL's
    # 10 or gloo's 30 minutes.
    dist_timeout_min: Annotated[float, Field(gt=0, le=1440)] = 5.0
    # auto: bf16 where the GPU has it, else fp16 with loss scaling; fp32 on a CPU.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # torch.use_deterministic_algorithms on GPU runs (CPU runs are bit-reproducible already).
    deterministic: bool = False


class PretrainParams(TrainParams):
    epochs: Epochs = 5
    model: Arch = "resnet_small"
    # Channels of resnet_small's first layer (the others are 2x, 4x, 8x); other models ignore it.
    width: Annotated[int, Field(gt=0, le=1024)] = 32
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    # imagenet: start from torchvision's ImageNet weights (needs a network once).
    weights: Literal["none", "imagenet"] = "none"
    # Side of the training images. None: the stored size (data.image_size), with the padded
    # crop and flip above. Smaller: random-resized crops of this side from the stored images,
    # flipped when hflip, on the device (stages/core/crops.py); validation sees whole images.
    train_size: Annotated[int, Field(ge=8, le=1024)] | None = None
    # Who runs the training processes: local = this stage (one process, or DDP launched from
    # here over this machine's devices); ray = Ray Train workers (nodes x devices of them) on
    # the Ray cluster ingest uses (RAY_ADDRESS / data.ray_address), the one way to train on
    # several machines.
    engine: Literal["local", "ray"] = "local"
    # Machines (engine ray only).
    nodes: Annotated[int, Field(gt=0, le=100_000)] = 1
    # engine ray: times Ray Train restarts the workers from the last checkpoint after a worker
    # or node is lost, before the stage gives up with 75.
    restarts: Annotated[int, Field(ge=0, le=100)] = 2

    @model_validator(mode="after")
    def _machines_on_ray(self) -> PretrainParams:
        if self.nodes > 1 and self.engine == "local":
            raise ValueError("several machines train with pretrain.engine: ray (README, "
                             "'A Ray cluster')")
        return self


class FinetuneParams(TrainParams):
    # Phase 1: new head only, backbone frozen (BatchNorm statistics included), lr = lr.
    head_epochs: Epochs = 3
    # Phase 2: everything trains; backbone lr = backbone_lr_scale x lr.
    full_epochs: Epochs = 5
    backbone_lr_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    # L2-SP strength alpha (phase 2): 0 = the backbone decays toward zero (weight_decay); > 0 =
    # its weight decay is replaced by alpha/2 * ||w - w_pretrained||^2 in the loss (the head
    # keeps weight_decay). The scratch baseline has no pretrained weights: it keeps weight_decay.
    l2sp: Decay = 0.0
    # The same network trained from scratch on the same data, epochs (head + full) and schedule.
    baseline: bool = True
    # Learning rate of the from-scratch baseline (tuned on its own, never weakened).
    scratch_lr: LearningRate = 0.1
    # Each model file holds the epoch with the best validation accuracy (ties: the lower val
    # loss, then the earlier epoch), the finetuned model's over both phases and the baseline's
    # alike; false: the last epoch. A model whose accuracy peaked early was shipped degraded.
    keep_best: bool = True

    def baseline_view(self) -> FinetuneParams:
        """What the from-scratch baseline (stages/scratch.py) trains with: these params with
        the transfer-only keys at their defaults, so they cannot reach it."""
        return self.model_copy(update={k: type(self).model_fields[k].default
                                       for k in TRANSFER_ONLY})

    @model_validator(mode="after")
    def _some_training(self) -> FinetuneParams:
        if self.head_epochs + self.full_epochs == 0:
            raise ValueError("head_epochs + full_epochs must be at least 1")
        return self


# finetune keys that only the transfer reads, and keys that only the baseline reads. dvc.yaml's
# scratch stage lists every finetune key but TRANSFER_ONLY and its finetune stage every key but
# BASELINE_ONLY, so a change to one (finetune.l2sp, say) leaves the other stage up to date.
TRANSFER_ONLY = ("lr", "backbone_lr_scale", "l2sp")
BASELINE_ONLY = ("baseline", "scratch_lr")


class EvaluateParams(_Section):
    batch_size: BatchSize = 256
    # Equal-width confidence bins of the expected calibration error.
    ece_bins: Annotated[int, Field(ge=2, le=100)] = 15
    device: Literal["auto", "cpu", "cuda"] = "auto"


class AuditParams(_Section):
    """The label and image audit of the target set (stages/audit.py)."""

    # Folds of the cross-validated linear probe: each image's class probabilities come from a
    # probe that never saw it (confident learning needs out-of-sample probabilities).
    folds: Annotated[int, Field(ge=2, le=20)] = 5
    # Inverse L2 strength of the logistic-regression probe on standardised features.
    probe_c: Annotated[float, Field(gt=0.0, le=1e6)] = 0.1
    # Near-duplicate across splits: a val/test image whose grey 8x8 thumbnail (mean removed,
    # unit length) has at least this cosine with an earlier split's image. On digits, resized
    # JPEG copies scored >= 0.998 and genuine look-alikes <= 0.990 (stages/core/imageissues.py).
    near_duplicate_similarity: Annotated[float, Field(gt=0.0, le=1.0)] = 0.995
    # Dark: the 99th percentile of an image's luminance (0..1) is below this (nothing bright).
    dark_below: Fraction = 0.15
    # Low information: the entropy of its grey levels is below this many bits (a flat image).
    low_information_below: Annotated[float, Field(ge=0.0, le=8.0)] = 1.0
    # Blurry: its sharpness (variance of the Laplacian over the variance of the image) is below
    # this fraction of the set's median (sharpness depends on the set's size and content).
    blurry_below: Fraction = 0.2
    # Images in plots/label_issues.png (the top-ranked label issues).
    grid_images: Annotated[int, Field(ge=1, le=100)] = 24
    # Gate: the stage exits 2 when images with any issue exceed this fraction of the target
    # set; null: off (the audit reports, never blocks).
    max_issue_fraction: Fraction | None = None
    # The backbone's one pass over every target image (features for the label probe; the
    # near-duplicate check compares thumbnails, not features).
    batch_size: BatchSize = 256
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ExportParams(_Section):
    # 18: the opset torch 2.14's dynamo exporter writes natively (others go through onnx's
    # version converter) and that onnxruntime 1.20+ runs in full.
    opset: Annotated[int, Field(ge=13, le=23)] = 18
    # Target images for the parity gate: the test split, topped up from val/train if smaller.
    parity_images: Images = 256
    # The gate is np.allclose's test on every logit and probability, ORT's CPU provider from
    # uint8 pixels against torch: |onnx - torch| <= parity_atol + parity_rtol * |torch|, as
    # timm checks its exports. Relative, because fp32 rounding grows with the logits: an
    # absolute 1e-4 left a 3x margin on the digits model and would refuse larger models.
    parity_atol: Annotated[float, Field(gt=0.0, le=0.1)] = 1e-4
    parity_rtol: Annotated[float, Field(ge=0.0, le=0.1)] = 1e-3
    # Extra artifacts in models/onnx_variants/, each with its accuracy delta on the test split.
    quantize_int8: bool = True
    calibration_images: Images = 256
    fp16: bool = True  # written only where the CUDA provider loads (fp16 runs on GPUs only)
    # ORT (and torch) threads for the parity gate and variant scoring; 0 = every usable core.
    # Timings are not the stage's business: `make bench` measures ORT against torch.
    threads: Annotated[int, Field(ge=0, le=4096)] = 0
    # Which model becomes model.onnx: best = the finetuned model or the from-scratch baseline,
    # whichever has the higher validation accuracy (a tie keeps the finetuned one); never the
    # test split, which is evaluate's. The choice is logged, in the metrics and in the
    # registered version's description.
    model: Literal["finetuned", "scratch", "best"] = "best"
    # Most images one request to the served model (`mlflow models serve`) may carry: more is a
    # 400 before any is decoded or run (the serving wrapper, stages/core/tracking/serving.py).
    serving_max_images: Annotated[int, Field(ge=1, le=1_000_000)] = 1024


class RegistryParams(_Section):
    model_name: str = Field(default="imagepipe-classifier", min_length=1)
    min_improvement: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


class Params(_Section):
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0  # torch.manual_seed's range
    # How a stage checks a dataset against its manifest before reading it
    # (stages/core/integrity.py): sha256 re-hashes every shard (a flipped byte is exit 2, not a
    # model trained on it); size only checks each file is complete, for sets too large to
    # re-read each stage, and every stage says so in its log. Top level, and in no stage's
    # dvc.yaml params: it changes no output, so changing it reruns nothing.
    verify_data: Literal["sha256", "size"] = "sha256"
    data: DataParams
    augment: AugmentParams = AugmentParams()
    pretrain: PretrainParams = PretrainParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    audit: AuditParams = AuditParams()
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


def load_params(path: str | Path) -> Params:
    """Read and validate params.yaml; raise BadInput naming the bad key (or what is wrong with
    the file itself: missing, a folder, not UTF-8, too large, nested too deeply)."""
    return parse_params(read_yaml(Path(path)))
