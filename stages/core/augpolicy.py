"""params.augment's policy on a batch of images: uint8 N x H x W x C + one key per image ->
uint8 N x H x W x C.

The same steps as torchvision's v2 RandomResizedCrop, RandomHorizontalFlip, RandomRotation,
ColorJitter, GaussianNoise and RandomErasing, with their parameter ranges, but each image's
parameters drawn from its own torch.Generator seeded by its key (seed, copy, row): an image's
bytes depend on its key alone, not on the batch it sits in, the engine or the number of
workers. A v2 transform called on a batch draws one set of parameters for the whole batch, so
the stage used to call the policy image by image (about 110 images/s of 16-px images); here
crop, flip and rotation are one affine map per image and one grid_sample for the batch, the
colour steps are arithmetic on the batch (benchmarks/bench_augment.py measures both).
The bytes differ from v2's for the same seed: one bilinear resample instead of a bilinear
crop then a nearest-neighbour rotation, colour steps in float rather than on uint8.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from stages.params import AugmentParams

# The fixed ranges of the v2 transforms the policy stands for (their defaults).
CROP_RATIO = (3 / 4, 4 / 3)
ERASE_SCALE, ERASE_RATIO = (0.02, 0.33), (0.3, 3.3)
ATTEMPTS = 10  # v2's tries at a crop / an erased box that fits before it falls back
# Uniforms per image: crop area and ratio tries, crop position, flip, angle, four jitter
# factors, four for their order, erase or not, erase area and ratio tries, erase position.
_CROP, _POS, _FLIP, _ANGLE, _JIT, _ORDER, _ERASE, _EBOX, _EPOS = (
    0, 20, 22, 23, 24, 28, 32, 33, 53)
UNIFORMS = 55
_MASK64 = (1 << 64) - 1


def image_keys(seed: int, copy: int, rows: np.ndarray) -> np.ndarray:
    """One 63-bit generator seed per image: SplitMix64 of (seed, copy, row), so neighbouring
    rows or copies start unrelated streams (torch's CPU generator keeps 32 bits of a seed:
    the mixing spreads the three numbers over all of them)."""
    with np.errstate(over="ignore"):
        z = (np.asarray(rows, dtype=np.uint64)
             + np.uint64((seed * 0x9E3779B97F4A7C15 + copy * 0xBF58476D1CE4E5B9) & _MASK64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z >> np.uint64(1)


def draw(keys: np.ndarray, channels: int, size: int, noise: bool
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N x UNIFORMS uniforms, N x C x H x W standard normals or None), each image's from its
    own generator: two calls per image, whatever the batch."""
    import torch

    u = torch.empty(len(keys), UNIFORMS)
    z = torch.empty(len(keys), channels, size, size) if noise else None
    g = torch.Generator()
    for n, key in enumerate(keys.tolist()):
        g.manual_seed(key)
        torch.rand(UNIFORMS, generator=g, out=u[n])
        if z is not None:
            torch.randn(channels, size, size, generator=g, out=z[n])
    return u, z


