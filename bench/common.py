"""What the benchmarks share: the corpus they time, the real video, and the process monitor.

Each bench script puts ``bench/`` on sys.path (it is the script's own folder) and imports
this module by name.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

REAL_VIDEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "single_face.mp4"


def make_corpus(root: Path, videos: int, frames: int, real_copies: int) -> Path:
    """Animated real-face videos (the sample corpus's, 320x240, longer) and copies of the real video (640x360)."""
    from affectray.sample.synth import SynthConfig, write_sample_corpus

    synth = root / "synth"
    config = SynthConfig(seed=11, num_videos=0, num_real_videos=videos, real_video_frames=frames, no_face_video=False)
    write_sample_corpus(synth, config)
    corpus = root / "videos"
    shutil.copytree(synth / "videos", corpus / "animated")
    for k in range(real_copies):
        (corpus / f"real_{k}").mkdir(parents=True)
        shutil.copy(REAL_VIDEO, corpus / f"real_{k}" / "single_face.mp4")
    return corpus


def combine(a: dict, b: dict) -> dict:
    stages = Counter(a["stages"])
    stages.update(b["stages"])
    frames, seconds = a["frames"] + b["frames"], a["seconds"] + b["seconds"]
    return {
        "frames": frames,
        "seconds": seconds,
        "cpu": a["cpu"] + b["cpu"],
        "fps": frames / seconds,
        "stages": dict(stages),
    }


def read_frames(path: Path) -> list:
    """Every frame of a video file, BGR, as OpenCV decodes it."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


class ProcessMonitor:
    """Samples the resident memory and CPU time of a process and all its descendants, in a thread.

    A local Ray is started by its driver, so the driver's descendants are every Ray process:
    GCS, raylet, agents and the workers (``ray::…``) the raylet starts. Use as a context
    manager; afterwards ``cpu_seconds`` (CPU used inside the block, the sampling thread's own
    left out), ``peak_sum`` (the largest total RSS seen at one sample) and ``peaks`` (each
    process's largest RSS, by pid, with its name) hold the results.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.2):
        import ray  # noqa: F401 - Ray ships psutil (thirdparty_files) and puts it on sys.path

        # isort: split
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.start_cpu: dict[int, float] = {}
        self.last_cpu: dict[int, float] = {}
        self.peaks: dict[int, tuple[str, int]] = {}
        self.peak_sum = 0
        self.samples = 0
        self.own_cpu = 0.0  # the sampling thread's CPU, charged to the monitored root when it is this process
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessMonitor:
        for proc, cpu, _ in self._sample():
            self.start_cpu[proc.pid] = cpu  # what ran before the block is not counted
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._record()

    @property
    def cpu_seconds(self) -> float:
        used = sum(cpu - self.start_cpu.get(pid, 0.0) for pid, cpu in self.last_cpu.items())
        return used - (self.own_cpu if self.root.pid == os.getpid() else 0.0)

    def cpu_by_name(self) -> Counter:
        """CPU seconds used inside the block, by process name (``ray::UnitProcessor``, ``raylet``…)."""
        by_name: Counter = Counter()
        for pid, cpu in self.last_cpu.items():
            name = self.peaks.get(pid, ("?", 0))[0]
            by_name[name] += cpu - self.start_cpu.get(pid, 0.0)
        return by_name

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._record()
        self.own_cpu = time.thread_time()

    def _record(self) -> None:
        total = 0
        for proc, cpu, rss in self._sample():
            self.last_cpu[proc.pid] = cpu
            total += rss
            name = _process_name(proc, self.root.pid)
            known, peak = self.peaks.get(proc.pid, (name, 0))
            if name == "ray::IDLE" or known.startswith(name):  # keep the name of the work it did, in full
                name = known
            self.peaks[proc.pid] = (name, max(peak, rss))
        self.peak_sum = max(self.peak_sum, total)
        self.samples += 1

    def _sample(self):
        """(process, CPU seconds, RSS bytes) of the root and each descendant alive now."""
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except self.psutil.Error:
            return []
        found = []
        for proc in procs:
            try:
                with proc.oneshot():
                    times, rss = proc.cpu_times(), proc.memory_info().rss
                found.append((proc, times.user + times.system, rss))
            except self.psutil.Error:  # it ended between the listing and the read
                continue
        return found


def _process_name(proc, driver: int) -> str:
    """``ray::UnitProcessor``, ``raylet``, ``gcs_server``, ``agent.py``; ``driver`` for the pid ``driver``."""
    if proc.pid == driver:
        return "driver"
    try:
        cmdline = proc.cmdline()
    except Exception:  # noqa: BLE001 - gone, or not ours to read
        return proc.name()
    if not cmdline:
        return proc.name()
    if cmdline[0].startswith("ray::"):  # ray::_StatsActor.update_metrics → ray::_StatsActor
        return re.sub(r"\.\w+$", "", cmdline[0].split()[0])
    scripts = [Path(a).name for a in cmdline[1:] if a.endswith(".py")]
    return scripts[0] if scripts else Path(cmdline[0]).name
