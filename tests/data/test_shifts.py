"""Stain and scanner shifts: shape and type kept, severity checked, stronger is further."""

import numpy as np
import pytest

from ssl_blood.data.shifts import SHIFTS, apply_shift, stain
from ssl_blood.errors import UserError


def cells(n=8, seed=0):
    """Pink-purple cell-like images: a dark round nucleus on a light background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    nucleus = ((yy - 14) ** 2 + (xx - 14) ** 2 < 40)[None, None]
    background = np.array([235, 210, 225])[None, :, None, None]
    purple = np.array([110, 60, 150])[None, :, None, None]
    images = np.where(nucleus, purple, background) + rng.normal(0, 4, (n, 3, 28, 28))
    return np.clip(images, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_every_shift_keeps_shape_and_grows_with_severity(name):
    x = cells()
    differences = []
    for severity in (1, 3, 5):
        y = apply_shift(x, name, severity, seed=1)
        assert y.shape == x.shape and y.dtype == np.uint8
        differences.append(np.abs(y.astype(int) - x).mean())
    assert 0 < differences[0] < differences[1] < differences[2], differences


def test_stain_shifts_colour_not_structure_and_leaves_grey_images_alone():
    x = cells()
    y = stain(x, 4, seed=2)
    nucleus, background = (slice(None), slice(None), 14, 14), (slice(None), slice(None), 1, 1)
    assert np.abs(y[nucleus].astype(int) - x[nucleus]).max() > 5  # the nucleus changed colour
    assert (y[nucleus].astype(int).sum(1) < y[background].astype(int).sum(1)).all()  # still darker
    grey = x[:, :1]
    assert (stain(grey, 5) == grey).all()


def test_bad_severity_and_name_are_refused():
    with pytest.raises(UserError, match="`severity` 6 must be one of 1-5"):
        apply_shift(cells(), "blur", 6)
    with pytest.raises(UserError, match="unknown shift 'fog'"):
        apply_shift(cells(), "fog", 1)


def test_shifted_copies_are_every_cell_shifted_and_say_whose_copy_each_is():
    from ssl_blood.data.shifts import shifted_copies

    x = cells(n=20)
    copies, origin = shifted_copies(x, 3, seed=0)
    assert copies.shape == (60, *x.shape[1:]) and copies.dtype == np.uint8
    assert np.array_equal(np.bincount(origin), np.full(20, 3))
    changed = np.abs(copies.astype(int) - x[origin]).mean(axis=(1, 2, 3))
    assert (changed > 0).all()  # every copy differs from its cell (severity >= 1)
    again, _ = shifted_copies(x, 3, seed=0)
    assert np.array_equal(copies, again)  # seeded
