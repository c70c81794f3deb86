"""MTCNN's three-stage cascade (Zhang et al., 2016) on numpy frames, with facenet-pytorch's nets.

facenet-pytorch's ``detect_face`` resamples with torch's "area" interpolation
(adaptive average pooling): the whole float batch once per pyramid scale, then
every R-net and O-net candidate in its own call, hundreds per frame. On a CPU
that resampling costs about as much as the nets. Here the same averages come from
one summed-area table per frame: every pyramid level and every candidate crop is
four gathers and a division, exact in integers, so the nets see the same inputs
(to float rounding) and the cascade finds the same faces with the same landmarks.
The stages, thresholds, NMS and box regression are facenet-pytorch's own helpers.

Given the faces of a recent frame (``near``), P-net runs only on windows around
them, at the pyramid levels of their size. P-net is fully convolutional, so on a
window aligned to its stride it scores exactly what it scores there on the whole
level: the candidates around the face, and so the face found, are the whole
frame's. Faces elsewhere in the frame are not looked for.

On CPU the nets run on a few frames and a few dozen crops per call: their
activations then stay in cache, 1.2-1.9x faster per item than in batches of hundreds.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from facenet_pytorch.models.utils.detect_face import batched_nms_numpy, bbreg, pad, rerec
from torchvision.ops import batched_nms

__all__ = ["Cascade", "area_windows", "pyramid_scales", "summed_area"]

PYRAMID_FACTOR = 0.709  # MTCNN's scale step between pyramid levels
NEAR_MARGIN = 1.0  # around a given face, P-net looks this many face sizes out on each side
NEAR_SCALES = 3.0  # ... at the levels whose 12 px cell is a third to three times the face's size
# Items per net call on CPU, measured fastest (one thread): past these, activations leave the
# cache and the time per item rises. A GPU takes each stage in one call.
CPU_FRAMES, CPU_RNET_CROPS, CPU_ONET_CROPS = 4, 128, 32


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


def _level(table: np.ndarray, out_h: int, out_w: int, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Every frame of the table area-resampled to [B, out_h, out_w, C] float32 (one pyramid level).

    ``window`` (top, bottom, left, right) in level pixels returns only that part of the level.
    """
    (r0, r1), (c0, c1) = area_windows(0, table.shape[1] - 1, out_h), area_windows(0, table.shape[2] - 1, out_w)
    if window is not None:
        top, bottom, left, right = window
        r0, r1, c0, c1 = r0[top:bottom], r1[top:bottom], c0[left:right], c1[left:right]
    strips = np.take(table, r1, axis=1) - np.take(table, r0, axis=1)  # [B, out_h, W + 1, C] row-window sums
    total = np.take(strips, c1, axis=2) - np.take(strips, c0, axis=2)  # np.take: 3x faster than fancy indexing
    count = (r1 - r0)[:, None] * (c1 - c0)[None, :]
    return np.divide(total, count[..., None], dtype=np.float32)


def _crop_means(table: np.ndarray, frame: np.ndarray, rows: tuple, cols: tuple) -> np.ndarray:
    """K crops area-resampled: [K, R, C, channels] float32.

    ``frame`` [K] picks each crop's table; rows / cols are its [K, R] / [K, C] (first, last) bounds.
    """
    (r0, r1), (c0, c1) = rows, cols
    _, h1, w1, channels = table.shape
    pixels = table.reshape(-1, channels)
    first_row = (np.asarray(frame) * h1)[:, None, None]

    def corner(r: np.ndarray, c: np.ndarray) -> np.ndarray:  # np.take on flat indices: 3x faster than fancy indexing
        return np.take(pixels, ((first_row + r[:, :, None]) * w1 + c[:, None, :]).ravel(), axis=0)

    total = corner(r1, c1) - corner(r0, c1) - corner(r1, c0) + corner(r0, c0)
    count = (r1 - r0)[:, :, None] * (c1 - c0)[:, None, :]
    return np.divide(total.reshape(*count.shape, channels), count[..., None], dtype=np.float32)


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


