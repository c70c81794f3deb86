"""uint8 RGB pixels to normalised model input: the one normalisation of training, evaluation and inference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["grey_levels", "normalise_levels", "normalise_pixels"]

# ITU-R BT.601 luma (0.299, 0.587, 0.114) in cv2.cvtColor's 15-bit fixed point (OpenCV 5), so grey
# levels here are exactly those of cv2.cvtColor(..., COLOR_RGB2GRAY) that FER2013 models saw.
_LUMA_Q15 = (9798, 19235, 3735)


def normalise_pixels(
    pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float], channels: int = 3
) -> torch.Tensor:
    """uint8 [..., H, W, 3] RGB → float32 [..., C, H, W], (x / 255 - mean) / std per channel.

    The one normalisation of model inputs: training, evaluation and inference all call it.
    ``channels`` 1 turns RGB into grey first, level for level as cv2 does.
    Computed in float32 (then cast by the caller): bf16 has too few bits for it to be exact.
    """
    levels = grey_levels(pixels) if channels == 1 else pixels.movedim(-1, -3).float()
    return normalise_levels(levels, mean, std)


def grey_levels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] RGB → float32 grey levels [..., 1, H, W], exactly cv2's COLOR_RGB2GRAY."""
    import torch

    x = pixels.movedim(-1, -3)  # [..., 3, H, W]
    luma = torch.tensor(_LUMA_Q15, device=x.device, dtype=torch.int32).view(3, 1, 1)
    return (((x.int() * luma).sum(dim=-3, keepdim=True) + (1 << 14)) >> 15).float()


def normalise_levels(levels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float levels in [0, 255], [..., C, H, W] → (x / 255 - mean) / std per channel."""
    import torch

    shape = (levels.shape[-3], 1, 1)
    mean_ = torch.tensor(tuple(mean), device=levels.device, dtype=torch.float32).view(shape) * 255.0
    std_ = torch.tensor(tuple(std), device=levels.device, dtype=torch.float32).view(shape) * 255.0
    return (levels - mean_) / std_
