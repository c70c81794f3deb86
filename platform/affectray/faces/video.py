"""Video decoding with PyAV: real presentation timestamps, bounded memory, local or streamed input.

A source is a local path or any binary file object with ``read`` and ``seek``
(e.g. ``affectray.storage.open_input("s3://…")``), so a video streams from
object storage without a temporary copy. Frames come out in batches of RGB
arrays with their decode-order index and their presentation time in seconds,
taken from the container (``pts * time_base``), so variable-frame-rate video
keeps its true times.

Every problem with the *content* of a video raises :class:`VideoDecodeError`
with a ``reason`` from a fixed set, so a corpus job can record it per video
and carry on. Frames decoded before a problem are always delivered first.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO, NamedTuple

import av
import numpy as np
from av.container import InputContainer

from affectray.errors import AffectrayError

__all__ = [
    "CORRUPT",
    "EMPTY",
    "FrameBatch",
    "NOT_A_VIDEO",
    "NO_VIDEO_STREAM",
    "TRUNCATED",
    "UNSUPPORTED_CODEC",
    "VideoDecodeError",
    "VideoInfo",
    "VideoSource",
    "iter_frames",
    "probe",
    "source_name",
]

VideoSource = str | os.PathLike | BinaryIO

# VideoDecodeError.reason values.
EMPTY = "empty file"
NOT_A_VIDEO = "not a video"  # no demuxer recognises the bytes (text, random data, …)
CORRUPT = "corrupt"  # a known container or stream that fails to parse or decode
TRUNCATED = "truncated"  # the stream ends before the frame count in the container's index
NO_VIDEO_STREAM = "no video stream"  # e.g. an audio-only file
UNSUPPORTED_CODEC = "unsupported codec"  # no decoder for the stream in this FFmpeg build

# Leading bytes of containers FFmpeg reads: a file that starts like one of these but
# does not open is a damaged video, not some other kind of file.
_CONTAINER_MAGIC = (
    (4, b"ftyp"),  # MP4 / MOV / 3GP (ISO base media)
    (4, b"moov"),  # old QuickTime
    (4, b"mdat"),
    (0, b"\x1a\x45\xdf\xa3"),  # Matroska / WebM (EBML)
    (0, b"RIFF"),  # AVI
    (0, b"FLV"),
)


class VideoDecodeError(AffectrayError):
    """A video that cannot be decoded, or not to its end.

    Args:
        source: the path or URI of the video, for the error record.
        reason: one of the module constants (EMPTY, NOT_A_VIDEO, CORRUPT, TRUNCATED,
            NO_VIDEO_STREAM, UNSUPPORTED_CODEC); stable, so callers can count by it.
        detail: FFmpeg's message or what was found instead.
        frame_index: for problems met while decoding, the number of frames delivered
            before it (= index of the first frame lost); None when nothing was decoded.
    """

    def __init__(self, source: str, reason: str, detail: str = "", frame_index: int | None = None):
        self.source = source
        self.reason = reason
        self.detail = detail
        self.frame_index = frame_index
        message = f"{source}: {reason}"
        if detail:
            message += f" ({detail})"
        if frame_index is not None:
            message += f" after {frame_index} frames"
        super().__init__(message)

    def __reduce__(self):
        # Ray pickles exceptions raised in tasks; the default reduce would call
        # __init__ with the message alone.
        return type(self), (self.source, self.reason, self.detail, self.frame_index)


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video's main video stream.

    Width and height are as displayed, i.e. after the rotation in the display
    matrix (phone videos), which is how iter_frames returns frames.
    """

    fps: float | None  # average frame rate; None when the container gives none
    width: int
    height: int
    num_frames: int | None  # the container's count if it has one, else duration * fps
    duration_seconds: float | None
    codec: str
    rotation: int = 0  # degrees counter-clockwise applied to the coded frames


@dataclass
class FrameBatch:
    """Consecutive decoded frames of one video, all of one size."""

    frame_index: np.ndarray  # [B] int32, 0-based decode (= presentation) order
    pts_seconds: np.ndarray  # [B] float64, presentation time from the stream start
    images: list[np.ndarray]  # B x [h, w, 3] uint8 RGB
    original_size: tuple[int, int]  # (height, width) of the video as displayed, before max_side
    scale: float  # images = original * scale; divide image coordinates by it to map back

    def __len__(self) -> int:
        return len(self.images)


class _Frame(NamedTuple):
    index: int
    pts_seconds: float
    image: np.ndarray  # [h, w, 3] uint8 RGB
    original_size: tuple[int, int]  # (height, width)
    scale: float


