"""Stain and scanner shifts made from BloodMNIST itself: what another lab's slide does to cells.

MedMNIST-C (medmnistc) has blur, JPEG, brightness, contrast and the like but no stain-colour
shift, and it needs ImageMagick through Wand; these are the shifts it lacks, in numpy/PIL:
- `stain`: another haematoxylin/eosin balance. Colour deconvolution into HED optical densities
  (Ruifrok & Johnston 2001, the stain matrix scikit-image uses), each stain's density scaled
  and offset, back to RGB. One draw per batch, as one slide has one stain: severity s scales
  a stain's density by 1 +- 0.08 s and offsets it by +- 0.012 s.
- `blur`: a scanner out of focus: Gaussian blur of radius 0.2 s px at the image's own size.
- `resample`: a scanner of another resolution: down to 1 - 0.1 s of the side and back.
- `brightness`: a lamp or exposure change: every pixel times 1 + 0.1 s (clipped).
All take uint8 images (N, C, H, W) and return the same shape; severity 1-5.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ssl_blood.errors import UserError

# RGB from HED optical densities (rows: haematoxylin, eosin, DAB), as skimage.color.rgb_from_hed
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
SEVERITIES = (1, 2, 3, 4, 5)


def _check(images: np.ndarray, severity: int) -> np.ndarray:
    if severity not in SEVERITIES:
        raise UserError(f"`severity` {severity} must be one of 1-5", param="severity")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError("shifts take uint8 images (N, C, H, W)", param="images")
    return images


def stain(images: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    """Another H&E balance, one random draw for the whole batch (see the module docstring)."""
    images = _check(images, severity)
    if images.shape[1] != 3:
        return images.copy()  # a grey image has no stain colour to shift
    rng = np.random.default_rng(seed)
    scale = 1 + rng.choice([-1, 1], 2) * 0.08 * severity * rng.uniform(0.8, 1.2, 2)
    offset = rng.choice([-1, 1], 2) * 0.012 * severity
    rgb = np.maximum(images.transpose(0, 2, 3, 1).astype(np.float64), 1) / 255
    hed = -np.log(rgb) @ HED_FROM_RGB  # optical densities per stain
    hed[..., :2] = hed[..., :2] * scale + offset
    out = np.exp(-(hed @ RGB_FROM_HED)) * 255
    return np.clip(out, 0, 255).round().astype(np.uint8).transpose(0, 3, 1, 2)


def _per_image(images: np.ndarray, change: Callable) -> np.ndarray:
    from PIL import Image

    out = np.empty_like(images)
    for i, chw in enumerate(images):
        hwc = chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0)
        new = np.asarray(change(Image.fromarray(hwc)))
        out[i] = new[None] if chw.shape[0] == 1 else new.transpose(2, 0, 1)
    return out


def blur(images: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    from PIL import ImageFilter

    images = _check(images, severity)
    return _per_image(images, lambda im: im.filter(ImageFilter.GaussianBlur(0.2 * severity)))


def resample(images: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    from PIL import Image

    images = _check(images, severity)
    side = images.shape[-1]
    small = max(4, round(side * (1 - 0.1 * severity)))
    return _per_image(images, lambda im: im.resize((small, small), Image.Resampling.BILINEAR)
                      .resize((side, side), Image.Resampling.BILINEAR))


def brightness(images: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    images = _check(images, severity)
    return np.clip(images.astype(np.float32) * (1 + 0.1 * severity), 0, 255).round().astype(np.uint8)


SHIFTS: dict[str, Callable[..., np.ndarray]] = {"stain": stain, "blur": blur, "resample": resample,
                                                "brightness": brightness}


def apply_shift(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    if name not in SHIFTS:
        raise UserError(f"unknown shift '{name}'; choose one of {', '.join(SHIFTS)}", param="shift")
    return SHIFTS[name](images, severity, seed)


def shifted_copies(images: np.ndarray, copies: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`copies` shifted copies of every cell: each copy of a cell under one of `SHIFTS` at a
    random severity 1-5 (cells drawn the same shift and severity share one draw of it, so a
    stain copy is a random other slide's stain). Returns the copies (copies x N, C, H, W) and
    each copy's row in `images`. What a classifier's head learns from besides the clean cells
    (`train-classifier --shift-copies`): torchvision has no stain or scanner shift to reuse."""
    images = _check(images, SEVERITIES[0])
    rng = np.random.default_rng(seed)
    n, names = len(images), list(SHIFTS)
    origin = np.tile(np.arange(n), copies)
    shift = rng.integers(0, len(names), len(origin))
    severity = rng.integers(1, len(SEVERITIES) + 1, len(origin))
    out = np.empty((len(origin), *images.shape[1:]), dtype=np.uint8)
    for s in range(len(names)):
        for v in SEVERITIES:
            rows = np.flatnonzero((shift == s) & (severity == v))
            if len(rows):
                out[rows] = SHIFTS[names[s]](images[origin[rows]], v, int(rng.integers(2**31)))
    return out, origin
