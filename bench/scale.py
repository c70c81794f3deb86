"""Scaling: 10x the work must not take more memory, nor more than ~10x the time.

Two jobs, `affectray label` (run_label) and `affectray ingest --layout videos`
(run_ingest), each on a local Ray with its defaults, and two ways to make the work
10x larger:

* long: one video of --base-seconds, then one of --scale times that;
* many: --videos videos of --base-seconds / --videos each, then --scale times as many
  (--videos defaults to ingest's actor pool size, so every run starts the same actors).

So both cases start from the same footage (--base-seconds of 640x360 video at
30 fps) and grow it --scale times. The videos are the real video in
../shared/data/real (2.4 s, one face) played back and forth until long enough,
written with OpenCV (mp4v) in a temporary folder; label uses the job's default
checkpoint (builtin:fer-minixception).

Every run has a process of its own: a fresh driver that starts its own local Ray,
so nothing is left from the run before. This process samples, every 0.2 s with
psutil, the resident memory (RSS) of that driver and of every process below it
(GCS, raylet, agents and the ``ray::`` workers, whose shared object-store pages
count in each process that maps them) and reports the driver's peak, the largest
peak of any other process, and the peak of their sum (and, for reference, the sum
of each process's own peak). In a tiny run the base run's actors may finish their
few frames before the last one has loaded its model, so their peaks never meet and
the sum's ratio says more about that overlap than about the work; at the default
sizes every actor works through the whole run. Time is the job's own
(run_label / run_ingest, actor start-up included), measured in the driver; Ray's
start is not counted.

Per case `memory_ratio` is the worst of the three peaks' ratios (larger run over
base run) and `time_ratio` the job time's; the last line is one JSON object whose
`memory_ratio` and `time_ratio` are the worst over the cases (targets: <= 1.2 and
<= 11 at --scale 10), with every case's figures.

    .venv/bin/python bench/scale.py [--base-seconds 30] [--scale 10] [--videos N] [--jobs label,ingest]
                                    [--cases long,many]
    .venv/bin/python bench/scale.py --base-seconds 2 --scale 3      # a quick check
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py

from common import REAL_VIDEO, ProcessMonitor, read_frames  # noqa: E402

FPS = 30.0


def make_video(path: Path, seconds: float) -> int:
    """A 640x360 mp4 of ``seconds``: the real video's frames played forward, backward, forward… (no cuts)."""
    import cv2

    frames = read_frames(REAL_VIDEO)
    loop = frames + frames[-2:0:-1]  # back and forth: the face never jumps, so one track
    count = max(1, round(seconds * FPS))
    height, width = frames[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (width, height))
    for k in range(count):
        writer.write(loop[k % len(loop)])
    writer.release()
    return count


def make_inputs(root: Path, case: str, videos: int, seconds: float) -> Path:
    """A folder with ``videos`` videos of ``seconds`` each (one made, the others copies of it)."""
    folder = root / case
    first = folder / "video_000.mp4"
    make_video(first, seconds)
    for k in range(1, videos):
        shutil.copy(first, folder / f"video_{k:03d}.mp4")
    return folder


