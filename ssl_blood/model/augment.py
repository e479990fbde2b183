"""Views made in batch on the training device, with independent random parameters per image.

Why hand-written: torchvision's v2 transforms draw one set of parameters per call (per batch),
and PIL pipelines (lightly's transforms) run per image on the CPU, which starves a GPU on
28-px images (5k img/s from 16 DataLoader workers against 20k img/s on an H100, see
docs/benchmarks.md). Here each view of a whole batch costs
one `grid_sample` (crop + flips + 90-degree rotation in one affine matrix) and a handful of
element-wise kernels, with every parameter drawn per image from a seeded `torch.Generator`.

Defaults are chosen for stained blood cells: stain colour carries class identity (eosinophil
granules orange-red, basophil granules dark purple), so hue jitter and grayscale are off and
brightness/contrast/saturation jitter is weak; cells have no canonical orientation, so both
flips and 90-degree rotations are on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


@dataclass
class AugmentConfig:
    """Parameters of one view; probabilities are per image."""

    crop_scale: tuple[float, float] = (0.14, 1.0)  # area fraction kept by the random resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range of the crop
    hflip: float = 0.5
    vflip: float = 0.5
    rot90: bool = True  # rotate by 0/90/180/270 degrees uniformly
    jitter_prob: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.0  # max hue rotation as a fraction of the colour wheel (0.5 = 180 degrees)
    grayscale: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 1.0)  # in pixels of the output view
    solarize_prob: float = 0.0
    stain: float = 0.0  # HED stain jitter (see stain_jitter): 0.2 ~ another lab's H&E balance

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------- helpers


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def _chance(n: int, p: float, gen: torch.Generator, device) -> torch.Tensor:
    """A boolean mask: each of n images selected with probability p."""
    return torch.rand(n, generator=gen, device=device) < p


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luminance."""
    w = torch.as_tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


# ----------------------------------------------------------------------------- geometry


def sample_crop_affine(n: int, scale: tuple[float, float], ratio: tuple[float, float],
                       hflip: float, vflip: float, rot90: bool, gen: torch.Generator,
                       device) -> torch.Tensor:
    """Affine matrices (n, 2, 3) for `F.affine_grid`: random resized crop, flips, rotation.

    Maps output coordinates in [-1, 1] to input coordinates: first flip and rotate the output
    grid (a square maps onto itself), then scale it to the crop's half-extents and shift it to
    the crop's centre, so the sampled points stay inside the crop. As torchvision, the area
    fraction is uniform in `scale` and the log aspect ratio uniform in `ratio`; a crop wider
    than the image is clamped to it (torchvision re-draws instead).
    """
    area = _uniform(n, scale[0], scale[1], gen, device)
    log_ratio = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), gen, device)
    aspect = torch.exp(log_ratio)
    half_w = torch.sqrt(area * aspect).clamp(max=1.0)  # half-extent in normalised coordinates
    half_h = torch.sqrt(area / aspect).clamp(max=1.0)
    centre_x = (torch.rand(n, generator=gen, device=device) * 2 - 1) * (1 - half_w)
    centre_y = (torch.rand(n, generator=gen, device=device) * 2 - 1) * (1 - half_h)

    flip_x = torch.where(_chance(n, hflip, gen, device), -1.0, 1.0)
    flip_y = torch.where(_chance(n, vflip, gen, device), -1.0, 1.0)
    if rot90:
        quarter_turns = torch.randint(0, 4, (n,), generator=gen, device=device)
    else:
        quarter_turns = torch.zeros(n, dtype=torch.long, device=device)
    # cos/sin of k * 90 degrees, exactly
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=device)[quarter_turns]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=device)[quarter_turns]

    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = half_w * cos * flip_x
    theta[:, 0, 1] = -half_w * sin * flip_y
    theta[:, 1, 0] = half_h * sin * flip_x
    theta[:, 1, 1] = half_h * cos * flip_y
    theta[:, 0, 2] = centre_x
    theta[:, 1, 2] = centre_y
    return theta


