"""Video decoding: frame counts, real timestamps, streaming sources, and every way a file can be bad."""

from __future__ import annotations

import io
import pickle
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from affectray.faces import video
from affectray.faces.video import VideoDecodeError, iter_frames, probe


def _all_frames(source, **kwargs):
    """(frame_index [N], pts_seconds [N], images [N, h, w, 3]) of a whole decode."""
    batches = list(iter_frames(source, **kwargs))
    return (
        np.concatenate([b.frame_index for b in batches]),
        np.concatenate([b.pts_seconds for b in batches]),
        np.stack([image for b in batches for image in b.images]),
    )


def _write_video(path: Path, images: list[np.ndarray], times: list[float], codec="libx264", rotation=None):
    """An MP4 whose frames carry exactly the given presentation times (ms precision)."""
    height, width = images[0].shape[:2]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for image, t in zip(images, times):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _faststart_copy(src: Path, dst: Path) -> list[int]:
    """Remux src's video with the index (moov) first, as streaming MP4s are; returns packet end offsets."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        out_stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out_stream
                out.mux(packet)
    with av.open(str(dst)) as container:
        return [p.pos + p.size for p in container.demux(container.streams.video[0]) if p.size]


def test_probe_reads_stream_parameters(real_video):
    info = probe(real_video)
    assert (info.width, info.height, info.num_frames, info.codec, info.rotation) == (640, 360, 72, "h264", 0)
    assert info.fps == pytest.approx(30.0)
    assert info.duration_seconds == pytest.approx(2.4, abs=0.05)


def test_decodes_every_frame_with_real_timestamps(real_video):
    batches = list(iter_frames(real_video, batch_size=32))
    assert [len(b) for b in batches] == [32, 32, 8]
    index, pts, images = _all_frames(real_video)
    assert index.dtype == np.int32 and pts.dtype == np.float64
    np.testing.assert_array_equal(index, np.arange(72))
    assert np.all(np.diff(pts) > 0)
    np.testing.assert_allclose(pts, np.arange(72) / 30, atol=1e-3)
    assert images.shape == (72, 360, 640, 3) and images.dtype == np.uint8
    assert images.std() > 10  # real pictures, not blank buffers
    assert all(b.original_size == (360, 640) and b.scale == 1.0 for b in batches)


def test_max_side_downscales_and_keeps_the_map_back(real_video):
    batch = next(iter_frames(real_video, max_side=320, batch_size=4))
    assert batch.images[0].shape == (180, 320, 3)
    assert batch.scale == pytest.approx(0.5) and batch.original_size == (360, 640)
    # Area averaging: a 4x reduction equals 4x4 block means of the full frame, up to the
    # colour conversion's rounding (point sampling is ~2.3 grey levels off, bilinear ~1.4).
    small = next(iter_frames(real_video, max_side=160, batch_size=1)).images[0]
    full = next(iter_frames(real_video, batch_size=1)).images[0]
    block_means = full.reshape(90, 4, 160, 4, 3).astype(np.float32).mean(axis=(1, 3))
    assert np.abs(small.astype(np.float32) - block_means).mean() < 1.1


def test_start_frame_and_stride_select_frames_but_keep_their_indices(real_video):
    index, pts, _ = _all_frames(real_video, start_frame=10, stride=20)
    np.testing.assert_array_equal(index, [10, 30, 50, 70])
    np.testing.assert_allclose(pts, index / 30, atol=1e-3)


def test_file_objects_stream_the_same_frames_as_a_path(real_video):
    index, pts, images = _all_frames(real_video, max_side=160)
    with open(real_video, "rb") as f:
        from_file = _all_frames(f, max_side=160)
    from_bytes = _all_frames(io.BytesIO(real_video.read_bytes()), max_side=160)
    for other in (from_file, from_bytes):
        np.testing.assert_array_equal(other[0], index)
        np.testing.assert_array_equal(other[1], pts)
        np.testing.assert_array_equal(other[2], images)


def test_streams_from_s3_without_a_local_copy(real_video, s3_bucket):
    from affectray import storage

    uri = f"{s3_bucket}/videos/single_face.mp4"
    storage.write_bytes(uri, real_video.read_bytes())
    with storage.open_input(uri) as f:
        assert probe(f).num_frames == 72
        index, pts, _ = _all_frames(f, max_side=160)  # the same file object, rewound by iter_frames
    np.testing.assert_allclose(pts, np.arange(72) / 30, atol=1e-3)
    assert len(index) == 72


def test_variable_frame_rate_keeps_true_timestamps(tmp_path):
    times = [0.0, 0.04, 0.2, 0.21, 0.5, 0.52, 0.9, 1.0, 1.6]
    images = [np.full((48, 64, 3), 25 * k, np.uint8) for k in range(len(times))]
    path = tmp_path / "vfr.mp4"
    _write_video(path, images, times)
    index, pts, decoded = _all_frames(path, batch_size=4)
    np.testing.assert_array_equal(index, np.arange(len(times)))
    np.testing.assert_allclose(pts, times, atol=1e-3)
    # Frames come out in presentation order: the grey levels rise like the originals.
    assert np.all(np.diff(decoded.reshape(len(times), -1).mean(axis=1)) > 10)


def test_display_rotation_is_applied(tmp_path):
    image = np.zeros((48, 64, 3), np.uint8)
    image[:16, :16] = 255  # a marker in the top-left corner of the stored frame
    path = tmp_path / "rotated.mp4"
    _write_video(path, [image] * 3, [0.0, 0.04, 0.08], codec="mpeg4", rotation=90)
    info = probe(path)
    assert (info.width, info.height, info.rotation) == (48, 64, 90)
    batch = next(iter_frames(path))
    upright = batch.images[0]
    assert upright.shape == (64, 48, 3) and batch.original_size == (64, 48)
    # 90 degrees counter-clockwise carries the top-left corner to the bottom-left.
    assert upright[-12:, :12].mean() > 200 and upright[:12, :12].mean() < 50


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, real_video) -> dict[str, Path]:
    """One file per way a video can be unusable, keyed by the reason it must raise."""
    root = tmp_path_factory.mktemp("bad_videos")
    data = real_video.read_bytes()
    files = {
        video.EMPTY: b"",
        video.NOT_A_VIDEO: np.random.default_rng(0).bytes(20_000),
        f"{video.NOT_A_VIDEO} (text)": b"frame,label\n0,happy\n" * 200,
        # The source keeps its index (moov) at the end, so half a file has none.
        video.CORRUPT: data[: len(data) // 2],
    }
    # The fourcc in the sample description names the codec; one FFmpeg has no decoder for.
    fourcc = data.find(b"avc1", data.find(b"stsd"))
    files[video.UNSUPPORTED_CODEC] = data[:fourcc] + b"zzzz" + data[fourcc + 4 :]
    paths = {}
    for reason, content in files.items():
        paths[reason] = root / f"{len(paths)}.mp4"
        paths[reason].write_bytes(content)

    paths[video.NO_VIDEO_STREAM] = root / "audio_only.m4a"
    with av.open(str(paths[video.NO_VIDEO_STREAM]), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for k in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return paths


@pytest.mark.parametrize(
    "case",
    [
        video.EMPTY,
        video.NOT_A_VIDEO,
        f"{video.NOT_A_VIDEO} (text)",
        video.CORRUPT,
        video.UNSUPPORTED_CODEC,
        video.NO_VIDEO_STREAM,
    ],
)
def test_bad_files_raise_before_any_frame_naming_the_problem(bad_files, case):
    path = bad_files[case]
    reason = case.removesuffix(" (text)")
    with pytest.raises(VideoDecodeError) as probed:
        probe(path)
    assert probed.value.reason == reason and str(path) in str(probed.value)
    with pytest.raises(VideoDecodeError) as decoded:
        next(iter_frames(path))
    assert decoded.value.reason == reason
    with pytest.raises(VideoDecodeError) as streamed:
        next(iter_frames(io.BytesIO(path.read_bytes())))
    assert streamed.value.reason == reason


def test_text_is_told_apart_from_binary_garbage(bad_files):
    with pytest.raises(VideoDecodeError, match="looks like text"):
        probe(bad_files[f"{video.NOT_A_VIDEO} (text)"])


def _decode_until_error(source) -> tuple[int, VideoDecodeError]:
    delivered = 0
    with pytest.raises(VideoDecodeError) as error:
        for batch in iter_frames(source, batch_size=8):
            np.testing.assert_array_equal(batch.frame_index, np.arange(delivered, delivered + len(batch)))
            delivered += len(batch)
    return delivered, error.value


def test_truncated_streaming_mp4_delivers_the_good_frames_then_raises(real_video, tmp_path):
    """With the index first, a cut file decodes up to the cut, then raises with the count reached."""
    full = tmp_path / "faststart.mp4"
    packet_ends = _faststart_copy(real_video, full)
    data = full.read_bytes()

    mid_packet = tmp_path / "cut_mid_packet.mp4"
    mid_packet.write_bytes(data[: len(data) // 2])
    delivered, error = _decode_until_error(mid_packet)
    assert 0 < delivered < 72 and error.frame_index == delivered
    assert error.reason in (video.CORRUPT, video.TRUNCATED)

    # Cut exactly after packet 40: FFmpeg sees a clean end; only the index's frame count tells.
    on_boundary = tmp_path / "cut_on_boundary.mp4"
    on_boundary.write_bytes(data[: packet_ends[40]])
    delivered, error = _decode_until_error(on_boundary)
    assert error.reason == video.TRUNCATED and error.frame_index == delivered
    assert 30 <= delivered <= 41 and "72" in error.detail


def test_decode_error_survives_pickling():
    """Ray ships exceptions between processes by pickling them."""
    error = VideoDecodeError("s3://b/v.mp4", video.TRUNCATED, "index lists 72 frames", frame_index=41)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.source, copy.reason, copy.frame_index) == ("s3://b/v.mp4", video.TRUNCATED, 41)
    assert copy.detail == "index lists 72 frames"
    assert str(copy) == str(error)


def test_bad_arguments_are_rejected(real_video):
    with pytest.raises(ValueError):
        next(iter_frames(real_video, batch_size=0))
    with pytest.raises(FileNotFoundError):
        probe(real_video.with_name("missing.mp4"))
