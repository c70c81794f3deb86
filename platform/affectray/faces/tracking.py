"""Face tracks: link per-frame face boxes into identities by overlap (IoU).

Ingest keeps one track per video by default (the main subject, see
:func:`largest_track`) or every track; labeling smooths predictions per track.
Faces in talking-head and in-the-wild FER video move little between frames, so
matching on box overlap with the last box of each track is enough, with a
short gap allowed for missed detections (blinks, turns, motion blur).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from affectray.faces.detect import Detection

__all__ = ["IoUTracker", "Track", "box_iou", "largest_track", "select_tracks"]

Boxes = np.ndarray | Sequence[Detection]  # [N, 4] x1, y1, x2, y2, or detections


@dataclass(eq=False)
class Track:
    """One face followed through a video."""

    track_id: int
    first_frame: int
    last_frame: int
    box: np.ndarray  # [4] float32, the last matched box
    num_frames: int = 1
    total_area: float = 0.0  # sum of box areas over the track's frames

    @property
    def mean_area(self) -> float:
        return self.total_area / self.num_frames

    def extend(self, frame_index: int, box: np.ndarray) -> None:
        self.last_frame = frame_index
        self.box = box
        self.num_frames += 1
        self.total_area += _area(box)


class IoUTracker:
    """Greedy IoU matching of each frame's boxes against the live tracks' last boxes.

    Pairs are taken in order of decreasing IoU (ties: lower track id, then earlier
    detection), each track and box at most once; with the few faces of a FER frame
    this gives the Hungarian assignment without its cost. Unmatched boxes start new
    tracks, numbered 0, 1, … in order of appearance, so a run is deterministic.

    Args:
        iou_threshold: least IoU for a box to continue a track.
        max_gap: frames a track may go unmatched and still continue, counted in
            frame_index units: with sampled frames, keep it at least the sampling stride.
    """

    def __init__(self, iou_threshold: float = 0.3, max_gap: int = 15):
        self.iou_threshold = iou_threshold
        self.max_gap = max_gap
        self.reset()

    def reset(self) -> None:
        """Forget all tracks; ids start from 0 again."""
        self._tracks: list[Track] = []
        self._live: list[Track] = []
        self._last_frame: int | None = None

    @property
    def tracks(self) -> list[Track]:
        """Every track so far, ended ones included, by id."""
        return list(self._tracks)

    def update(self, frame_index: int, detections: Boxes) -> list[int]:
        """Track ids of one frame's faces, in the order given; frames must come in increasing order."""
        if self._last_frame is not None and frame_index <= self._last_frame:
            raise ValueError(f"frame {frame_index} after frame {self._last_frame}: frames must increase")
        self._last_frame = frame_index
        boxes = _as_boxes(detections)  # [D, 4]
        self._live = [t for t in self._live if frame_index - t.last_frame - 1 <= self.max_gap]

        ids = [-1] * len(boxes)
        if self._live and len(boxes):
            iou = box_iou(np.stack([t.box for t in self._live]), boxes)  # [T, D]
            rows, cols = np.nonzero(iou >= self.iou_threshold)
            order = np.lexsort((cols, rows, -iou[rows, cols]))  # the last key sorts first
            taken_tracks: set[int] = set()
            for r, c in zip(rows[order], cols[order]):
                if r in taken_tracks or ids[c] >= 0:
                    continue
                taken_tracks.add(r)
                ids[c] = self._live[r].track_id
                self._live[r].extend(frame_index, boxes[c])

        for c, box in enumerate(boxes):
            if ids[c] < 0:
                track = Track(len(self._tracks), frame_index, frame_index, box, total_area=_area(box))
                self._tracks.append(track)
                self._live.append(track)
                ids[c] = track.track_id
        return ids


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, M] intersection over union of boxes a [N, 4] and b [M, 4] (x1, y1, x2, y2)."""
    a, b = a[:, None, :], b[None, :, :]  # [N, 1, 4], [1, M, 4]
    width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = width * height  # [N, M]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-9)


def largest_track(tracks: Sequence[Track]) -> int | None:
    """Id of the main subject's track: most frames x mean box area (= total area); None if no tracks.

    Frames alone would pick a small face that stays in the background; area alone a
    face that crosses the camera briefly. Ties go to the lower id.
    """
    if not tracks:
        return None
    return max(tracks, key=lambda t: (t.total_area, -t.track_id)).track_id


def select_tracks(tracks: Sequence[Track], all_faces: bool = False, min_frames: int = 1) -> list[int]:
    """Ids of the tracks to keep: every track of at least min_frames frames, or only the largest."""
    kept = [t for t in tracks if t.num_frames >= min_frames]
    if all_faces:
        return sorted(t.track_id for t in kept)
    largest = largest_track(kept)
    return [] if largest is None else [largest]


def _as_boxes(detections: Boxes) -> np.ndarray:
    if isinstance(detections, np.ndarray):
        return detections.astype(np.float32).reshape(-1, 4)
    return np.array([d.box for d in detections], dtype=np.float32).reshape(-1, 4)


def _area(box: np.ndarray) -> float:
    return float(max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1]))
