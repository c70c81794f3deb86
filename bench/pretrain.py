"""Pretraining feed and compute: the data-wait share of step time, samples/s, and (on a CUDA GPU) ViT-B MFU.

Data wait: runs jobs/configs/pretrain-smoke.yaml through affectray.train.pretrain.run_pretrain,
as jobs/pretrain.py does (the sample corpus built into a temporary folder, the run's
storage there too; a local Ray of its own), with enough steps for several report windows.
The shared training loop measures every window itself (train/loop.py's _Meter: the time
between asking for a batch and getting it, over the window's wall time) and writes every
report to <run>/metrics.csv; this script reads that file back and sums the windows weighted
by their duration. The first window holds the pipeline's start-up (Ray Data's first
execution), so it is printed apart and the headline is the windows after it; epoch ends
(a new execution of the dataset, and the loop's epoch-end checkpoint) stay in, as in any
run; the every-N-steps checkpoint is moved to the last step (train.checkpoint_every =
--steps), as writing it is not step time. Target: data wait <= 10% of step time.

The smoke model is VideoMAE-tiny at 32 px: its steps take milliseconds on a CPU, so the
feed shows through; a real model's steps are longer and hide more of it. ``--set`` changes
any config key (e.g. ``--set model.size=small``).

MFU (only where CUDA is present, else null with the reason printed): VideoMAE ViT-B
(16 x 224 x 224, tube masking 0.9, pretrain-videomae-base.yaml's model) on random clips
already on the GPU, bf16 autocast, AdamW: clips/s over timed steps, and model FLOPs
utilisation = FLOPs of one training step (torch.utils.flop_counter.FlopCounterMode: the
matmuls, convolutions and CUDA attention kernels of forward and backward; not the optimizer) x steps/s / the GPU's dense
bf16 peak from a small table by name (``--peak-tflops`` for a GPU not in it).

Last line: a JSON object with `data_wait_fraction` (after the first window), `samples_per_s`
and `mfu` (null when not measured). There is no `ratio`: nothing runs side by side here,
and a target / measured ratio would grow without bound as the wait approaches zero.

    .venv/bin/python bench/pretrain.py [--steps 60] [--set train.batch_size=16] [--mfu-steps 20]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "configs" / "pretrain-smoke.yaml"
DATA_WAIT_TARGET = 0.10

# Dense bf16 tensor-core peaks (vendor datasheets, no sparsity), matched in order against the device name.
PEAK_BF16 = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
]


def windows(metrics_csv: str, samples_per_step: int) -> list[dict]:
    """The loop's report windows from <run>/metrics.csv: steps, seconds, data-wait seconds, samples.

    A row repeats the previous window's values when it only adds an epoch-end report; those
    are dropped. A window's wall time is its samples over its samples/s.
    """
    rows = list(csv.DictReader(open(metrics_csv)))
    out, last_step, last_values = [], 0, None
    for row in rows:
        if not row.get("samples_per_s"):
            continue
        values = (row["samples_per_s"], row["data_wait_fraction"], row.get("loss"))
        step = int(float(row["step"]))
        if values == last_values or step <= last_step:
            continue
        samples = (step - last_step) * samples_per_step
        seconds = samples / float(row["samples_per_s"])
        out.append(
            {
                "steps": step - last_step,
                "samples": samples,
                "seconds": seconds,
                "wait": float(row["data_wait_fraction"]) * seconds,
            }
        )
        last_step, last_values = step, values
    return out


def summarise(parts: list[dict]) -> dict:
    seconds = sum(w["seconds"] for w in parts)
    return {
        "steps": sum(w["steps"] for w in parts),
        "seconds": round(seconds, 2),
        "data_wait_fraction": round(sum(w["wait"] for w in parts) / seconds, 4) if seconds else None,
        "samples_per_s": round(sum(w["samples"] for w in parts) / seconds, 1) if seconds else None,
    }


def measure_mfu(batch: int, steps: int, peak: float | None) -> dict:
    """ViT-B VideoMAE training steps in bf16 on the GPU: clips/s and model FLOPs utilisation."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from affectray.models.video_classifier import build_pretrain_model

    name = torch.cuda.get_device_name()
    if peak is None:
        peak = next((value for key, value in PEAK_BF16 if key in name), None)
    device = torch.device("cuda")
    model = build_pretrain_model("videomae", "base").to(device).train()
    frames, size = model.cfg.num_frames, model.cfg.img_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    clips = torch.randn(batch, 3, frames, size, size, device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _, _ = model(clips)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # kernels chosen, allocator warm
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    achieved = flops * steps / seconds
    return {
        "gpu": name,
        "batch": batch,
        "clip": f"{frames}x{size}x{size}",
        "clips_per_s": round(batch * steps / seconds, 1),
        "step_tflop": round(flops / 1e12, 3),
        "achieved_tflops": round(achieved / 1e12, 1),
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": round(achieved / peak, 4) if peak else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(SMOKE.relative_to(REPO)), help="pretrain config (default: %(default)s)")
    parser.add_argument(
        "--steps", type=int, default=60, help="optimizer steps (train.max_steps; epochs raised to reach it; default 60)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any other config override (repeatable)"
    )
    parser.add_argument(
        "--mfu-batch", type=int, default=16, help="ViT-B clips per step for MFU (default 16, as the base config)"
    )
    parser.add_argument("--mfu-steps", type=int, default=20, help="timed ViT-B steps for MFU (default 20)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for a GPU not in the table")
    parser.add_argument("--no-mfu", action="store_true", help="skip the MFU measurement even on a GPU")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    import torch

    from affectray.config import load_config
    from affectray.runtime import init_ray
    from affectray.train.loop import METRICS_FILE
    from affectray.train.pretrain import PretrainConfig, run_pretrain

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = Path(tempfile.mkdtemp(prefix="affectray-bench-pretrain-"))
    try:
        overrides = [
            f"data.root={tmp / 'shards'}",
            f"run.storage={tmp / 'runs'}",
            "run.name=bench",
            "sample_corpus_if_empty=true",
            f"train.max_steps={args.steps}",
            "train.epochs=1000",
            f"train.checkpoint_every={args.steps}",  # checkpoint writes are not step time: one, at the end
            *args.set,
        ]
        config = load_config(PretrainConfig, args.config, overrides)
        ray = init_ray()
        d, t = config.data, config.train
        print(
            f"{args.config}: {config.model.name}-{config.model.size}, clips {d.num_frames}x{d.image_size}px "
            f"(stride {d.frame_stride}), batch {t.batch_size} x {config.run.num_workers} worker(s), "
            f"{t.max_steps} steps, a report every {t.log_every}, checkpoint every {t.checkpoint_every}; "
            f"{os.cpu_count()} CPU cores, Ray {ray.__version__} ({int(ray.cluster_resources()['CPU'])} logical CPUs), "
            f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
            flush=True,
        )
        start = time.perf_counter()
        summary = run_pretrain(config)
        wall = time.perf_counter() - start
        ray.shutdown()  # its workers' exit messages would otherwise come after the JSON line
        per_step = t.batch_size * config.run.num_workers * config.optim.accumulation
        parts = windows(os.path.join(summary["run"], METRICS_FILE), per_step)
        first, rest = summarise(parts[:1]), summarise(parts[1:])
        every = summarise(parts)
        print(
            f"\nrun: {summary['steps']} steps in {wall:.1f} s "
            "(corpus, Ray Train start-up and epoch-end checkpoints included)"
        )
        print("report windows (the loop's own measurement): steps, wall s, data wait, samples/s")
        for w in parts:
            print(
                f"  {w['steps']:4d} steps {w['seconds']:7.2f} s  wait {100 * w['wait'] / w['seconds']:5.1f}%  "
                f"{w['samples'] / w['seconds']:8.1f} samples/s"
            )
        print(
            f"first window (pipeline start-up): data wait {100 * (first['data_wait_fraction'] or 0):.1f}%; "
            f"after it: data wait {100 * (rest['data_wait_fraction'] or 0):.1f}% of step time "
            f"(target <= {100 * DATA_WAIT_TARGET:.0f}%), {rest['samples_per_s']} samples/s; "
            f"all windows: {100 * (every['data_wait_fraction'] or 0):.1f}%"
        )

        mfu = None
        if args.no_mfu:
            print("MFU: skipped (--no-mfu)")
        elif not torch.cuda.is_available():
            print("MFU: skipped, no CUDA GPU here (ViT-B in bf16 is a GPU measurement)")
        else:
            peak = args.peak_tflops * 1e12 if args.peak_tflops else None
            mfu = measure_mfu(args.mfu_batch, args.mfu_steps, peak)
            print(
                f"MFU: VideoMAE ViT-B {mfu['clip']}, batch {mfu['batch']}, bf16 on {mfu['gpu']}: "
                f"{mfu['clips_per_s']} clips/s, {mfu['step_tflop']} TFLOP a step, {mfu['achieved_tflops']} TFLOP/s"
                + (
                    f" of {mfu['peak_tflops']:.0f} peak = {100 * mfu['mfu']:.1f}% MFU"
                    if mfu["mfu"] is not None
                    else " (no peak for this GPU: give --peak-tflops)"
                )
            )
        print(
            json.dumps(
                {
                    "data_wait_fraction": rest["data_wait_fraction"],
                    "samples_per_s": rest["samples_per_s"],
                    "mfu": mfu["mfu"] if mfu else None,
                    "data_wait_target": DATA_WAIT_TARGET,
                    "data_wait_fraction_first_window": first["data_wait_fraction"],
                    "data_wait_fraction_all_windows": every["data_wait_fraction"],
                    "steps": summary["steps"],
                    "windows": len(parts),
                    "vit_b_clips_per_s": mfu["clips_per_s"] if mfu else None,
                    "mfu_detail": mfu,
                    "model": summary["model"],
                    "batch_size": t.batch_size,
                    "cpu_cores": os.cpu_count(),
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
