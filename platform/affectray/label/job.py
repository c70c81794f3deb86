"""Label whole video corpora with a classifier, on Ray Data: streaming, resumable, exactly once.

    affectray label VIDEOS OUT [--checkpoint URI] [--batch-size 64] [--fail-fast]
    affectray label --config jobs/configs/label-smoke.yaml --set min_face_size=40
    ray job submit --working-dir . -- python jobs/label_videos.py VIDEOS OUT --checkpoint URI

Every field of LabelConfig can come from a YAML file (--config) and --set FIELD=VALUE;
each flag below is shorthand for one field, and wins over --config and --set.

VIDEOS is a local dir or s3:// prefix, a glob, a text/csv/Parquet manifest of
video URIs, or one video (``--layout aligned-frames``: folders of aligned face
frames, labelled without detection). OUT is a local dir or s3:// prefix.

Videos stream through decode tasks in chunks of frames, MTCNN and alignment in
one actor pool and the checkpoint's classifier in another, each actor with a GPU
fraction (on a cluster without GPUs, one pool of actors does both); the driver
assembles each video, links faces into tracks, smooths predictions per track and
writes OUT/labels/<key>.parquet (one row per frame and face; a frame with no face
has one row with face_count 0), a timeline PNG and a done marker, in that order.
A re-run skips finished videos, and a run killed halfway and started again ends
with exactly one complete file per video. Bad inputs (empty, corrupt, truncated,
not a video, unsupported codec) are recorded as failed with the reason and the
job goes on; it ends with OUT/videos.parquet, OUT/report.html and a JSON summary.
Transient storage errors are retried where they happen; a video the store kept
failing is recorded as ``storage unavailable`` and a plain re-run tries it again.
The first run claims OUT for its model (OUT/_job.json, created exclusively): a
concurrent or later run with another checkpoint or settings is refused.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import typing
import warnings
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal

from affectray import storage
from affectray.config import ConfigError, location, resolve_locations
from affectray.errors import JobError
from affectray.ingest.sources import unit_key
from affectray.label import outputs
from affectray.label.inputs import InputListing, Layout, VideoInput, list_inputs
from affectray.label.pipeline import (
    END,
    ClassifyFaces,
    DetectFaces,
    Finisher,
    LabelFaces,
    StageSettings,
    VideoAssembler,
    decode_videos,
)
from affectray.models.builtin import DEFAULT_CHECKPOINT

__all__ = ["LabelConfig", "add_arguments", "config_from_args", "main", "run_label"]

logger = logging.getLogger("affectray.label")


@dataclass
class LabelConfig:
    videos: str = location()  # local dir, s3:// prefix, glob, .txt/.csv/.parquet manifest, or one video; required
    out: str = location()  # output root: a local dir or s3:// prefix; required
    # A classifier checkpoint URI: a finetune run's (local dir or s3://) or a built-in model.
    checkpoint: str = location(DEFAULT_CHECKPOINT)
    layout: Layout = "videos"
    # Settings the pipeline's stages share take StageSettings' defaults: each lives in one place.
    batch_size: int = StageSettings.batch_size  # faces per classifier forward pass
    chunk_frames: int = StageSettings.chunk_frames  # frames per chunk: the unit of work between stages
    # Frames are downscaled to this for MTCNN: 320 costs ~2x less CPU but misses faces under ~40 px.
    detect_max_side: int = StageSettings.detect_max_side
    decode_max_side: int = StageSettings.decode_max_side  # bounds memory for 4K; faces are aligned from these
    # MTCNN on the whole of every k-th frame, on the frames between only near its faces: the same
    # faces at ~2x less CPU, but one entering the picture is found up to k - 1 frames late (1: off).
    detect_every: int = StageSettings.detect_every
    min_face_score: float = StageSettings.min_face_score
    min_face_size: int = StageSettings.min_face_size  # pixels, in the decoded frame
    smooth_window: int = 9  # frames, odd; 1 turns smoothing off
    smooth_method: Literal["mean", "majority"] = "mean"
    frames_fps: float = StageSettings.frames_fps  # aligned-frames: the time base (frame folders carry no timestamps)
    detectors: int | None = None  # MTCNN actors; default: 2 per GPU, else a quarter of the CPUs (and they classify)
    classifiers: int | None = None  # classifier actors with GPUs; default: 2 per GPU (without GPUs: none)
    gpu_fraction: float = 0.25  # of a GPU per actor, when the cluster has GPUs
    timelines: bool = True
    fail_fast: bool = False  # stop at the first video that fails
    retry_failed: bool = False  # process failed and partial videos again
    overwrite: bool = False  # relabel every video, even finished ones

    def __post_init__(self) -> None:
        if self.layout not in ("videos", "aligned-frames"):
            raise ConfigError(f"layout must be 'videos' or 'aligned-frames', got {self.layout!r}")
        if self.smooth_window < 1 or self.smooth_window % 2 == 0:
            raise ConfigError(f"smooth_window must be a positive odd number of frames, got {self.smooth_window}")
        if self.smooth_method not in ("mean", "majority"):
            raise ConfigError(f"smooth_method must be 'mean' or 'majority', got {self.smooth_method!r}")
        if min(self.batch_size, self.chunk_frames, self.detect_max_side, self.decode_max_side, self.detect_every) < 1:
            raise ConfigError(
                "batch_size, chunk_frames, detect_max_side, decode_max_side and detect_every must be positive"
            )
        if not 0 < self.gpu_fraction <= 1:
            raise ConfigError(f"gpu_fraction must be in (0, 1], got {self.gpu_fraction}")

    def output_settings(self) -> dict[str, Any]:
        """The settings that change what is written: a re-run into the same OUT must keep them."""
        keys = ("layout", "detect_max_side", "decode_max_side", "detect_every", "min_face_score", "min_face_size",
                "smooth_window", "smooth_method", "frames_fps")  # fmt: skip
        return {k: getattr(self, k) for k in keys}


def run_label(config: LabelConfig, progress: bool = True) -> dict[str, Any]:
    """Label every video ``config.videos`` lists into ``config.out``; returns the job summary."""
    from affectray.models.inference import inspect_classifier
    from affectray.runtime import check_writable

    start = time.perf_counter()
    config = resolve_locations(config)  # Ray tasks and actors run in directories of their own
    check_writable(config.out)  # an OUT that cannot be written fails now, not after Ray starts
    listing = list_inputs(config.videos, config.layout)
    # The checkpoint's classes, preprocessing and weights hash: a bad URI fails in a second, before
    # Ray starts; the model itself is built only in the actors that classify.
    info = inspect_classifier(config.checkpoint)
    classes, model_id, prep = info.classes, info.model_id, info.preprocessing
    _check_job(config, model_id, classes)
    finished = set() if config.overwrite else _finished(config.out, listing.videos, config.retry_failed)
    todo = [v for v in listing.videos if v.key not in finished]
    logger.info("%d videos, %d finished before, %d to label", len(listing.videos), len(finished), len(todo))

    halo = (prep.num_frames // 2) * prep.frame_stride if prep.mode == "clip" else 0
    settings = StageSettings(
        image_size=prep.image_size,
        crop=prep.crop,
        crop_margin=prep.box_margin if prep.crop == "box" else None,
        chunk_frames=max(config.chunk_frames, halo),
        halo=halo,
        decode_max_side=config.decode_max_side,
        detect_max_side=config.detect_max_side,
        detect_every=config.detect_every,
        min_face_score=config.min_face_score,
        min_face_size=config.min_face_size,
        frames_fps=config.frames_fps,
        batch_size=config.batch_size,
    )
    finisher = Finisher(
        out=config.out,
        classes=classes,
        model_id=model_id,
        model=config.checkpoint,
        smooth_window=config.smooth_window,
        smooth_method=config.smooth_method,
        timelines=config.timelines,
        va=info.va,
    )
    run_start = time.perf_counter()
    new, stopped, startup = _label(config, todo, settings, finisher, progress) if todo else ([], None, 0.0)
    run_seconds = time.perf_counter() - run_start

    all_outcomes = _outcomes(config.out, listing, new)
    frames = sum(int(o.get("frames") or 0) for o in new)
    stage_seconds: Counter = Counter()
    stage_cpu: Counter = Counter()
    for o in new:
        stage_seconds.update(o.get("seconds") or {})
        stage_cpu.update(o.get("cpu_seconds") or {})
    run = {
        "videos": len(new),
        "skipped": len(finished),
        "frames": frames,
        "seconds": run_seconds,
        "frames_per_second": frames / run_seconds if run_seconds > 0 else 0.0,
        "startup_seconds": startup,
        "stage_seconds": {k: stage_seconds[k] for k in ("decode", "detect", "classify", "write") if k in stage_seconds},
        "stage_cpu_seconds": {k: stage_cpu[k] for k in ("decode", "detect", "classify", "write") if k in stage_cpu},
    }
    videos_uri = storage.join(config.out, outputs.VIDEOS_FILE)
    report_uri = storage.join(config.out, outputs.REPORT_FILE)
    outputs.write_parquet(videos_uri, outputs.videos_table(all_outcomes))
    for o in all_outcomes:  # links in the report are relative to OUT
        o["output_rel"] = f"{outputs.LABELS_DIR}/{o['video_key']}.parquet" if o.get("output") else None
        o["timeline_rel"] = f"{outputs.TIMELINES_DIR}/{o['video_key']}.png" if o.get("timeline") else None
    page = outputs.summary_html(all_outcomes, classes=classes, model_id=model_id, checkpoint=config.checkpoint, run=run)
    storage.write_text(report_uri, page)
    if stopped is not None:
        raise JobError(f"--fail-fast: {stopped['name']!r} {stopped['status']}: {stopped['error']}")

    # Counts are OUT's state, earlier runs' failures included, as videos.parquet and the report give it.
    status = Counter(o["status"] for o in all_outcomes)
    return {
        "job": "label",
        "out": config.out,
        "model": config.checkpoint,
        "model_id": model_id,
        "videos": len(listing.videos) + len(listing.refused),
        "processed": len(new),
        "ok": status["ok"],
        "partial": status["partial"],
        "failed": status["failed"],  # refused entries included
        "retryable": sum(outputs.retryable(o) for o in all_outcomes),  # a plain re-run tries these again
        "skipped": len(finished),
        "frames": frames,
        "faces": sum(int(o.get("faces") or 0) for o in new),
        "frames_per_second": round(run["frames_per_second"], 2),
        "startup_seconds": round(startup, 2),  # to the first labelled chunk: workers start, actors load models
        "stage_seconds": {k: round(v, 2) for k, v in run["stage_seconds"].items()},
        "stage_cpu_seconds": {k: round(v, 2) for k, v in run["stage_cpu_seconds"].items()},
        "nodes": sorted({node for o in new for node in o.get("nodes") or []}),  # where this run's work ran
        "videos_parquet": videos_uri,
        "report": report_uri,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _label(
    config: LabelConfig, todo: list[VideoInput], settings: StageSettings, finisher: Finisher, progress: bool
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, float]:
    """Run the pipeline over ``todo``.

    Returns the outcomes of this run, the failure that stopped it (fail-fast) and the
    seconds until the first labelled chunk came back (start-up: workers, imports, models).
    """
    import ray

    from affectray.runtime import init_ray

    start = time.perf_counter()
    init_ray()  # after listing and loading the checkpoint: bad input fails in a second, not after Ray starts
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.target_max_block_size, ctx.max_errored_blocks)
    # One chunk of frames per block, so chunks of one video spread over every actor; a block whose
    # task died for good is dropped (its video is recorded as lost) instead of stopping the corpus.
    ctx.enable_progress_bars, ctx.target_max_block_size, ctx.max_errored_blocks = False, 4 << 20, -1
    try:
        dataset = _build_dataset(config, todo, settings)
        outcomes, stopped, first = _consume(config, dataset, todo, finisher, progress)
        return outcomes, stopped, first - start
    finally:
        ctx.enable_progress_bars, ctx.target_max_block_size, ctx.max_errored_blocks = saved


def _build_dataset(config: LabelConfig, todo: list[VideoInput], settings: StageSettings):
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    per_gpu = max(1, int(1 / (2 * config.gpu_fraction)))
    frames_only = all(v.kind == "frames" for v in todo)
    if gpus:  # two pools: MTCNN and the classifier each take GPU fractions and scale apart
        detectors = config.detectors or (1 if frames_only else max(1, int(gpus) * per_gpu))
        classifiers = config.classifiers or max(1, int(gpus) * per_gpu)
    else:  # one pool of actors that detect and classify: both stages would share the cores anyway
        detectors, classifiers = config.detectors or max(1, int(cpus) // 4), 0
    decoders = max(1, min(detectors, len(todo)))
    # Fractional CPUs when the cluster is small, so decode tasks always find a slot beside the actors.
    cpu = min(1.0, cpus / (detectors + classifiers + decoders))
    # Share the node's cores between the CPU actors instead of oversubscribing them.
    threads = 0 if gpus else max(1, (os.cpu_count() or 1) // detectors)
    gpu = config.gpu_fraction if gpus else 0
    logger.info("pipeline: %d decode tasks, %d detector and %d classifier actors%s", decoders, detectors,
                classifiers, "" if gpus else " (no GPU: the detector actors classify too)")  # fmt: skip

    # Retries are capped (Ray Data retries forever by default): a video that kills its worker every
    # time must end as "lost", not loop. Ray 2.60 takes the cap only as a deprecated remote arg.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        dataset = ray.data.from_items([{"video": v.to_json()} for v in todo], override_num_blocks=len(todo))
        dataset = dataset.map_batches(
            decode_videos,
            fn_kwargs={"settings": settings},
            batch_size=1,
            compute=ray.data.TaskPoolStrategy(size=decoders),
            num_cpus=cpu,
            max_retries=1,
        )
        classify = {"checkpoint": config.checkpoint, "settings": settings, "torch_threads": threads}
        if not gpus:
            return dataset.map_batches(
                LabelFaces,
                fn_constructor_kwargs=classify,
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=detectors),
                num_cpus=cpu,
                max_task_retries=1,
            )
        dataset = dataset.map_batches(
            DetectFaces,
            fn_constructor_kwargs={"settings": settings, "torch_threads": threads},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=detectors),
            num_cpus=cpu,
            num_gpus=gpu if not frames_only else 0,
            max_task_retries=1,
        )
        return dataset.map_batches(
            ClassifyFaces,
            fn_constructor_kwargs=classify,
            batch_size=max(1, math.ceil(config.batch_size / settings.chunk_frames)),
            compute=ray.data.ActorPoolStrategy(size=classifiers),
            num_cpus=cpu,
            num_gpus=gpu,
            max_task_retries=1,
        )


def _consume(
    config: LabelConfig, dataset, todo: list[VideoInput], finisher: Finisher, progress: bool
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, float]:
    """Gather rows per video on the driver; finished videos are written by two threads while rows keep coming.

    Returns the outcomes, the failure that stopped the run (fail-fast) and when (perf_counter)
    the first chunk arrived.
    """
    from tqdm import tqdm

    by_key = {v.key: v for v in todo}
    assembler = VideoAssembler()
    outcomes: list[dict[str, Any]] = []
    stopped: dict[str, Any] | None = None
    frames = 0
    start = time.perf_counter()
    first = 0.0
    bar = tqdm(total=len(todo), unit="video", disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def collect(futures: set[Future], block: bool) -> set[Future]:
        nonlocal stopped
        done, pending = wait(futures, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in done:
            outcome = future.result()
            outcomes.append(outcome)
            bar.update(1)
            if outcome["status"] != "ok":
                logger.warning("%s: %s (%s)", outcome["name"], outcome["status"], outcome["error"])
                if config.fail_fast and stopped is None:
                    stopped = outcome
        return pending

    with ThreadPoolExecutor(max_workers=2) as writers:
        futures: set[Future] = set()
        for row in dataset.iter_rows():
            key, part = str(row["key"]), int(row["part"])
            complete = assembler.add(key, part, row["payload"])
            if part != END:
                first = first or time.perf_counter()
                frames += assembler.last_frames
                elapsed = time.perf_counter() - start
                bar.set_postfix(frames=frames, fps=f"{frames / elapsed:.1f}", refresh=False)
            if complete:
                parts, end = assembler.pop(key)
                futures.add(writers.submit(finisher, by_key[key], parts, end))
            if futures:
                futures = collect(futures, block=len(futures) > 4)  # bounds the videos held in memory
            if stopped is not None:
                break
        while futures:
            futures = collect(futures, block=True)
    if stopped is None:
        # Videos whose rows never all arrived: a worker died for good on them. Recorded, not retried forever.
        seen = {o["video_key"] for o in outcomes}
        for key in [k for k in by_key if k not in seen]:
            outcomes.append(finisher.lost(by_key[key]))
            bar.update(1)
    bar.close()
    return outcomes, stopped, first or time.perf_counter()


def _check_job(config: LabelConfig, model_id: str, classes: tuple[str, ...]) -> None:
    """Claim OUT for this model and settings, or refuse one claimed for others (unless --overwrite).

    The claim is an exclusive create, so of two runs that start together with different
    checkpoints exactly one gets OUT, whatever the timing; runs with the same model share it.
    """
    uri = storage.join(config.out, outputs.JOB_FILE)
    record = {
        "checkpoint": config.checkpoint, "model_id": model_id, "classes": list(classes), **config.output_settings()
    }  # fmt: skip
    if config.overwrite:
        storage.write_json(uri, record)
        return
    if storage.write_new_json(uri, record):
        return
    before = storage.read_json(uri)
    changed = sorted(k for k in record if k != "checkpoint" and before.get(k) != record[k])
    if changed:
        diff = ", ".join(f"{k}: {before.get(k)!r} -> {record[k]!r}" for k in changed)
        raise JobError(
            f"{config.out!r} was labelled with other settings ({diff}); "
            "write to a new OUT, or pass --overwrite to relabel every video"
        )


def _finished(out: str, videos: list[VideoInput], retry_failed: bool) -> set[str]:
    """Keys of the videos a run may skip.

    Ok with its label file; failed or partial for a reason of the video's own (not a
    video, truncated, ...) unless --retry-failed. A retryable failure (the store was
    unavailable) is never skipped.
    """
    labelled = _keys(storage.join(out, outputs.LABELS_DIR), ".parquet")
    finished = set()
    for key, outcome in _recorded(out, [v.key for v in videos]).items():
        if outcome["status"] == "ok":
            if key in labelled:
                finished.add(key)  # else its output was deleted: label it again
        elif not retry_failed and not outputs.retryable(outcome):
            finished.add(key)
    return finished


def _recorded(out: str, keys: list[str]) -> dict[str, dict[str, Any]]:
    """The recorded outcome (done marker) of each of ``keys`` that has one, read fresh from OUT."""
    markers = _keys(storage.join(out, outputs.DONE_DIR), ".json")
    keys = [k for k in keys if k in markers]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return dict(zip(keys, pool.map(lambda k: storage.read_json(outputs.done_uri(out, k)), keys)))


def _keys(directory: str, suffix: str) -> set[str]:
    if not storage.exists(directory):
        return set()
    names = (uri.replace("\\", "/").rsplit("/", 1)[-1] for uri in storage.list_files(directory, (suffix,)))
    return {name[: -len(suffix)] for name in names if not name.startswith(".")}


def _outcomes(out: str, listing: InputListing, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every listed video's outcome (those not reached yet are left out), then the refused entries.

    Recorded outcomes, with this run's ``new`` ones over them: a video whose marker the
    store would not take is still reported.
    """
    recorded = _recorded(out, [v.key for v in listing.videos])
    recorded.update({o["video_key"]: o for o in new})
    found = [recorded[v.key] for v in listing.videos if v.key in recorded]
    refused = [
        {
            "video_uri": r.get("uri", r["input"]),  # what one can open again; the name stays as typed
            "video_key": unit_key(r["input"]),
            "name": r["input"],
            "status": "failed",
            "reason": "refused",
            "error": r["reason"],
            "seconds": {},
        }
        for r in listing.refused
    ]
    return found + refused


