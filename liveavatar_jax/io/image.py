"""Reference image input: loading, the official output-size rule and the official preprocessing.

Official behaviour: architecture.md §2.5 (preprocessing) and §3.1 (output size).

    H, W = size_for_area(h_img, w_img, "720*400")       # WanS2V.get_size_less_than_area
    ref = preprocess_reference(image, H, W)              # Resize(min(H, W)) -> CenterCrop((H, W)) -> [-1, 1]

`preprocess_reference` returns float32 [3, 1, H, W] (channels, one frame, height, width), the official
`ref_pixel_values` without its batch axis.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be used: the message names the file and what is wrong with it."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens an image file as RGB, fully decoded (a truncated file fails here, not later).

    Like the official `Image.open(path).convert('RGB')`, EXIF orientation is not applied.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such image file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (no image format recognises it)") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(f"{path}: cannot decode the image ({e})") from None


def parse_area(area: int | str) -> int:
    """Pixel budget from an int or an official size string such as "720*400" (or "720x400")."""
    if isinstance(area, str):
        parts = area.lower().replace("x", "*").split("*")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"size {area!r} is not of the form 'H*W'")
        return int(parts[0]) * int(parts[1])
    return int(area)


def size_for_area(height: int, width: int, area: int | str, divisor: int = 64) -> tuple[int, int]:
    """(H, W) for an image of `height` x `width` under the pixel budget `area`: official `get_size_less_than_area`.

    Scans 100 scales downward from the largest allowed one and returns the first whose size, padded up to
    multiples of `divisor`, fits in `area`: the largest multiples of `divisor` near the image's aspect ratio. The
    official code pads to 64 whatever `divisor` is; here the padding follows `divisor` (the same for the default).
    """
    target = parse_area(area)
    if height <= 0 or width <= 0 or target <= 0:
        raise ValueError(f"size_for_area: sizes must be positive, got {height}x{width} and area {target}")
    if height * width <= target:
        min_scale, max_scale = 0.1, 1.0
    else:
        d = divisor - 1
        b = d * (height + width)
        a = height * width
        c = d ** 2 - target
        min_scale = (-b + math.sqrt(b ** 2 - 2 * a * c)) / (2 * a)
        max_scale = math.sqrt(target / (height * width))
    for i in range(100):
        scale = max_scale - (max_scale - min_scale) * i / 100
        new_h, new_w = int(height * scale), int(width * scale)
        padded_h = new_h + (divisor - new_h % divisor) % divisor
        padded_w = new_w + (divisor - new_w % divisor) % divisor
        if padded_h * padded_w <= target:
            return padded_h, padded_w
    # No scale fitted: the official fallback, multiples of `divisor` from the aspect ratio.
    aspect = width / height
    out_w = int((target * aspect) ** 0.5 // divisor * divisor)
    out_h = int((target / aspect) ** 0.5 // divisor * divisor)
    if out_w >= width or out_h >= height:
        out_w = int(width // divisor * divisor)
        out_h = int(height // divisor * divisor)
    return out_h, out_w


def _resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """torchvision `Resize(size)` on a PIL image: shorter side to `size`, longer side int(size * long / short),
    PIL bilinear (which filters over the whole footprint when shrinking, i.e. antialiased)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.BILINEAR)


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision `CenterCrop((height, width))` on [h, w, c]: zero-pads a too-small side first, then crops."""
    h, w = pixels.shape[:2]
    if height > h or width > w:
        top, left = max(height - h, 0) // 2, max(width - w, 0) // 2
        bottom, right = max(height - h, 0) - top, max(width - w, 0) - left
        pixels = np.pad(pixels, ((top, bottom), (left, right), (0, 0)))
        h, w = pixels.shape[:2]
    # Python's round (half to even), as torchvision writes it.
    y0, x0 = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return pixels[y0:y0 + height, x0:x0 + width]


def preprocess_reference(image: Image.Image | np.ndarray, height: int, width: int) -> np.ndarray:
    """Official reference preprocessing -> float32 [3, 1, height, width] in [-1, 1] (padding is -1)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"preprocess_reference: expected a uint8 [h, w, 3] array, got {image.dtype} "
                             f"{list(image.shape)}")
        image = Image.fromarray(image)
    image = image.convert("RGB")
    resized = _resize_shorter_side(image, min(height, width))
    pixels = _center_crop(np.asarray(resized, np.uint8), height, width)
    x = pixels.astype(np.float32) / np.float32(255.0) * 2 - 1
    return np.ascontiguousarray(x.transpose(2, 0, 1)[:, None])


def load_reference_image(path: str | os.PathLike, area: int | str = "720*400",
                         divisor: int = 64) -> tuple[np.ndarray, tuple[int, int]]:
    """Loads `path`, picks the output size for `area` from its own size, and preprocesses it.

    Returns (float32 [3, 1, H, W] in [-1, 1], (H, W)).
    """
    img = load_image(path)
    h, w = size_for_area(img.height, img.width, area, divisor)
    return preprocess_reference(img, h, w), (h, w)
