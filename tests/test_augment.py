"""Batch augmentation on the training worker (affectray.data.augment): tensor ops only, no Ray.

The Ray path (the data tasks decode only, the worker augments) is in test_loaders.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from affectray.data.augment import augment_batch, draw_augmentation
from affectray.data.loaders import DataConfig, to_model_input

GREY = dict(channels=1, mean=(0.5,), std=(0.5,))
IDENTITY = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, color_jitter=0.0)


def faces(n: int = 6, size: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("colour", [{}, GREY], ids=["rgb", "grey"])
def test_the_identity_draw_is_the_evaluation_input_and_a_flip_mirrors_it(colour):
    cfg = DataConfig(root="x", mode="frame", image_size=24, **colour, **IDENTITY)
    pixels = faces()
    evaluation = to_model_input({"image": pixels}, cfg, "cpu")
    same = augment_batch(pixels, cfg, torch.Generator().manual_seed(0))
    assert same.shape == evaluation.shape == (6, cfg.channels, 24, 24)
    torch.testing.assert_close(same, evaluation, atol=1e-5, rtol=0)
    flipped = augment_batch(pixels, dataclasses.replace(cfg, hflip=1.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(flipped, evaluation.flip(-1), atol=1e-5, rtol=0)
    # Resized on the way: a 24 px face to a 32 px input, as cv2 resizes for evaluation (bilinear, half-pixel centres).
    bigger = augment_batch(pixels, dataclasses.replace(cfg, image_size=32), torch.Generator().manual_seed(0))
    assert bigger.shape == (6, cfg.channels, 32, 32)
    torch.testing.assert_close(bigger.mean(dim=(2, 3)), evaluation.mean(dim=(2, 3)), atol=0.05, rtol=0)


def test_draws_stay_in_the_configured_ranges_and_repeat_with_the_seed():
    cfg = DataConfig(root="x", scale=(0.5, 0.8), ratio=(0.75, 1.25), hflip=0.5, color_jitter=0.2)
    draw = draw_augmentation(4000, cfg, torch.Generator().manual_seed(3))
    half_w, half_h = draw.theta[:, 0, 0].abs(), draw.theta[:, 1, 1]
    area, aspect = half_w * half_h, half_w / half_h
    assert area.min() >= 0.5 - 1e-5 and area.max() <= 0.8 + 1e-5
    assert aspect.min() >= 0.75 - 1e-5 and aspect.max() <= 1.25 + 1e-5
    # The box stays inside the face: centre +- half-side within [-1, 1].
    assert (draw.theta[:, 0, 2].abs() + half_w <= 1 + 1e-5).all()
    assert (draw.theta[:, 1, 2].abs() + half_h <= 1 + 1e-5).all()
    assert 0.45 < (draw.theta[:, 0, 0] < 0).float().mean() < 0.55  # flipped half the time
    for factor in (draw.brightness, draw.contrast, draw.saturation):
        assert factor.min() >= 0.8 and factor.max() <= 1.2 and factor.std() > 0.1
    again = draw_augmentation(4000, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(again.theta, draw.theta) and torch.equal(again.contrast, draw.contrast)
    assert not torch.equal(draw_augmentation(4000, cfg, torch.Generator().manual_seed(4)).theta, draw.theta)


def test_a_clip_gets_one_crop_flip_and_jitter_for_all_its_frames():
    cfg = DataConfig(root="x", num_frames=3, image_size=16, scale=(0.4, 0.9), color_jitter=0.3)
    stills = faces(4, 20)
    clips = stills[:, None].expand(4, 3, 20, 20, 3).contiguous()  # every frame the same picture
    out = augment_batch(clips, cfg, torch.Generator().manual_seed(1))
    assert out.shape == (4, 3, 3, 16, 16)  # [B, T, C, S, S], as normalise_pixels lays clips out
    torch.testing.assert_close(out[:, 0], out[:, 2], atol=0, rtol=0)
    as_frames = augment_batch(stills, dataclasses.replace(cfg, mode="frame"), torch.Generator().manual_seed(1))
    torch.testing.assert_close(out[:, 1], as_frames, atol=1e-5, rtol=0)  # the same draw per sample
    assert (out[:, 0] - augment_batch(clips, cfg, torch.Generator().manual_seed(2))[:, 0]).abs().max() > 0.1


def test_jitter_saturates_like_the_data_path():
    """Brightness, contrast and saturation keep levels in [0, 255]; grey inputs stay grey."""
    cfg = DataConfig(root="x", mode="frame", image_size=24, color_jitter=0.9, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    out = augment_batch(faces(64), cfg, torch.Generator().manual_seed(5))
    levels = out * torch.tensor(cfg.std).view(3, 1, 1) * 255 + torch.tensor(cfg.mean).view(3, 1, 1) * 255
    assert levels.min() >= -1e-3 and levels.max() <= 255 + 1e-3
    assert (levels < 0.5).any() and (levels > 254.5).any()  # a 0.9 jitter pushes some levels to the bounds
    grey_rgb = faces(8)[..., :1].expand(8, 24, 24, 3).contiguous()
    jittered = augment_batch(grey_rgb, cfg, torch.Generator().manual_seed(5))
    raw = jittered * torch.tensor(cfg.std).view(3, 1, 1) + torch.tensor(cfg.mean).view(3, 1, 1)
    torch.testing.assert_close(raw[:, 0], raw[:, 1], atol=1e-5, rtol=0)  # saturation has nothing to move