def _span(lo: float, hi: float, size: int) -> tuple[int, int]:
    """[lo, hi) widened to an even start and an even length (or the level's end), clipped to [0, size).

    Even, because P-net halves the grid once (a 2x2 max-pool, ceil mode): on such a
    window its every output is the whole level's output at the same place.
    """
    start = max(0, int(np.floor(lo)) // 2 * 2)
    stop = min(size, int(np.ceil(hi)))
    if (stop - start) % 2 and stop < size:
        stop += 1
    return start, stop


def _windows(near: np.ndarray | None, scale: float, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """Windows (top, bottom, left, right) of a pyramid level P-net runs on: the whole level, or around ``near``."""
    if near is None:
        return [(0, height, 0, width)]
    windows = []
    for x1, y1, x2, y2 in near[:, :4]:
        w, h = x2 - x1, y2 - y1
        if not 1 / NEAR_SCALES <= 12 / scale / max(w, h, 1.0) <= NEAR_SCALES:
            continue  # a candidate this level's size cannot become this face
        top, bottom = _span((y1 - NEAR_MARGIN * h) * scale, (y2 + NEAR_MARGIN * h) * scale, height)
        left, right = _span((x1 - NEAR_MARGIN * w) * scale, (x2 + NEAR_MARGIN * w) * scale, width)
        if bottom - top >= 12 and right - left >= 12:  # P-net's receptive field
            windows.append((top, bottom, left, right))
    return windows


def _candidates(reg: torch.Tensor, probs: torch.Tensor, scale: float, threshold: float, top: int, left: int):
    """facenet-pytorch's generateBoundingBox for P-net's output on a window at (top, left) of its level.

    Each output cell above ``threshold`` maps to the 12 px square it scored, in frame pixels:
    rows [x1, y1, x2, y2, score, 4 regression offsets] and the frame index of each.
    """
    mask = probs >= threshold
    where = mask.nonzero()  # [K, 3]: frame, row, column
    cells = (where[:, 1:] + torch.tensor([top // 2, left // 2], device=where.device)).to(reg.dtype).flip(1)
    q1 = ((2 * cells + 1) / scale).floor()  # P-net's stride 2 and 12 px cell, as facenet-pytorch writes them
    q2 = ((2 * cells + 12) / scale).floor()
    offsets = reg.permute(1, 0, 2, 3)[:, mask].permute(1, 0)
    return torch.cat([q1, q2, probs[mask].unsqueeze(1), offsets], dim=1), where[:, 0]


def _forward(net: torch.nn.Module, inputs: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """``net`` over ``inputs`` in slices of ``size`` items, outputs concatenated."""
    if len(inputs) <= size:
        return net(inputs)
    outputs = [net(inputs[k : k + size]) for k in range(0, len(inputs), size)]
    return tuple(torch.cat(parts) for parts in zip(*outputs))


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
        limits = (CPU_FRAMES, CPU_RNET_CROPS, CPU_ONET_CROPS) if self.device.type == "cpu" else (2**31,) * 3
        self.max_frames, self.max_rnet, self.max_onet = limits

    @torch.inference_mode()
    def detect(self, frames: np.ndarray, near: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per frame of [B, H, W, 3] uint8: (boxes [N, 5] x1, y1, x2, y2, score; landmarks [N, 5, 2]).

        ``near`` [M, 4+] boxes (e.g. the faces of a recent frame): look only around them, at
        their sizes; P-net's pyramid, most of the cost, shrinks to a few small windows.
        """
        if len(frames) > self.max_frames:
            groups = (frames[k : k + self.max_frames] for k in range(0, len(frames), self.max_frames))
            return [found for group in groups for found in self.detect(group, near)]
        b, h, w, _ = frames.shape
        table = summed_area(frames)
        boxes, image = self._propose(table, h, w, None if near is None else np.asarray(near, np.float64))
        boxes, image = self._refine(table, boxes, image)
        boxes, image, points = self._finish(table, boxes, image)
        if len(boxes):
            pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], image, 0.7, "Min")  # facenet's last NMS
            boxes, image, points = boxes[pick], image[pick], points[pick]
        boxes, image, points = boxes.cpu().numpy(), image.cpu().numpy(), points.cpu().numpy()
        return [(boxes[image == i], points[image == i]) for i in range(b)]

    def _propose(self, table: np.ndarray, h: int, w: int, near: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """P-net over every pyramid level (or windows near given faces): candidate squares [N, 5], frame indices [N]."""
        boxes, image = [torch.zeros(0, 9, device=self.device)], [torch.zeros(0, dtype=torch.long, device=self.device)]
        for scale in pyramid_scales(h, w, self.min_face_size):
            size = (int(h * scale + 1), int(w * scale + 1))  # facenet's level sizes
            found = [
                _candidates(*self._pnet(_level(table, *size, window)), scale, self.thresholds[0], window[0], window[2])
                for window in _windows(near, scale, *size)
            ]
            if not found:
                continue
            level, index = (torch.cat(parts) for parts in zip(*found))
            pick = batched_nms(level[:, :4], level[:, 4], index, 0.5)  # also merges overlapping windows' twins
            boxes.append(level[pick])
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

    def _pnet(self, level: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        reg, probs = self.pnet(_normalised(level, self.device))
        return reg, probs[:, 1]

    def _crops(self, table: np.ndarray, boxes: torch.Tensor, image: torch.Tensor, side: int):
        """Area-resampled [K, 3, side, side] inputs of the candidates inside the frame, and which those are."""
        h, w = table.shape[1] - 1, table.shape[2] - 1
        y, ey, x, ex = pad(boxes, w, h)  # 1-based inclusive bounds, clipped to the frame
        inside = (ey > y - 1) & (ex > x - 1)
        y, ey, x, ex = y[inside], ey[inside], x[inside], ex[inside]
        rows = area_windows(y - 1, ey - y + 1, side)
        cols = area_windows(x - 1, ex - x + 1, side)
        frame = image.cpu().numpy()[inside]
        return _normalised(_crop_means(table, frame, rows, cols), self.device), torch.as_tensor(
            inside, device=self.device
        )

    def _refine(self, table, boxes, image):
        """R-net: keep candidates it scores above its threshold, merge, regress, square."""
        if not len(boxes):
            return boxes, image
        inputs, inside = self._crops(table, boxes, image, 24)
        boxes, image = boxes[inside], image[inside]
        reg, prob = _forward(self.rnet, inputs, self.max_rnet)
        keep = prob[:, 1] > self.thresholds[1]
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
        reg, marks, prob = _forward(self.onet, inputs, self.max_onet)
        keep = prob[:, 1] > self.thresholds[2]
        boxes = torch.cat([boxes[keep, :4], prob[keep, 1:2]], dim=1)
        image, reg, marks = image[keep], reg[keep], marks[keep]
        width = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        height = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        points = torch.stack(
            [width * marks[:, :5] + boxes[:, :1] - 1, height * marks[:, 5:] + boxes[:, 1:2] - 1], dim=2
        )  # [N, 5, 2], landmarks relative to O-net's input box
        return bbreg(boxes, reg), image, points
