"""lightly's PIL augmentation pipeline over a CellData, the comparison path of the benchmarks.

ssl-blood itself makes views in batch on the training device; this is what a lightly user
would write instead: a Dataset of PIL images through `SimCLRTransform` / `DINOTransform`, fed
by a DataLoader. It lives here, beside the benchmark that compares the two, not in the package.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ssl_blood.model.augment import AugmentConfig
from ssl_blood.data import CellData


class PILViews(torch.utils.data.Dataset):
    """Each cell as a PIL image through a lightly transform (a list of views)."""

    def __init__(self, data: CellData, transform: Callable):
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        from PIL import Image

        array = self.data.images[i].permute(1, 2, 0).numpy()
        return self.transform(Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array))


def lightly_transform(method: str, cfg: AugmentConfig, size: int, mean: Sequence[float],
                      std: Sequence[float], local_views: int = 6, local_size: int = 12,
                      local_scale: tuple[float, float] = (0.05, 0.3)):
    """lightly's transform closest to `cfg`. lightly's colour jitter is one torchvision
    ColorJitter and its rotation a fixed 90 degrees with probability `rr_prob`, so the two
    pipelines match in spirit, not bit for bit."""
    from lightly.transforms import DINOTransform, SimCLRTransform

    common = dict(
        hf_prob=cfg.hflip, vf_prob=cfg.vflip, rr_prob=0.5 if cfg.rot90 else 0.0,
        cj_prob=cfg.jitter_prob, cj_strength=1.0, cj_bright=cfg.brightness,
        cj_contrast=cfg.contrast, cj_sat=cfg.saturation, cj_hue=cfg.hue,
        random_gray_scale=cfg.grayscale, sigmas=cfg.blur_sigma,
        normalize={"mean": list(mean), "std": list(std)},
    )
    if method == "dino":
        return DINOTransform(
            global_crop_size=size, global_crop_scale=cfg.crop_scale, local_crop_size=local_size,
            local_crop_scale=local_scale, n_local_views=local_views,
            gaussian_blur=(cfg.blur_prob, cfg.blur_prob, cfg.blur_prob),
            solarization_prob=cfg.solarize_prob, **common)
    return SimCLRTransform(input_size=size, min_scale=cfg.crop_scale[0],
                           gaussian_blur=cfg.blur_prob, **common)
