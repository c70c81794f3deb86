"""The labeling pipeline's stages, on Ray Data, streaming in chunks of frames.

    videos ─▶ decode (tasks) ─▶ chunks ─▶ detect + align (MTCNN actors) ─▶ classify (actors) ─▶ driver
                                                              assemble each video: track, smooth, write its
                                                              Parquet, timeline and done marker

On a cluster without GPUs one pool of LabelFaces actors runs detection and
classification back to back: the stages would share the same cores anyway.

A video becomes a stream of *chunks* of ``chunk_frames`` consecutive frames, so a
long or 4K video is never held whole and its chunks spread over every detector
and classifier actor. Each chunk is one Ray Data row ``{"key", "part", "payload"}``
(``payload`` a pickled dict of arrays: frames of any size travel without schema
trouble); after its last chunk, a video's decode task emits an *end* row
(``part`` -1) with the frame count, the number of chunks and any decode error.
The driver gathers rows by video; once the end row and every chunk it announces
have arrived the video is complete (a re-delivered chunk replaces its twin, so
a retried task cannot duplicate rows).

Window classifiers (smooth predicting, CNN-GRU, video encoders) need the faces
around each frame: chunks then carry ``halo`` extra frames on each side, which
are detected and used to build windows along chunk-local IoU tracks but are
labelled only by the chunk that owns them (its *core*).
"""

from __future__ import annotations

import logging
import pickle
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from affectray import storage
from affectray.faces.detect import LazyDetector
from affectray.label import outputs
from affectray.label.inputs import VideoInput

END = -1  # the ``part`` of a video's end row

logger = logging.getLogger("affectray.label")


@dataclass(frozen=True)
class StageSettings:
    """What the stages need to know, fixed for a run.

    The defaults are the label job's too: LabelConfig reads them from here (job.py imports this module).
    """

    image_size: int  # the classifier's input side: faces are cropped straight to it
    crop: str = "aligned"  # the checkpoint's face crop: "aligned" (five points) or "box" (detector box)
    crop_margin: float | None = None  # the crop's extra context; None: the crop's default
    chunk_frames: int = 16
    halo: int = 0  # extra frames on each side of a chunk, for window classifiers
    decode_max_side: int = 1280  # bounds memory for 4K; faces are aligned from these frames
    detect_max_side: int = 640  # frames are downscaled to this for MTCNN
    detect_every: int = 4  # MTCNN on the whole of every k-th frame of a chunk, between only near its faces
    min_face_score: float = 0.9
    min_face_size: int = 20
    frames_fps: float = 30.0  # time base of frame folders, which carry no timestamps
    batch_size: int = 64  # faces per classifier forward pass


def _row(key: str, part: int, payload: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        "key": np.array([key], dtype=object),
        "part": np.array([part], dtype=np.int64),
        "payload": np.array([pickle.dumps(payload, protocol=5)], dtype=object),
    }


def _reason(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) < 500 else text[:497] + "..."


