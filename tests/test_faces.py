"""Faces: MTCNN on real frames, alignment onto the template, JPEG coding, IoU tracks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from affectray.faces.align import align_face, align_faces, face_template, similarity_transform
from affectray.faces.detect import Detection, FaceDetector
from affectray.faces.jpeg import decode_jpeg, encode_jpeg
from affectray.faces.tracking import IoUTracker, Track, box_iou, largest_track, select_tracks
from affectray.faces.video import iter_frames

STRIDE = 6  # 12 of the 72 frames keep MTCNN on CPU to about a second


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(device="cpu")


@pytest.fixture(scope="module")
def frames(real_video):
    """The sampled frames of single_face.mp4 at 320 px: (frame_index [12], images, scale)."""
    batch = next(iter_frames(real_video, max_side=320, stride=STRIDE, batch_size=64))
    return batch.frame_index, batch.images, batch.scale


@pytest.fixture(scope="module")
def detections(detector, frames):
    """Faces of the sampled frames, mapped back to 640x360 coordinates."""
    _, images, scale = frames
    return detector.detect(images, scale=scale)


def test_finds_the_one_real_face_in_every_frame(detections):
    assert len(detections) == 12
    for faces in detections:
        assert len(faces) == 1
        face = faces[0]
        assert face.score > 0.95
        assert face.box.shape == (4,) and face.box.dtype == np.float32
        assert face.landmarks.shape == (5, 2) and face.landmarks.dtype == np.float32
        x1, y1, x2, y2 = face.box
        assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 360
        assert 60 < x2 - x1 < 300  # a head in a 640x360 frame, in original coordinates
        (lx, ly), (rx, ry) = face.landmarks[:2]
        assert x1 < lx < rx < x2 and y1 < ly < y2  # eyes inside the box, image-left first


def test_scale_maps_detections_to_original_coordinates(detector, real_video, detections):
    """Detection at 320 px with scale=0.5 agrees with detection on the 640 px frame."""
    full = next(iter_frames(real_video, batch_size=1)).images[0]
    direct = detector.detect([full])[0]
    assert len(direct) == 1
    side = direct[0].box[2] - direct[0].box[0]
    assert np.abs(detections[0][0].box - direct[0].box).max() < 0.08 * side
    assert np.abs(detections[0][0].landmarks - direct[0].landmarks).max() < 0.05 * side
    assert detections[0][0].scaled(0.5).box == pytest.approx(detections[0][0].box * 0.5)


def test_blank_and_tiny_images_give_no_faces(detector):
    blank = np.zeros((180, 320, 3), np.uint8)
    tiny = np.full((8, 8, 3), 128, np.uint8)  # smaller than min_face_size: MTCNN itself would crash
    assert detector.detect([blank, tiny]) == [[], []]
    assert detector.detect([]) == []


def test_mixed_sizes_in_one_call_keep_their_order(detector, frames):
    _, images, _ = frames
    face_320 = images[0]
    face_240 = cv2.resize(face_320, (240, 135), interpolation=cv2.INTER_AREA)
    blank = np.zeros((100, 150, 3), np.uint8)
    results = detector.detect([face_320, blank, face_240, face_320], scale=[1.0, 1.0, 0.75, 1.0])
    assert [len(r) for r in results] == [1, 0, 1, 1]
    # The 240 px copy, mapped back by its own scale, lands where the 320 px face is.
    np.testing.assert_allclose(results[2][0].box, results[0][0].box, atol=12)
    np.testing.assert_array_equal(results[3][0].box, results[0][0].box)


def test_rejects_images_that_are_not_rgb_uint8(detector):
    with pytest.raises(ValueError, match="uint8 RGB"):
        detector.detect([np.zeros((100, 100), np.uint8)])


def test_aligned_face_has_its_landmarks_on_the_template(detector, real_video, detections):
    frame = next(iter_frames(real_video, batch_size=1)).images[0]
    aligned = align_face(frame, detections[0][0].landmarks, image_size=224)
    assert aligned.shape == (224, 224, 3) and aligned.dtype == np.uint8
    [found] = detector.detect([aligned])
    assert len(found) == 1
    error = np.linalg.norm(found[0].landmarks - face_template(224), axis=1)  # [5] px
    assert error.max() < 6.0, error
    # The default crop is looser than ArcFace's: the face box fills well under the whole crop.
    x1, y1, x2, y2 = found[0].box
    assert 0.45 < (x2 - x1) / 224 < 0.85


def test_face_template_margin():
    np.testing.assert_allclose(face_template(112, margin=0.0)[0], [38.2946, 51.6963], atol=1e-4)
    tight, loose = face_template(224, 0.0), face_template(224, 0.5)
    spread = lambda t: np.linalg.norm(t - t.mean(0), axis=1).mean()  # noqa: E731
    assert spread(loose) == pytest.approx(spread(tight) / 1.5)


def test_similarity_transform_recovers_a_known_transform_in_batch():
    rng = np.random.default_rng(0)
    template = face_template(224)
    angles, scales = rng.uniform(-0.5, 0.5, 8), rng.uniform(0.3, 3.0, 8)
    shifts = rng.uniform(-100, 100, (8, 2))
    # Points that the true similarity maps onto the template: src = inverse(template).
    cos, sin = np.cos(angles), np.sin(angles)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # [8, 2, 2]
    src = np.einsum("nij,kj->nki", rot, template) * scales[:, None, None] + shifts[:, None, :]  # [8, 5, 2]
    matrices = similarity_transform(src, template)  # [8, 2, 3]
    assert matrices.shape == (8, 2, 3)
    mapped = np.einsum("nij,nkj->nki", matrices[:, :, :2], src) + matrices[:, None, :, 2]
    np.testing.assert_allclose(mapped, np.broadcast_to(template, mapped.shape), atol=1e-3)
    # A mirrored face is fitted by a rotation, never a reflection.
    mirrored = similarity_transform(template * [-1, 1], template)
    assert np.linalg.det(mirrored[:2, :2]) > 0


def test_align_faces_crops_every_face_of_a_frame(frames, detections):
    _, images, scale = frames
    landmarks = np.stack([detections[0][0].landmarks, detections[1][0].landmarks]) * scale  # [2, 5, 2]
    crops = align_faces(images[0], landmarks, image_size=64)
    assert crops.shape == (2, 64, 64, 3) and crops.dtype == np.uint8
    np.testing.assert_array_equal(crops[0], align_face(images[0], landmarks[0], image_size=64))


def test_jpeg_round_trip():
    y, x = np.mgrid[0:96, 0:128]
    # Red everywhere, green and blue ramps: a BGR/RGB mix-up would turn it blue.
    smooth = np.stack([np.full_like(x, 230), 2 * x, 2 * y], axis=-1).astype(np.uint8)  # [96, 128, 3]
    data = encode_jpeg(smooth, quality=90)
    assert data[:2] == b"\xff\xd8"
    decoded = decode_jpeg(data)
    assert decoded.shape == smooth.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - smooth.astype(int)).mean() < 3
    assert decoded[..., 0].mean() > decoded[..., 2].mean() + 100
    assert len(encode_jpeg(smooth, quality=30)) < len(data)
    with pytest.raises(ValueError, match="cannot decode"):
        decode_jpeg(b"not a jpeg")


def test_tracker_follows_the_real_face_as_one_track(frames, detections):
    frame_index, _, _ = frames
    tracker = IoUTracker(max_gap=STRIDE)
    ids = [tracker.update(int(i), faces) for i, faces in zip(frame_index, detections)]
    assert ids == [[0]] * 12
    [track] = tracker.tracks
    assert (track.num_frames, track.first_frame, track.last_frame) == (12, 0, 66)
    assert select_tracks(tracker.tracks) == [0]


def _two_faces(step: int) -> np.ndarray:
    """Boxes of two faces drifting apart, 'a' to the left, 'b' to the right."""
    a = [200 - 3 * step, 100, 260 - 3 * step, 170]
    b = [270 + 3 * step, 105, 330 + 3 * step, 175]
    return np.array([a, b], np.float32)


def _track_two_faces(tracker: IoUTracker) -> list[list[int]]:
    ids = []
    for step in range(20):
        boxes = _two_faces(step)
        if 8 <= step < 11:  # 'b' missed for 3 frames: within max_gap
            ids.append(tracker.update(step, boxes[:1]) + [None])
        elif step % 2:  # detections arrive in either order
            ids.append(tracker.update(step, boxes[::-1])[::-1])
        else:
            ids.append(tracker.update(step, boxes))
    return ids


def test_tracker_keeps_two_moving_faces_apart():
    ids = _track_two_faces(IoUTracker(iou_threshold=0.3, max_gap=5))
    assert ids[0] == [0, 1]
    assert all(a == 0 for a, _ in ids) and all(b in (1, None) for _, b in ids)
    # The same boxes from a new tracker, or after reset, get the same ids.
    tracker = IoUTracker(iou_threshold=0.3, max_gap=5)
    assert _track_two_faces(tracker) == ids
    tracker.reset()
    assert _track_two_faces(tracker) == ids


def test_tracks_end_after_max_gap():
    tracker = IoUTracker(max_gap=2)
    box = np.array([[10, 10, 50, 50]], np.float32)
    assert tracker.update(0, box) == [0]
    assert tracker.update(3, box) == [0]  # frames 1 and 2 missed: a gap of 2
    assert tracker.update(7, box) == [1]  # 3 missed frames end track 0
    assert tracker.update(8, np.zeros((0, 4), np.float32)) == []
    with pytest.raises(ValueError, match="must increase"):
        tracker.update(8, box)


def test_a_box_continues_the_track_it_overlaps_most():
    tracker = IoUTracker(iou_threshold=0.1)
    tracker.update(0, np.array([[0, 0, 10, 10], [8, 0, 18, 10]], np.float32))
    # One box now overlapping both tracks: it continues the closer, the other becomes a gap.
    assert tracker.update(1, np.array([[7, 0, 17, 10]], np.float32)) == [1]
    assert box_iou(np.array([[0, 0, 10, 10]], np.float32), np.array([[5, 0, 15, 10]], np.float32))[0, 0] == (
        pytest.approx(1 / 3)
    )


def test_largest_track_weighs_frames_by_face_area():
    box = np.zeros(4, np.float32)
    tracks = [
        Track(0, 0, 99, box, num_frames=100, total_area=100 * 400.0),  # long but a small background face
        Track(1, 0, 49, box, num_frames=50, total_area=50 * 10_000.0),  # the subject
        Track(2, 60, 64, box, num_frames=5, total_area=5 * 40_000.0),  # a face crossing the camera
    ]
    assert largest_track(tracks) == 1
    assert select_tracks(tracks, all_faces=True) == [0, 1, 2]
    assert select_tracks(tracks, all_faces=True, min_frames=10) == [0, 1]
    assert select_tracks([], all_faces=False) == [] and largest_track([]) is None


def test_tracker_accepts_detections_or_boxes():
    box = np.array([10, 10, 50, 50], np.float32)
    detection = Detection(box=box, score=0.99, landmarks=np.zeros((5, 2), np.float32))
    tracker = IoUTracker()
    assert tracker.update(0, [detection]) == [0]
    assert tracker.update(1, box[None] + 2) == [0]
    assert tracker.tracks[0].mean_area == pytest.approx((1600 + 1600) / 2)
