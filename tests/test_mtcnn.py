"""The summed-area MTCNN cascade against facenet-pytorch's own detect_face, on real frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from facenet_pytorch import MTCNN

from affectray.faces.mtcnn import Cascade, _crop_means, _level, area_windows, summed_area
from affectray.faces.video import iter_frames


@pytest.fixture(scope="module")
def mtcnn() -> MTCNN:
    return MTCNN(keep_all=True, select_largest=False, post_process=False, min_face_size=20, device="cpu").eval()


@pytest.fixture(scope="module")
def real_frames(real_video) -> list[np.ndarray]:
    """Every 9th frame of the 640x360 real video, and two frames side by side (two faces)."""
    frames = list(next(iter_frames(real_video, max_side=640, stride=9, batch_size=16)).images)
    pair = np.ascontiguousarray(np.concatenate([frames[0], frames[-1]], axis=1)[:, ::2])  # 640x360, two faces
    return frames + [pair]


@pytest.mark.parametrize(
    ("height", "width", "out_h", "out_w"), [(37, 53, 24, 24), (360, 640, 217, 385), (7, 5, 24, 24), (48, 48, 48, 48)]
)
def test_area_resampling_is_torch_area_interpolation(height, width, out_h, out_w):
    """Shrinking, growing (out > in) and identity: torch's adaptive average pooling, to float rounding."""
    rng = np.random.default_rng(height)
    images = rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    expected = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=(out_h, out_w), mode="area")
    expected = expected.permute(0, 2, 3, 1).numpy()
    table = summed_area(images)
    np.testing.assert_allclose(_level(table, out_h, out_w), expected, rtol=1e-6, atol=1e-4)
    # The same windows as a crop of each whole image.
    rows = area_windows(np.zeros(2, int), np.full(2, height), out_h)
    cols = area_windows(np.zeros(2, int), np.full(2, width), out_w)
    np.testing.assert_allclose(_crop_means(table, np.arange(2), rows, cols), expected, rtol=1e-6, atol=1e-4)


def test_crops_average_their_own_window():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, 50, 60, 3), dtype=np.uint8)
    rows, cols = area_windows(np.array([10]), np.array([30]), 24), area_windows(np.array([5]), np.array([41]), 24)
    crop = torch.from_numpy(image[:, 10:40, 5:46]).permute(0, 3, 1, 2).float()
    expected = F.interpolate(crop, size=(24, 24), mode="area").permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(_crop_means(summed_area(image), np.zeros(1, int), rows, cols), expected, atol=1e-4)


def test_summed_area_stays_exact_where_int32_would_overflow():
    assert summed_area(np.zeros((1, 4, 4, 3), np.uint8)).dtype == np.int32
    big = np.full((1, 3000, 3000, 1), 255, np.uint8)  # 2.3e9 > 2**31
    table = summed_area(big)
    assert table.shape == (1, 3001, 3001, 1) and table[0, -1, -1, 0] == 255 * 3000 * 3000


def test_cascade_finds_what_facenet_finds(mtcnn, real_frames):
    """Same faces, same scores, landmarks within a thousandth of a pixel; batched or one at a time."""
    cascade = Cascade(mtcnn)
    batched = cascade.detect(np.stack(real_frames))
    faces = 0
    for k, frame in enumerate(real_frames):
        boxes, probs, points = (np.asarray(a, np.float32) for a in mtcnn.detect(frame, landmarks=True))
        ours, marks = cascade.detect(frame[None])[0]
        assert len(ours) == len(boxes), f"frame {k}"
        np.testing.assert_allclose(ours[:, :4], boxes, atol=1e-3)
        np.testing.assert_allclose(ours[:, 4], probs, atol=1e-5)
        np.testing.assert_allclose(marks, points, atol=1e-3)
        np.testing.assert_allclose(batched[k][0], ours, atol=1e-3)
        faces += len(ours)
    assert faces == len(real_frames) + 1  # one face per frame, two in the side-by-side pair


def test_cascade_on_a_frame_without_faces(mtcnn):
    boxes, points = Cascade(mtcnn).detect(np.full((1, 120, 160, 3), 90, np.uint8))[0]
    assert boxes.shape == (0, 5) and points.shape == (0, 5, 2)


def test_detecting_near_recent_faces_finds_what_the_whole_frame_finds(mtcnn, real_frames):
    """P-net on windows around the faces of 9 frames before: the same faces, landmarks within 1e-3 px."""
    cascade = Cascade(mtcnn)
    *frames, pair = real_frames
    whole = cascade.detect(np.stack(frames))
    for k in range(1, len(frames)):
        boxes, marks = cascade.detect(frames[k][None], near=whole[k - 1][0])[0]
        assert len(boxes) == 1, f"frame {k}"
        np.testing.assert_allclose(boxes, whole[k][0], atol=1e-3)
        np.testing.assert_allclose(marks, whole[k][1], atol=1e-3)
    # Batched, as between key frames: every frame near the same earlier face.
    for (boxes, _), (expected, _) in zip(cascade.detect(np.stack(frames[1:4]), near=whole[0][0]), whole[1:4]):
        np.testing.assert_allclose(boxes, expected, atol=1e-3)

    both, _ = cascade.detect(pair[None])[0]
    assert len(both) == 2
    np.testing.assert_allclose(cascade.detect(pair[None], near=both)[0][0], both, atol=1e-3)
    one, _ = cascade.detect(pair[None], near=both[:1])[0]  # the other face is not looked for
    np.testing.assert_allclose(one, both[:1], atol=1e-3)
    nothing, _ = cascade.detect(pair[None], near=np.array([[0, 0, 30, 30]], np.float32))[0]  # no face there
    assert len(nothing) == 0
