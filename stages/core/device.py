"""Which device a stage trains and evaluates on, in which precision, and how (`Runtime`).

device: auto (CUDA when it loads, else CPU), cuda or cpu; a stage the flow granted GPU slots
refuses to fall back to the CPU. precision: auto (bf16 where the GPU has it, else fp16 with loss
scaling), bf16, fp16 (GPU only) or fp32. Input: a training section of params.yaml and this
process's place among the training processes; output: a `Runtime`.
"""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from stages.core.distributed import SINGLE, Comm, current
from stages.core.errors import BadInput
from stages.core.host import GPUS_GRANTED_ENV, usable_cores
from stages.params import TrainParams

log = logging.getLogger("imagepipe.train")

# torch.compile's backend when `compile: true`: inductor (the default: generated kernels, what a
# GPU run wants), or one named here, e.g. aot_eager, the same capture (dynamo, AOTAutograd)
# without generating code. The CPU tests use that one: inductor's C++ build of a two-layer net's
# graphs took 45 s on the 2-core test machine (tests/unit/test_train.py).
COMPILE_BACKEND_ENV = "IMAGEPIPE_COMPILE_BACKEND"


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    channels_last: bool
    compile: bool
    fp16: bool = False  # fp16 autocast with loss scaling (GPUs without bf16)
    comm: Comm = SINGLE

    def autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.bf16 else torch.float16,
                              enabled=self.bf16 or self.fp16)

    def backend(self) -> str:
        return os.environ.get(COMPILE_BACKEND_ENV) or "inductor"


def select_device(name: str) -> torch.device:
    granted = int(os.environ.get(GPUS_GRANTED_ENV) or 0)  # the flow gave this stage GPU slots
    if name != "cpu" and granted and not torch.cuda.is_available():
        raise BadInput(f"the flow granted {granted} GPU(s) (CUDA_VISIBLE_DEVICES="
                       f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}) but CUDA does not "
                       "load in this process: check the driver and the container's GPU runtime, "
                       "or set device: cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput("device: cuda was asked for but no CUDA device is visible; use auto or cpu")
    return torch.device(name)


def resolve_precision(asked: str, device: torch.device) -> str:
    """bf16, fp16 or fp32 for `asked` on `device` (nanoGPT's rule: bf16 where supported)."""
    if device.type != "cuda":
        if asked == "fp16":
            raise BadInput("precision: fp16 needs a CUDA device (its loss scaling is for GPUs); "
                           "use auto, bf16 or fp32")
        return "bf16" if asked == "bf16" else "fp32"
    if asked in ("auto", "bf16"):
        if torch.cuda.is_bf16_supported():
            return "bf16"
        if asked == "bf16":
            log.warning("precision: this GPU has no bf16: fp16 with loss scaling instead")
        return "fp16"
    return asked


def make_runtime(p: TrainParams) -> Runtime:
    """The device, precision and thread count of a training run in this process."""
    comm = current()
    device = select_device(p.device)
    if device.type == "cuda":
        device = torch.device("cuda", comm.local_rank if comm.world > 1 else torch.cuda.current_device())
        # Fixed input shapes: let cuDNN time its algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = not p.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if p.deterministic:  # cuBLAS reads its workspace setting at its first call
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic = True
    else:
        # The ranks of one machine share its cores: all of them each would oversubscribe it.
        torch.set_num_threads(max(1, usable_cores() // comm.local_world))
        # Weights that decay towards zero become denormal floats, which x86 CPUs compute at a
        # fraction of the speed: finetuning a pretrained resnet_small ran 2x slower without this.
        torch.set_flush_denormal(True)
    precision = resolve_precision(p.precision, device)
    return Runtime(device, bf16=precision == "bf16", channels_last=device.type == "cuda",
                   compile=p.compile, fp16=precision == "fp16", comm=comm)