def run_job(job: str, source: str, out: str, checkpoint: str | None, result_path: str) -> None:
    """In a fresh process: start a local Ray, run one job with its defaults, write its time and summary."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from affectray.runtime import init_ray

    init_ray()  # not timed
    start = time.perf_counter()
    if job == "label":
        from affectray.label.job import LabelConfig, run_label

        config = LabelConfig(source, out, **({"checkpoint": checkpoint} if checkpoint else {}))
        summary = run_label(config, progress=False)
    else:
        from affectray.ingest.job import IngestConfig, run_ingest

        summary = run_ingest(IngestConfig(source, out, layout="videos"), progress=False)
    seconds = time.perf_counter() - start
    Path(result_path).write_text(json.dumps({"seconds": seconds, "summary": summary}))


def measure(job: str, source: Path, out: Path, checkpoint: str | None) -> dict:
    """Run one job in a process of its own and watch that process and everything it starts."""
    result = out.with_suffix(".json")
    process = multiprocessing.get_context("spawn").Process(
        target=run_job, args=(job, str(source), str(out), checkpoint, str(result))
    )
    process.start()
    with ProcessMonitor(process.pid) as monitor:
        process.join()
    if process.exitcode != 0 or not result.exists():
        raise SystemExit(f"{job} on {source} failed (exit code {process.exitcode})")
    run = json.loads(result.read_text())
    driver = monitor.peaks.get(process.pid, ("driver", 0))[1]
    others = {pid: peak for pid, peak in monitor.peaks.items() if pid != process.pid}
    worst = max(others, key=lambda pid: others[pid][1])
    summary = run["summary"]
    return {
        "seconds": round(run["seconds"], 2),
        "frames": summary["frames"] if job == "label" else _decoded_frames(out),
        "failed": summary["failed"],
        "driver_mb": round(driver / 2**20, 1),
        "worker_mb": round(others[worst][1] / 2**20, 1),
        "worker": others[worst][0],
        "sum_mb": round(monitor.peak_sum / 2**20, 1),
        "sum_of_peaks_mb": round(sum(peak for _, peak in monitor.peaks.values()) / 2**20, 1),
        "processes": len(monitor.peaks),
        "samples": monitor.samples,
        "largest": sorted(
            ((name, round(peak / 2**20, 1)) for name, peak in monitor.peaks.values()), key=lambda x: -x[1]
        )[:6],
    }


def _decoded_frames(out: Path) -> int:
    manifest = json.loads((out / "_manifest.json").read_text())
    return manifest["detection"]["frames_decoded"]


def compare(base: dict, big: dict) -> dict:
    """Ratios of the larger run to the base run: each memory peak, the worst of them, and time."""
    ratios = {k: big[k] / base[k] for k in ("driver_mb", "worker_mb", "sum_mb")}
    return {
        "memory_ratio": round(max(ratios.values()), 3),
        "driver_ratio": round(ratios["driver_mb"], 3),
        "worker_ratio": round(ratios["worker_mb"], 3),
        "sum_ratio": round(ratios["sum_mb"], 3),
        "time_ratio": round(big["seconds"] / base["seconds"], 3),
        "work_ratio": round(big["frames"] / base["frames"], 3) if base["frames"] else None,
    }


def show(name: str, run: dict) -> None:
    print(
        f"  {name:22s} {run['frames']:6d} frames {run['seconds']:8.1f} s | "
        f"peak RSS: driver {run['driver_mb']:7.1f} MB, "
        f"largest other {run['worker_mb']:7.1f} MB ({run['worker']}), sum {run['sum_mb']:7.1f} MB "
        f"(of each process's peak: {run['sum_of_peaks_mb']:.1f} MB, {run['processes']} processes)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-seconds", type=float, default=30.0, help="footage of the base runs (default 30 s)")
    parser.add_argument("--scale", type=int, default=10, help="how many times the work the larger runs get")
    parser.add_argument(
        "--videos",
        type=int,
        help="videos of the 'many' base run (default: ingest's actor pool size, half the local Ray's CPUs, "
        "so the base run starts every actor too; with fewer, the larger run starts more actors and "
        "the memory sum grows with their number, not with the work)",
    )
    parser.add_argument("--jobs", default="label,ingest", help="comma-separated: label, ingest (default both)")
    parser.add_argument("--cases", default="long,many", help="comma-separated: long, many (default both)")
    parser.add_argument("--checkpoint", help="label's classifier (default: the job's default checkpoint)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    jobs, cases = args.jobs.split(","), args.cases.split(",")
    if args.videos is None:
        from affectray.runtime import MIN_LOCAL_CPUS

        args.videos = max(MIN_LOCAL_CPUS, os.cpu_count() or 1) // 2  # ingest's default pool, label's is half

    root = Path(tempfile.mkdtemp(prefix="affectray-bench-scale-"))
    try:
        inputs = {}
        if "long" in cases:
            inputs["long"] = (make_inputs(root, "long-base", 1, args.base_seconds),
                              make_inputs(root, "long-big", 1, args.base_seconds * args.scale))  # fmt: skip
        if "many" in cases:
            each = args.base_seconds / args.videos
            inputs["many"] = (make_inputs(root, "many-base", args.videos, each),
                              make_inputs(root, "many-big", args.videos * args.scale, each))  # fmt: skip
        print(
            f"{os.cpu_count()} CPU cores; base: {args.base_seconds:g} s of 640x360 video at {FPS:g} fps "
            f"(long: one video; many: {args.videos} videos), larger runs {args.scale}x; "
            f"jobs {', '.join(jobs)}; RSS sampled every 0.2 s",
            flush=True,
        )
        results = {}
        for job in jobs:
            for case, (base_dir, big_dir) in inputs.items():
                name = f"{job}-{case}"
                base = measure(job, base_dir, root / "out" / f"{name}-base", args.checkpoint)
                show(f"{name} base", base)
                big = measure(job, big_dir, root / "out" / f"{name}-{args.scale}x", args.checkpoint)
                show(f"{name} {args.scale}x", big)
                ratios = compare(base, big)
                print(
                    f"  {name:22s} memory {ratios['memory_ratio']:.2f}x (driver {ratios['driver_ratio']:.2f}x, "
                    f"largest other {ratios['worker_ratio']:.2f}x, sum {ratios['sum_ratio']:.2f}x), "
                    f"time {ratios['time_ratio']:.2f}x for {ratios['work_ratio']}x the frames",
                    flush=True,
                )
                print(f"    largest processes, {args.scale}x: {big['largest']}")
                results[name] = {**ratios, "base": base, "big": big}

        worst_memory = max(results, key=lambda n: results[n]["memory_ratio"])
        worst_time = max(results, key=lambda n: results[n]["time_ratio"])
        print(
            f"\nworst memory ratio {results[worst_memory]['memory_ratio']:.2f} ({worst_memory}), worst time ratio "
            f"{results[worst_time]['time_ratio']:.2f} ({worst_time}) for {args.scale}x the work "
            f"(targets at 10x: <= 1.2 and <= 11)"
        )
        for r in results.values():
            r["base"].pop("largest")
            r["big"].pop("largest")
        print(
            json.dumps(
                {
                    "memory_ratio": results[worst_memory]["memory_ratio"],
                    "time_ratio": results[worst_time]["time_ratio"],
                    "scale": args.scale,
                    "base_seconds": args.base_seconds,
                    "videos": args.videos,
                    "cpu_cores": os.cpu_count(),
                    "cases": results,
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
