"""One decoded image to the canonical form every stage and the server use: uint8 size x size x
channels, upright, opaque, centre-cropped; and the limits on a file read for it.

Here rather than in stages/core/sources.py (which reads files for ingest and uses these limits)
so that the serving artifact ships it without ingest's readers (stages/core/tracking/serving.py).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

# Pixels above which a file is refused as a decompression bomb (Pillow's own default limit).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# A file over this is refused before it is read (data.max_file_mb): one hostile 2 GB ".png"
# raised ingest's peak memory from 0.55 to 2.3 GB when candidates were read whole.
DEFAULT_MAX_FILE_BYTES = 64 * 2**20

# Keys whose presence may rotate or composite an image: such files take the full path.
_NOT_PLAIN = frozenset({"exif", "xmp", "XML:com.adobe.xmp", "transparency"})


def canonical(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """Any mode and size -> uint8 size x size x channels: upright, opaque, centre-cropped.

    A JPEG or PNG already in the wanted mode and size, with nothing that rotates or composites
    it, is its own pixels: returned at once (the same bytes; 1.4x on CIFAR's JPEGs, where
    exif_transpose and copies dominated)."""
    if (img.mode == ("RGB" if channels == 3 else "L") and img.size == (size, size)
            and img.format in ("JPEG", "PNG") and not (_NOT_PLAIN & img.info.keys())):
        # tobytes, not np.asarray(img): the same bytes without the array-interface dict.
        return np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(size, size, channels)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        wide = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if wide.max() > 255 else 255.0
        img = Image.fromarray(np.clip(wide * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        # Transparent pixels over white, as most viewers show them.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("RGB" if channels == 3 else "L")
    if img.size != (size, size):
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr
