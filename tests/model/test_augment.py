import numpy as np
import torch

from ssl_blood.model.augment import (AugmentConfig, BatchAugment, ViewGroup, color_jitter,
                               eval_preprocess, gaussian_blur, sample_crop_affine, to_unit_float, warp)

IDENTITY = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]  # normalisation that keeps [0, 1] values


def images(n=16, size=28, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def dihedral(x):
    """The 8 rotations/flips of an image (C, H, W)."""
    out = []
    for k in range(4):
        r = torch.rot90(x, k, (1, 2))
        out += [r, r.flip(2)]
    return out


def test_two_views_shapes_and_range():
    cfg = AugmentConfig(hue=0.1, grayscale=0.3, blur_prob=0.5, solarize_prob=0.3)
    v1, v2 = BatchAugment(cfg, *IDENTITY).views([ViewGroup(2, 24, (0.14, 1.0))], images(), gen())
    assert v1.shape == v2.shape == (16, 3, 24, 24) and v1.dtype == torch.float32
    assert v1.min() >= 0 and v1.max() <= 1 and not torch.equal(v1, v2)


def test_multicrop_view_groups():
    groups = [ViewGroup(2, 28, (0.35, 1.0)), ViewGroup(4, 12, (0.05, 0.3))]
    views = BatchAugment(AugmentConfig(), *IDENTITY).views(groups, images(8), gen())
    assert [tuple(v.shape) for v in views] == [(8, 3, 28, 28)] * 2 + [(8, 3, 12, 12)] * 4


def test_crop_area_and_aspect_follow_their_distributions():
    """Area fraction uniform in `scale`, log aspect ratio uniform in `ratio` (torchvision's
    RandomResizedCrop), before the clamp to the image."""
    import math

    n = 20000
    theta = sample_crop_affine(n, (0.2, 0.6), (3 / 4, 4 / 3), 0.0, 0.0, False, gen(1), "cpu")
    half_w, half_h = theta[:, 0, 0], theta[:, 1, 1]
    area = half_w * half_h  # (2 hw * 2 hh) / (2 * 2): fraction of the image
    log_ratio = torch.log(half_w / half_h)
    inside = (half_w < 1) & (half_h < 1)
    assert inside.float().mean() > 0.99
    a = area[inside]
    assert a.min() >= 0.2 - 1e-6 and a.max() <= 0.6 + 1e-6
    assert abs(float(a.mean()) - 0.4) < 0.01 and abs(float(a.std()) - 0.4 / math.sqrt(12)) < 0.01
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    assert log_ratio.min() >= lo - 1e-5 and log_ratio.max() <= hi + 1e-5
    assert abs(float(log_ratio.mean())) < 0.01
    assert abs(float(log_ratio.std()) - (hi - lo) / math.sqrt(12)) < 0.01
    centre = theta[:, :, 2]
    assert (centre.abs() <= (1 - torch.stack([half_w, half_h], 1)) + 1e-6).all()  # crop inside


def test_parameters_differ_per_image():
    same = images(1).expand(32, -1, -1, -1).contiguous()
    view = BatchAugment(AugmentConfig(), *IDENTITY).view(same, gen(), 28, (0.3, 1.0))
    distinct = {tuple(v.flatten()[:50].tolist()) for v in view}
    assert len(distinct) > 28  # one batch, (almost) every image transformed differently


def test_geometry_is_label_preserving_dihedral():
    x = images(32)
    theta = sample_crop_affine(32, (1.0, 1.0), (1.0, 1.0), 0.5, 0.5, True, gen(3), "cpu")
    out = warp(to_unit_float(x), theta, 28)
    seen = set()
    for original, warped in zip(to_unit_float(x), out):
        errors = [float((d - warped).abs().max()) for d in dihedral(original)]
        assert min(errors) < 1e-4  # exactly one of the 8 symmetries, no interpolation blur
        seen.add(min(range(8), key=errors.__getitem__))
    assert len(seen) >= 6  # and the symmetries vary across the batch


def test_crop_stays_inside_the_image():
    theta = sample_crop_affine(500, (0.05, 1.0), (0.5, 2.0), 0.5, 0.5, True, gen(), "cpu")
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, -1.0, 1.0]])
    mapped = torch.einsum("nij,kj->nki", theta, corners)
    assert mapped.abs().max() <= 1 + 1e-6


