"""Find every face in a few images or videos and say what it expresses, at once.

    affectray predict group.jpg                      # the built-in FER2013 model
    affectray predict a.jpg clip.mp4 --out annotated/ --json
    affectray predict photo.png --checkpoint demo-output/runs/finetune-smoke/best_checkpoint

For each input: MTCNN finds the faces, each face is cropped as the checkpoint's
preprocessing says (its detector box for the built-in model, five-point alignment
for fine-tuned ones) and classified. A table lists every face with its box, label
and top probabilities (and valence / arousal, for a checkpoint with a VA head);
``--json`` ends with one JSON object; ``--out`` gets an
annotated copy of each input (boxes and labels drawn; videos as MP4).

Videos are sampled (``--every``, default every 10th frame) and each face is scored on
its own frame: a quick look. ``affectray label`` is the corpus job, with face tracks,
smoothing, window models and Parquet output, on Ray.

No Ray here, on purpose: starting Ray costs 10-20 s on a laptop, longer than detecting
and classifying a handful of photos; everything runs in this process.
"""

from __future__ import annotations

import argparse
import logging
import posixpath
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from affectray import storage
from affectray.errors import AffectrayError
from affectray.faces.detect import FaceDetector, detect_and_align
from affectray.faces.video import iter_frames
from affectray.models.builtin import DEFAULT_CHECKPOINT
from affectray.models.inference import Classifier, load_classifier

logger = logging.getLogger("affectray.predict")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
TOP_K = 3


class PredictError(AffectrayError):
    """An input that is not there or is neither an image nor a video we can read."""


@dataclass
class Face:
    box: list[float]  # x1, y1, x2, y2 in the input's pixels
    score: float  # the detector's face probability
    label: str
    probs: dict[str, float]
    frame_index: int | None = None  # videos: the frame it was found on
    pts_seconds: float | None = None
    valence: float | None = None  # a checkpoint with a VA head: in [-1, 1]
    arousal: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"box": [round(v, 1) for v in self.box], "score": round(self.score, 4), "label": self.label,
               "probs": {k: round(v, 4) for k, v in self.probs.items()}}  # fmt: skip
        if self.valence is not None:
            out.update(valence=round(self.valence, 4), arousal=round(self.arousal, 4))
        if self.frame_index is not None:
            out.update(frame_index=self.frame_index, pts_seconds=round(self.pts_seconds or 0.0, 3))
        return out


@dataclass
class Prediction:
    path: str
    kind: str  # "image" | "video"
    faces: list[Face] = field(default_factory=list)
    frames: int = 0  # frames looked at
    annotated: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "kind": self.kind, "faces": [f.to_dict() for f in self.faces]}
        if self.kind == "video":
            out["frames"] = self.frames
        if self.annotated:
            out["annotated"] = self.annotated
        if self.error:
            out["error"] = self.error
        return out


class Predictor:
    """A detector and a classifier, loaded once, applied to images and sampled video frames."""

    def __init__(self, classifier: Classifier, *, min_face_score: float = 0.9, min_face_size: int = 20,
                 detect_max_side: int = 1280) -> None:  # fmt: skip
        self.classifier = classifier
        self.detector = FaceDetector(min_score=min_face_score, min_face_size=min_face_size)
        self.detect_max_side = detect_max_side
        pre = classifier.preprocessing
        self.crop = pre.crop
        self.margin = pre.box_margin if pre.crop == "box" else None

    def faces(self, images: list[np.ndarray]) -> list[list[Face]]:
        """Every face of each RGB image, classified; images may differ in size."""
        found: list[list[Face]] = []
        for image in images:
            (detections, crops), = detect_and_align(
                self.detector, [image], self.classifier.preprocessing.image_size, self.detect_max_side,
                margin=self.margin, crop=self.crop,
            )  # fmt: skip
            if not detections:
                found.append([])
                continue
            # Each face on its own: a window model sees its frame repeated (a one-frame track).
            predicted = [self.classifier.predict_track_outputs(crop[None]) for crop in crops]
            probs = np.concatenate([p["probs"] for p in predicted])
            va = np.concatenate([p["va"] for p in predicted]) if self.classifier.predicts_va else None
            classes = self.classifier.classes
            found.append([
                Face(box=[float(v) for v in d.box], score=float(d.score), label=classes[int(p.argmax())],
                     probs={classes[k]: float(p[k]) for k in np.argsort(-p)},
                     **({} if va is None else {"valence": float(va[j, 0]), "arousal": float(va[j, 1])}))
                for j, (d, p) in enumerate(zip(detections, probs))
            ])  # fmt: skip
        return found


def predict_inputs(
    inputs: list[str], predictor: Predictor, *, out: str | None = None, every: int = 10
) -> list[Prediction]:
    """Predict every input; one that cannot be read is reported with its error, the others go on."""
    results = []
    for uri in inputs:
        kind = input_kind(uri)
        try:
            if kind == "image":
                result = _predict_image(uri, predictor, out)
            else:
                result = _predict_video(uri, predictor, out, every)
        except (AffectrayError, OSError, ValueError) as error:  # unreadable, missing, not decodable
            result = Prediction(uri, kind, error=str(error))
            logger.error("%s: %s", uri, error)
        results.append(result)
    return results


def input_kind(uri: str) -> str:
    suffix = posixpath.splitext(uri.lower())[1]
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    raise PredictError(
        f"{uri!r}: not an image ({', '.join(IMAGE_SUFFIXES)}) or a video ({', '.join(VIDEO_SUFFIXES)}) by its name"
    )


