"""A small built-in sample corpus: drawn faces with learnable expressions, and real-face videos.

Nothing is downloaded. The corpus has three parts:

* ``aligned/<video_id>/00001.jpg …`` and ``annotations/<video_id>.txt``: "videos" of
  drawn faces in the layout of Aff-Wild2's ``cropped_aligned`` frames and EXPR
  annotations. The expression alone sets the label (brows, eyes, mouth), while
  identity, pose, colour and noise vary, so a small CNN can learn it. These go
  through the aligned-frames path, which skips detection: MTCNN does not see a
  drawing as a face.
* ``videos/astronaut_<i>.mp4``: short videos animated from scikit-image's
  public-domain astronaut photo, a real face that MTCNN detects, for the ingest
  and labeling paths.
* ``videos/no_face.mp4``: moving shapes and noise with no face at all, so a
  pipeline must account for frames where detection finds nothing.

Everything is a pure function of :class:`SynthConfig`: the same seed gives
byte-identical files. Each video draws from its own generator seeded by
``(seed, kind, index)``, so adding videos never changes the earlier ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from affectray.errors import JobError
from affectray.labels import ABAW8

__all__ = [
    "EXPR_CLASSES",
    "EXPR_HEADER",
    "FaceStyle",
    "Pose",
    "SampleCorpusError",
    "SynthConfig",
    "draw_face",
    "expression_track",
    "render_face",
    "sample_pose",
    "sample_style",
    "write_sample_corpus",
]  # plus add_arguments / main: the `affectray synth OUT_DIR` verb

# Aff-Wild2 EXPR annotation files start with exactly this header; each later line
# is an index into it, or -1 for a frame without a label.
EXPR_CLASSES = ABAW8.classes
EXPR_HEADER = ",".join(EXPR_CLASSES)

JPEG_QUALITY = 95
# Expression segments last this many frames (inclusive), as in Aff-Wild2 where
# an expression holds for a fraction of a second to a few seconds.
SEGMENT_FRAMES = (6, 20)
# Generator streams: one per kind of video, so each kind can grow independently.
_DRAWN, _REAL, _NO_FACE = 0, 1, 2
# Drawing happens on a canvas this many times larger, then is area-downsampled:
# cheap anti-aliasing that keeps thin strokes from aliasing away at 32 px.
_SUPERSAMPLE = 2
# The astronaut's face box in skimage.data.astronaut() (512x512), as MTCNN finds it:
# x 181-268, y 62-172.
_ASTRONAUT_FACE_CENTER = (224.0, 117.0)
_ASTRONAUT_FACE_HEIGHT = 110.0


class SampleCorpusError(JobError):
    """The sample corpus cannot be written: not a local path, a non-corpus directory in the way, a broken codec."""


@dataclass
class SynthConfig:
    """What :func:`write_sample_corpus` writes. The defaults write in a few seconds."""

    seed: int = 0
    num_videos: int = 6  # drawn-face "videos" (aligned-frame folders)
    frames_per_video: int = 48
    image_size: int = 112  # aligned face size (Aff-Wild2 cropped_aligned is 112)
    unlabelled_fraction: float = 0.05  # frames annotated -1
    num_real_videos: int = 2  # short mp4s with a real face MTCNN detects
    real_video_frames: int = 24
    real_video_size: tuple[int, int] = (320, 240)  # (width, height)
    fps: float = 25.0
    no_face_video: bool = True  # one extra mp4 with no face at all (for labeling/ingest tests)


# --------------------------------------------------------------------------- drawn faces


@dataclass(frozen=True)
class FaceStyle:
    """Identity and scene of a drawn face: everything that must NOT predict the label."""

    background: tuple[int, int, int]  # BGR
    skin: tuple[int, int, int]
    ink: tuple[int, int, int]  # outlines, pupils, brows
    lips: tuple[int, int, int]
    hair: tuple[int, int, int] | None  # None: bald
    face_aspect: float  # half-width / half-height of the head ellipse
    eye_gap: float  # eye centre distance from the midline, in canvas units
    feature_drop: float  # shifts eyes, brows and mouth down together


@dataclass(frozen=True)
class Pose:
    """A similarity transform of the whole face about the image centre."""

    angle: float = 0.0  # degrees, counter-clockwise
    dx: float = 0.0  # fraction of the image size
    dy: float = 0.0
    scale: float = 1.0


@dataclass(frozen=True)
class _Expression:
    """Geometry of one expression, in canvas units (1.0 = image size); +y is down."""

    brow_inner: float = 0.0  # vertical offset of the brow's inner end
    brow_outer: float = 0.0  # ... and of its outer end
    brow_arch: float = 0.015  # how far the brow's middle rises above its ends
    brow_together: float = 0.0  # inner ends pulled toward the midline
    eye_open: float = 1.0  # 1 = normal, <0.5 = narrowed slit, >1.3 = wide
    wink: bool = False  # one eye closed
    mouth: str = "line"  # key into _MOUTHS
    nose_wrinkles: bool = False


# The label is carried only by these shapes. Each class differs from every other
# in at least two of brows / eyes / mouth, so it survives downscaling to 32 px.
_EXPRESSION_SHAPES = {
    "Neutral": _Expression(),
    "Anger": _Expression(brow_inner=0.06, brow_outer=-0.035, brow_arch=0.0, eye_open=0.4, mouth="tight"),
    "Disgust": _Expression(
        brow_inner=0.045, brow_outer=0.03, brow_arch=0.0, eye_open=0.7, mouth="sneer", nose_wrinkles=True
    ),
    "Fear": _Expression(brow_inner=-0.075, brow_outer=-0.035, brow_together=0.03, eye_open=1.7, mouth="stretch"),
    "Happiness": _Expression(eye_open=0.7, mouth="smile"),
    "Sadness": _Expression(brow_inner=-0.055, brow_outer=0.03, brow_arch=0.0, eye_open=0.85, mouth="frown"),
    "Surprise": _Expression(brow_inner=-0.085, brow_outer=-0.07, brow_arch=0.04, eye_open=1.7, mouth="o"),
    "Other": _Expression(wink=True, mouth="tongue"),
}
_EXPRESSIONS = tuple(_EXPRESSION_SHAPES[name] for name in EXPR_CLASSES)

# Skin tones (BGR), light to dark; darker tones stop where black ink would lose contrast.
_SKIN_TONES = ((189, 224, 255), (125, 194, 241), (105, 172, 224), (66, 134, 198), (50, 105, 160))


def _random_colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(low, high, size=3))


def sample_style(rng: np.random.Generator) -> FaceStyle:
    """Draw a random identity and background."""
    skin = np.array(_SKIN_TONES[rng.integers(len(_SKIN_TONES))], dtype=float)
    skin = np.clip(skin + rng.normal(0.0, 8.0, size=3), 0, 255)
    hair = _random_colour(rng, 10, 110) if rng.random() < 0.7 else None
    return FaceStyle(
        background=_random_colour(rng),
        skin=tuple(int(c) for c in skin),
        ink=_random_colour(rng, 0, 45),
        lips=(int(rng.integers(30, 80)), int(rng.integers(30, 80)), int(rng.integers(120, 190))),
        hair=hair,
        face_aspect=float(rng.uniform(0.74, 0.86)),
        eye_gap=float(rng.uniform(0.12, 0.14)),
        feature_drop=float(rng.uniform(-0.015, 0.015)),
    )


def sample_pose(rng: np.random.Generator) -> Pose:
    """Draw a random pose: rotation ±12°, translation ±6% of the size, scale 0.85–1.1."""
    return Pose(
        angle=float(rng.uniform(-12, 12)),
        dx=float(rng.uniform(-0.06, 0.06)),
        dy=float(rng.uniform(-0.06, 0.06)),
        scale=float(rng.uniform(0.85, 1.1)),
    )


class _Canvas:
    """Draws in canvas units (0..1 across the image) onto a pixel array."""

    def __init__(self, image: np.ndarray):
        self.image = image
        self.px = image.shape[0]

    def xy(self, x: float, y: float) -> tuple[int, int]:
        return int(round(x * self.px)), int(round(y * self.px))

    def width(self, w: float) -> int:
        return max(1, int(round(w * self.px)))

    def polyline(self, points, colour, thickness: float) -> None:
        pts = np.array([self.xy(x, y) for x, y in points], dtype=np.int32)
        cv2.polylines(self.image, [pts], False, colour, self.width(thickness), cv2.LINE_AA)

    def ellipse(self, centre, axes, colour, thickness: float = -1, angle: float = 0.0) -> None:
        """Filled when thickness < 0."""
        t = -1 if thickness < 0 else self.width(thickness)
        axes_px = (self.width(axes[0]), self.width(axes[1]))
        cv2.ellipse(self.image, self.xy(*centre), axes_px, angle, 0, 360, colour, t, cv2.LINE_AA)


# Stroke widths in canvas units: about 3 px at 64 px, so the strokes survive 32 px.
_STROKE = 0.045
_THIN = 0.03


def _curve(cx: float, cy: float, half_width: float, depth: float, n: int = 16):
    """Parabola through (cx ± half_width, cy) whose middle sits ``depth`` lower (+y)."""
    xs = np.linspace(-1.0, 1.0, n)
    return [(cx + half_width * x, cy + depth * (1.0 - x * x)) for x in xs]


def _mouth_line(c: _Canvas, x, y, s: FaceStyle, k: float) -> None:
    c.polyline([(x - 0.12, y), (x + 0.12, y)], s.lips, _STROKE)


def _mouth_tight(c: _Canvas, x, y, s: FaceStyle, k: float) -> None:
    # Pressed lips: short, thick, with the corners pulled slightly down.
    c.polyline([(x - 0.075, y + 0.012 * k), (x, y), (x + 0.075, y + 0.012 * k)], s.ink, _STROKE * 1.4)


def _mouth_smile(c: _Canvas, x, y, s: FaceStyle, k: float) -> None:
    c.polyline(_curve(x, y - 0.02, 0.14, 0.08 * k), s.lips, _STROKE * 1.2)


def _mouth_frown(c: _Canvas, x, y, s: FaceStyle, k: float) -> None:
    c.polyline(_curve(x, y + 0.045, 0.13, -0.075 * k), s.lips, _STROKE * 1.2)


def _mouth_o(c: _Canvas, x, y, s: FaceStyle, k: float) -> None:
    c.ellipse((x, y + 0.01), (0.05, 0.07 * k), s.ink)
    c.ellipse((x, y + 0.01), (0.05, 0.07 * k), s.lips, _THIN)


def _mouth_stretch(c: _Canvas, x, y, s: FaceStyle, k: float) -> None:
    # Fear: open and pulled sideways, teeth showing.
    c.ellipse((x, y), (0.15, 0.04 * k), s.ink)
    c.polyline([(x - 0.1, y - 0.012), (x + 0.1, y - 0.012)], (235, 235, 235), _THIN * 0.8)
    c.ellipse((x, y), (0.15, 0.04 * k), s.lips, _THIN)


def _mouth_sneer(c: _Canvas, x, y, s: FaceStyle, k: float, side: float = 1.0) -> None:
    # Disgust: a wavy lip whose upper lip is raised on one side.
    xs = np.linspace(-1.0, 1.0, 16)
    ys = 0.022 * np.sin(math.pi * 1.5 * xs) - 0.045 * k * np.clip(side * xs, 0, None) ** 2
    c.polyline([(x + 0.13 * u, y + v) for u, v in zip(xs, ys)], s.lips, _STROKE)


def _mouth_tongue(c: _Canvas, x, y, s: FaceStyle, k: float) -> None:
    # Other: lopsided open mouth with the tongue out.
    c.ellipse((x + 0.03, y), (0.09, 0.03), s.ink, angle=-10)
    c.ellipse((x + 0.035, y + 0.045 * k), (0.045, 0.05 * k), (120, 110, 235))
    c.ellipse((x + 0.03, y), (0.09, 0.03), s.lips, _THIN, angle=-10)


_MOUTHS = {
    "line": _mouth_line,
    "tight": _mouth_tight,
    "smile": _mouth_smile,
    "frown": _mouth_frown,
    "o": _mouth_o,
    "stretch": _mouth_stretch,
    "sneer": _mouth_sneer,
    "tongue": _mouth_tongue,
}


def _draw_head(c: _Canvas, s: FaceStyle) -> None:
    half_h = 0.4
    if s.hair is not None:
        c.ellipse((0.5, 0.41), (half_h * s.face_aspect + 0.04, half_h * 0.9), s.hair)
    c.ellipse((0.5, 0.52), (half_h * s.face_aspect, half_h), s.skin)
    c.ellipse((0.5, 0.52), (half_h * s.face_aspect, half_h), s.ink, _THIN * 0.7)
    nose_y = 0.56 + s.feature_drop
    c.polyline([(0.5, nose_y - 0.06), (0.485, nose_y), (0.515, nose_y)], s.ink, _THIN * 0.8)


def _draw_brows(c: _Canvas, s: FaceStyle, e: _Expression, k: float) -> None:
    y = 0.30 + s.feature_drop
    colour = s.hair if s.hair is not None else s.ink
    for side in (-1.0, 1.0):
        inner = (0.5 + side * (s.eye_gap - 0.065 - e.brow_together * k), y + e.brow_inner * k)
        outer = (0.5 + side * (s.eye_gap + 0.075), y + e.brow_outer * k)
        middle = ((inner[0] + outer[0]) / 2, (inner[1] + outer[1]) / 2 - e.brow_arch * k)
        c.polyline([inner, middle, outer], colour, _STROKE)


def _draw_eyes(c: _Canvas, s: FaceStyle, e: _Expression, k: float) -> None:
    y = 0.40 + s.feature_drop
    # Blend the openness toward normal by intensity, so weak frames look milder.
    openness = 1.0 + (e.eye_open - 1.0) * k
    for side in (-1.0, 1.0):
        centre = (0.5 + side * s.eye_gap, y)
        if e.wink and side > 0:
            c.polyline(_curve(centre[0], centre[1] - 0.005, 0.06, 0.02), s.ink, _STROKE)
            continue
        half_h = 0.032 * openness
        c.ellipse(centre, (0.062, half_h), (245, 245, 245))
        c.ellipse(centre, (min(0.026, half_h + 0.004), min(0.026, half_h + 0.004)), s.ink)
        c.ellipse(centre, (0.062, half_h), s.ink, _THIN * 0.7)


def _draw_nose_wrinkles(c: _Canvas, s: FaceStyle) -> None:
    y = 0.47 + s.feature_drop
    for side in (-1.0, 1.0):
        for dy in (0.0, 0.03):
            c.polyline([(0.5 + side * 0.03, y + dy), (0.5 + side * 0.07, y + dy - 0.02)], s.ink, _THIN * 0.7)


def _warp(image: np.ndarray, pose: Pose) -> np.ndarray:
    size = image.shape[0]
    m = cv2.getRotationMatrix2D((size / 2, size / 2), pose.angle, pose.scale)
    m[:, 2] += (pose.dx * size, pose.dy * size)
    # The canvas edges are plain background, so replicating them extends it seamlessly.
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-channel gain, brightness offset and Gaussian sensor noise."""
    out = image.astype(np.float32)
    out *= rng.uniform(0.85, 1.15, size=3).astype(np.float32)
    out += np.float32(rng.uniform(-20, 20))
    out += rng.normal(0.0, rng.uniform(2.0, 7.0), size=out.shape).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_face(
    label: int,
    style: FaceStyle,
    pose: Pose,
    size: int,
    rng: np.random.Generator,
    intensity: float = 1.0,
) -> np.ndarray:
    """Draw one face showing expression ``label`` (index into EXPR_CLASSES); BGR uint8 ``size``x``size``x3.

    ``intensity`` scales how far the expression departs from neutral (1 = full).
    ``rng`` draws only the per-frame nuisances: asymmetries, colour jitter and noise.
    """
    if not 0 <= label < len(_EXPRESSIONS):
        raise ValueError(f"label must be in [0, {len(_EXPRESSIONS)}), got {label}")
    e = _EXPRESSIONS[label]
    px = size * _SUPERSAMPLE
    c = _Canvas(np.full((px, px, 3), style.background, dtype=np.uint8))
    _draw_head(c, style)
    _draw_brows(c, style, e, intensity)
    _draw_eyes(c, style, e, intensity)
    if e.nose_wrinkles:
        _draw_nose_wrinkles(c, style)
    mouth_x = 0.5 + rng.uniform(-0.01, 0.01)
    mouth_y = 0.72 + style.feature_drop
    if e.mouth == "sneer":
        _mouth_sneer(c, mouth_x, mouth_y, style, intensity, side=rng.choice((-1.0, 1.0)))
    else:
        _MOUTHS[e.mouth](c, mouth_x, mouth_y, style, intensity)
    image = cv2.resize(_warp(c.image, pose), (size, size), interpolation=cv2.INTER_AREA)
    return _photometric(image, rng)


