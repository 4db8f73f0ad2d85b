"""Which device a stage trains and evaluates on, and in which precision.

device: auto (CUDA when it loads, else CPU), cuda or cpu; a stage the flow granted GPU slots
refuses to fall back to the CPU. precision: auto (bf16 where the GPU has it, else fp16 with loss
scaling), bf16, fp16 (GPU only) or fp32.
"""

from __future__ import annotations

import logging
import os

import torch

from stages.core.errors import BadInput
from stages.core.host import GPUS_GRANTED_ENV

log = logging.getLogger("imagepipe.train")


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