def _predict_image(uri: str, predictor: Predictor, out: str | None) -> Prediction:
    data = storage.read_bytes(uri)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise PredictError(f"{uri!r}: not a readable image ({len(data)} bytes)")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    result = Prediction(uri, "image", faces=predictor.faces([rgb])[0], frames=1)
    if out is not None:
        ok, encoded = cv2.imencode(".jpg", draw_faces(bgr, result.faces), [cv2.IMWRITE_JPEG_QUALITY, 92])
        result.annotated = storage.join(out, f"{_stem(uri)}.annotated.jpg")
        storage.write_bytes(result.annotated, encoded.tobytes())
    return result


def _predict_video(uri: str, predictor: Predictor, out: str | None, every: int) -> Prediction:
    result = Prediction(uri, "video")
    with tempfile.TemporaryDirectory(prefix="affectray-predict-") as tmp, storage.open_input(uri) as source:
        annotated = Path(tmp, f"{_stem(uri)}.annotated.mp4")
        writer = None
        for batch in iter_frames(source, stride=every, batch_size=16):
            found = predictor.faces(batch.images)
            for index, pts, image, faces in zip(batch.frame_index, batch.pts_seconds, batch.images, found):
                result.frames += 1
                for face in faces:
                    face.frame_index, face.pts_seconds = int(index), float(pts)
                result.faces.extend(faces)
                if out is None:
                    continue
                bgr = draw_faces(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), faces)
                if writer is None:  # 5 fps: the sampled frames play at a readable pace
                    writer = cv2.VideoWriter(str(annotated), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, bgr.shape[1::-1])
                writer.write(bgr)
        if writer is not None:
            writer.release()
            result.annotated = storage.join(out, annotated.name)
            storage.write_bytes(result.annotated, annotated.read_bytes())
    return result


def draw_faces(bgr: np.ndarray, faces: list[Face]) -> np.ndarray:
    """A copy of the image with each face's box and its label (and probability) drawn on it."""
    canvas = bgr.copy()
    thickness = max(1, round(max(canvas.shape[:2]) / 400))
    for face in faces:
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 200, 0), thickness)
        text = f"{face.label} {face.probs[face.label]:.2f}"
        scale = max(0.4, (x2 - x1) / 160)
        (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        top = max(y1 - h - base - 2, 0)
        cv2.rectangle(canvas, (x1, top), (x1 + w + 2, top + h + base + 2), (0, 200, 0), cv2.FILLED)
        cv2.putText(canvas, text, (x1 + 1, top + h + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness)
    return canvas


def _stem(uri: str) -> str:
    return posixpath.splitext(posixpath.basename(uri.rstrip("/")))[0] or "input"


def format_table(results: list[Prediction]) -> str:
    """One line per face: input, frame, box, label and the top probabilities."""
    lines = [f"{'input':<28} {'frame':>6} {'box (x1, y1, x2, y2)':<24} {'label':<10} top probabilities"]
    for r in results:
        name = posixpath.basename(r.path)[:28]
        if r.error:
            lines.append(f"{name:<28} {'':>6} error: {r.error}")
            continue
        if not r.faces:
            lines.append(f"{name:<28} {'':>6} no face found" + (f" in {r.frames} frames" if r.kind == "video" else ""))
        for f in r.faces:
            box = ", ".join(f"{v:.0f}" for v in f.box)
            top = "  ".join(f"{k} {v:.2f}" for k, v in list(f.probs.items())[:TOP_K])
            frame = "" if f.frame_index is None else str(f.frame_index)
            va = "" if f.valence is None else f"  valence {f.valence:+.2f} arousal {f.arousal:+.2f}"
            lines.append(f"{name:<28} {frame:>6} {box:<24} {f.label:<10} {top}{va}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image or video files (local paths or s3:// URIs)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help=f"classifier checkpoint URI or builtin:NAME (default {DEFAULT_CHECKPOINT}; "
                             "`affectray models` lists the built-ins)")  # fmt: skip
    parser.add_argument("--out", help="write an annotated copy of each input here (local dir or s3:// prefix)")
    parser.add_argument("--json", action="store_true", help="end with one JSON object: every input and its faces")
    parser.add_argument("--every", type=int, default=10, help="videos: look at every k-th frame (default 10)")
    parser.add_argument("--min-face-score", type=float, default=0.9, help="MTCNN probability a face needs")
    parser.add_argument("--min-face-size", type=int, default=20, help="smallest face side MTCNN looks for, pixels")


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    from affectray.config import resolve_location
    from affectray.runtime import emit_summary

    if args.every < 1:
        raise PredictError(f"--every must be at least 1, got {args.every}")
    start = time.perf_counter()
    inputs = [resolve_location(i) for i in args.inputs]
    for uri in inputs:
        input_kind(uri)  # a wrong kind of file is refused before any model loads
    out = resolve_location(args.out) if args.out else None
    classifier = load_classifier(resolve_location(args.checkpoint))
    predictor = Predictor(classifier, min_face_score=args.min_face_score, min_face_size=args.min_face_size)
    results = predict_inputs(inputs, predictor, out=out, every=args.every)
    print(format_table(results))
    summary = {
        "job": "predict",
        "model": args.checkpoint,
        "model_id": classifier.model_id,
        "inputs": [r.to_dict() for r in results],
        "faces": sum(len(r.faces) for r in results),
        "failed": sum(1 for r in results if r.error),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if args.json:
        emit_summary(summary)  # the last line on stdout
    if summary["failed"]:
        raise PredictError(f"{summary['failed']} of {len(results)} inputs could not be read (see above)")
    return None
