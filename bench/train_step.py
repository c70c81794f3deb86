"""The FER2013 recipe's training step five ways side by side: precision, input, weight layout.

What the recipe's `train.precision: bf16`, `data.augment_on: worker` and `train.channels_last`
cost or buy on this machine's CPU, without Ray and without data loading: the recipe's model (the
built-in mini-Xception with its middle-flow blocks), batch size, AdamW and moving average, on
uint8 faces of FER2013's size held in memory. "ready" feeds faces already resized to the
input (what the data tasks hand over when they augment); "worker" runs
affectray.data.augment.augment_batch on the batch first (crop, flip, jitter, grey,
normalise), as the recipe's training loop does. "nhwc" holds the convolution weights
channels-last (affectray.models.memory_format), as `train.channels_last` does: with bf16
only, since its fp32 backward crashes on the CPU (train/loop.py, CHANNELS_LAST_FP32_CRASH).

Timing: ``--rounds`` rounds, each timing every variant for ``--seconds`` in the same order,
so all meet the same background load; faces/s per variant is over all its rounds. bf16 needs
a CPU with AVX512-BF16 or AMX to be faster (oneDNN); elsewhere it may be slower.

Last line: a JSON object with faces/s per variant and the ratios bf16 / fp32 and
worker / ready (per precision, NCHW) and nhwc / nchw (bf16, worker inputs).

    .venv/bin/python bench/train_step.py [--rounds 2] [--seconds 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "finetune-fer2013.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds of every variant (default 2)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per variant per round (default 10)")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from affectray.config import load_config
    from affectray.data.augment import augment_batch
    from affectray.data.loaders import to_model_input
    from affectray.models.memory_format import to_channels_last
    from affectray.models.minixception import MiniXception, MiniXceptionConfig
    from affectray.train.finetune import FinetuneConfig

    config = load_config(FinetuneConfig, str(CONFIG))
    data = dataclasses.replace(config.data, augment_on="worker")
    batch = config.train.batch_size

    def trainee(layout: str):
        """The recipe's model, its moving average and optimizer; the same weights in either layout."""
        torch.manual_seed(0)
        model = MiniXception(MiniXceptionConfig(middle_blocks=tuple(config.model.extra["middle_blocks"])))
        if layout == "nhwc":
            to_channels_last(model)
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.optim.ema_decay), use_buffers=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
        return model, ema, optimizer

    trainees = {layout: trainee(layout) for layout in ("nchw", "nhwc")}
    parameters = sum(p.numel() for p in trainees["nchw"][0].parameters())
    generator = torch.Generator().manual_seed(0)
    stored = torch.randint(0, 256, (4096, 48, 48, 3), dtype=torch.uint8, generator=generator)  # FER2013's 48 px
    resized = torch.nn.functional.interpolate(
        stored.permute(0, 3, 1, 2).float(), size=data.image_size, mode="bilinear", align_corners=False
    ).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # fmt: skip
    labels = torch.randint(0, 7, (4096,), generator=generator)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {batch}, {data.image_size} px grey, "
          f"{parameters:,} parameters", flush=True)  # fmt: skip

    def run(precision: str, inputs: str, layout: str, seconds: float) -> tuple[int, float]:
        model, ema, optimizer = trainees[layout]
        faces, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            pick = torch.randint(0, 4096, (batch,), generator=generator)
            if inputs == "worker":
                x = augment_batch(stored[pick], data, generator)
            else:
                x = to_model_input({"image": resized[pick]}, data, "cpu")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(x)["logits"]
            loss = F.cross_entropy(logits.float(), labels[pick])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.update_parameters(model)
            faces += batch
        return faces, time.perf_counter() - started

    variants = [(p, i, "nchw") for p in ("fp32", "bf16") for i in ("ready", "worker")]
    variants.append(("bf16", "worker", "nhwc"))
    for variant in variants:
        run(*variant, 2.0)  # warm-up: oneDNN's kernels for each dtype
    totals = {v: [0, 0.0] for v in variants}
    for round_ in range(args.rounds):
        for variant in variants:
            faces, seconds = run(*variant, args.seconds)
            totals[variant][0] += faces
            totals[variant][1] += seconds
            label = " ".join(f"{part:>6}" for part in variant)
            print(f"round {round_ + 1}: {label}: {faces / seconds:6.1f} faces/s", flush=True)
    rate = {"_".join(v): totals[v][0] / totals[v][1] for v in variants}
    result = {
        "faces_per_s": {k: round(v, 1) for k, v in rate.items()},
        "bf16_over_fp32": {i: round(rate[f"bf16_{i}_nchw"] / rate[f"fp32_{i}_nchw"], 3) for i in ("ready", "worker")},
        "worker_over_ready": {
            p: round(rate[f"{p}_worker_nchw"] / rate[f"{p}_ready_nchw"], 3) for p in ("fp32", "bf16")
        },
        "nhwc_over_nchw": {"bf16": round(rate["bf16_worker_nhwc"] / rate["bf16_worker_nchw"], 3)},
        "rounds": args.rounds,
        "seconds": args.seconds,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
