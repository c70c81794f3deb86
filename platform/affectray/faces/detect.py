"""MTCNN face detection over frame batches, and detection followed by alignment.

Detection runs facenet-pytorch's MTCNN nets (weights ship inside its wheel, nothing
downloads) through affectray.faces.mtcnn's cascade: the same faces, faster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from affectray.faces.align import DEFAULT_BOX_MARGIN, DEFAULT_MARGIN, align_faces, crop_boxes


@dataclass(frozen=True, eq=False)  # arrays inside: compare fields, not detections
class Detection:
    """One face found by the detector, in the coordinates of the image it was asked about."""

    box: np.ndarray  # [4] float32 x1, y1, x2, y2
    score: float  # MTCNN's final-stage face probability
    landmarks: np.ndarray  # [5, 2] float32 (x, y), in ARCFACE_TEMPLATE_112's order

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return float(max(0.0, x2 - x1) * max(0.0, y2 - y1))

    def scaled(self, factor: float) -> Detection:
        """The same face in an image resized by ``factor`` (e.g. 1 / FrameBatch.scale)."""
        return Detection(
            box=(self.box * factor).astype(np.float32),
            score=self.score,
            landmarks=(self.landmarks * factor).astype(np.float32),
        )


class FaceDetector:
    """MTCNN over lists of RGB frames; frames of equal size run as one batch.

    Built once per process (e.g. in a Ray actor's ``__init__``), then called per batch.

    Args:
        device: "cuda", "cpu", … ; None picks CUDA when available.
        min_face_size: smallest face side in pixels MTCNN looks for; smaller is slower.
        thresholds: MTCNN's P-, R- and O-net stage thresholds.
        min_score: faces below this final probability are dropped.
        max_batch: most frames per forward pass, bounding memory for large frames.
    """

    def __init__(
        self,
        *,
        device: str | None = None,
        min_face_size: int = 20,
        thresholds: Sequence[float] = (0.6, 0.7, 0.7),
        min_score: float = 0.9,
        max_batch: int = 32,
    ):
        # Imported here so that modules needing only alignment or JPEG coding
        # do not import torch and facenet-pytorch.
        import torch
        from facenet_pytorch import MTCNN

        from affectray.faces.mtcnn import Cascade

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.min_face_size = min_face_size
        self.min_score = min_score
        self.max_batch = max_batch
        self.mtcnn = MTCNN(
            keep_all=True,
            select_largest=False,  # order by probability; callers pick faces themselves
            post_process=False,
            min_face_size=min_face_size,
            thresholds=list(thresholds),
            device=self.device,
        )
        self.mtcnn.eval()
        self.cascade = Cascade(self.mtcnn)

    def detect(
        self,
        images: Sequence[np.ndarray],
        *,
        scale: float | Sequence[float] = 1.0,
        near: Sequence[Detection] | None = None,
        min_score: float | None = None,
    ) -> list[list[Detection]]:
        """Faces in each image, most probable first.

        Args:
            images: [h, w, 3] uint8 RGB arrays; sizes may differ.
            scale: the factor the images were resized by (FrameBatch.scale), one for all
                or one per image; boxes and landmarks are divided by it, i.e. returned in
                the original frame's coordinates. 1.0 keeps the images' own coordinates.
            near: faces of a recent frame (in the returned coordinates): look for faces only
                within a face's size of these and at about their size. P-net's image pyramid,
                most of MTCNN's cost, shrinks to a few windows, and there the cascade sees what
                it sees on the whole frame: a face that stayed is found as a full detection
                finds it; a new face elsewhere is not. An empty list finds nothing.
            min_score: overrides the detector's ``min_score`` for this call.
        """
        scales = [float(scale)] * len(images) if np.isscalar(scale) else [float(s) for s in scale]
        if len(scales) != len(images):
            raise ValueError(f"got {len(scales)} scales for {len(images)} images")
        results: list[list[Detection]] = [[] for _ in images]
        if near is not None and not near:
            return results
        for indices in _batches_by_size(images, self.max_batch):
            height, width = images[indices[0]].shape[:2]
            if min(height, width) < self.min_face_size:
                continue  # MTCNN's image pyramid is empty
            batch = np.stack([images[i] for i in indices])  # [B, H, W, 3] uint8
            around = None if near is None else np.stack([f.box * scales[indices[0]] for f in near])
            for i, (boxes, points) in zip(indices, self.cascade.detect(batch, around)):
                results[i] = self._detections(boxes[:, :4], boxes[:, 4], points, scales[i], min_score)
        return results

    def _detections(
        self, boxes: np.ndarray, probs: np.ndarray, points: np.ndarray, scale: float, min_score: float | None = None
    ) -> list[Detection]:
        min_score = self.min_score if min_score is None else min_score
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) / scale  # [N, 4]
        probs = np.asarray(probs, dtype=np.float32).reshape(-1)  # [N]
        points = np.asarray(points, dtype=np.float32).reshape(-1, 5, 2) / scale  # [N, 5, 2]
        return [
            Detection(box=boxes[k], score=float(probs[k]), landmarks=points[k])
            for k in range(len(probs))
            if probs[k] >= min_score
        ]


class LazyDetector:
    """A FaceDetector built on its first call, for Ray actors whose inputs may need none (frame folders).

    ``torch_threads`` > 0 caps torch's threads in the process first, so the actors of
    one node share its cores instead of oversubscribing them.
    """

    def __init__(self, *, min_score: float, min_face_size: int, torch_threads: int = 0):
        self.kwargs = {"min_score": min_score, "min_face_size": min_face_size}
        self.torch_threads = torch_threads
        self._detector: FaceDetector | None = None

    def __call__(self) -> FaceDetector:
        if self._detector is None:
            import torch

            if self.torch_threads:
                torch.set_num_threads(self.torch_threads)
            self._detector = FaceDetector(**self.kwargs)
        return self._detector


def _batches_by_size(images: Sequence[np.ndarray], max_batch: int) -> list[list[int]]:
    """Indices of the images grouped by shape (MTCNN batches one size), chunked to max_batch."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {i}: expected [h, w, 3] uint8 RGB, got {image.shape} {image.dtype}")
        groups.setdefault(image.shape, []).append(i)
    return [ids[k : k + max_batch] for ids in groups.values() for k in range(0, len(ids), max_batch)]


