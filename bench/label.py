"""Labeling throughput: the Ray Data pipeline against a naive sequential loop, same models, same videos, one run.

The naive loop is what one writes first: decode a frame, run facenet-pytorch's
MTCNN on it, align and classify each face, append the rows; one Parquet per video
at the end. The pipeline is `affectray label` (run_label) on a local Ray with its defaults:
decode tasks, a pool of actors that detect (affectray's cascade: the same nets
and stages, resampling from a summed-area table, channels-last; the whole frame
every 4th frame, near its faces between) and classify chunks of frames,
per-track smoothing and all its outputs, actor start-up included. Both use the
same MTCNN weights, the same tiny classifier and the same
videos: copies of the real video in ../shared/data/real and the sample corpus's
animated real-face videos, made longer. ``--same-detector`` also times the naive
loop with the pipeline's detector, which splits the gain into detector and pipeline.

The naive loop's videos are timed in two halves, before and after the pipeline,
so both meet the same background load. Besides wall-clock frames/s, both report
CPU seconds (the pipeline's per stage, measured inside its workers): on a shared
machine the wall clock depends on the share of the cores each side gets, the CPU
per frame does not. The naive loop runs on torch's default threads (one per core),
as written without thinking about it; ``--naive-threads 1`` pins it to one. Faces are
matched per frame at IoU >= 0.5; labels are compared on matched faces.

Prints the configuration, the per-stage breakdown, the match rates and, as the
last line, a JSON object with `ratio` (pipeline frames/s over naive frames/s, the
pipeline's start-up included), `ratio_after_startup` (from its first labelled
chunk on, which is what a long corpus sees) and `cpu_ratio` (naive CPU seconds per
frame over the pipeline stages', Ray's own overhead not counted).

    .venv/bin/python bench/label.py [--videos 8] [--frames 300] [--detect-every 1] [--same-detector]
                                    [--naive-threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py

from common import combine, make_corpus  # noqa: E402


def make_checkpoint(directory: Path, size: int, steps: int) -> str:
    """A tiny frame classifier trained briefly on drawn faces (the sample corpus's generator).

    On real faces it is out of its domain: its top two classes are often close, so the
    label agreement below mostly counts near-ties that a pixel of alignment tips over.
    """
    import cv2
    import numpy as np
    import torch
    import torch.nn.functional as F

    from affectray.checkpoints import save_checkpoint
    from affectray.labels import ABAW8
    from affectray.models.registry import create_model
    from affectray.sample.synth import draw_face

    rng = np.random.default_rng(0)
    y = rng.integers(0, 8, 800)
    x = np.stack([cv2.resize(cv2.cvtColor(draw_face(int(k), rng, 64), cv2.COLOR_BGR2RGB), (size, size)) for k in y])

    torch.manual_seed(0)
    model = create_model("frame", backbone="test_resnet", num_classes=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = rng.integers(0, len(x), 32)
        inputs = (torch.from_numpy(x[batch]).movedim(-1, -3).float() / 255 - 0.5) / 0.25
        loss = F.cross_entropy(model(inputs)["logits"], torch.from_numpy(y[batch]).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    meta = {
        "kind": "classifier",
        "model": model.describe(),
        "label_set": {"name": "abaw8", "classes": list(ABAW8.classes)},
        "preprocessing": {"mode": "frame", "image_size": size, "num_frames": 1, "frame_stride": 1,
                          "mean": [0.5] * 3, "std": [0.25] * 3},
    }  # fmt: skip
    save_checkpoint(directory, model.eval(), meta)
    return str(directory)


def naive_loop(videos: list, checkpoint: str, out: Path, same_detector_at: int | None = None) -> tuple[dict, dict]:
    """Frame by frame: decode, detect, align + classify each face, append; one Parquet per video.

    By default the detector is facenet-pytorch's MTCNN called as its README shows
    (what one writes first) on the decoded frame. ``same_detector_at`` instead runs
    the pipeline's detector (affectray's cascade, the same nets) on the frame shrunk
    to that size, as the pipeline does, isolating the pipeline's own gain.
    """
    import numpy as np
    import pandas as pd
    from facenet_pytorch import MTCNN

    from affectray.faces.align import align_face
    from affectray.faces.detect import FaceDetector, downscale
    from affectray.faces.video import iter_frames
    from affectray.models.inference import load_classifier

    start, cpu_start = time.perf_counter(), time.process_time()
    seconds = Counter()
    ours = FaceDetector(min_score=0.9, min_face_size=20)
    mtcnn = MTCNN(keep_all=True, min_face_size=20, thresholds=[0.6, 0.7, 0.7], device="cpu").eval()

    def detect(image: np.ndarray) -> list:
        if same_detector_at:
            small, factor = downscale([image], same_detector_at)
            return ours.detect(small, scale=factor)[0]
        boxes, probs, points = mtcnn.detect(image, landmarks=True)
        if boxes is None:
            return []
        return ours._detections(boxes, probs, points, 1.0)  # the same >= 0.9 score cut as the job

    classifier = load_classifier(checkpoint)
    seconds["load"] = time.perf_counter() - start
    size = classifier.preprocessing.image_size
    faces: dict = {}
    frames = 0
    out.mkdir(parents=True, exist_ok=True)
    for video in videos:
        rows = []
        clock = time.perf_counter()
        for batch in iter_frames(video.uri, max_side=1280, batch_size=1):
            image, frame = batch.images[0], int(batch.frame_index[0])
            seconds["decode"] += time.perf_counter() - clock
            clock = time.perf_counter()
            found = detect(image)  # in the decoded frame's coordinates
            seconds["detect"] += time.perf_counter() - clock
            for det in found:
                clock = time.perf_counter()
                crop = align_face(image, det.landmarks, size)
                seconds["align"] += time.perf_counter() - clock
                clock = time.perf_counter()
                probs = classifier.predict_track(crop[None])[0]
                seconds["classify"] += time.perf_counter() - clock
                label = int(np.argmax(probs))
                box = det.box / batch.scale  # original video coordinates, as the pipeline writes them
                rows.append({"frame_index": frame, "box": box.tolist(), "label": label, "probs": probs.tolist()})
                faces.setdefault((video.key, frame), []).append((box, label))
            if not found:
                rows.append({"frame_index": frame, "box": None, "label": None, "probs": None})
            frames += 1
            clock = time.perf_counter()
        pd.DataFrame(rows).to_parquet(out / f"{video.key}.parquet")
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"frames": frames, "seconds": wall, "cpu": cpu, "fps": frames / wall, "stages": dict(seconds)}, faces


def pipeline_faces(out: str, classes: list[str]) -> dict:
    """(video key, frame) → [(box, label index)] from the pipeline's label files."""
    import numpy as np

    from affectray.label import outputs

    table = outputs.read_labels(out).to_pandas()
    table = table[table.face_count > 0]
    index = {c: k for k, c in enumerate(classes)}
    faces: dict = {}
    for row in table.itertuples():
        box = np.array([row.bbox_x1, row.bbox_y1, row.bbox_x2, row.bbox_y2], np.float32)
        faces.setdefault((row.video_key, int(row.frame_index)), []).append((box, index[row.label]))
    return faces


