"""MTCNN's three-stage cascade (Zhang et al., 2016) on numpy frames, with facenet-pytorch's nets.

facenet-pytorch's ``detect_face`` resamples with torch's "area" interpolation
(adaptive average pooling): the whole float batch once per pyramid scale, then
every R-net and O-net candidate in its own call, hundreds per frame. On a CPU
that resampling costs about as much as the nets. Here the same averages come from
one summed-area table per frame: every pyramid level and every candidate crop is
four gathers and a division, exact in integers, so the nets see the same inputs
(to float rounding) and the cascade finds the same faces with the same landmarks.
The stages, thresholds, NMS and box regression are facenet-pytorch's own helpers.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from facenet_pytorch.models.utils.detect_face import (
    batched_nms_numpy,
    bbreg,
    generateBoundingBox,
    pad,
    rerec,
)
from torchvision.ops import batched_nms

__all__ = ["Cascade", "area_windows", "pyramid_scales", "summed_area"]

PYRAMID_FACTOR = 0.709  # MTCNN's scale step between pyramid levels


def summed_area(frames: np.ndarray) -> np.ndarray:
    """[B, H + 1, W + 1, C] table T with T[b, y, x] = sum of frames[b, :y, :x] (zero first row and column).

    int32 while a frame's total fits, else float64 (exact for integers below 2**53).
    """
    b, h, w, c = frames.shape
    depth = cv2.CV_32S if h * w * 255 < 2**31 else cv2.CV_64F
    return np.stack([cv2.integral(frame, sdepth=depth).reshape(h + 1, w + 1, c) for frame in frames])


def area_windows(start: np.ndarray, length: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive average pooling's windows: ``length`` pixels from ``start`` into ``size`` cells.

    Cell i averages [floor(i * L / size), ceil((i + 1) * L / size)), as torch does; windows
    overlap when L is not a multiple of size. Arrays of K spans give [K, size] bounds.
    """
    cells = np.arange(size)
    length = np.asarray(length)[..., None]
    first = np.asarray(start)[..., None] + (cells * length) // size
    last = np.asarray(start)[..., None] - (-(cells + 1) * length // size)  # ceil division
    return first, last


def _level(table: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Every frame of the table area-resampled to [B, out_h, out_w, C] float32 (one pyramid level)."""
    (r0, r1), (c0, c1) = area_windows(0, table.shape[1] - 1, out_h), area_windows(0, table.shape[2] - 1, out_w)
    strips = np.take(table, r1, axis=1) - np.take(table, r0, axis=1)  # [B, out_h, W + 1, C] row-window sums
    total = np.take(strips, c1, axis=2) - np.take(strips, c0, axis=2)  # np.take: 3x faster than fancy indexing
    count = (r1 - r0)[:, None] * (c1 - c0)[None, :]
    return np.divide(total, count[..., None], dtype=np.float32)


def _crop_means(table: np.ndarray, frame: np.ndarray, rows: tuple, cols: tuple) -> np.ndarray:
    """K crops area-resampled: [K, R, C, channels] float32.

    ``frame`` [K] picks each crop's table; rows / cols are its [K, R] / [K, C] (first, last) bounds.
    """
    (r0, r1), (c0, c1) = rows, cols
    k = frame[:, None, None]
    total = (
        table[k, r1[:, :, None], c1[:, None, :]]
        - table[k, r0[:, :, None], c1[:, None, :]]
        - table[k, r1[:, :, None], c0[:, None, :]]
        + table[k, r0[:, :, None], c0[:, None, :]]
    )
    count = (r1 - r0)[:, :, None] * (c1 - c0)[:, None, :]
    return np.divide(total, count[..., None], dtype=np.float32)


def pyramid_scales(height: int, width: int, min_face_size: int) -> list[float]:
    """MTCNN's image pyramid: scales from 12 / min_face_size down while the short side stays >= 12 px."""
    scale = 12.0 / min_face_size
    short = min(height, width) * scale
    scales = []
    while short >= 12:
        scales.append(scale)
        scale *= PYRAMID_FACTOR
        short *= PYRAMID_FACTOR
    return scales


def _normalised(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """[K, h, w, 3] float32 pixel means → the nets' [K, 3, h, w] input in [-1, 1], channels last.

    Channels-last is how the pixels already lie, and on CPU the three nets run 1.6-3x
    faster in it than in NCHW (max-pooling most of all).
    """
    tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # a channels-last view, no copy
    return ((tensor - 127.5) * 0.0078125).to(device, memory_format=torch.channels_last)


class Cascade:
    """P-net over the pyramid, then R-net and O-net on the candidates, as facenet-pytorch's MTCNN.

    Args:
        mtcnn: a facenet_pytorch.MTCNN whose nets, thresholds and min_face_size are used.
    """

    def __init__(self, mtcnn):
        self.pnet, self.rnet, self.onet = mtcnn.pnet, mtcnn.rnet, mtcnn.onet
        self.thresholds = list(mtcnn.thresholds)
        self.min_face_size = mtcnn.min_face_size
        self.device = next(self.pnet.parameters()).device

    @torch.inference_mode()
    def detect(self, frames: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per frame of [B, H, W, 3] uint8: (boxes [N, 5] x1, y1, x2, y2, score; landmarks [N, 5, 2])."""
        b, h, w, _ = frames.shape
        table = summed_area(frames)
        boxes, image = self._propose(table, h, w)
        boxes, image = self._refine(table, boxes, image, self.rnet, 24, self.thresholds[1])
        boxes, image, points = self._finish(table, boxes, image)
        if len(boxes):
            pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], image, 0.7, "Min")  # facenet's last NMS
            boxes, image, points = boxes[pick], image[pick], points[pick]
        boxes, image, points = boxes.cpu().numpy(), image.cpu().numpy(), points.cpu().numpy()
        return [(boxes[image == i], points[image == i]) for i in range(b)]

    @torch.inference_mode()
    def follow(self, frame: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """R-net and O-net on the squares around ``boxes`` [N, 5] of one [H, W, 3] frame, as on P-net's candidates.

        Returns (boxes [M, 5], landmarks [M, 5, 2]) of the faces still seen, converged ones merged.
        """
        table = summed_area(frame[None])
        boxes = torch.tensor(np.asarray(boxes, np.float32).reshape(-1, 5), device=self.device)  # a copy: rerec writes in place
        image = torch.zeros(len(boxes), dtype=torch.long, device=self.device)
        boxes, image = self._refine(table, rerec(boxes), image, self.rnet, 24, self.thresholds[1])
        boxes, image, points = self._finish(table, boxes, image)
        if len(boxes):
            pick = batched_nms(boxes[:, :4], boxes[:, 4], image, 0.7)
            boxes, points = boxes[pick], points[pick]
        return boxes.cpu().numpy(), points.cpu().numpy()

    def _propose(self, table: np.ndarray, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """P-net over every pyramid level: candidate squares [N, 5] and their frame indices [N]."""
        boxes, image = [], []
        for scale in pyramid_scales(h, w, self.min_face_size):
            level = _level(table, int(h * scale + 1), int(w * scale + 1))  # facenet's sizes
            reg, probs = self.pnet(_normalised(level, self.device))
            found, index = generateBoundingBox(reg, probs[:, 1], scale, self.thresholds[0])
            pick = batched_nms(found[:, :4], found[:, 4], index, 0.5)
            boxes.append(found[pick])
            image.append(index[pick])
        boxes, image = torch.cat(boxes), torch.cat(image)
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image, 0.7)
        boxes, image = boxes[pick], image[pick]
        # P-net's own box regression, then squares for R-net.
        width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        refined = torch.stack(
            [
                boxes[:, 0] + boxes[:, 5] * width,
                boxes[:, 1] + boxes[:, 6] * height,
                boxes[:, 2] + boxes[:, 7] * width,
                boxes[:, 3] + boxes[:, 8] * height,
                boxes[:, 4],
            ],
            dim=1,
        )
        return rerec(refined), image

    def _crops(self, table: np.ndarray, boxes: torch.Tensor, image: torch.Tensor, side: int):
        """Area-resampled [K, 3, side, side] inputs of the candidates inside the frame, and which those are."""
        h, w = table.shape[1] - 1, table.shape[2] - 1
        y, ey, x, ex = pad(boxes, w, h)  # 1-based inclusive bounds, clipped to the frame
        inside = (ey > y - 1) & (ex > x - 1)
        y, ey, x, ex = y[inside], ey[inside], x[inside], ex[inside]
        rows = area_windows(y - 1, ey - y + 1, side)
        cols = area_windows(x - 1, ex - x + 1, side)
        frame = image.cpu().numpy()[inside]
        return _normalised(_crop_means(table, frame, rows, cols), self.device), torch.as_tensor(inside, device=self.device)

    def _refine(self, table, boxes, image, net, side: int, threshold: float):
        """R-net: keep candidates it scores above ``threshold``, merge, regress, square."""
        if not len(boxes):
            return boxes, image
        inputs, inside = self._crops(table, boxes, image, side)
        boxes, image = boxes[inside], image[inside]
        reg, prob = net(inputs)
        keep = prob[:, 1] > threshold
        boxes = torch.cat([boxes[keep, :4], prob[keep, 1:2]], dim=1)
        image, reg = image[keep], reg[keep]
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image, 0.7)
        return rerec(bbreg(boxes[pick], reg[pick])), image[pick]

    def _finish(self, table, boxes, image):
        """O-net: final scores, boxes and five landmarks of the candidates above its threshold."""
        points = torch.zeros(0, 5, 2, device=self.device)
        if not len(boxes):
            return boxes, image, points
        inputs, inside = self._crops(table, boxes, image, 48)
        boxes, image = boxes[inside], image[inside]
        reg, marks, prob = self.onet(inputs)
        keep = prob[:, 1] > self.thresholds[2]
        boxes = torch.cat([boxes[keep, :4], prob[keep, 1:2]], dim=1)
        image, reg, marks = image[keep], reg[keep], marks[keep]
        width = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        height = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        points = torch.stack(
            [width * marks[:, :5] + boxes[:, :1] - 1, height * marks[:, 5:] + boxes[:, 1:2] - 1], dim=2
        )  # [N, 5, 2], landmarks relative to O-net's input box
        return bbreg(boxes, reg), image, points

