"""Ingest video and frame corpora into aligned-face segment shards, on Ray Data.

    affectray ingest SOURCE OUT --layout videos --annotations EXPR_Set/ --dataset affwild2
    affectray ingest RAF-DB/basic OUT --layout rafdb
    affectray ingest AffectNet/ OUT --layout affectnet --split train
    affectray ingest DFEW/ OUT --layout dfew --fold 1
    affectray ingest DFEW/ OUT --layout dfew-maedfer --fold 1 --csv MAE-DFER/saved/data/dfew/org
    affectray ingest --config jobs/configs/ingest-smoke.yaml --set min_face_score=0.8

Every field of IngestConfig can come from a YAML file (--config) and --set FIELD=VALUE;
each flag below is shorthand for one field, and wins over --config and --set.

Each work unit (a video, a folder of aligned frames, a chunk of images) is one
row of a Ray Data dataset and becomes one shard, written whole under a name
derived from the input, so a re-run skips finished units and never duplicates
rows. Videos stream through PyAV in frame batches; MTCNN runs batched in an
actor pool (a GPU per actor when the cluster has GPUs), each face is aligned
by its five landmarks, JPEG-encoded and linked into tracks; the JPEGs wait in a
local spool file until the video's tracks are chosen, then the kept tracks are cut
into segments and streamed into the shard a row group at a time, so an actor's
memory does not grow with a video's length. Aligned frames and images skip detection: they are only resized, and
AffectNet's images are cropped by the box its csv gives. A unit that fails
(corrupt, truncated, not a video, no face, a shard the store would not take) is
recorded with its reason and the rest goes on. Transient storage errors are
retried where they happen; a unit the store kept failing is recorded as
retryable (``storage unavailable``) and the next run processes it again.
OUT/_manifest.json is rebuilt from every unit's outcome at the end; besides the
stored index space (``label_set``, always ABAW8) it records the dataset's own
classes (``dataset_label_set``: basic7, affectnet8 or abaw8, read with
``shards.dataset_label_set``). The layouts (--layout) are described in
affectray.ingest.sources.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from affectray import storage
from affectray.config import location, resolve_locations
from affectray.data import shards
from affectray.errors import JobError
from affectray.faces.detect import LazyDetector, detect_and_align
from affectray.faces.jpeg import decode_jpeg, encode_jpeg
from affectray.faces.tracking import IoUTracker, select_tracks
from affectray.faces.video import VideoDecodeError, iter_frames
from affectray.ingest.annotations import find_annotations, frame_labels, read_annotation
from affectray.ingest.sources import DFEW_FOLDS, LAYOUT_DATASETS, LAYOUTS, WorkUnit, list_units
from affectray.ingest.spool import FaceSpool
from affectray.labels import ABAW8, LabelError, dataset_label_to_abaw
from affectray.runtime import add_config_job_arguments, check_writable, init_ray, job_config, run_config_job

logger = logging.getLogger("affectray.ingest")

Layout = Literal["videos", "aligned-frames", "image-folder", "dfew-csv", "rafdb", "affectnet", "dfew", "dfew-maedfer"]


@dataclass
class IngestConfig:
    source: str = location()  # input root: a local dir or s3:// prefix; required
    out: str = location()  # shard root to write: a local dir or s3:// prefix; required
    layout: Layout = "videos"
    annotations: str | None = location(None)  # Aff-Wild2 EXPR or VA txt files, matched to videos by name
    # The csv layouts' list file or folder of lists (default: where the dataset keeps it under SOURCE).
    csv: str | None = location(None)
    dataset: str = "custom"  # a dataset's own layout writes its name instead (rafdb, affectnet, dfew)
    # Selects a split where the layout knows them; None: every split, each row its own ("train" if unknown).
    split: str | None = None
    fold: int | None = None  # dfew, dfew-maedfer: the DFEW fold (1..5) whose split lists are read
    image_size: int = 224
    all_faces: bool = False  # keep every face track, not only the largest
    segment_length: int = 64  # most frames per segment row
    max_gap: int = 4  # a jump of more frames than this (no face found) starts a new segment
    frames_fps: float = 30.0  # time base for frame folders, which carry no timestamps
    # Frames are downscaled to this for MTCNN (alignment uses full size): 320 costs ~2x less CPU
    # but misses faces under ~40 px.
    detect_max_side: int = 640
    # MTCNN on the whole of every k-th frame, near the faces found there on the frames between
    # (as the label job does): 1.5-2x less CPU, the same faces, a face entering found up to
    # k - 1 frames late. 1: every whole frame.
    detect_every: int = 1
    decode_max_side: int = 1280  # bounds memory for 4K input; faces are aligned from these frames
    decode_batch: int = 32
    min_face_score: float = 0.9
    min_face_size: int = 20
    min_track_frames: int = 3  # shorter tracks are detector flicker, not faces
    jpeg_quality: int = 90
    images_per_unit: int = 512
    workers: int | None = None  # actor pool size; default: one per GPU, else half the CPUs
    gpus_per_worker: float = 1.0
    overwrite: bool = False  # re-process units that are already done

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.image_size < 16 or self.segment_length < 1 or self.max_gap < 1 or self.detect_every < 1:
            raise ValueError("image_size >= 16, segment_length >= 1, max_gap >= 1 and detect_every >= 1 are required")
        if self.fold is not None and self.fold not in DFEW_FOLDS:
            raise ValueError(f"fold must be one of DFEW's folds 1..5, got {self.fold}")


@dataclass
class UnitResult:
    """What happened to one work unit: written to OUT/_done/<key>.json."""

    key: str
    source: str
    status: Literal["ok", "partial", "failed"]
    reason: str = ""
    frames: int = 0  # frames (or images) read
    frames_with_face: int = 0
    multi_face_frames: int = 0
    tracks: int = 0
    rows: int = 0  # segments written
    face_frames: int = 0  # frames written into segments
    label_counts: dict[str, int] = field(default_factory=dict)
    shard: dict[str, Any] | None = None
    seconds: float = 0.0
    retryable: bool = False  # the store was unavailable, not the input bad: the next run tries it again


class UnitProcessor:
    """Turns one work unit into one shard. Ray Data runs it as an actor pool.

    The MTCNN detector is built once per actor, on first use, so frame-folder
    and image layouts never load it.
    """

    def __init__(self, config: IngestConfig, annotation_uris: dict[str, str], torch_threads: int = 0):
        self.config = config
        self.annotation_uris = annotation_uris
        self.detector = LazyDetector(
            min_score=config.min_face_score, min_face_size=config.min_face_size, torch_threads=torch_threads
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [self.process(WorkUnit.from_dict(json.loads(row))) for row in batch["unit"]]
        return {"result": np.array([json.dumps(asdict(r)) for r in results], dtype=object)}

    def process(self, unit: WorkUnit) -> UnitResult:
        start = time.perf_counter()
        with contextlib.ExitStack() as scope:  # the unit's temporary files (a video's face spool) go at its end
            try:
                result, segments = self._read(unit, scope)
            except Exception as error:  # noqa: BLE001 - any input may be broken; record it, go on
                result, segments = _failed(unit, error), []
            if segments:
                try:
                    self._write(unit, result, segments)
                except Exception as error:  # noqa: BLE001 - a shard the store refused fails its unit, not the job
                    result = _failed(unit, error)
            elif result.status == "ok":
                result.status, result.reason = "failed", result.reason or "no face found in any frame"
        result.seconds = round(time.perf_counter() - start, 3)
        self._mark(result)
        return result

    def _write(self, unit: WorkUnit, result: UnitResult, segments: Iterable[shards.Segment]) -> None:
        """Stream the unit's segments into its shard as they come: memory holds a row group, not the unit."""
        labels = Counter()
        split = _split(unit, self.config)
        with shards.ShardWriter(
            self.config.out, unit.key, dataset=self.config.dataset, split=split, source=unit.source
        ) as writer:
            for segment in segments:
                writer.add(segment)
                result.face_frames += len(segment)
                labels.update(ABAW8.classes[v] if v >= 0 else "unlabelled" for v in segment.labels)
        result.label_counts = dict(labels)
        result.shard = writer.shard
        result.rows = writer.rows

    def _mark(self, result: UnitResult) -> None:
        """Write the done marker, last: its presence means the shard (if any) is complete.

        If the store refuses even that, the unit stays unmarked (the next run processes it
        again) and the driver builds the manifest from the result this returns.
        """
        try:
            storage.write_json(shards.done_uri(self.config.out, result.key), asdict(result))
        except storage.StorageError as error:
            logger.warning("%s: outcome not recorded, the next run processes it again: %s", result.source, error)

    def _read(self, unit: WorkUnit, scope: contextlib.ExitStack) -> tuple[UnitResult, Iterable[shards.Segment]]:
        """The unit's outcome so far and its segments: a list, or (videos) a generator reading the spool.

        ``scope`` holds what the segments need until they are written (a video's face spool).
        """
        if unit.kind == "video":
            return self._read_video(unit, scope)
        return self._read_images(unit)

    # -- videos: decode → detect → align → track → segments -------------------------------

    def _read_video(self, unit: WorkUnit, scope: contextlib.ExitStack) -> tuple[UnitResult, Iterable[shards.Segment]]:

        cfg = self.config
        result = UnitResult(unit.key, unit.source, "ok")
        tracker = IoUTracker()
        # Every face waits on local disk until the kept tracks are known (the end of the video).
        spool = scope.enter_context(FaceSpool())
        try:
            with storage.open_input(unit.uris[0]) as stream:
                for batch in iter_frames(stream, max_side=cfg.decode_max_side, batch_size=cfg.decode_batch):
                    faces_per_frame = detect_and_align(
                        self.detector(),
                        batch.images,
                        cfg.image_size,
                        cfg.detect_max_side,
                        detect_every=cfg.detect_every,
                    )
                    for frame, pts, (found, crops) in zip(batch.frame_index, batch.pts_seconds, faces_per_frame):
                        result.frames += 1
                        result.frames_with_face += bool(found)
                        result.multi_face_frames += len(found) > 1
                        ids = tracker.update(int(frame), found)
                        for det, track_id, crop in zip(found, ids, crops):
                            jpeg = encode_jpeg(crop, cfg.jpeg_quality)
                            spool.add(track_id, int(frame), float(pts), jpeg, float(det.score))
        except VideoDecodeError as error:
            if result.frames == 0:
                raise
            # Keep what decoded before the damage; the manifest lists the unit as partial.
            result.status, result.reason = "partial", _reason(error)
        if result.frames == 0:
            raise VideoDecodeError(unit.source, "no frames", "the video stream holds no decodable frame")
        kept = select_tracks(tracker.tracks, all_faces=cfg.all_faces, min_frames=cfg.min_track_frames)
        result.tracks = len(kept)
        annotation = self._annotation(unit)
        if not kept:
            return result, []
        return result, self._spooled_segments(unit, spool, kept, annotation)

    def _spooled_segments(self, unit, spool: FaceSpool, kept: list[int], annotation) -> Iterator[shards.Segment]:
        """The kept tracks' segments, in ``kept`` order, each one's JPEGs read from the spool as it comes."""
        for new_id, track_id in enumerate(kept):
            frames, pts, scores, images = spool.track(track_id)
            yield from self._segments(unit, new_id, frames, pts, images, annotation, scores)

    # -- frame folders and image chunks: no detection ------------------------------------

    def _read_images(self, unit: WorkUnit) -> tuple[UnitResult, list[shards.Segment]]:
        cfg = self.config
        result = UnitResult(unit.key, unit.source, "ok")
        boxes = unit.boxes or (None,) * len(unit.uris)
        with ThreadPoolExecutor(max_workers=8) as pool:  # object-store reads are latency-bound
            loaded = list(pool.map(self._load_image, unit.uris, boxes))
        bad = [(uri, err) for uri, (_, err) in zip(unit.uris, loaded) if err]
        result.frames = len(unit.uris) - len(bad)
        result.frames_with_face = result.frames
        if bad:
            result.status = "partial"
            result.reason = f"{len(bad)} unreadable image(s), first {bad[0][0]!r}: {bad[0][1]}"
        if len(bad) == len(unit.uris):
            raise ValueError(f"no readable image in {unit.source!r}: {bad[0][1]}")
        good = [(i, jpeg) for i, (jpeg, err) in enumerate(loaded) if not err]
        if unit.kind == "images":  # every image is its own one-frame "video"
            segments = []
            for i, jpeg in good:
                video_id = _image_id(cfg.source, unit.uris[i])
                label = unit.labels[i] if unit.labels else -1
                segment = shards.Segment(video_id, 0, [0], [0.0], [jpeg], [label])
                if unit.valence is not None and unit.arousal is not None:
                    segment.valence, segment.arousal = [unit.valence[i]], [unit.arousal[i]]
                segments.append(segment)
            return result, segments
        frames = [unit.frame_indices[i] for i, _ in good]
        pts = [f / cfg.frames_fps for f in frames]
        result.tracks = 1
        segments = list(self._segments(unit, 0, frames, pts, [j for _, j in good], self._annotation(unit), None))
        return result, segments

    def _load_image(self, uri: str, box: tuple[int, int, int, int] | None = None) -> tuple[bytes | None, str]:
        """The image as a JPEG of the configured size (cropped to ``box``, x y width height, if given)."""
        size = self.config.image_size
        try:
            data = storage.read_bytes(uri)
            image = decode_jpeg(data)
            if box is not None:
                image = _crop(image, box)
        except storage.StorageUnavailable:
            raise  # the store, not the image: the whole unit is retried on the next run
        except Exception as error:  # noqa: BLE001
            return None, _reason(error)
        if box is None and image.shape[:2] == (size, size) and data[:2] == b"\xff\xd8":
            return data, ""  # already an aligned JPEG of the right size: keep the original bytes
        import cv2

        interpolation = cv2.INTER_AREA if max(image.shape[:2]) > size else cv2.INTER_CUBIC
        return encode_jpeg(cv2.resize(image, (size, size), interpolation=interpolation), self.config.jpeg_quality), ""

    # -- shared ------------------------------------------------------------------------

    def _annotation(self, unit: WorkUnit) -> tuple[str, np.ndarray] | None:

        uri = self.annotation_uris.get(unit.key)
        return None if uri is None else read_annotation(uri)

    def _segments(self, unit, track_id, frames, pts, images, annotation, scores) -> Iterator[shards.Segment]:
        """A track's segments, one at a time (``images`` may be a spool's: sliced, it reads only that run)."""

        cfg = self.config
        kind, values = annotation if annotation else ("expr", None)
        labels = (
            frame_labels(values, frames)
            if kind == "expr" and values is not None
            else np.full(len(frames), -1, np.int16)
        )
        va = frame_labels(values, frames) if kind == "va" else None
        for start, stop in shards.split_runs(frames, cfg.segment_length, cfg.max_gap):
            yield shards.Segment(
                video_id=unit.video_id,
                track_id=track_id,
                frame_index=frames[start:stop],
                pts_seconds=pts[start:stop],
                images=images[start:stop],
                labels=[int(v) for v in labels[start:stop]],
                detection_score=None if scores is None else [float(s) for s in scores[start:stop]],
                valence=None if va is None else [float(v) for v in va[start:stop, 0]],
                arousal=None if va is None else [float(v) for v in va[start:stop, 1]],
                clip_label=unit.clip_label,
            )