def _node_id() -> str:
    """The Ray node this stage runs on, recorded per video so a job reports where its work ran."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _ran_here(chunk: dict[str, Any]) -> None:
    node = _node_id()
    if node and node not in chunk.setdefault("nodes", []):
        chunk["nodes"].append(node)


class _Clock:
    """Wall and CPU seconds of work since the last lap.

    CPU time is the process's (all threads: torch's and FFmpeg's too), or with
    ``thread=True`` the calling thread's (the driver's writer threads share a process).
    Between laps a generator may sit suspended at a yield; callers lap on resuming,
    so that time is the consumer's, not theirs.
    """

    def __init__(self, thread: bool = False) -> None:
        self.cpu_clock = time.thread_time if thread else time.process_time
        self.wall, self.cpu = time.perf_counter(), self.cpu_clock()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), self.cpu_clock()
        elapsed = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return elapsed


def _charge(piece: dict[str, Any], stage: str, lap: tuple[float, float], share: float = 1.0) -> None:
    """Add a stage's wall and CPU seconds to a chunk's (or end row's) accounts."""
    for account, value in zip(("seconds", "cpu"), lap):
        totals = piece.setdefault(account, {})
        totals[stage] = totals.get(stage, 0.0) + value * share


# -- stage 1: decode (Ray tasks) -------------------------------------------------------


def decode_videos(batch: dict[str, np.ndarray], settings: StageSettings) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: video rows → chunk rows, then one end row per video (a generator: rows stream out)."""
    for text in batch["video"]:
        video = VideoInput.from_json(str(text))
        parts = _frame_folder_chunks(video, settings) if video.kind == "frames" else _video_chunks(video, settings)
        for part, payload in parts:
            yield _row(video.key, part, payload)


def _video_chunks(video: VideoInput, s: StageSettings) -> Iterator[tuple[int, dict[str, Any]]]:
    from affectray.faces.video import VideoDecodeError, iter_frames, probe

    clock = _Clock()
    end: dict[str, Any] = {"status": "ok", "reason": None, "error": None, "info": {}, "chunks": 0, "frames": 0}
    try:
        with storage.open_input(video.uri) as stream:
            info = probe(stream)
            end["info"] = {
                "fps": info.fps,
                "width": info.width,
                "height": info.height,
                "duration_seconds": info.duration_seconds,
                "codec": info.codec,
            }
            stream.seek(0)
            frames = _flat_frames(iter_frames(stream, max_side=s.decode_max_side, batch_size=s.chunk_frames))
            for chunk in _with_halo(frames, s.chunk_frames, s.halo):
                _charge(chunk, "decode", clock.lap())
                _ran_here(chunk)
                yield end["chunks"], chunk
                clock.lap()  # the time spent suspended is the consumer's, not decoding
                end["chunks"] += 1
                end["frames"] += int(np.count_nonzero(_core_mask(chunk)))
    except VideoDecodeError as error:
        end["reason"], end["error"] = error.reason, _reason(error)
    except storage.StorageUnavailable as error:  # retries ran out: not the video's fault, a re-run tries again
        end["reason"], end["error"] = storage.STORAGE_UNAVAILABLE, _reason(error)
    except Exception as error:  # noqa: BLE001 - unreadable (missing, no access): record it and go on
        end["reason"], end["error"] = "unreadable", _reason(error)
    if end["error"] is None and end["frames"] == 0:
        end["reason"], end["error"] = "no frames", f"{video.uri}: the video stream holds no decodable frame"
    if end["error"] is not None:
        end["status"] = "partial" if end["frames"] else "failed"
    _charge(end, "decode", clock.lap())
    _ran_here(end)
    yield END, end


def _flat_frames(batches) -> Iterator[tuple[int, float, np.ndarray, float]]:
    for batch in batches:
        for i in range(len(batch)):
            yield int(batch.frame_index[i]), float(batch.pts_seconds[i]), batch.images[i], float(batch.scale)


def _with_halo(frames: Iterator[tuple], size: int, halo: int) -> Iterator[dict[str, Any]]:
    """Group frames into chunks of ``size`` core frames plus up to ``halo`` frames on each side."""
    size = max(size, halo)  # the next chunk's leading halo must come from this chunk's core
    pending: list[tuple] = []
    lead = 0  # frames of leading halo at the front of pending
    for frame in frames:
        pending.append(frame)
        if len(pending) == lead + size + halo:
            yield _frames_chunk(pending, lead, lead + size)
            pending, lead = pending[lead + size - halo :], halo
    if len(pending) > lead:
        yield _frames_chunk(pending, lead, len(pending))


def _frames_chunk(frames: list[tuple], lo: int, hi: int) -> dict[str, Any]:
    index = np.array([f[0] for f in frames], dtype=np.int64)
    return {
        "frame_index": index,  # [T]
        "pts": np.array([f[1] for f in frames], dtype=np.float64),  # [T]
        "scale": np.array([f[3] for f in frames], dtype=np.float64),  # [T] decoded = original * scale
        "images": [f[2] for f in frames],  # T x [h, w, 3] uint8
        "core": (int(index[lo]), int(index[hi - 1]) + 1),  # frame indices this chunk labels
    }


def _core_mask(chunk: dict[str, Any]) -> np.ndarray:
    lo, hi = chunk["core"]
    return (chunk["frame_index"] >= lo) & (chunk["frame_index"] < hi)


def _frame_folder_chunks(video: VideoInput, s: StageSettings) -> Iterator[tuple[int, dict[str, Any]]]:
    """Aligned frames (one face per frame, no detection) in chunks; unreadable frames are dropped and reported."""
    clock = _Clock()
    end: dict[str, Any] = {
        "status": "ok", "reason": None, "error": None, "chunks": 0, "frames": 0,
        "info": {"fps": s.frames_fps, "width": s.image_size, "height": s.image_size, "codec": "images"},
    }  # fmt: skip
    n = len(video.frames)
    size = max(s.chunk_frames, s.halo)
    bad: list[tuple[str, str]] = []
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:  # object-store reads are latency-bound
            for start in range(0, n, size):
                lo, hi = max(0, start - s.halo), min(n, start + size + s.halo)
                loaded = list(pool.map(lambda i: _load_face(video.frames[i], s.image_size), range(lo, hi)))
                good = [i for i, (face, _) in zip(range(lo, hi), loaded) if face is not None]
                bad += [
                    (video.frames[i], err) for i, (_, err) in enumerate(loaded, lo) if err and start <= i < start + size
                ]
                if not good:
                    continue
                index = np.array([video.frame_indices[i] for i in good], dtype=np.int64)
                t = len(good)
                chunk = {
                    "frame_index": index,
                    "pts": index / s.frames_fps,
                    "core": (video.frame_indices[start], video.frame_indices[min(n, start + size) - 1] + 1),
                    "face_count": np.ones(t, np.int64),
                    "face_pos": np.arange(t),
                    "boxes": np.full((t, 4), np.nan, np.float32),
                    "scores": np.full(t, np.nan, np.float32),
                    "landmarks": np.full((t, 5, 2), np.nan, np.float32),
                    "crops": np.stack([loaded[i - lo][0] for i in good]),
                }
                _charge(chunk, "decode", clock.lap())
                _ran_here(chunk)
                yield end["chunks"], chunk
                clock.lap()
                end["chunks"] += 1
                end["frames"] += int(np.count_nonzero(_core_mask(chunk)))
    except storage.StorageUnavailable as error:  # not the frames' fault: the whole video is tried again
        end["reason"], end["error"] = storage.STORAGE_UNAVAILABLE, _reason(error)
    end["info"]["duration_seconds"] = n / s.frames_fps
    if bad and end["error"] is None:
        end["reason"] = "unreadable frames"
        end["error"] = f"{len(bad)} unreadable frame file(s), first {bad[0][0]!r}: {bad[0][1]}"
    if end["error"] is not None:
        end["status"] = "partial" if end["frames"] else "failed"
    _charge(end, "decode", clock.lap())
    _ran_here(end)
    yield END, end


def _load_face(uri: str, size: int) -> tuple[np.ndarray | None, str]:
    import cv2

    from affectray.faces.jpeg import decode_jpeg

    try:
        image = decode_jpeg(storage.read_bytes(uri))
    except storage.StorageUnavailable:
        raise  # the store, not the frame: the video is recorded as retryable
    except Exception as error:  # noqa: BLE001 - one bad frame file must not sink its video
        return None, _reason(error)
    if image.shape[:2] != (size, size):
        interpolation = cv2.INTER_AREA if max(image.shape[:2]) > size else cv2.INTER_CUBIC
        image = cv2.resize(image, (size, size), interpolation=interpolation)
    return image, ""


# -- stage 2: detect + align (actor pool) ----------------------------------------------


class DetectFaces:
    """Ray Data actor: MTCNN over a chunk's frames, then 5-point alignment at the classifier's size.

    Replaces a chunk's frames by its faces: ``face_pos`` (frame position in the
    chunk), ``boxes`` / ``landmarks`` in the video's original pixel coordinates,
    ``scores`` and aligned ``crops`` [F, S, S, 3]. The detector loads on first use,
    so a run over frame folders never loads it.
    """

    def __init__(self, settings: StageSettings, torch_threads: int = 0):
        self.settings = settings
        self.detector = LazyDetector(
            min_score=settings.min_face_score, min_face_size=settings.min_face_size, torch_threads=torch_threads
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _packed(batch, self.process(_unpacked(batch)))

    def process(self, chunks: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Chunks (by row) with frames → with faces; a chunk whose detection fails carries the error."""
        for i, chunk in chunks.items():
            if "images" in chunk:
                try:
                    chunks[i] = self.detect(chunk)
                except Exception as error:  # noqa: BLE001 - the video fails, the job goes on
                    reason = f"face detection failed: {_reason(error)}"
                    chunks[i] = {"error": reason, "seconds": chunk.get("seconds", {})}
        return chunks

    def detect(self, chunk: dict[str, Any]) -> dict[str, Any]:
        from affectray.faces.detect import detect_and_align

        clock = _Clock()
        s = self.settings
        images = chunk.pop("images")
        found: list[tuple[list, np.ndarray]] = [None] * len(images)  # type: ignore[list-item]
        for run in _same_size_runs(images):
            frames = [images[i] for i in run]
            results = detect_and_align(
                self.detector(), frames, s.image_size, s.detect_max_side,
                margin=s.crop_margin, detect_every=s.detect_every, crop=s.crop,
            )  # fmt: skip
            for i, result in zip(run, results):
                found[i] = result
        face_pos, boxes, scores, landmarks, crops = [], [], [], [], []
        for i, (faces, aligned) in enumerate(found):
            scale = chunk["scale"][i]
            for det in faces:
                face_pos.append(i)
                boxes.append(det.box / scale)  # decoded-frame → original video coordinates
                scores.append(det.score)
                landmarks.append(det.landmarks / scale)
            if len(aligned):
                crops.append(aligned)
        size = s.image_size
        chunk.update(
            face_count=np.array([len(faces) for faces, _ in found], dtype=np.int64),  # [T]
            face_pos=np.array(face_pos, dtype=np.int64),  # [F]
            boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
            scores=np.array(scores, dtype=np.float32),
            landmarks=np.array(landmarks, dtype=np.float32).reshape(-1, 5, 2),
            crops=np.concatenate(crops) if crops else np.zeros((0, size, size, 3), np.uint8),
        )
        _charge(chunk, "detect", clock.lap())
        _ran_here(chunk)
        return chunk