def downscale(images: Sequence[np.ndarray], max_side: int) -> tuple[list[np.ndarray], float]:
    """Frames shrunk so that max(h, w) <= max_side, and the factor that maps their coordinates back.

    All images are taken to share the first one's size (a FrameBatch does).
    """
    h, w = images[0].shape[:2]
    factor = min(1.0, max_side / max(h, w))
    if factor == 1.0:
        return list(images), 1.0
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return [cv2.resize(im, size, interpolation=cv2.INTER_AREA) for im in images], factor


def detect_and_align(
    detector: FaceDetector,
    images: Sequence[np.ndarray],
    image_size: int,
    detect_max_side: int,
    margin: float | None = None,
    detect_every: int = 1,
    crop: str = "aligned",
) -> list[tuple[list[Detection], np.ndarray]]:
    """Detect on downscaled copies of same-sized frames, crop faces from the frames themselves.

    Returns, per image, its faces (in the image's coordinates, most probable first)
    and their crops [N, image_size, image_size, 3] (N may be 0). Ingest and
    labeling share this, so both see the same faces and the same crops.

    Args:
        crop: "aligned" (five-point alignment, ``align_faces``) or "box" (the detector's
            box squared, ``crop_boxes``): what the classifier was trained on.
        margin: the crop's extra context; None takes the mode's default.
        detect_every: for consecutive video frames: detection on the whole of every k-th
            frame (the first included), and on the frames between only near the faces
            found there (:meth:`FaceDetector.detect` ``near``): 1.5-2x cheaper over k = 4,
            the same faces, but a face that enters the picture is found up to k - 1
            frames late. 1 (default) detects on every whole frame.
    """
    small, factor = downscale(images, detect_max_side)
    every = max(1, detect_every)
    keys = list(range(0, len(small), every))
    found: list[list[Detection]] = [[] for _ in small]
    # Key frames keep every face O-net passed, even under min_score: one that crosses it on the
    # frames between must be looked for there too, as detection on every frame would find it.
    for key, faces in zip(keys, detector.detect([small[i] for i in keys], scale=factor, min_score=0.0)):
        found[key] = [f for f in faces if f.score >= detector.min_score]
        between = range(key + 1, min(key + every, len(small)))
        if faces and len(between):
            found[key + 1 : between.stop] = detector.detect([small[i] for i in between], scale=factor, near=faces)
    empty = np.zeros((0, image_size, image_size, 3), np.uint8)
    if crop == "aligned":
        margin = DEFAULT_MARGIN if margin is None else margin
        return [
            (faces, align_faces(image, np.stack([d.landmarks for d in faces]), image_size, margin) if faces else empty)
            for image, faces in zip(images, found)
        ]
    if crop == "box":
        margin = DEFAULT_BOX_MARGIN if margin is None else margin
        return [
            (faces, crop_boxes(image, np.stack([d.box for d in faces]), image_size, margin) if faces else empty)
            for image, faces in zip(images, found)
        ]
    raise ValueError(f"crop must be 'aligned' or 'box', got {crop!r}")