def run_ingest(config: IngestConfig, progress: bool = True) -> dict[str, Any]:
    """Ingest ``config.source`` into shards under ``config.out``; returns the job summary."""
    import ray

    start = time.perf_counter()
    config = resolve_locations(config)  # Ray actors run in directories of their own
    check_writable(config.out)  # an OUT that cannot be written fails now, not after Ray starts
    if config.dataset == IngestConfig.dataset and config.layout in LAYOUT_DATASETS:
        config = replace(config, dataset=LAYOUT_DATASETS[config.layout])
    listing = list_units(
        config.source,
        config.layout,
        images_per_unit=config.images_per_unit,
        csv_uri=config.csv,
        dataset=_index_map(config.dataset),
        split=config.split,
        fold=config.fold,
    )
    if not listing.units:
        raise JobError(f"no inputs of layout {config.layout!r} found under {config.source!r}")
    annotation_uris = find_annotations(config.annotations, listing.units) if config.annotations else {}
    todo = listing.units if config.overwrite else _pending(config.out, listing.units)
    logger.info(
        "%d work units, %d already done, %d to process", len(listing.units), len(listing.units) - len(todo), len(todo)
    )

    if todo:
        init_ray()  # after listing: a bad SOURCE fails in a second, not after Ray starts
        has_video = any(u.kind == "video" for u in todo)
        gpus = ray.cluster_resources().get("GPU", 0) if has_video else 0
        workers = config.workers or (
            int(gpus / config.gpus_per_worker) if gpus else max(1, int(ray.cluster_resources().get("CPU", 2)) // 2)
        )
        workers = max(1, min(workers, len(todo)))
        fresh = _process(config, todo, annotation_uris, workers, gpus, progress)
        logger.info("processed %d units this run", len(fresh))
    else:
        fresh = {}

    manifest = build_manifest(config, listing, fresh)
    storage.write_json(storage.join(config.out, shards.MANIFEST_NAME), manifest)
    counts = manifest["counts"]
    return {
        "job": "ingest",
        "out": config.out,
        "manifest": storage.join(config.out, shards.MANIFEST_NAME),
        "units": counts["units"],
        "processed": len(todo),
        "skipped": len(listing.units) - len(todo),
        "failed": counts["failed_units"] + len(listing.refused),  # earlier runs' failures included
        "partial": counts["partial_units"],
        "retryable": sum(f["retryable"] for f in manifest["failures"]),  # the next run tries these again
        "rows": counts["rows"],
        "frames": counts["face_frames"],
        "videos": counts["videos"],
        "seconds": round(time.perf_counter() - start, 2),
    }


def _process(
    config: IngestConfig,
    todo: list[WorkUnit],
    annotation_uris: dict[str, str],
    workers: int,
    gpus: float,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """Run the units on an actor pool; returns this run's results by unit key."""
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.max_errored_blocks)
    # A unit whose task died for good (a crashed decoder) is dropped and recorded as lost, not the job.
    ctx.enable_progress_bars, ctx.max_errored_blocks = progress, -1
    try:
        # Units travel as JSON text: Ray Data would turn a None list into NaN.
        dataset = ray.data.from_items([{"unit": json.dumps(u.to_dict())} for u in todo], override_num_blocks=len(todo))
        rows = dataset.map_batches(
            UnitProcessor,
            fn_constructor_kwargs={
                "config": config,
                "annotation_uris": annotation_uris,
                # Share the physical cores between the CPU actors instead of oversubscribing them.
                "torch_threads": 0 if gpus else max(1, (os.cpu_count() or 1) // workers),
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=config.gpus_per_worker if gpus else 0,
            num_cpus=1,
        ).take_all()
    finally:
        ctx.enable_progress_bars, ctx.max_errored_blocks = saved
    results = [json.loads(row["result"]) for row in rows]
    return {r["key"]: r for r in results}


def build_manifest(config: IngestConfig, listing, fresh: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Aggregate every unit's outcome into the shard manifest.

    Outcomes come from OUT/_done/, read fresh, with this run's ``fresh`` results over them (a
    unit whose marker the store refused is still counted); a unit with neither was lost.
    """
    recorded = _recorded(config.out, listing.units)
    recorded.update(fresh or {})
    results = [recorded.get(u.key) or asdict(_lost(u)) for u in listing.units]
    labels = Counter()
    for r in results:
        labels.update(r["label_counts"])
    ok = [r for r in results if r["status"] != "failed"]
    frames = sum(r["frames"] for r in results)
    with_face = sum(r["frames_with_face"] for r in results)
    written = [u for u, r in zip(listing.units, results) if r["shard"]]
    splits = sorted({_split(u, config) for u in written})
    clip_labels = Counter(ABAW8.classes[u.clip_label] for u in written if u.clip_label >= 0)
    return {
        "schema_version": shards.SCHEMA_VERSION,
        "dataset": config.dataset,
        "split": config.split or "+".join(splits) or "train",
        "splits": splits,
        "fold": config.fold,
        "layout": config.layout,
        "source": config.source,
        "image_size": config.image_size,
        "segment_length": config.segment_length,
        # The index space labels are stored in: always ABAW8, whatever the dataset.
        "label_set": ABAW8.to_dict(),
        # The dataset's own classes (shards.DATASET_LABEL_SETS): what a head trained on it needs.
        "dataset_label_set": listing.label_set,
        "class_mapping": listing.class_mapping,
        "counts": {
            "units": len(listing.units),
            "ok_units": sum(r["status"] == "ok" for r in results),
            "partial_units": sum(r["status"] == "partial" for r in results),
            "failed_units": sum(r["status"] == "failed" for r in results),
            "videos": len({r["source"] for r in ok}) if listing.units[0].kind != "images" else 0,
            "images": sum(r["face_frames"] for r in ok) if listing.units[0].kind == "images" else 0,
            "rows": sum(r["rows"] for r in results),
            "face_frames": sum(r["face_frames"] for r in results),
            "tracks": sum(r["tracks"] for r in results),
        },
        "labels": {name: labels.get(name, 0) for name in list(ABAW8.classes) + ["unlabelled"]},
        "clip_labels": {name: clip_labels[name] for name in ABAW8.classes} if clip_labels else {},
        "detection": {
            "detect_max_side": config.detect_max_side,
            "detect_every": config.detect_every,
            "frames_decoded": frames,
            "frames_with_face": with_face,
            "frames_without_face": frames - with_face,
            "multi_face_frames": sum(r["multi_face_frames"] for r in results),
            "frames_dropped": frames - sum(r["face_frames"] for r in results),
        },
        "shards": sorted((r["shard"] for r in results if r["shard"]), key=lambda s: s["file"]),
        "failures": [
            {"input": r["source"], "status": r["status"], "reason": r["reason"], "retryable": bool(r.get("retryable"))}
            for r in results
            if r["status"] != "ok"
        ]
        + [
            {"input": x["input"], "status": "refused", "reason": x["reason"], "retryable": False}
            for x in listing.refused
        ],
    }


def _index_map(dataset: str) -> str | None:
    """The dataset's name if it has a published class numbering (numbered class folders)."""

    try:
        dataset_label_to_abaw(dataset, -1)
    except LabelError:
        return None
    return dataset


def _split(unit: WorkUnit, config: IngestConfig) -> str:
    """The split a unit's rows are written with: its own, else the configured one, else 'train'."""
    return unit.split or config.split or "train"


def _crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The part of ``image`` inside ``box`` (x, y, width, height), clipped to the image."""
    x, y, width, height = box
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(image.shape[1], x + width), min(image.shape[0], y + height)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"face box {tuple(box)} lies outside the {image.shape[1]}x{image.shape[0]} image")
    return image[y0:y1, x0:x1]


def _pending(out: str, units: list[WorkUnit]) -> list[WorkUnit]:
    """Units with no recorded outcome, and those whose outcome is retryable (the store was unavailable)."""
    recorded = _recorded(out, units)
    return [u for u in units if u.key not in recorded or recorded[u.key].get("retryable")]


def _recorded(out: str, units: list[WorkUnit]) -> dict[str, dict[str, Any]]:
    """The outcome markers of ``units`` found under OUT/_done/, listed and read fresh (actors write them)."""
    done_dir = storage.join(out, shards.DONE_DIR)
    if not storage.exists(done_dir):
        return {}
    names = {uri.replace("\\", "/").rsplit("/", 1)[-1] for uri in storage.list_files(done_dir, (".json",))}
    keys = [u.key for u in units if f"{u.key}.json" in names]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return dict(zip(keys, pool.map(lambda k: storage.read_json(shards.done_uri(out, k)), keys)))


def _failed(unit: WorkUnit, error: BaseException) -> UnitResult:
    retryable = isinstance(error, storage.StorageUnavailable)
    return UnitResult(unit.key, unit.source, "failed", reason=_reason(error), retryable=retryable)


def _lost(unit: WorkUnit) -> UnitResult:
    reason = "lost: its worker died or its task failed for good (see the Ray logs); the next run tries again"
    return UnitResult(unit.key, unit.source, "failed", reason=reason, retryable=True)


def _image_id(source_root: str, uri: str) -> str:
    """An image's path relative to SOURCE, without its extension: its id in the shards."""
    prefix = storage.join(source_root, "")
    rel = uri[len(prefix) :] if uri.startswith(prefix) else uri.rsplit("/", 1)[-1]
    return rel.replace("\\", "/").rsplit(".", 1)[0]


def _reason(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) < 500 else text[:497] + "..."


# -- command line ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:

    add_config_job_arguments(parser)
    # Flags are shorthand for config fields: dest is the field, and a flag left out is absent
    # (SUPPRESS), so it never overrides --config or --set. Defaults are read from IngestConfig.
    fields = parser.add_argument_group(
        "config fields", "shorthand for --set FIELD=VALUE; a flag wins over --config and --set"
    )
    add = fields.add_argument
    unset = argparse.SUPPRESS
    d = IngestConfig
    add("source", nargs="?", default=unset, metavar="SOURCE",
        help="input root: a local dir or s3:// prefix (source; optional when --config gives it)")  # fmt: skip
    add("out", nargs="?", default=unset, metavar="OUT",
        help="shard root to write: a local dir or s3:// prefix (out; optional when --config gives it)")  # fmt: skip
    add("--layout", choices=LAYOUTS, default=unset,
        help=f"how SOURCE is organised (default: {d.layout}): videos, aligned-frames, image-folder, dfew-csv; "
             "or a dataset as distributed: rafdb (RAF-DB basic), affectnet (training.csv, validation.csv), "
             "dfew (EmoLabel_DataSplit/ + Clip/jpg_256/; --fold), dfew-maedfer (MAE-DFER's split0N/*.csv)")  # fmt: skip
    add("--annotations", default=unset, help="Aff-Wild2 EXPR or VA annotation folder, matched to videos by name")
    add("--csv", default=unset,
        help="the csv layouts' list file or folder of lists: dfew-csv's split file (default: the *.csv in "
             "SOURCE), RAF-DB's list_patition_label.txt, AffectNet's training.csv or validation.csv, DFEW's "
             "set_N.csv or EmoLabel_DataSplit/, MAE-DFER's train.csv or the folder holding split0N/ "
             "(default: where the dataset keeps it in SOURCE; relative paths are tried under SOURCE too)")  # fmt: skip
    add("--dataset", default=unset,
        help=f"dataset name written to every row (affwild2, dfew, rafdb…; default: {d.dataset}, or the "
             "layout's dataset for rafdb, affectnet, dfew*); image-folder: numbered folders' numbering")  # fmt: skip
    add("--split", default=unset,
        help="the split to ingest where the layout knows splits (split folders; rafdb: train/test; affectnet: "
             "train/val; dfew: train/test; dfew-maedfer: train/val/test), else the split written to every row "
             "(default: every split, each row its own; train where none is known)")  # fmt: skip
    add("--fold", type=int, choices=list(DFEW_FOLDS), default=unset,
        help="dfew, dfew-maedfer: the DFEW fold (1..5) whose split lists are read (set_N.csv, split0N/)")  # fmt: skip
    add("--image-size", type=int, default=unset, help=f"side of the aligned face crops (default: {d.image_size})")
    add("--all-faces", action="store_true", default=unset, help="keep every face track, not only the largest")
    add("--segment-length", type=int, default=unset, help=f"most frames per segment row (default: {d.segment_length})")
    add("--detect-max-side", type=int, default=unset,
        help=f"frames are downscaled to this for MTCNN (default {d.detect_max_side}; 320 costs ~2x less CPU "
             "but misses faces under ~40 px)")  # fmt: skip
    add("--detect-every", type=int, default=unset,
        help=f"MTCNN on the whole of every k-th frame, near its faces between (default {d.detect_every}; "
             "1: every whole frame)")  # fmt: skip
    add("--workers", type=int, default=unset, help="actor pool size (default: one per GPU, else half the CPUs)")
    add("--overwrite", action="store_true", default=unset, help="re-process units that are already done")


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    """IngestConfig from --config, --set and the flags (``add_arguments``); local paths made absolute."""

    return job_config(IngestConfig, args)


def main(args: argparse.Namespace) -> dict[str, Any]:

    # run_ingest connects to Ray itself, after listing SOURCE: a bad SOURCE fails in a second.
    return run_config_job(IngestConfig, args, run_ingest, connect_first=False)