def _same_size_runs(images: list[np.ndarray]) -> list[list[int]]:
    """Positions of consecutive images of one size (a video may change size mid-stream)."""
    runs: list[list[int]] = []
    for i, image in enumerate(images):
        if runs and images[runs[-1][0]].shape == image.shape:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


# -- stage 3: classify (actor pool) ----------------------------------------------------


class ClassifyFaces:
    """Ray Data actor: the checkpoint's classifier, loaded once, over aligned faces.

    Frame models classify every face of a batch of chunks in forward passes of
    ``batch_size``; window models classify along chunk-local tracks, halo
    included. Either way the chunk leaves with class probabilities (and, for a model
    with a VA head, valence and arousal) for its core frames and without its face crops.
    """

    def __init__(self, checkpoint: str, settings: StageSettings, torch_threads: int = 0):
        import torch

        from affectray.models.inference import load_classifier

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.settings = settings
        self.classifier = load_classifier(checkpoint, "cuda" if torch.cuda.is_available() else "cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _packed(batch, self.process(_unpacked(batch)))

    def process(self, chunks: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Chunks (by row) with faces → their core frames with class probabilities."""
        clock = _Clock()
        ready = {i: c for i, c in chunks.items() if "error" not in c}
        if self.classifier.preprocessing.mode == "clip":
            predicted = {i: self._classify_tracks(c) for i, c in ready.items()}
        else:
            predicted = self._classify_frames(ready)
        faces = sum(len(c["crops"]) for c in ready.values())
        elapsed = clock.lap()
        for i, chunk in ready.items():
            share = len(chunk["crops"]) / faces if faces else 1 / len(ready)
            chunks[i] = _core_only(chunk, predicted[i])
            _charge(chunks[i], "classify", elapsed, share)
            _ran_here(chunks[i])
        return chunks

    def _classify_frames(self, chunks: dict[int, dict[str, Any]]) -> dict[int, dict[str, np.ndarray]]:
        """Each chunk's ``probs`` [F, C] (and ``va`` [F, 2]), from forward passes over all their faces."""
        order = list(chunks)
        crops = [chunks[i]["crops"] for i in order]
        if not any(len(c) for c in crops):
            return {i: self._empty(0) for i in order}
        predicted = self.classifier.predict_track_outputs(np.concatenate(crops), batch_size=self.settings.batch_size)
        bounds = np.cumsum([0] + [len(c) for c in crops])
        return {i: {k: v[bounds[j] : bounds[j + 1]] for k, v in predicted.items()} for j, i in enumerate(order)}

    def _empty(self, n: int) -> dict[str, np.ndarray]:
        out = {"probs": np.zeros((n, self.classifier.num_classes), np.float32)}
        return {**out, "va": np.zeros((n, 2), np.float32)} if self.classifier.predicts_va else out

    def _classify_tracks(self, chunk: dict[str, Any]) -> dict[str, np.ndarray]:
        from affectray.faces.tracking import IoUTracker

        n = len(chunk["crops"])
        predicted = self._empty(n)
        if n == 0:
            return predicted
        if np.isnan(chunk["boxes"]).all():  # aligned frames: one face per frame, one track
            tracks = np.zeros(n, np.int64)
        else:
            tracks = _track_faces(IoUTracker(), chunk["frame_index"][chunk["face_pos"]], chunk["boxes"])
        for track in np.unique(tracks):
            rows = np.nonzero(tracks == track)[0]
            track_out = self.classifier.predict_track_outputs(chunk["crops"][rows], batch_size=self.settings.batch_size)
            for name, values in track_out.items():
                predicted[name][rows] = values
        return predicted


class LabelFaces:
    """Ray Data actor for clusters without GPUs: DetectFaces then ClassifyFaces in one process.

    On CPUs the two stages share the same cores anyway; one actor instead of two pools
    saves a process's start-up (torch, the model) and the hand-off of every chunk's face
    crops (measured on 2 cores: the classifier actor spent 10 s of CPU to classify for 1.3 s).
    """

    def __init__(self, checkpoint: str, settings: StageSettings, torch_threads: int = 0):
        self.detect = DetectFaces(settings, torch_threads)
        self.classify = ClassifyFaces(checkpoint, settings, torch_threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _packed(batch, self.classify.process(self.detect.process(_unpacked(batch))))


def _unpacked(batch: dict[str, np.ndarray]) -> dict[int, dict[str, Any]]:
    """The chunks of a batch of rows, by row; end rows pass through the stages untouched."""
    rows = enumerate(zip(batch["part"], batch["payload"]))
    return {i: pickle.loads(payload) for i, (part, payload) in rows if part != END}


def _packed(batch: dict[str, np.ndarray], chunks: dict[int, dict[str, Any]]) -> dict[str, np.ndarray]:
    payloads = list(batch["payload"])
    for i, chunk in chunks.items():
        payloads[i] = pickle.dumps(chunk, protocol=5)
    return {"key": batch["key"], "part": batch["part"], "payload": np.array(payloads, dtype=object)}


def _core_only(chunk: dict[str, Any], predicted: dict[str, np.ndarray]) -> dict[str, Any]:
    """The chunk's own frames and faces, with their probabilities (and VA); halo and crops dropped."""
    frames = _core_mask(chunk)
    faces = frames[chunk["face_pos"]]
    va = {"va": predicted["va"][faces].astype(np.float32)} if "va" in predicted else {}
    return {
        "frame_index": chunk["frame_index"][frames],  # [T]
        "pts": chunk["pts"][frames],
        "face_count": chunk["face_count"][frames],
        "face_frame": chunk["frame_index"][chunk["face_pos"][faces]],  # [F] frame index of each face
        "boxes": chunk["boxes"][faces],
        "scores": chunk["scores"][faces],
        "landmarks": chunk["landmarks"][faces],
        "probs": predicted["probs"][faces].astype(np.float32),
        **va,
        "seconds": chunk.get("seconds", {}),
        "cpu": chunk.get("cpu", {}),
        "nodes": chunk.get("nodes", []),
    }


def _track_faces(tracker, face_frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Track ids of faces given in frame order ([F] frame index, [F, 4] boxes)."""
    ids = np.empty(len(face_frame), np.int64)
    frames, starts = np.unique(face_frame, return_index=True)
    stops = np.append(starts[1:], len(face_frame))
    for frame, lo, hi in zip(frames, starts, stops):
        ids[lo:hi] = tracker.update(int(frame), boxes[lo:hi])
    return ids


# -- stage 4: assemble and write (driver) ----------------------------------------------


@dataclass
class VideoAssembler:
    """Gathers each video's chunk rows until its end row and every chunk it announces have arrived."""

    parts: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    ends: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_frames: int = 0  # frames in the last chunk taken, for the progress bar

    def add(self, key: str, part: int, payload: bytes) -> bool:
        """Take one row; True when it completes its video."""
        data = pickle.loads(payload)
        if part == END:
            self.ends[key] = data
        else:
            self.parts.setdefault(key, {})[part] = data  # a re-delivered chunk replaces its twin
            self.last_frames = len(data.get("frame_index", ()))
        end = self.ends.get(key)
        return end is not None and len(self.parts.get(key, {})) >= end["chunks"]

    def pop(self, key: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        parts = self.parts.pop(key, {})
        return [parts[p] for p in sorted(parts)], self.ends.pop(key)

    def incomplete(self) -> list[str]:
        return sorted(set(self.parts) | set(self.ends))


@dataclass(frozen=True)
class Finisher:
    """Turns a complete video's chunks into its outputs: tracks, smoothing, Parquet, timeline, marker."""

    out: str
    classes: tuple[str, ...]
    model_id: str
    model: str = ""  # the checkpoint URI the labels came from (builtin:fer-minixception, s3://…)
    smooth_window: int = 9
    smooth_method: str = "mean"
    track_iou: float = 0.3
    track_gap: int = 15
    timelines: bool = True
    va: bool = False  # the model predicts valence and arousal: the label files get those columns

    def __call__(self, video: VideoInput, parts: list[dict[str, Any]], end: dict[str, Any]) -> dict[str, Any]:
        clock = _Clock(thread=True)
        seconds: Counter = Counter()
        cpu: Counter = Counter()
        nodes: set[str] = set()
        for piece in [*parts, end]:
            seconds.update(piece.get("seconds") or {})
            cpu.update(piece.get("cpu") or {})
            nodes.update(piece.get("nodes") or [])
        outcome: dict[str, Any] = {
            "video_uri": video.uri,
            "video_key": video.key,
            "name": video.name,
            "status": end["status"],
            "reason": end["reason"],
            "error": end["error"],
            "frames": end["frames"],
            **{k: end["info"].get(k) for k in ("fps", "width", "height", "duration_seconds", "codec")},
            "faces": 0,
            "frames_with_face": 0,
            "tracks": 0,
            "label_counts": {},
            "output": None,
            "timeline": None,
            "model": self.model,
            "model_id": self.model_id,
        }
        errors = [p["error"] for p in parts if "error" in p]
        if errors:
            outcome.update(status="failed", reason="processing error", error=errors[0])
        elif end["frames"]:
            try:
                self._write(video, parts, outcome)
            except storage.StorageUnavailable as error:  # OUT's store, not the video: retried next run
                outcome.update(status="failed", reason=storage.STORAGE_UNAVAILABLE, error=str(error))
                outcome.update(output=None, timeline=None)
        wall, cpu_write = clock.lap()
        seconds["write"] += wall
        cpu["write"] += cpu_write
        outcome["seconds"] = {k: round(v, 4) for k, v in seconds.items()}
        outcome["cpu_seconds"] = {k: round(v, 4) for k, v in cpu.items()}
        outcome["nodes"] = sorted(nodes)  # Ray nodes that decoded, detected or classified it
        outcome["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._mark(outcome)
        return outcome

    def _write(self, video: VideoInput, parts: list[dict[str, Any]], outcome: dict[str, Any]) -> None:
        """The video's label file and timeline, and what they hold into ``outcome``."""
        labels = self.assemble(parts)
        table = outputs.labels_table(
            labels, video_uri=video.uri, key=video.key, classes=self.classes, model_id=self.model_id
        )
        outcome["output"] = outputs.write_labels(self.out, video.key, table)
        if self.timelines:
            png = outputs.timeline_png(labels, self.classes, f"{video.name}  ({self.model_id})")
            outcome["timeline"] = outputs.timeline_uri(self.out, video.key)
            storage.write_bytes(outcome["timeline"], png)
        outcome.update(
            frames=labels.num_frames,
            faces=labels.num_faces,
            frames_with_face=int(np.count_nonzero(labels.face_count)),
            tracks=len(np.unique(labels.track_id)),
            label_counts={
                self.classes[k]: int(n) for k, n in zip(*np.unique(labels.label_smoothed, return_counts=True))
            },
        )

    def _mark(self, outcome: dict[str, Any]) -> None:
        """Write the done marker, last: its presence means the video's outputs (if any) are complete.

        If the store refuses even that, the video stays unmarked and the next run labels it again.
        """
        try:
            storage.write_json(outputs.done_uri(self.out, outcome["video_key"]), outcome)
        except storage.StorageUnavailable as error:
            logger.warning("%s: outcome not recorded, a re-run labels it again: %s", outcome["name"], error)

    def lost(self, video: VideoInput) -> dict[str, Any]:
        """Record a video whose chunks never all arrived (a worker died on it for good) as failed."""
        outcome = {
            "video_uri": video.uri,
            "video_key": video.key,
            "name": video.name,
            "status": "failed",
            "reason": "lost",
            "error": "some of its chunks were lost: a worker died or a task failed for good (see the Ray logs)",
            "model": self.model,
            "model_id": self.model_id,
            "seconds": {},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self._mark(outcome)
        return outcome

    def assemble(self, parts: list[dict[str, Any]]) -> outputs.VideoLabels:
        """Concatenate chunks in order, link faces into tracks over the whole video, smooth per track."""
        from affectray.faces.tracking import IoUTracker
        from affectray.models.cascade import smooth_predictions

        def cat(name: str, empty_shape: tuple[int, ...], dtype) -> np.ndarray:
            arrays = [p[name] for p in parts if len(p[name])]
            return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(empty_shape, dtype)

        c = len(self.classes)
        face_frame = cat("face_frame", (0,), np.int64)
        boxes = cat("boxes", (0, 4), np.float32)
        probs = cat("probs", (0, c), np.float32)
        if len(face_frame) and np.isnan(boxes).all():  # aligned frames: the one face is one track
            tracks = np.zeros(len(face_frame), np.int64)
        else:
            tracks = _track_faces(IoUTracker(self.track_iou, self.track_gap), face_frame, boxes)
        smoothed = probs
        if len(probs) and self.smooth_window > 1:
            smoothed = smooth_predictions(probs, self.smooth_window, method=self.smooth_method, groups=tracks)
        return outputs.VideoLabels(
            frame_index=cat("frame_index", (0,), np.int64),
            pts_seconds=cat("pts", (0,), np.float64),
            face_count=cat("face_count", (0,), np.int64),
            face_frame=face_frame,
            boxes=boxes,
            scores=cat("scores", (0,), np.float32),
            landmarks=cat("landmarks", (0, 5, 2), np.float32),
            probs=probs,
            track_id=tracks,
            label=probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64),
            label_smoothed=smoothed.argmax(axis=1) if len(probs) else np.zeros(0, np.int64),
            va=cat("va", (0, 2), np.float32) if self.va else None,
        )