def compare(naive: dict, pipeline: dict) -> dict:
    """Share of naive faces the pipeline found (IoU >= 0.5), and of those, how many got the same label."""
    import numpy as np

    from affectray.faces.tracking import box_iou

    total = matched = same = 0
    extra = 0
    for key in set(naive) | set(pipeline):
        a, b = naive.get(key, []), pipeline.get(key, [])
        total += len(a)
        if not a or not b:
            extra += len(b)
            continue
        iou = box_iou(np.stack([f[0] for f in a]), np.stack([f[0] for f in b]))  # [A, B]
        pairs = sorted(((iou[i, j], i, j) for i in range(len(a)) for j in range(len(b))), reverse=True)
        used_a: set[int] = set()
        used: set[int] = set()
        for value, i, j in pairs:  # greedy, best overlap first
            if value < 0.5:
                break
            if i in used_a or j in used:
                continue
            used_a.add(i)
            used.add(j)
            matched += 1
            same += a[i][1] == b[j][1]
        extra += len(b) - len(used)
    return {
        "naive_faces": total,
        "faces_matched": matched / total if total else 1.0,
        "labels_matched": same / matched if matched else 1.0,
        "pipeline_extra_faces": extra,
    }


def main() -> None:
    from affectray.label.job import LabelConfig, run_label

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--videos", type=int, default=8, help="animated real-face videos (320x240; 8: 2544 frames in all)"
    )
    parser.add_argument("--frames", type=int, default=300, help="frames per animated video")
    parser.add_argument("--real-copies", type=int, default=2, help="copies of the 72-frame real video (640x360)")
    parser.add_argument("--detect-max-side", type=int, default=640, help="the pipeline's detection size")
    parser.add_argument(
        "--detect-every",
        type=int,
        default=LabelConfig.detect_every,
        help=f"the pipeline's whole-frame detection period (default {LabelConfig.detect_every}, as the job)",
    )
    parser.add_argument(
        "--same-detector",
        action="store_true",
        help="also time the naive loop with the pipeline's detector at --detect-max-side "
        "(isolates the pipeline from its detector)",
    )
    parser.add_argument("--image-size", type=int, default=64, help="classifier input side")
    parser.add_argument(
        "--naive-threads",
        type=int,
        help="torch threads of the naive loop (default: torch's own default, one per core; 1 keeps it off "
        "the other cores, which on a shared machine can be faster)",
    )
    parser.add_argument("--detectors", type=int, help="MTCNN actors (default: the job's default)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    import torch

    from affectray.label.inputs import list_inputs
    from affectray.runtime import init_ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = Path(tempfile.mkdtemp(prefix="affectray-bench-label-"))
    try:
        corpus = make_corpus(root, args.videos, args.frames, args.real_copies)
        checkpoint = make_checkpoint(root / "ckpt", args.image_size, steps=150)
        videos = list_inputs(str(corpus)).videos
        init_ray()
        # torch's default threads unless asked: what one gets without thinking about it. On a
        # shared machine its threads spin against other jobs' processes (1 thread ran 1.5-7x
        # faster, seen), so the CPU-per-frame ratio below is the steadier comparison.
        if args.naive_threads:
            torch.set_num_threads(args.naive_threads)
        threads, default = torch.get_num_threads(), "" if args.naive_threads else " (torch's default)"
        print(
            f"{len(videos)} videos; {os.cpu_count()} CPU cores; naive loop: torch threads {threads}{default}, "
            f"facenet-pytorch MTCNN on every whole frame; pipeline: affectray's cascade at max side "
            f"{args.detect_max_side}, the whole frame every {args.detect_every} frames, near its faces between",
            flush=True,
        )

        # The naive videos are timed in two halves, before and after the pipeline, so both see the same load.
        first, first_found = naive_loop(videos[::2], checkpoint, root / "naive")
        config = LabelConfig(
            str(corpus),
            str(root / "labels"),
            checkpoint,
            detect_max_side=args.detect_max_side,
            detect_every=args.detect_every,
            detectors=args.detectors,
        )
        start = time.perf_counter()
        summary = run_label(config, progress=False)
        wall = time.perf_counter() - start
        fps = summary["frames"] / wall
        startup = summary["startup_seconds"]
        steady = summary["frames"] / (wall - startup)
        print(f"pipeline (MTCNN at {args.detect_max_side} px, the whole frame every {args.detect_every} frames): "
              f"{summary['frames']} frames in {wall:.1f} s = {fps:.2f} frames/s; start-up {startup:.1f} s "
              f"(first labelled chunk), then {steady:.2f} frames/s")  # fmt: skip

        second, second_found = naive_loop(videos[1::2], checkpoint, root / "naive")
        naive = combine(first, second)
        naive_found = {**first_found, **second_found}
        print(
            f"naive ({threads} torch thread(s){default}, facenet-pytorch MTCNN on every whole frame): "
            f"{naive['frames']} frames in {naive['seconds']:.1f} s = {naive['fps']:.2f} frames/s",
            flush=True,
        )
        same = None
        if args.same_detector:
            same, same_found = naive_loop(videos, checkpoint, root / "naive-same", args.detect_max_side)
            print(
                f"naive, the pipeline's cascade on every whole frame at {args.detect_max_side} px: "
                f"{same['frames']} frames in {same['seconds']:.1f} s = {same['fps']:.2f} frames/s",
                flush=True,
            )

        print("\nper stage: wall seconds of work summed over workers, frames/s of one worker; pipeline CPU seconds")
        runs = [("naive", naive)] + ([("naive-same", same)] if same else [])
        runs.append(("pipeline", {"stages": summary["stage_seconds"], "frames": summary["frames"]}))
        for name, run in runs:
            for stage, seconds in run["stages"].items():
                rate = run["frames"] / seconds if seconds else float("inf")
                cpu = summary["stage_cpu_seconds"].get(stage) if name == "pipeline" else None
                print(
                    f"  {name:10s} {stage:9s} {seconds:8.1f} s  {rate:9.1f} frames/s"
                    + (f"  cpu {cpu:7.1f} s" if cpu is not None else "")
                )
        # Frames per CPU second: the work each does per frame, whatever share of the cores it got.
        pipeline_cpu = sum(summary["stage_cpu_seconds"].values())
        cpu_ratio = (summary["frames"] / pipeline_cpu) / (naive["frames"] / naive["cpu"])
        print(
            f"CPU: naive {naive['cpu']:.1f} s, pipeline stages {pipeline_cpu:.1f} s (Ray's own overhead not counted): "
            f"{cpu_ratio:.2f}x less CPU per frame"
        )

        from affectray.models.inference import load_classifier

        found = pipeline_faces(str(root / "labels"), load_classifier(checkpoint).classes)
        match, ratio = compare(naive_found, found), fps / naive["fps"]
        print(
            f"\nagainst the naive loop on whole frames: {ratio:.2f}x wall clock ({steady / naive['fps']:.2f}x after "
            f"the pipeline's start-up), {cpu_ratio:.2f}x in CPU per frame; faces matched "
            f"{100 * match['faces_matched']:.2f}% (IoU >= 0.5), labels matched "
            f"{100 * match['labels_matched']:.2f}% of matched faces"
        )
        result = {
            "ratio": round(ratio, 3),
            "faces_matched": round(match["faces_matched"], 4),
            "labels_matched": round(match["labels_matched"], 4),
            "naive_faces": match["naive_faces"],
            "pipeline_extra_faces": match["pipeline_extra_faces"],
            "naive_fps": round(naive["fps"], 2),
            "pipeline_fps": round(fps, 2),
            "startup_seconds": startup,
            "ratio_after_startup": round(steady / naive["fps"], 3),
            "frames": summary["frames"],
            "detect_max_side": args.detect_max_side,
            "detect_every": args.detect_every,
            "cpu_cores": os.cpu_count(),
            "naive_threads": threads,
            "cpu_ratio": round(cpu_ratio, 3),
        }
        if same:
            match_same = compare(same_found, found)
            result.update(
                ratio_same_detector=round(fps / same["fps"], 3),
                faces_matched_same_detector=round(match_same["faces_matched"], 4),
                labels_matched_same_detector=round(match_same["labels_matched"], 4),
            )
            print(
                f"against the naive loop with the pipeline's cascade: {fps / same['fps']:.2f}x; faces matched "
                f"{100 * match_same['faces_matched']:.2f}%, labels matched {100 * match_same['labels_matched']:.2f}%"
            )
        print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