# -- command line ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from affectray.runtime import add_config_job_arguments

    add_config_job_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Flags are shorthand for config fields: dest is the field, and a flag left out is absent
    # (SUPPRESS), so it never overrides --config or --set. Defaults are read from LabelConfig.
    fields = parser.add_argument_group(
        "config fields", "shorthand for --set FIELD=VALUE; a flag wins over --config and --set"
    )
    add = fields.add_argument
    unset = argparse.SUPPRESS
    d = LabelConfig
    add("videos", nargs="?", default=unset, metavar="VIDEOS",
        help="local dir, s3:// prefix, glob, .txt/.csv/.parquet manifest, or one video "
             "(videos; optional when --config gives it)")  # fmt: skip
    add("out", nargs="?", default=unset, metavar="OUT",
        help="output root: a local dir or s3:// prefix (out; optional when --config gives it)")  # fmt: skip
    add("--checkpoint", default=unset,
        help="classifier checkpoint: a finetune run's (local dir or s3://) or builtin:NAME "
             f"(default {d.checkpoint}: FER2013's mini-Xception; `affectray models` lists the built-ins)")  # fmt: skip
    add("--layout", choices=typing.get_args(Layout), default=unset,
        help="videos, or aligned-frames: folders of aligned face frames, labelled without detection "
             f"(default: {d.layout})")  # fmt: skip
    add("--batch-size", type=int, default=unset, help=f"faces per classifier forward pass (default {d.batch_size})")
    add("--chunk-frames", type=int, default=unset,
        help=f"frames per unit of work between stages (default {d.chunk_frames})")  # fmt: skip
    add("--detect-max-side", type=int, default=unset,
        help=f"frames are shrunk to this for MTCNN (default {d.detect_max_side}; 320: ~2x less CPU, "
             "misses faces under ~40 px)")  # fmt: skip
    add("--detect-every", type=int, default=unset,
        help="MTCNN on the whole of every k-th frame, between them only near the faces it found: "
             "the same faces for ~2x less CPU, but a face entering the picture is found up to k-1 "
             f"frames late (default {d.detect_every}; 1: the whole of every frame)")  # fmt: skip
    add("--decode-max-side", type=int, default=unset, help=f"decode 4K down to this (default {d.decode_max_side})")
    add("--min-face-score", type=float, default=unset,
        help=f"MTCNN probability a face needs (default {d.min_face_score})")  # fmt: skip
    add("--smooth-window", type=int, default=unset,
        help=f"frames in the per-track smoothing window, odd (default {d.smooth_window}; 1: off)")  # fmt: skip
    add("--smooth-method", choices=("mean", "majority"), default=unset, help=f"(default {d.smooth_method})")
    add("--fps", dest="frames_fps", metavar="FPS", type=float, default=unset,
        help=f"aligned-frames: frames per second for timestamps (default {d.frames_fps:g})")  # fmt: skip
    add("--detectors", type=int, default=unset,
        help="MTCNN actors (default: 2 per GPU; without GPUs a quarter of the CPUs, "
             "and they classify too)")  # fmt: skip
    add("--classifiers", type=int, default=unset,
        help="classifier actors on clusters with GPUs (default: 2 per GPU)")  # fmt: skip
    add("--gpu-fraction", type=float, default=unset,
        help=f"GPU share per actor when there are GPUs (default {d.gpu_fraction})")  # fmt: skip
    add("--no-timelines", dest="timelines", action="store_false", default=unset,
        help="skip the per-video timeline PNGs")  # fmt: skip
    add("--fail-fast", action="store_true", default=unset, help="stop at the first video that fails (exit 2)")
    add("--retry-failed", action="store_true", default=unset,
        help="process videos that failed or were partial before again")  # fmt: skip
    add("--overwrite", action="store_true", default=unset,
        help="relabel every video, finished or not (also with another checkpoint)")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> LabelConfig:
    """LabelConfig from --config, --set and the flags (``add_arguments``); local paths made absolute."""
    from affectray.runtime import job_config

    return job_config(LabelConfig, args)


def main(args: argparse.Namespace) -> dict[str, Any]:
    from affectray.runtime import run_config_job

    # run_label connects to Ray itself, after listing VIDEOS and loading the checkpoint: bad input fails fast.
    def run(config: LabelConfig) -> dict[str, Any]:
        return run_label(config, progress=not args.no_progress)

    return run_config_job(LabelConfig, args, run, connect_first=False)
