"""IMAGE/MASK conversions and their input checks."""

from __future__ import annotations

import pytest
import torch

from priorface.inference.images import (
    alpha_of,
    bchw_to_image,
    image_to_bchw,
    mask_to_bhw,
    resize_bchw,
    stack_same_size,
)


def test_round_trip_rgb():
    img = torch.rand(2, 5, 7, 3)
    t = image_to_bchw(img)
    assert t.shape == (2, 3, 5, 7)
    assert torch.equal(bchw_to_image(t), img)


def test_gray_and_unbatched_inputs():
    gray = torch.rand(4, 4, 1)
    t = image_to_bchw(gray)
    assert t.shape == (1, 3, 4, 4) and torch.equal(t[:, 0], t[:, 2])


def test_rgba_alpha_is_split():
    rgba = torch.rand(1, 3, 3, 4)
    assert image_to_bchw(rgba).shape == (1, 3, 3, 3)
    assert torch.equal(alpha_of(rgba), rgba[..., 3])
    assert alpha_of(torch.rand(1, 3, 3, 3)) is None


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (8, 8), (1, 8, 8, 5)])
def test_wrong_shapes_are_clear_errors(shape):
    with pytest.raises(ValueError, match="IMAGE|channels"):
        image_to_bchw(torch.rand(*shape))


def test_nan_is_rejected():
    img = torch.rand(1, 2, 2, 3)
    img[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        image_to_bchw(img)


def test_placeholder_mask_means_no_mask():
    assert mask_to_bhw(torch.zeros(1, 64, 64), 1, 512, 512) is None
    real = torch.zeros(1, 64, 64)
    real[0, 10, 10] = 1
    assert mask_to_bhw(real, 1, 512, 512).shape == (1, 512, 512)
    assert mask_to_bhw(torch.zeros(1, 64, 64), 1, 64, 64).shape == (1, 64, 64)


def test_mask_batch_rules():
    assert mask_to_bhw(torch.ones(8, 8), 3, 8, 8).shape == (3, 8, 8)
    with pytest.raises(ValueError, match="batch"):
        mask_to_bhw(torch.ones(2, 8, 8), 3, 8, 8)


def test_mixed_sizes_name_each_size():
    with pytest.raises(ValueError, match="4x4, 5x4"):
        stack_same_size([torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 5, 4)])
    assert stack_same_size([torch.zeros(1, 3, 4, 4)] * 2).shape == (2, 3, 4, 4)


def test_resize_stays_in_range():
    t = torch.rand(1, 3, 16, 16)
    assert resize_bchw(t, 4, 4).shape == (1, 3, 4, 4)
    up = resize_bchw(t, 33, 31)
    assert up.shape == (1, 3, 33, 31) and up.min() >= 0 and up.max() <= 1
