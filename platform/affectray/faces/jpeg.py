"""JPEG coding of RGB face crops: what shards store and loaders decode."""

from __future__ import annotations

import cv2
import numpy as np


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of a [h, w, 3] uint8 RGB image."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"cannot JPEG-encode an image of shape {rgb.shape} and dtype {rgb.dtype}")
    return buffer.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    """[h, w, 3] uint8 RGB of JPEG (or PNG, …) bytes."""
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot decode {len(data)} bytes as an image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