def source_name(source: VideoSource) -> str:
    """A printable name for a source: the path, or a file object's URI/path/name if it has one."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    # fsspec files (s3fs) carry full_name ("s3://bucket/key") and path; open() files carry name.
    for attr in ("full_name", "path", "name"):
        value = getattr(source, attr, None)
        if isinstance(value, str):
            return value
    return f"<{type(source).__name__}>"


def probe(source: VideoSource) -> VideoInfo:
    """Read a video's stream parameters; decodes the first frame to prove the stream is readable."""
    name = source_name(source)
    with _open_video(source, name) as (container, stream):
        frames = _decode(container, stream, name, check_complete=False)
        first = next(frames, None)
        frames.close()
        if first is None:
            raise VideoDecodeError(name, CORRUPT, "no frame could be decoded", frame_index=0)
        rotation = _quarter_turns(first.rotation) * 90
        height, width = _displayed_size(first)
        fps = _average_fps(stream)
        duration = _duration_seconds(container, stream)
        num_frames = stream.frames or None
        if num_frames is None and duration is not None and fps is not None:
            num_frames = round(duration * fps)
        return VideoInfo(
            fps=fps,
            width=width,
            height=height,
            num_frames=num_frames,
            duration_seconds=duration,
            codec=stream.codec_context.name,
            rotation=rotation,
        )


def iter_frames(
    source: VideoSource,
    *,
    max_side: int | None = None,
    batch_size: int = 32,
    start_frame: int = 0,
    stride: int = 1,
) -> Iterator[FrameBatch]:
    """Decode a video into batches of RGB frames with presentation timestamps.

    Memory stays bounded by one batch: frames are converted as they are decoded
    and the container is read incrementally (from a file object too).

    Args:
        max_side: downscale so that max(h, w) <= max_side (area interpolation, in
            FFmpeg's scaler); FrameBatch.scale maps coordinates back. None keeps the
            original size, which at 4K costs ~25 MB per frame: set max_side for detection.
        batch_size: frames per batch; a batch also ends where the frame size changes.
        start_frame: first frame index to return. Earlier frames are still decoded
            (frame indices count decoded frames, which seeking cannot give) but not converted.
        stride: return every stride-th frame from start_frame on.

    Raises:
        VideoDecodeError: at the first call if the video cannot be opened; after the
            last good batch if decoding fails part-way (frame_index says where).
            A stream that ends before the frame count in its container's index
            (an MP4 cut at a packet boundary) raises TRUNCATED the same way.
    """
    if batch_size < 1 or stride < 1 or start_frame < 0:
        raise ValueError(f"need batch_size, stride >= 1, start_frame >= 0: {batch_size}, {stride}, {start_frame}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    name = source_name(source)
    with _open_video(source, name) as (container, stream):
        pending: list[_Frame] = []
        error: VideoDecodeError | None = None
        try:
            for frame in _rgb_frames(container, stream, name, max_side, start_frame, stride):
                size_changed = bool(pending) and frame.original_size != pending[0].original_size
                if len(pending) == batch_size or size_changed:
                    yield _collate(pending)
                    pending = []
                pending.append(frame)
        except VideoDecodeError as e:
            error = e
        if pending:
            yield _collate(pending)
        if error is not None:
            raise error


@contextlib.contextmanager
def _open_video(source: VideoSource, name: str) -> Iterator[tuple[InputContainer, av.VideoStream]]:
    """Open the container and its first video stream, translating failures into VideoDecodeError."""
    if _byte_size(source) == 0:
        raise VideoDecodeError(name, EMPTY)
    try:
        target = os.fspath(source) if isinstance(source, (str, os.PathLike)) else source
        # Non-UTF-8 tags are common in wild corpora and say nothing about the pixels.
        container = av.open(target, metadata_errors="ignore")
    except av.FFmpegError as e:
        raise _open_error(source, name, e) from e
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoDecodeError(name, NO_VIDEO_STREAM, f"streams: {', '.join(kinds)}")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise VideoDecodeError(name, UNSUPPORTED_CODEC, "FFmpeg knows no decoder for the video stream")
        stream.thread_type = "AUTO"  # frame + slice threads: several times faster on H.264/HEVC
        yield container, stream


def _decode(
    container: InputContainer, stream: av.VideoStream, name: str, check_complete: bool = True
) -> Iterator[av.VideoFrame]:
    """Decoded frames in presentation order; damage raises VideoDecodeError after the good frames."""
    num_frames = 0
    num_packets = 0
    try:
        for packet in container.demux(stream):
            if packet.size:  # the last packet is an empty one that flushes the decoder
                num_packets += 1
            for frame in packet.decode():
                yield frame
                num_frames += 1
    except av.error.DecoderNotFoundError as e:
        raise VideoDecodeError(name, UNSUPPORTED_CODEC, str(e), frame_index=num_frames) from e
    except av.FFmpegError as e:
        raise VideoDecodeError(name, CORRUPT, _ffmpeg_message(e), frame_index=num_frames) from e
    # A file cut exactly between two packets demuxes cleanly to a short end; only the
    # container's own sample count (exact for MP4/MOV, absent for MKV/TS) reveals it.
    # Packets, not frames, are compared: edit lists may drop decoded frames legitimately.
    if check_complete and stream.frames and num_packets < stream.frames:
        detail = f"index lists {stream.frames} frames, stream ends after {num_packets}"
        raise VideoDecodeError(name, TRUNCATED, detail, frame_index=num_frames)


def _rgb_frames(
    container: InputContainer,
    stream: av.VideoStream,
    name: str,
    max_side: int | None,
    start_frame: int,
    stride: int,
) -> Iterator[_Frame]:
    """The selected frames as upright RGB arrays, downscaled to max_side, with their times."""
    time_base = stream.time_base or Fraction(1, 1)
    start = stream.start_time or 0  # MPEG-TS and some MP4s start at a non-zero pts
    fps = _average_fps(stream)
    for index, frame in enumerate(_decode(container, stream, name)):
        if index < start_frame or (index - start_frame) % stride:
            continue
        if frame.pts is not None:
            pts_seconds = float((frame.pts - start) * time_base)
        else:
            pts_seconds = index / fps if fps else float("nan")
        original_size = _displayed_size(frame)
        scale = 1.0 if max_side is None else min(1.0, max_side / max(original_size))
        yield _Frame(index, pts_seconds, _to_rgb(frame, scale), original_size, scale)


def _to_rgb(frame: av.VideoFrame, scale: float) -> np.ndarray:
    """[h, w, 3] uint8 RGB of a decoded frame, scaled in FFmpeg's scaler and turned upright."""
    if scale < 1.0:
        width, height = max(1, round(frame.width * scale)), max(1, round(frame.height * scale))
        # Area averaging: bilinear aliases badly at the 3-6x reductions used for 4K detection.
        rgb = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="AREA")
    else:
        rgb = frame.to_ndarray(format="rgb24")
    turns = _quarter_turns(frame.rotation)
    if turns:
        # Portrait phone videos are stored sideways; MTCNN does not find sideways faces.
        rgb = np.ascontiguousarray(np.rot90(rgb, k=turns))  # rot90 is counter-clockwise, as the metadata
    return rgb


