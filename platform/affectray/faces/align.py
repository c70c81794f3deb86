"""Face crops for classifiers: five-point alignment, or the detector's box.

The five MTCNN landmarks map onto the ArcFace template with a least-squares similarity
transform (Umeyama), widened by ``margin`` because expression lives in the brows,
forehead and chin that ArcFace's tight identity crop cuts off. Models trained on
detector crops instead (FER2013's mini-Xception) get :func:`crop_boxes`; a checkpoint's
preprocessing says which (``crop``: "aligned" or "box").
"""

from __future__ import annotations

import cv2
import numpy as np

# Landmarks of an aligned 112x112 ArcFace crop (insightface), (x, y) in pixels, in
# MTCNN's order: image-left eye, image-right eye, nose tip, left and right mouth corner.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)

# The crop is (1 + margin) times ArcFace's, i.e. the template shrinks toward the centre by
# 1 / 1.25 = 0.8: brows, forehead and chin stay inside, the background stays small.
DEFAULT_MARGIN = 0.25
# A detector box squared and widened by a fifth: about fer's 10 px each side of a 100 px face.
DEFAULT_BOX_MARGIN = 0.2


def face_template(image_size: int = 224, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """[5, 2] float32 landmark targets in an image_size crop.

    Args:
        margin: extra context relative to ArcFace's crop, as a fraction of its side:
            0 reproduces ArcFace's geometry, 0.25 (default) a crop 1.25x as wide.
    """
    unit = ARCFACE_TEMPLATE_112 / 112.0  # [5, 2] in [0, 1]
    return ((0.5 + (unit - 0.5) / (1.0 + margin)) * image_size).astype(np.float32)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src onto dst.

    Umeyama (1991), vectorised over leading dimensions; reflections are excluded.

    Args:
        src: [..., K, 2] points, e.g. detected landmarks.
        dst: [K, 2] or [..., K, 2] target points.
    Returns:
        [..., 2, 3] float64 affine matrices for cv2.warpAffine.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.broadcast_to(np.asarray(dst, dtype=np.float64), src.shape)
    src_mean = src.mean(axis=-2, keepdims=True)  # [..., 1, 2]
    dst_mean = dst.mean(axis=-2, keepdims=True)
    src_c, dst_c = src - src_mean, dst - dst_mean  # [..., K, 2]
    cov = np.swapaxes(dst_c, -1, -2) @ src_c / src.shape[-2]  # [..., 2, 2]
    u, s, vt = np.linalg.svd(cov)
    # Flip the last axis where the best orthogonal map would be a reflection.
    d = np.sign(np.linalg.det(u) * np.linalg.det(vt))  # [...]
    d = np.where(d == 0, 1.0, d)
    u[..., :, 1] *= d[..., None]
    s[..., 1] *= d
    rotation = u @ vt  # [..., 2, 2]
    src_var = (src_c**2).sum(axis=(-2, -1)) / src.shape[-2]  # [...]
    scale = s.sum(axis=-1) / np.maximum(src_var, 1e-12)  # [...]
    linear = scale[..., None, None] * rotation  # [..., 2, 2]
    translation = dst_mean[..., 0, :] - (linear @ src_mean[..., 0, :, None])[..., 0]  # [..., 2]
    return np.concatenate([linear, translation[..., None]], axis=-1)


def align_face(
    image: np.ndarray, landmarks: np.ndarray, image_size: int = 224, margin: float = DEFAULT_MARGIN
) -> np.ndarray:
    """[image_size, image_size, 3] face crop with its five landmarks on face_template(image_size, margin).

    Args:
        image: [h, w, 3] uint8 RGB frame, in the coordinates of ``landmarks``.
        landmarks: [5, 2] (x, y) in MTCNN's order.
    """
    return align_faces(image, np.asarray(landmarks)[None], image_size, margin)[0]


def align_faces(
    image: np.ndarray, landmarks: np.ndarray, image_size: int = 224, margin: float = DEFAULT_MARGIN
) -> np.ndarray:
    """[N, image_size, image_size, 3] crops of the N faces of one frame; landmarks is [N, 5, 2]."""
    matrices = similarity_transform(landmarks, face_template(image_size, margin))  # [N, 2, 3]
    crops = np.empty((len(matrices), image_size, image_size, 3), dtype=np.uint8)
    for k, matrix in enumerate(matrices):
        # Black outside the frame, as insightface does: replicated edges draw fake texture.
        crops[k] = cv2.warpAffine(
            image, matrix, (image_size, image_size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
        )
    return crops


def square_boxes(boxes: np.ndarray, margin: float) -> np.ndarray:
    """[N, 4] (x1, y1, x2, y2) → the square around each box's centre, its longer side times (1 + margin)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    half = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])[:, None] * (1.0 + margin) / 2.0
    return np.concatenate([centre - half, centre + half], axis=1)


def crop_boxes(image: np.ndarray, boxes: np.ndarray, image_size: int, margin: float = DEFAULT_BOX_MARGIN) -> np.ndarray:
    """[N, image_size, image_size, 3] crops of the detector boxes, squared and widened by ``margin``.

    What a model trained on detector crops rather than aligned faces wants (fer's
    mini-Xception: the square box plus a border). Cut at the frame's own resolution and
    then resized (area averaging when shrinking, as a face 5x the crop's side aliases
    otherwise); outside the frame is black, as in :func:`align_faces`.
    """
    h, w = image.shape[:2]
    squares = np.round(square_boxes(boxes, margin)).astype(np.int64)
    crops = np.empty((len(squares), image_size, image_size, 3), dtype=np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(squares):
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
        inside = image[max(y1, 0) : min(y2, h), max(x1, 0) : min(x2, w)]
        patch = cv2.copyMakeBorder(
            inside, max(-y1, 0), max(y2 - h, 0), max(-x1, 0), max(x2 - w, 0), cv2.BORDER_CONSTANT, value=0
        )
        interpolation = cv2.INTER_AREA if patch.shape[0] > image_size else cv2.INTER_LINEAR
        crops[k] = cv2.resize(patch, (image_size, image_size), interpolation=interpolation)
    return crops
