"""Training augmentation of whole batches as tensor ops, run on the training worker.

The default path (``data.augment_on: data``) crops, flips and jitters every sample with
OpenCV inside the Ray Data tasks (:func:`affectray.data.loaders.transform_clip`). On a
small CPU machine those tasks take cores from the training step: FER2013's recipe trained
at 183 faces/s that way, against 216-248 for the bare step. With ``augment_on: worker``
the data tasks only decode and resize (what evaluation does) and the same random resized
crop, flip and colour jitter run here, on the batch, on the worker's device: 1.3% of a
mini-Xception step on 2 CPU cores, nothing to speak of on a GPU.

The draws follow torchvision, as the data path does: the crop's area and log-aspect are
uniform in ``cfg.scale`` and ``cfg.ratio`` (a side longer than the face is clamped to it
instead of retried), brightness then contrast (towards the frame's mean grey) then
saturation (towards each pixel's grey), each factor uniform in 1 +- ``cfg.color_jitter``,
saturating at 0 and 255. A clip gets one crop, flip and set of factors for all its
frames, as the data path gives it (consistent spatial augmentation, VideoMAE).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from affectray.data.pixels import grey_levels, normalise_levels

if TYPE_CHECKING:
    import torch

__all__ = ["AugmentDraw", "AugmentSettings", "augment_batch", "draw_augmentation"]

# ITU-R BT.601 luma, as torchvision's rgb_to_grayscale weighs channels for contrast and saturation.
_LUMA = (0.299, 0.587, 0.114)


class AugmentSettings(Protocol):
    """What the augmentation reads of a config: affectray.data.loaders.DataConfig has it all."""

    image_size: int
    channels: int
    mean: Sequence[float]
    std: Sequence[float]
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float
    color_jitter: float


@dataclass(frozen=True)
class AugmentDraw:
    """One batch's random draws, one row per sample: what :func:`augment_batch` applies."""

    theta: torch.Tensor  # [B, 2, 3] affine map from output to input coordinates (crop and flip)
    brightness: torch.Tensor  # [B]
    contrast: torch.Tensor  # [B]
    saturation: torch.Tensor  # [B]


def draw_augmentation(batch_size: int, cfg: AugmentSettings, generator: torch.Generator) -> AugmentDraw:
    """Crop box, flip and jitter factors for ``batch_size`` samples, drawn on the CPU."""
    import torch

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch_size, generator=generator, dtype=torch.float64)

    area = uniform(*cfg.scale)
    aspect = uniform(math.log(cfg.ratio[0]), math.log(cfg.ratio[1])).exp()
    # Half-sides in grid units (the face spans [-1, 1]); the box's centre keeps it inside the face.
    half_w = (area * aspect).sqrt().clamp(max=1.0)
    half_h = (area / aspect).sqrt().clamp(max=1.0)
    centre_x = (1.0 - half_w) * uniform(-1.0, 1.0)
    centre_y = (1.0 - half_h) * uniform(-1.0, 1.0)
    flip = torch.where(uniform(0.0, 1.0) < cfg.hflip, -1.0, 1.0).to(torch.float64)
    theta = torch.zeros(batch_size, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = half_w * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = half_h
    theta[:, 1, 2] = centre_y
    strength = cfg.color_jitter
    return AugmentDraw(
        theta=theta.float(),
        brightness=uniform(1.0 - strength, 1.0 + strength).float(),
        contrast=uniform(1.0 - strength, 1.0 + strength).float(),
        saturation=uniform(1.0 - strength, 1.0 + strength).float(),
    )


def _grey(levels: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] RGB levels → [N, 1, H, W] luma."""
    r, g, b = levels.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _jitter(levels: torch.Tensor, draw: AugmentDraw, repeat: int) -> torch.Tensor:
    """Brightness, contrast and saturation on [N, C, H, W] levels in [0, 255] (N = samples x repeat)."""

    def factor(values: torch.Tensor) -> torch.Tensor:
        return values.to(levels.device).repeat_interleave(repeat).view(-1, 1, 1, 1)

    b, c, s = factor(draw.brightness), factor(draw.contrast), factor(draw.saturation)
    grey = levels if levels.shape[1] == 1 else _grey(levels)
    mean_grey = grey.mean(dim=(2, 3), keepdim=True)
    # Brightness then contrast is one affine map: (b * x - b * m) * c + b * m.
    out = (levels * (b * c) + b * mean_grey * (1.0 - c)).clamp_(0.0, 255.0)
    if out.shape[1] == 3:  # saturation leaves grey alone: luma of the blend is the luma
        grey = _grey(out)
        out = (grey + (out - grey) * s).clamp_(0.0, 255.0)
    return out


def augment_batch(pixels: torch.Tensor, cfg: AugmentSettings, generator: torch.Generator) -> torch.Tensor:
    """uint8 faces [B, H, W, 3] or clips [B, T, H, W, 3] → augmented, normalised float32.

    Out: [B, C, S, S] or [B, T, C, S, S] with S = ``cfg.image_size`` and C = ``cfg.channels``,
    normalised as :func:`affectray.data.pixels.normalise_pixels` does. Runs where ``pixels``
    live; the draws come from ``generator`` (a CPU generator), so a seed repeats a batch.
    With the identity draw (scale and ratio 1, no flip, no jitter) it gives the evaluation
    input of the same faces.
    """
    import torch.nn.functional as F

    clip = pixels.dim() == 5
    batch, frames = pixels.shape[0], (pixels.shape[1] if clip else 1)
    height, width = pixels.shape[-3:-1]
    flat = pixels.reshape(batch * frames, height, width, 3)
    # Grey first when the model is grey: a third of the resampling, and the same levels as cv2.
    levels = grey_levels(flat) if cfg.channels == 1 else flat.movedim(-1, -3).float()
    draw = draw_augmentation(batch, cfg, generator)
    size = cfg.image_size
    theta = draw.theta.to(levels.device).repeat_interleave(frames, dim=0)
    grid = F.affine_grid(theta, [batch * frames, levels.shape[1], size, size], align_corners=False)
    levels = F.grid_sample(levels, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if cfg.color_jitter > 0:
        levels = _jitter(levels, draw, frames)
    x = normalise_levels(levels, cfg.mean, cfg.std)
    return x.view(batch, frames, *x.shape[1:]) if clip else x
