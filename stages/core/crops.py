"""Random-resized crops on the training device, for stored images larger than the train size.

Input: per-image crop boxes drawn from a numpy Generator (`draw_boxes`) and a float B x C x H x W
batch on the device. Output: B x C x S x S crops resized to the train size S, flipped where
asked (`resized_crop`).

The boxes are drawn as torchvision's RandomResizedCrop draws them (area share in `scale`,
log-uniform aspect ratio in `ratio`), but for a whole epoch at once from the epoch's Generator,
so a resumed epoch draws the same crops; a box that does not fit is clamped to the image instead
of torchvision's ten tries and a centre-crop fallback (a loop per image, which is what this
module exists to avoid). The crop and resize are one `grid_sample` over the batch (bilinear,
no antialiasing: ImageNet-sized crops are downscaled by less than 2x to the train size).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F  # torch's own convention

# torchvision's RandomResizedCrop defaults (the ImageNet recipe).
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


def draw_boxes(rng: np.random.Generator, n: int, size: tuple[int, int]) -> np.ndarray:
    """n boxes (top, left, height, width) in pixels, float64, each inside an H x W image."""
    h, w = size
    area = h * w * rng.uniform(SCALE[0], SCALE[1], size=n)
    aspect = np.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1]), size=n))
    bw = np.clip(np.sqrt(area * aspect), 1.0, w)
    bh = np.clip(np.sqrt(area / aspect), 1.0, h)
    top = rng.uniform(0.0, 1.0, size=n) * (h - bh)
    left = rng.uniform(0.0, 1.0, size=n) * (w - bw)
    return np.stack([top, left, bh, bw], axis=1)


def resized_crop(x: torch.Tensor, boxes: np.ndarray, flips: np.ndarray, out: int) -> torch.Tensor:
    """Float B x C x H x W -> B x C x out x out: each image's box, resized, mirrored if flipped."""
    b, _, h, w = x.shape
    box = torch.from_numpy(np.asarray(boxes, dtype=np.float32)).to(x.device)
    top, left, bh, bw = box.unbind(1)
    sign = 1.0 - 2.0 * torch.from_numpy(np.asarray(flips, dtype=np.float32)).to(x.device)
    # affine_grid maps the output's [-1, 1] square onto the box, in the input's [-1, 1] frame
    # (align_corners=False: -1 and 1 are the outer edges of the border pixels).
    theta = torch.zeros((b, 2, 3), dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = sign * bw / w
    theta[:, 0, 2] = (2 * left + bw) / w - 1
    theta[:, 1, 1] = bh / h
    theta[:, 1, 2] = (2 * top + bh) / h - 1
    grid = F.affine_grid(theta, [b, x.shape[1], out, out], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