def draw_face(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw one face showing expression ``label`` with a random identity, pose and colour; BGR uint8."""
    return render_face(label, sample_style(rng), sample_pose(rng), size, rng, intensity=rng.uniform(0.8, 1.1))


# --------------------------------------------------------------------------- annotations


def expression_track(
    num_frames: int, first_class: int, unlabelled_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame labels: piecewise-constant segments cycling through the classes, then one -1 run.

    Returns ``(labels, annotated)``: ``labels`` is what each frame shows, ``annotated``
    is what the file says (``labels`` with the unlabelled run set to -1). Segments
    last SEGMENT_FRAMES frames; a short remainder joins the last segment, so no
    segment is shorter than the minimum and an unlabelled run shorter than that
    never hides a whole segment.
    """
    low, high = SEGMENT_FRAMES
    lengths: list[int] = []
    while sum(lengths) < num_frames:
        lengths.append(int(rng.integers(low, high + 1)))
    lengths[-1] -= sum(lengths) - num_frames
    if len(lengths) > 1 and lengths[-1] < low:
        tail = lengths.pop()
        lengths[-1] += tail
    classes = [(first_class + i) % len(EXPR_CLASSES) for i in range(len(lengths))]
    labels = np.repeat(np.array(classes, dtype=np.int64), lengths)
    annotated = labels.copy()
    run = int(round(unlabelled_fraction * num_frames))
    if run > 0:
        start = int(rng.integers(0, num_frames - run + 1))
        annotated[start : start + run] = -1
    return labels, annotated


def _min_segments(num_frames: int) -> int:
    """Fewest segments a track of this length can have (a merged segment is < low + high frames)."""
    low, high = SEGMENT_FRAMES
    return max(1, math.ceil(num_frames / (low + high - 1)))


def _smooth_path(rng: np.random.Generator, n: int, amplitude: float, centre: float = 0.0) -> np.ndarray:
    """A slow random wave of ``n`` samples within ``centre ± amplitude``: smooth motion between frames."""
    t = np.arange(n) / max(n, 1)
    cycles = rng.uniform(0.3, 1.2, size=2)
    phase = rng.uniform(0, 2 * math.pi, size=2)
    wave = 0.6 * np.sin(2 * math.pi * cycles[0] * t + phase[0]) + 0.4 * np.sin(2 * math.pi * cycles[1] * t + phase[1])
    return centre + amplitude * wave


def _drawn_video_id(index: int, num_videos: int) -> str:
    # The last id holds a space and a non-ASCII letter: downstream code must quote and
    # encode paths and keys properly, and every test that uses this corpus exercises that.
    return f"synth_{index:03d} café" if index == num_videos - 1 else f"synth_{index:03d}"


def _write_drawn_video(root: Path, index: int, config: SynthConfig) -> dict:
    video_id = _drawn_video_id(index, config.num_videos)
    rng = np.random.default_rng((config.seed, _DRAWN, index))
    n = config.frames_per_video
    # Offsets step by the fewest segments a video can hold, so consecutive videos
    # continue the class cycle and a handful of videos covers all eight classes.
    first_class = (index * _min_segments(n)) % len(EXPR_CLASSES)
    labels, annotated = expression_track(n, first_class, config.unlabelled_fraction, rng)

    style = sample_style(rng)
    angles = _smooth_path(rng, n, 10.0)
    dxs, dys = _smooth_path(rng, n, 0.05), _smooth_path(rng, n, 0.05)
    scales = _smooth_path(rng, n, 0.1, centre=0.975)
    frames_dir = root / "aligned" / video_id
    frames_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pose = Pose(float(angles[i]), float(dxs[i]), float(dys[i]), float(scales[i]))
        image = render_face(int(labels[i]), style, pose, config.image_size, rng, rng.uniform(0.8, 1.1))
        _write_jpeg(frames_dir / f"{i + 1:05d}.jpg", image)

    annotation = root / "annotations" / f"{video_id}.txt"
    annotation.parent.mkdir(parents=True, exist_ok=True)
    annotation.write_text(EXPR_HEADER + "\n" + "".join(f"{v}\n" for v in annotated), encoding="utf-8")
    return {
        "video_id": video_id,
        "frames_dir": frames_dir.relative_to(root).as_posix(),
        "annotation": annotation.relative_to(root).as_posix(),
        "frames": n,
        "labels": _histogram(annotated),
    }


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    # imencode + write_bytes rather than imwrite: imwrite mangles non-ASCII paths on Windows.
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise SampleCorpusError(f"JPEG encoding failed for {path}")
    path.write_bytes(buf.tobytes())


def _histogram(annotated: np.ndarray) -> dict[str, int]:
    counts = {name: int(np.sum(annotated == i)) for i, name in enumerate(EXPR_CLASSES)}
    counts["unlabelled"] = int(np.sum(annotated == -1))
    return counts


# --------------------------------------------------------------------------- mp4 videos


def _astronaut_bgr() -> np.ndarray:
    from skimage import data  # the photo ships inside the scikit-image wheel

    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])