def _collate(frames: list[_Frame]) -> FrameBatch:
    return FrameBatch(
        frame_index=np.array([f.index for f in frames], dtype=np.int32),
        pts_seconds=np.array([f.pts_seconds for f in frames], dtype=np.float64),
        images=[f.image for f in frames],
        original_size=frames[0].original_size,
        scale=frames[0].scale,
    )


def _quarter_turns(rotation: float | None) -> int:
    """Counter-clockwise quarter turns for a display-matrix angle; 0, 1, 2 or 3."""
    return round((rotation or 0) / 90) % 4


def _displayed_size(frame: av.VideoFrame) -> tuple[int, int]:
    """(height, width) of a frame once its display rotation is applied."""
    if _quarter_turns(frame.rotation) % 2:
        return frame.width, frame.height
    return frame.height, frame.width


def _average_fps(stream: av.VideoStream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None


def _duration_seconds(container: InputContainer, stream: av.VideoStream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _byte_size(source: VideoSource) -> int | None:
    """Size in bytes, rewinding a file object to its start; None when it cannot be told."""
    if isinstance(source, (str, os.PathLike)):
        return os.path.getsize(source)  # a missing file raises FileNotFoundError, as open() would
    try:
        size = source.seek(0, io.SEEK_END)
        source.seek(0)
    except (AttributeError, OSError, ValueError):
        return None
    return size


def _head(source: VideoSource, num_bytes: int = 16) -> bytes:
    """The first bytes of a source, for telling a damaged video from some other file."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return f.read(num_bytes)
        source.seek(0)
        return source.read(num_bytes)
    except (OSError, ValueError):
        return b""


def _open_error(source: VideoSource, name: str, error: av.FFmpegError) -> VideoDecodeError:
    head = _head(source)
    message = _ffmpeg_message(error)
    if any(head[offset : offset + len(magic)] == magic for offset, magic in _CONTAINER_MAGIC):
        # An MP4 cut short loses its index (moov box), written at the end by default.
        detail = f"container header found but unreadable, truncated or damaged: {message}"
        return VideoDecodeError(name, CORRUPT, detail)
    try:
        head.decode("utf-8")
        kind = "looks like text"
    except UnicodeDecodeError:
        kind = "unrecognised data"
    return VideoDecodeError(name, NOT_A_VIDEO, f"{kind}: {message}")


def _ffmpeg_message(error: av.FFmpegError) -> str:
    # str(error) repeats the errno and the (possibly long) file name; the strerror says it all.
    return getattr(error, "strerror", None) or str(error)
