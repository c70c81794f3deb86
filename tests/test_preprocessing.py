"""What a classifier sees: face crops (aligned or detector box) and the one pixel normalisation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from affectray.data.loaders import normalise_pixels
from affectray.faces.align import crop_boxes, square_boxes


def test_box_crops_are_the_squared_widened_box_resized():
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    box = np.array([[40.0, 30.0, 80.0, 90.0]])  # 40 wide, 60 tall: centred at (60, 60)
    np.testing.assert_allclose(square_boxes(box, 0.2), [[24.0, 24.0, 96.0, 96.0]])  # 60 * 1.2 = 72 a side
    crop = crop_boxes(image, box, 72, margin=0.2)[0]
    np.testing.assert_array_equal(crop, image[24:96, 24:96])  # same size: the pixels themselves
    small = crop_boxes(image, box, 36, margin=0.2)[0]
    np.testing.assert_array_equal(small, cv2.resize(image[24:96, 24:96], (36, 36), interpolation=cv2.INTER_AREA))


def test_box_crops_past_the_frame_edge_are_black_there():
    image = np.full((50, 50, 3), 200, np.uint8)
    crop = crop_boxes(image, np.array([[-10.0, -10.0, 20.0, 20.0]]), 30, margin=0.0)[0]
    assert (crop[:10, :10] == 0).all() and (crop[10:, 10:] == 200).all()
    assert crop_boxes(image, np.zeros((0, 4)), 30).shape == (0, 30, 30, 3)


def test_grey_input_is_cv2s_grey_level_for_level():
    image = np.random.default_rng(1).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    grey = normalise_pixels(torch.from_numpy(image), (0.5,), (0.5,), channels=1)  # fer: (x / 255 - 0.5) * 2
    expected = np.stack([cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) for im in image]).astype(np.float32) / 255
    assert grey.shape == (2, 1, 64, 48)
    np.testing.assert_allclose(grey[:, 0].numpy(), (expected - 0.5) * 2, atol=1e-6)


def test_rgb_input_is_normalised_per_channel():
    image = np.random.default_rng(2).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = normalise_pixels(torch.from_numpy(image), mean, std)
    expected = (image.astype(np.float32) / 255 - mean) / std
    np.testing.assert_allclose(x.numpy(), expected.transpose(0, 3, 1, 2), atol=1e-5)


@pytest.mark.parametrize("channels, mean", [(1, (0.5, 0.5, 0.5)), (3, (0.5,))])
def test_one_mean_and_std_per_channel(channels, mean):
    from affectray.data.loaders import DataConfig, LoaderError, validate

    with pytest.raises(LoaderError, match="one value per channel"):
        validate(DataConfig(root="x", channels=channels, mean=mean, std=mean))