def warp(x: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Resample float images (N, C, H, W) through affine matrices to (N, C, size, size)."""
    grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# ----------------------------------------------------------------------------- colour


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * a + (1 - factor) * b, per image, clamped to [0, 1] (torchvision's _blend)."""
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp_(0, 1)


def _hue_rotation(angle: torch.Tensor) -> torch.Tensor:
    """Per-image 3x3 RGB matrices that rotate hue by `angle` radians in YIQ space.

    A linear stand-in for torchvision's HSV hue shift that costs one batched matmul; it keeps
    luminance and saturation and moves the hue, which is what hue jitter is for.
    """
    rgb_to_yiq = torch.tensor([[0.299, 0.587, 0.114],
                               [0.596, -0.274, -0.322],
                               [0.211, -0.523, 0.312]], device=angle.device)
    yiq_to_rgb = torch.linalg.inv(rgb_to_yiq)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(len(angle), 3, 3, device=angle.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    return yiq_to_rgb @ rot @ rgb_to_yiq


def color_jitter(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation, hue (in this order), each factor drawn per image;
    images not selected by `jitter_prob` get the identity."""
    n, device = x.shape[0], x.device
    applied = _chance(n, cfg.jitter_prob, gen, device)

    def factor(strength: float) -> torch.Tensor:
        f = _uniform(n, max(0.0, 1 - strength), 1 + strength, gen, device)
        return torch.where(applied, f, torch.ones_like(f))

    if cfg.brightness > 0:
        x = _blend(x, torch.zeros_like(x), factor(cfg.brightness))
    if cfg.contrast > 0:
        mean_gray = (grayscale(x) if x.shape[1] == 3 else x).mean(dim=(1, 2, 3), keepdim=True)
        x = _blend(x, mean_gray.expand_as(x), factor(cfg.contrast))
    if x.shape[1] != 3:
        return x
    if cfg.saturation > 0:
        x = _blend(x, grayscale(x).expand_as(x), factor(cfg.saturation))
    if cfg.hue > 0:
        angle = _uniform(n, -cfg.hue, cfg.hue, gen, device) * 2 * math.pi
        angle = torch.where(applied, angle, torch.zeros_like(angle))
        x = torch.einsum("nij,njhw->nihw", _hue_rotation(angle), x).clamp_(0, 1)
    return x


def stain_jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Another haematoxylin/eosin balance per image (HED augmentation, Tellez et al. 2018): the
    optical densities of both stains scaled by U(1 - s, 1 + s) and offset by U(-s/4, s/4), in
    the colour deconvolution `data.shifts` uses for its stain shift. Hand-written: torchvision
    has no stain augmentation and HEDJitter packages work per PIL image."""
    if strength <= 0 or x.shape[1] != 3:
        return x
    from ssl_blood.data.shifts import HED_FROM_RGB, RGB_FROM_HED

    n, device = x.shape[0], x.device
    to_hed = torch.as_tensor(HED_FROM_RGB, dtype=x.dtype, device=device)
    to_rgb = torch.as_tensor(RGB_FROM_HED, dtype=x.dtype, device=device)
    hed = torch.einsum("nchw,cj->njhw", -torch.log(x.clamp(min=1 / 255)), to_hed)
    scale = _uniform(2 * n, 1 - strength, 1 + strength, gen, device).view(n, 2, 1, 1).to(x.dtype)
    offset = _uniform(2 * n, -strength / 4, strength / 4, gen, device).view(n, 2, 1, 1).to(x.dtype)
    hed = torch.cat([hed[:, :2] * scale + offset, hed[:, 2:]], 1)
    return torch.exp(-torch.einsum("njhw,jc->nchw", hed, to_rgb)).clamp_(0, 1)


def random_grayscale(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    if p <= 0 or x.shape[1] != 3:
        return x
    chosen = _chance(x.shape[0], p, gen, x.device).view(-1, 1, 1, 1)
    return torch.where(chosen, grayscale(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, p: float, sigma: tuple[float, float],
                  gen: torch.Generator) -> torch.Tensor:
    """Blur a random subset of images, each with its own sigma: one grouped separable conv."""
    n, c, h, w = x.shape
    chosen = _chance(n, p, gen, x.device)
    sigmas = _uniform(n, sigma[0], sigma[1], gen, x.device)
    if p <= 0 or not bool(chosen.any()):
        return x
    radius = min(int(math.ceil(3 * sigma[1])), (min(h, w) - 1) // 2)
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigmas[chosen].to(x.dtype).view(-1, 1)
    kernel = torch.exp(-(offsets**2) / (2 * s**2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (m*C, k)
    sub = x[chosen].reshape(1, -1, h, w)  # channels of all chosen images side by side
    groups = sub.shape[1]
    sub = F.pad(sub, (radius, radius, radius, radius), mode="reflect")
    sub = F.conv2d(sub, kernel.view(groups, 1, -1, 1), groups=groups)
    sub = F.conv2d(sub, kernel.view(groups, 1, 1, -1), groups=groups)
    out = x.clone()
    out[chosen] = sub.view(-1, c, h, w)
    return out


def solarize(x: torch.Tensor, p: float, gen: torch.Generator, threshold: float = 0.5) -> torch.Tensor:
    if p <= 0:
        return x
    chosen = _chance(x.shape[0], p, gen, x.device).view(-1, 1, 1, 1)
    return torch.where(chosen & (x >= threshold), 1 - x, x)


# ----------------------------------------------------------------------------- views


@dataclass(frozen=True)
class ViewGroup:
    """`count` views of side `size` px whose crops keep an area fraction in `scale`."""

    count: int
    size: int
    scale: tuple[float, float]


class BatchAugment:
    """Makes normalised views of a uint8 batch on whatever device the batch lives on.

    >>> aug = BatchAugment(AugmentConfig(), mean=[.5] * 3, std=[.25] * 3)
    >>> v1, v2 = aug.views([ViewGroup(2, 28, (0.14, 1.0))], images_uint8, torch.Generator())
    """

    def __init__(self, cfg: AugmentConfig, mean: Sequence[float], std: Sequence[float]):
        self.cfg, self.mean, self.std = cfg, list(mean), list(std)

    def view(self, images: torch.Tensor, gen: torch.Generator, size: int,
             scale: tuple[float, float]) -> torch.Tensor:
        """One augmented, normalised view (N, C, size, size) of uint8 images (N, C, H, W)."""
        cfg = self.cfg
        x = to_unit_float(images)
        theta = sample_crop_affine(len(x), scale, cfg.crop_ratio, cfg.hflip, cfg.vflip,
                                   cfg.rot90, gen, x.device)
        x = warp(x, theta, size)
        x = color_jitter(x, cfg, gen)
        x = stain_jitter(x, cfg.stain, gen)
        x = random_grayscale(x, cfg.grayscale, gen)
        x = gaussian_blur(x, cfg.blur_prob, cfg.blur_sigma, gen)
        x = solarize(x, cfg.solarize_prob, gen)
        return normalize(x, self.mean, self.std)

    def views(self, groups: Sequence[ViewGroup], images: torch.Tensor,
              gen: torch.Generator) -> list[torch.Tensor]:
        """Every view a method asks for (its `view_spec`), group by group, in order."""
        return [self.view(images, gen, g.size, g.scale) for g in groups for _ in range(g.count)]


def eval_preprocess(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                    size: int) -> torch.Tensor:
    """The deterministic input the backbone sees at evaluation: resize to `size`, normalise."""
    x = to_unit_float(images)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < x.shape[-1])
    return normalize(x, mean, std)