def _real_face_frames(rng: np.random.Generator, config: SynthConfig) -> list[np.ndarray]:
    """Animate the astronaut photo: a camera that drifts, zooms, rolls and changes exposure."""
    photo = _astronaut_bgr()
    width, height = config.real_video_size
    n = config.real_video_frames
    # The face spans about 27-48% of the frame height: well inside MTCNN's working range.
    zoom = _smooth_path(rng, n, 0.06, centre=rng.uniform(0.33, 0.42)) * height / _ASTRONAUT_FACE_HEIGHT
    angle = _smooth_path(rng, n, 8.0)
    # Where the face sits in the frame, as a fraction of width/height from the centre.
    fx, fy = _smooth_path(rng, n, 0.12), _smooth_path(rng, n, 0.08, centre=-0.05)
    gain = _smooth_path(rng, n, 0.2, centre=1.0)
    mirror = bool(rng.random() < 0.5)
    frames = []
    for i in range(n):
        m = cv2.getRotationMatrix2D(_ASTRONAUT_FACE_CENTER, float(angle[i]), float(zoom[i]))
        # Move the face centre from its place in the photo to its place in the frame.
        target = (width * (0.5 + fx[i]), height * (0.5 + fy[i]))
        m[:, 2] += np.subtract(target, _ASTRONAUT_FACE_CENTER)
        frame = cv2.warpAffine(photo, m, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        frame = np.clip(frame.astype(np.float32) * np.float32(gain[i]), 0, 255).astype(np.uint8)
        frames.append(frame[:, ::-1].copy() if mirror else frame)
    return frames


def _no_face_frames(rng: np.random.Generator, config: SynthConfig) -> list[np.ndarray]:
    """Rectangles and bars drifting over a noisy gradient: busy, but nothing face-like."""
    width, height = config.real_video_size
    n = config.real_video_frames
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    c0, c1 = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
    base = (c0 + (c1 - c0) * ramp).astype(np.float32) * np.ones((height, 1, 1), np.float32)
    shapes = [
        (rng.uniform(0, width, 2), rng.uniform(-4, 4, 2), rng.uniform(20, 90, 2), _random_colour(rng)) for _ in range(6)
    ]
    frames = []
    for i in range(n):
        noise = rng.normal(0.0, 12.0, size=base.shape).astype(np.float32)
        frame = np.clip(base + noise, 0, 255).astype(np.uint8)
        for (x0, y0), (vx, vy), (w, h), colour in shapes:
            x, y = int((x0 + vx * i) % width), int((y0 + vy * i) % height)
            cv2.rectangle(frame, (x, y), (x + int(w), y + int(h) // 3), colour, -1)
        frames.append(frame)
    return frames


def _write_mp4(path: Path, frames: list[np.ndarray], fps: float) -> dict:
    """Write ``frames`` with the MPEG-4 Part 2 codec, then re-open the file and count its frames."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise SampleCorpusError(f"OpenCV cannot write mp4v video {path}: is its FFmpeg backend missing?")
    for frame in frames:
        writer.write(frame)
    writer.release()

    # The container's frame-count field can be approximate; decoding every frame is exact.
    capture = cv2.VideoCapture(str(path))
    decoded = 0
    while capture.isOpened() and capture.grab():
        decoded += 1
    capture.release()
    if decoded != len(frames):
        raise SampleCorpusError(f"{path} decodes to {decoded} frames, wrote {len(frames)}")
    return {"frames": decoded, "width": width, "height": height, "fps": fps}


def _write_videos(root: Path, config: SynthConfig) -> list[dict]:
    videos_dir = root / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(config.num_real_videos):
        rng = np.random.default_rng((config.seed, _REAL, index))
        path = videos_dir / f"astronaut_{index:03d}.mp4"
        info = _write_mp4(path, _real_face_frames(rng, config), config.fps)
        written.append({"path": path.relative_to(root).as_posix(), "has_face": True, **info})
    if config.no_face_video:
        rng = np.random.default_rng((config.seed, _NO_FACE, 0))
        path = videos_dir / "no_face.mp4"
        info = _write_mp4(path, _no_face_frames(rng, config), config.fps)
        written.append({"path": path.relative_to(root).as_posix(), "has_face": False, **info})
    return written


# --------------------------------------------------------------------------- the corpus

_OWNED = ("aligned", "annotations", "videos", "README.txt", "synth.json")


def _local_root(out_dir: str | os.PathLike) -> Path:
    text = os.fspath(out_dir)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        # OpenCV's video writer needs a real file; write locally, then storage.upload_dir.
        raise SampleCorpusError(f"the sample corpus is written to a local directory, not {text!r}")
    return Path(text).expanduser().resolve()


def _prepare(root: Path) -> None:
    """Make ``root`` ready: new, empty, or an earlier sample corpus (whose files are replaced)."""
    if root.exists() and any(root.iterdir()):
        if not (root / "synth.json").is_file():
            raise SampleCorpusError(f"{root} is not empty and holds no sample corpus; refusing to write into it")
        # Drop the old corpus wholesale: a smaller config must not leave stale frames behind.
        for name in _OWNED:
            target = root / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    root.mkdir(parents=True, exist_ok=True)


def _readme(summary: dict, config: SynthConfig) -> str:
    size = config.image_size
    lines = [
        "affectray built-in sample corpus (written by affectray.sample.synth; no download).",
        "",
        f"aligned/<video_id>/NNNNN.jpg  {summary['num_videos']} videos of drawn faces, {size}x{size}, "
        "Aff-Wild2 cropped_aligned layout.",
        "annotations/<video_id>.txt   Aff-Wild2 EXPR format: header line, then one label index per frame, "
        "-1 = no label.",
        f"videos/astronaut_NNN.mp4     {config.num_real_videos} animated real-face videos "
        "(scikit-image astronaut photo, public domain).",
    ]
    if config.no_face_video:
        lines.append("videos/no_face.mp4           moving shapes and noise, no face.")
    lines.append("synth.json                   the config and summary; the same seed rewrites identical bytes.")
    return "\n".join(lines) + "\n"


def write_sample_corpus(out_dir: str | os.PathLike, config: SynthConfig | None = None) -> dict:
    """Write the sample corpus under local directory ``out_dir`` and return its summary.

    ``out_dir`` must be missing, empty, or an earlier sample corpus (which is replaced).
    The summary (also saved in ``synth.json``) gives paths relative to ``out_dir``, frame
    counts and the label histogram; the returned dict adds ``root``, the absolute path.
    """
    config = config or SynthConfig()
    root = _local_root(out_dir)
    _prepare(root)
    drawn = [_write_drawn_video(root, i, config) for i in range(config.num_videos)]
    videos = _write_videos(root, config)
    histogram = {key: sum(v["labels"][key] for v in drawn) for key in (*EXPR_CLASSES, "unlabelled")}
    summary = {
        "classes": list(EXPR_CLASSES),
        "num_videos": len(drawn),
        "num_frames": sum(v["frames"] for v in drawn),
        "label_histogram": histogram,
        "aligned": drawn,
        "videos": videos,
    }
    (root / "README.txt").write_text(_readme(summary, config), encoding="utf-8")
    record = {"config": asdict(config), "summary": summary}
    (root / "synth.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"root": str(root), **summary}


# --------------------------------------------------------------------------- `affectray synth`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from affectray.config import add_config_arguments

    parser.add_argument("out_dir", help="local directory to write (missing, empty, or an earlier sample corpus)")
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> dict:
    from affectray.config import config_from_args, print_config

    config = config_from_args(SynthConfig, args)
    print_config(config)
    summary = write_sample_corpus(args.out_dir, config)
    return {key: summary[key] for key in ("root", "num_videos", "num_frames", "label_histogram")} | {
        "videos": [v["path"] for v in summary["videos"]]
    }