def _boxes(u: torch.Tensor, side: int, scale: tuple[float, float], ratio: tuple[float, float],
           erase: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v2's box search, for every image at once: the first of ATTEMPTS (area, ratio) draws
    that fits; (height, width, found). u: N x 2*ATTEMPTS."""
    import torch

    area = side * side * (scale[0] + (scale[1] - scale[0]) * u[:, :ATTEMPTS])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, ATTEMPTS:2 * ATTEMPTS])
    # RandomResizedCrop: w = sqrt(area * ratio); RandomErasing: h = sqrt(area * ratio).
    a, b = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    h, w = (a, b) if erase else (b, a)
    fits = (h < side) & (w < side) if erase else (h > 0) & (h <= side) & (w > 0) & (w <= side)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    return h.gather(1, first)[:, 0], w.gather(1, first)[:, 0], fits.any(dim=1)


def _geometry(u: torch.Tensor, p: AugmentParams, size: int) -> torch.Tensor:
    """The sampling grid (N x H x W x 2, grid_sample's coordinates, NaN where the rotation
    leaves the image) of crop, then flip, then rotation, composed."""
    import torch

    n = len(u)
    h, w, found = _boxes(u[:, _CROP:_POS], size, tuple(p.crop_scale), CROP_RATIO, erase=False)
    h, w = torch.where(found, h, size), torch.where(found, w, size)  # v2's fallback: all of it
    top = torch.floor(u[:, _POS] * (size - h + 1))
    left = torch.floor(u[:, _POS + 1] * (size - w + 1))
    theta = (2 * u[:, _ANGLE] - 1) * math.radians(p.rotation)
    flip = torch.where(u[:, _FLIP] < 0.5, -1.0, 1.0) if p.hflip else torch.ones(n)
    axis = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1  # pixel centres
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    qx = cos * xs + sin * ys  # the output pixel in the cropped image, before rotation
    qy = -sin * xs + cos * ys
    outside = (qx.abs() > 1) | (qy.abs() > 1)  # v2's rotation fills it with 0
    qx = qx * flip[:, None, None]
    gx = (2 * left + w)[:, None, None] / size - 1 + qx * (w / size)[:, None, None]
    gy = (2 * top + h)[:, None, None] / size - 1 + qy * (h / size)[:, None, None]
    grid = torch.stack([gx, gy], dim=-1)
    return grid.masked_fill(outside[..., None], float("nan"))


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of N x 3 x H x W images in [0, 1] by `shift` turns (v2's adjust_hue)."""
    import torch

    r, g, b = x.unbind(1)
    top, _ = x.max(dim=1)
    low, _ = x.min(dim=1)
    span = top - low
    safe = torch.where(span == 0, torch.ones_like(span), span)
    rc, gc, bc = (top - r) / safe, (top - g) / safe, (top - b) / safe
    hue = torch.where(top == r, bc - gc, torch.where(top == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(span == 0, torch.zeros_like(hue), hue)
    hue = torch.remainder(hue / 6.0 + shift[:, None, None], 1.0)
    sat = span / torch.where(top == 0, torch.ones_like(top), top)
    i = torch.floor(hue * 6.0)
    f = hue * 6.0 - i
    i = i.to(torch.int64) % 6
    v = top
    p_, q, t = v * (1 - sat), v * (1 - sat * f), v * (1 - sat * (1 - f))
    table = torch.stack([torch.stack(c, 1) for c in (
        (v, t, p_), (q, v, p_), (p_, v, t), (p_, q, v), (t, p_, v), (v, p_, q))], 0)
    return table.gather(0, i[None, :, None].expand(1, -1, 3, -1, -1))[0]


def _jitter(x: torch.Tensor, u: torch.Tensor, strength: float) -> torch.Tensor:
    """Brightness, contrast, saturation and hue, each image with its own factors and its
    own order of the four (as v2's ColorJitter draws per call). Each step runs on the images
    whose turn it is, so the four cost what they would in a fixed order."""

    def factor(k: int, lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * u[:, _JIT + k])[:, None, None, None]

    colour = strength if x.shape[1] == 3 else 0.0  # saturation and hue: nothing on grey
    b = factor(0, max(0.0, 1 - strength), 1 + strength)
    c = factor(1, max(0.0, 1 - strength), 1 + strength)
    s = factor(2, max(0.0, 1 - colour), 1 + colour)
    h = factor(3, -colour / 10, colour / 10)[:, 0, 0, 0]
    steps: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = [
        lambda y, i: (y * b[i]).clamp(0, 1),
        lambda y, i: (c[i] * y + (1 - c[i]) * _grey(y).mean(dim=(1, 2, 3), keepdim=True)
                      ).clamp(0, 1),
        lambda y, i: (s[i] * y + (1 - s[i]) * _grey(y)).clamp(0, 1),
        lambda y, i: _hue(y, h[i])]
    order = u[:, _ORDER:_ORDER + 4].argsort(dim=1)  # a random permutation per image
    x = x.clone()
    for k in range(4):
        for op in range(4 if colour else 2):
            turn = (order[:, k] == op).nonzero()[:, 0]
            if len(turn):
                x[turn] = steps[op](x[turn], turn)
    return x


def _erase(x: torch.Tensor, u: torch.Tensor, prob: float) -> torch.Tensor:
    import torch

    size = x.shape[-1]
    h, w, found = _boxes(u[:, _EBOX:_EPOS], size, ERASE_SCALE, ERASE_RATIO, erase=True)
    on = found & (u[:, _ERASE] < prob)
    top = torch.floor(u[:, _EPOS] * (size - h + 1))
    left = torch.floor(u[:, _EPOS + 1] * (size - w + 1))
    axis = torch.arange(size, dtype=torch.float32)
    rows = (axis >= top[:, None]) & (axis < (top + h)[:, None])
    cols = (axis >= left[:, None]) & (axis < (left + w)[:, None])
    box = rows[:, :, None] & cols[:, None, :] & on[:, None, None]
    return x.masked_fill(box[:, None], 0.0)


def augment(p: AugmentParams, images: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """N x H x W x C uint8 -> N x H x W x C uint8, image n drawn from keys[n] alone."""
    import torch
    import torch.nn.functional as F  # torch's own name for it

    n, size, _, channels = images.shape
    if n == 0:
        return np.empty_like(images)
    u, z = draw(keys, channels, size, bool(p.noise_std))
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    grid = _geometry(u, p, size)
    # NaN marks what the rotation left; grid_sample would give 0 there too, but explicitly.
    missing = grid[..., 0].isnan()
    x = F.grid_sample(x, grid.nan_to_num(0.0), mode="bilinear", padding_mode="border",
                      align_corners=False).masked_fill(missing[:, None], 0.0)
    if p.color_jitter:
        x = _jitter(x, u, p.color_jitter)
    if z is not None:
        x = (x + p.noise_std * z).clamp(0, 1)
    if p.erasing:
        x = _erase(x, u, p.erasing)
    # v2's ToDtype(uint8, scale=True): x * (256 - 1e-3), truncated.
    out = (x * (256.0 - 1e-3)).to(torch.uint8)
    return out.permute(0, 2, 3, 1).contiguous().numpy()