def test_seeded_determinism():
    aug = BatchAugment(AugmentConfig(blur_prob=0.5, hue=0.05), *IDENTITY)
    groups = [ViewGroup(2, 28, (0.35, 1.0)), ViewGroup(6, 12, (0.05, 0.3))]
    a = aug.views(groups, images(), gen(7))
    b = aug.views(groups, images(), gen(7))
    c = aug.views(groups, images(), gen(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_no_augmentation_is_identity():
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0, vflip=0, rot90=False,
                        jitter_prob=0)
    x = images(4)
    view = BatchAugment(cfg, *IDENTITY).view(x, gen(), 28, cfg.crop_scale)
    assert torch.allclose(view, to_unit_float(x), atol=1e-5)


def test_color_jitter_strength_zero_and_gray_stays_gray():
    x = to_unit_float(images(8))
    assert torch.equal(color_jitter(x, AugmentConfig(jitter_prob=1.0, brightness=0, contrast=0,
                                                     saturation=0, hue=0), gen()), x)
    gray = x[:, :1].expand(-1, 3, -1, -1).contiguous()
    out = color_jitter(gray, AugmentConfig(jitter_prob=1.0, hue=0.5, saturation=0.9), gen())
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-4)  # hue/saturation move no gray pixel


def test_blur_keeps_constant_images_and_smooths_noise():
    flat = torch.full((4, 3, 16, 16), 0.4)
    assert torch.allclose(gaussian_blur(flat, 1.0, (1.0, 1.0), gen()), flat, atol=1e-6)
    noise = torch.rand(4, 3, 16, 16, generator=gen())
    assert gaussian_blur(noise, 1.0, (1.0, 1.0), gen()).std() < noise.std() * 0.7


def test_eval_preprocess_resizes_and_normalises():
    x = torch.full((2, 3, 28, 28), 255, dtype=torch.uint8)
    out = eval_preprocess(x, [0.5] * 3, [0.25] * 3, 56)
    assert out.shape == (2, 3, 56, 56) and torch.allclose(out, torch.full_like(out, 2.0))


def test_grayscale_input_images():
    x = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    views = BatchAugment(AugmentConfig(hue=0.2, grayscale=0.5), [0.5], [0.2]).views(
        [ViewGroup(2, 16, (0.14, 1.0))], x, gen())
    assert views[0].shape == (6, 1, 16, 16)


def test_stain_jitter_rescales_each_images_haematoxylin_and_eosin_only():
    """Per image, the H and E optical densities are an affine map of the input's with scale in
    [1 - s, 1 + s] and offset in [-s/4, s/4]; the third (DAB) density is untouched."""
    from ssl_blood.data.shifts import HED_FROM_RGB
    from ssl_blood.model.augment import stain_jitter

    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.3 + 0.35
    out = stain_jitter(x, 0.2, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and 0 < out.min() and out.max() < 1  # nothing clipped here

    def hed(images):
        return torch.einsum("nchw,cj->njhw", -torch.log(images.double()),
                            torch.as_tensor(HED_FROM_RGB)).flatten(2)

    before, after = hed(x), hed(out)
    scales = []
    for i in range(16):
        for stain in (0, 1):
            a, b = np.polyfit(before[i, stain].numpy(), after[i, stain].numpy(), 1)
            assert 0.8 - 1e-4 <= a <= 1.2 + 1e-4 and abs(b) <= 0.05 + 1e-4
            scales.append(a)
        assert torch.allclose(before[i, 2], after[i, 2], atol=1e-4)
    assert np.std(scales) > 0.02  # drawn per image and stain, not once
    assert torch.equal(stain_jitter(x, 0.0, torch.Generator()), x)


def test_stain_zero_leaves_the_views_and_their_random_stream_unchanged():
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    plain = BatchAugment(AugmentConfig(), [0.5] * 3, [0.25] * 3)
    zero = BatchAugment(AugmentConfig(stain=0.0), [0.5] * 3, [0.25] * 3)
    a = plain.view(images, torch.Generator().manual_seed(3), 16, (0.5, 1.0))
    b = zero.view(images, torch.Generator().manual_seed(3), 16, (0.5, 1.0))
    assert torch.equal(a, b)
    stained = BatchAugment(AugmentConfig(stain=0.2), [0.5] * 3, [0.25] * 3)
    assert not torch.equal(a, stained.view(images, torch.Generator().manual_seed(3), 16, (0.5, 1.0)))
