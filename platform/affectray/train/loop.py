"""The one training loop: pretraining and fine-tuning both run it on Ray Train.

A *task* (pretrain.MAETask, finetune tasks) says what differs: how to build the
model, what a batch is and what its loss is, what to evaluate, what to put in
a checkpoint's metadata. The loop owns the rest, identically for both: DDP,
bf16 autocast on GPU (float32 on CPU), AdamW with a warmup + cosine schedule,
gradient clipping and accumulation, an optional moving average of the weights
(what is evaluated and checkpointed), checkpoints every N steps with full
training state, resume from the latest checkpoint (after a worker failure or
when the same run is started again), and metrics on every report: loss,
learning rate, samples/s, and the fraction of step time spent waiting for data.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from affectray import checkpoints as ckpt
from affectray import storage
from affectray.config import ConfigError, FieldError, at_least, check_fields, location, positive
from affectray.errors import JobError

logger = logging.getLogger("affectray.train")


@dataclass
class OptimConfig:
    lr: float = 1.5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.01  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    accumulation: int = 1  # micro-batches per optimizer step
    # Exponential moving average of the weights, updated every optimizer step (timm's ModelEma,
    # torch's AveragedModel): validation scores the average and checkpoints carry it as their
    # weights, the trained ones beside it for resuming. 0 = off; 0.998 averages over ~500 steps.
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        check_fields(self, {
            "lr": (positive, "must be above 0"),
            "weight_decay": (at_least(0), "must be >= 0"),
            "betas": (lambda betas: all(0 <= b < 1 for b in betas), "each must be in [0, 1)"),
            "warmup_steps": (at_least(0), "must be >= 0 (0: no warmup)"),
            "min_lr_ratio": (lambda ratio: 0 <= ratio <= 1, "is a fraction of lr, in [0, 1]"),
            "grad_clip": (at_least(0), "must be >= 0 (0: no clipping)"),
            "accumulation": (at_least(1), "must be at least 1"),
            "ema_decay": (lambda decay: 0 <= decay < 1, "must be in [0, 1) (0: no moving average)"),
        })  # fmt: skip


@dataclass
class TrainConfig:
    batch_size: int = 8  # per worker, per micro-batch
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; stops early and sets the schedule length
    log_every: int = 10
    checkpoint_every: int = 50  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # Convolution weights in NHWC (models/memory_format.py): 1.6x the FER2013 recipe's bf16 CPU step;
    # refused with fp32 on the CPU (below). Checkpoints record it; evaluation and labeling load them so.
    channels_last: bool = False

    def __post_init__(self) -> None:
        # Caught here, not in the workers: checkpoint_every=0 divided by zero in every retry.
        check_fields(self, {
            name: (at_least(1), "must be at least 1")
            for name in ("batch_size", "epochs", "max_steps", "log_every", "checkpoint_every", "keep_checkpoints")
        })  # fmt: skip
        if self.channels_last and self.precision == "fp32":
            raise FieldError("channels_last", True, CHANNELS_LAST_FP32_CRASH)


# Measured with torch 2.14 on this CPU: Conv2d(8, 16, 1, stride=2) with NHWC weights on 60x60
# inputs aborts the process in its fp32 backward; bf16 autocast takes other kernels (two
# 30-epoch FER2013 runs), and on a GPU cuDNN does.
CHANNELS_LAST_FP32_CRASH = (
    "crashes fp32 training on the CPU (PyTorch's channels-last backward of a 1x1 stride-2 convolution "
    "frees memory twice); set train.precision: bf16 (a CPU with AVX512-BF16) or train.channels_last: false"
)


def check_channels_last(train_cfg: TrainConfig, use_gpu: bool) -> None:
    """Refuse channels-last weights where training would run in fp32 on the CPU (precision auto, no GPU)."""
    if train_cfg.channels_last and not use_gpu and train_cfg.precision != "bf16":
        raise ConfigError(
            f"train.channels_last=True: {CHANNELS_LAST_FP32_CRASH} (train.precision: {train_cfg.precision} "
            "is fp32 on the CPU)"
        )


@dataclass
class RunConfig:
    name: str = "run"
    storage: str = location("runs")  # local dir or s3:// prefix; the run lives at <storage>/<name>
    num_workers: int = 1
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # worker failures survived by resuming from the latest checkpoint
    fail_once_at_step: int | None = None  # fault-injection for tests and drills: one worker raises once

    def __post_init__(self) -> None:
        check_fields(self, {
            "num_workers": (at_least(1), "must be at least 1"),
            "cpus_per_worker": (positive, "must be above 0"),
            "max_failures": (at_least(-1), "must be >= 0, or -1 to retry without end"),
            "fail_once_at_step": (at_least(0), "must be >= 0"),
        })  # fmt: skip


class Task(Protocol):
    """What a training job plugs into the loop."""

    def build_model(self): ...
    def batches(self, shard, epoch: int, device) -> Iterable[Any]: ...
    def loss(self, model, batch) -> tuple[Any, dict[str, float]]: ...
    def batch_size_of(self, batch) -> int: ...
    def evaluate(self, model, device) -> dict[str, float]: ...
    def checkpoint_meta(self) -> dict[str, Any]: ...
    def score(self, metrics: dict[str, float]) -> float | None: ...


# Where the loop keeps the best-scoring checkpoint of a run (tasks that define score()).
BEST_CHECKPOINT_DIR = "best_checkpoint"
# Every report of the run, one row each (rewritten at each checkpoint; survives resume).
METRICS_FILE = "metrics.csv"
# Where a checkpoint's train state keeps the trained weights when its weights are their average.
TRAINED_WEIGHTS = "trained_weights"


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def planned_steps(data, optim_cfg: OptimConfig, train_cfg: TrainConfig, run_cfg: RunConfig) -> int:
    """Optimizer steps of a run over ``data`` (a loader DataConfig): max_steps, or the epochs' worth.

    Counted from the shards' label and index columns (no image decoded); a corpus too small
    for one step is a clear error, not a run that trains on nothing.
    """
    from affectray.data.loaders import count_samples

    samples = count_samples(data, train=True)
    per_step = train_cfg.batch_size * run_cfg.num_workers * optim_cfg.accumulation
    if samples < per_step:
        raise JobError(
            f"{samples} training samples in {data.root!r} cannot fill one step of {per_step} "
            "(batch_size x num_workers x accumulation): lower train.batch_size or ingest more data"
        )
    steps = (samples // per_step) * train_cfg.epochs
    return min(steps, train_cfg.max_steps) if train_cfg.max_steps else steps


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and embeddings-like 1-D parameters (as MAE/timm do).

    A task with its own policy (layer-wise lr decay) defines ``param_groups(model,
    weight_decay)``; groups may carry an ``lr_scale``, as MAE's lr_decay does.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "token" in name else decay).append(
            p
        )
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. ``config`` holds the task and the loop's settings."""
    import ray.data
    import ray.train
    import ray.train.torch
    import torch

    from affectray.models.memory_format import CHANNELS_LAST, to_channels_last

    # Progress bars of datasets built here (validation) reach the driver as hundreds of escaped
    # lines; the loop reports its own progress (loss, samples/s, data wait) instead.
    ray.data.DataContext.get_current().enable_progress_bars = False
    task: Task = config["task"]
    optim_cfg: OptimConfig = config["optim"]
    train_cfg: TrainConfig = config["train"]
    run_cfg: RunConfig = config["run"]
    total_steps: int = config["total_steps"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    node_ids = _worker_node_ids(world)  # the node of every rank: jobs report where work ran

    device = ray.train.torch.get_device()
    use_bf16 = train_cfg.precision == "bf16" or (train_cfg.precision == "auto" and device.type == "cuda")
    torch.manual_seed(config.get("seed", 0) + rank)

    model = task.build_model().to(device)
    if train_cfg.channels_last:
        to_channels_last(model)  # before the moving average copies it
    ema = _weight_average(model, optim_cfg.ema_decay)
    groups = (task.param_groups if hasattr(task, "param_groups") else param_groups)(model, optim_cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=optim_cfg.betas)
    for group in optimizer.param_groups:
        group.setdefault("lr_scale", 1.0)
        group["base_lr"] = optim_cfg.lr * group["lr_scale"]
    step, epoch, first_loss, resumed_from = 0, 0, None, 0
    best_score = None  # the task's score() of the best checkpoint so far (higher is better)
    history: list[dict[str, Any]] = []  # every report's scalars: <run>/metrics.csv
    best_uri = storage.join(run_cfg.storage, run_cfg.name, BEST_CHECKPOINT_DIR)

    resume, adopted = _resume_checkpoint(config.get("adopt"))
    if resume is not None:
        with resume.as_directory() as directory:
            weights = ckpt.load_weights(directory)
            state = ckpt.load_train_state(directory)
            # With a moving average the checkpoint's weights are the average; the trained ones are in its state.
            model.load_state_dict(state.get(TRAINED_WEIGHTS) or weights)
            if ema is not None:
                ema.module.load_state_dict(weights)
                ema.n_averaged.fill_(1)  # averaging goes on from the loaded average, not from a copy
            optimizer.load_state_dict(state["optimizer"])
            step, epoch, first_loss = int(state["step"]), int(state["epoch"]), state.get("first_loss")
            best_score = state.get("best_score")
            history = list(state.get("history") or [])
            epoch_done = bool(state.get("epoch_done"))
            if adopted:
                # Reported again, Ray registers it as its own: the run's latest checkpoint, even when
                # no step is left to train, and the unregistered folder can go (tidy_checkpoints).
                last = {**(history[-1] if history else {}), "step": step, "resumed_from_step": step}
                ray.train.report(last, checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None)
        epoch += epoch_done
        resumed_from = step
        if rank == 0:
            print(f"[affectray] resumed from checkpoint at step {step}, epoch {epoch}", flush=True)

    model = ray.train.torch.prepare_model(model) if world > 1 else model
    # The weights validation scores and checkpoints hold: the bare model's, or their moving average.
    kept = ckpt.unwrap(model) if ema is None else ema.module
    shard = ray.train.get_dataset_shard("train")

    def set_lr() -> float:
        factor = lr_factor(step, total_steps, optim_cfg.warmup_steps, optim_cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return optimizer.param_groups[0]["lr"]

    def report(metrics: dict[str, Any], checkpoint=None) -> None:
        row = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
        if history and history[-1].get("step") == row.get("step"):
            history[-1].update(row)  # the epoch-end evaluation of a step already reported
        else:
            history.append(row)
        ray.train.report(metrics, checkpoint=checkpoint)

    def save(metrics: dict[str, float], epoch_done: bool) -> None:
        nonlocal best_score
        score = task.score(metrics) if epoch_done and hasattr(task, "score") else None
        is_best = score is not None and (best_score is None or score > best_score)
        if is_best:
            best_score = score
        meta = {
            **task.checkpoint_meta(),
            "step": step,
            "epoch": epoch,
            "metrics": metrics,
            "git_revision": ckpt.git_revision(),
            **({"memory_format": CHANNELS_LAST} if train_cfg.channels_last else {}),
        }
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:  # one copy of the weights; every worker still reports
                state = {
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "epoch": epoch,
                    "epoch_done": epoch_done,
                    "first_loss": first_loss,
                    "best_score": best_score,
                    "history": history + [metrics],
                }
                if ema is not None:
                    state[TRAINED_WEIGHTS] = {k: v.detach().cpu() for k, v in ckpt.unwrap(model).state_dict().items()}
                ckpt.save_checkpoint(tmp, kept, meta, state)
                if is_best:
                    # A copy outside Ray's rotation (which keeps only the latest K), without
                    # the optimizer state: what evaluation and labeling take as it is.
                    ckpt.publish(tmp, best_uri)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            report(metrics, checkpoint=checkpoint)
            if rank == 0:
                storage.write_text(storage.join(run_cfg.storage, run_cfg.name, METRICS_FILE), history_csv(history))

    window = _Meter()
    last_metrics: dict[str, float] = {}
    saved_at = -1
    evaluates = bool(getattr(task, "evaluates", False))
    while epoch < train_cfg.epochs and step < total_steps:
        model.train()
        micro = 0
        epoch_started, epoch_first_step = time.perf_counter(), step
        optimizer.zero_grad(set_to_none=True)
        waited = time.perf_counter()
        for batch in task.batches(shard, epoch, device):
            fetched = time.perf_counter()
            _maybe_fail(run_cfg, step, rank)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, extra = task.loss(model, batch)
            (loss / optim_cfg.accumulation).backward()
            micro += 1
            window.add(float(loss.detach()), task.batch_size_of(batch) * world, fetched - waited)
            if micro % optim_cfg.accumulation:
                waited = time.perf_counter()
                continue
            lr = set_lr()
            if optim_cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(ckpt.unwrap(model))
            step += 1
            if first_loss is None:
                first_loss = window.losses[0]
            window.elapsed_until(time.perf_counter())
            if step % train_cfg.log_every == 0 or step % train_cfg.checkpoint_every == 0 or step >= total_steps:
                last_metrics = {
                    **window.summary(),
                    "lr": lr,
                    "step": step,
                    "epoch": epoch,
                    "first_loss": first_loss,
                    "resumed_from_step": resumed_from,
                    "worker_nodes": node_ids,
                    **extra,
                }
                window = _Meter()
                # The last step's checkpoint comes with the epoch's evaluation, just below.
                last = step >= total_steps
                if (step % train_cfg.checkpoint_every == 0 or last) and not (last and evaluates):
                    save(last_metrics, epoch_done=False)
                    saved_at = step
                else:
                    report(last_metrics)
            if step >= total_steps:
                break
            waited = time.perf_counter()
        # Every epoch ends with an evaluation (fine-tuning, on rank 0 with the bare
        # model: DDP's forward would wait for the other ranks) and a checkpoint, unless
        # one was just written for this very step. Every rank must take the same branch.
        trained = time.perf_counter()
        eval_metrics = task.evaluate(kept, device) if evaluates and rank == 0 else {}
        evaluated = time.perf_counter()
        if evaluates or saved_at != step:
            last_metrics = {**last_metrics, **eval_metrics, "step": step, "epoch": epoch}
            save(last_metrics, epoch_done=True)
            saved_at = step
        if rank == 0:  # where an epoch's time goes: the steps, the validation, the checkpoint
            logger.info(
                "epoch %d: %d steps in %.1f s, validation %.1f s, checkpoint %.1f s", epoch, step - epoch_first_step,
                trained - epoch_started, evaluated - trained, time.perf_counter() - evaluated,
            )  # fmt: skip
        epoch += 1


def _weight_average(model, decay: float):
    """A torch AveragedModel keeping the exponential moving average of ``model``'s weights, or None.

    Buffers are averaged too (batch-norm statistics), as timm's ModelEmaV2 does.
    """
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def history_csv(history: list[dict[str, Any]]) -> str:
    """Reported metrics as CSV text: one row per report, the union of keys as columns."""
    import csv
    import io

    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


class _Meter:
    """Loss, throughput and data-wait fraction over the steps since the last report."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.samples = 0
        self.data_wait = 0.0
        self.start = time.perf_counter()
        self.end = self.start

    def add(self, loss: float, samples: int, data_wait: float) -> None:
        self.losses.append(loss)
        self.samples += samples
        self.data_wait += data_wait

    def elapsed_until(self, now: float) -> None:
        self.end = now

    def summary(self) -> dict[str, float]:
        elapsed = max(self.end - self.start, 1e-9)
        return {
            "loss": sum(self.losses) / max(1, len(self.losses)),
            "samples_per_s": self.samples / elapsed,
            "data_wait_fraction": min(1.0, self.data_wait / elapsed),
        }


def _worker_node_ids(world: int) -> list[str]:
    """The Ray node id of every rank, gathered from all workers (rank order)."""
    import ray
    import torch.distributed as dist

    node_id = ray.get_runtime_context().get_node_id()
    if world == 1 or not dist.is_initialized():
        return [node_id]
    node_ids: list[str] = [""] * world
    dist.all_gather_object(node_ids, node_id)
    return node_ids


def _maybe_fail(run_cfg: RunConfig, step: int, rank: int) -> None:
    """Fault injection: the last worker raises once at the configured step.

    A marker object in the run's storage makes it once per run, across the
    restart that follows; the restarted workers resume from the checkpoint.
    """
    if run_cfg.fail_once_at_step is None or step != run_cfg.fail_once_at_step:
        return
    import ray.train

    if rank != ray.train.get_context().get_world_size() - 1:
        return
    marker = storage.join(run_cfg.storage, run_cfg.name, "_injected_failure")
    if storage.exists(marker):
        return
    storage.write_text(marker, f"failure injected at step {step}\n")
    raise RuntimeError(f"injected failure at step {step} (run.fail_once_at_step)")


def fit(
    task, optim_cfg: OptimConfig, train_cfg: TrainConfig, run_cfg: RunConfig, datasets: dict, total_steps: int,
    seed: int = 0, callbacks: list | None = None,
):  # fmt: skip
    """Run the loop on Ray Train; returns (ray.train.Result, the run's URI).

    ``callbacks``: Ray Train user callbacks, e.g. Tune's report callback when a sweep runs the loop.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    for dataset in datasets.values():
        # The feed runs in Ray Train's split coordinator: its progress bars would reach the
        # driver as escaped lines, every epoch. The loop logs loss, samples/s and data wait.
        dataset.context.enable_progress_bars = False
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = run_cfg.use_gpu == "yes" or (run_cfg.use_gpu == "auto" and gpus >= run_cfg.num_workers)
    check_channels_last(train_cfg, use_gpu)
    storage_fs, storage_path = storage.pyarrow_filesystem(run_cfg.storage)
    run_uri = storage.join(run_cfg.storage, run_cfg.name)
    newest = tidy_checkpoints(run_uri)
    if newest is not None and not newest.registered:
        logger.warning("resuming from %s (step %d): written whole, never registered by Ray", newest.uri, newest.step)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "task": task,
            "optim": optim_cfg,
            "train": train_cfg,
            "run": run_cfg,
            "total_steps": total_steps,
            "seed": seed,
            # A whole checkpoint Ray never registered (the run was killed in between): resume there.
            "adopt": newest if newest is not None and not newest.registered else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=run_cfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": run_cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=run_cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=run_cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train_cfg.keep_checkpoints),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    tidy_checkpoints(run_uri)  # an adopted folder is older than Ray's newest now: it goes
    return result, run_uri


# Ray Train's record of the checkpoints it registered, in the run's folder; its checkpoint
# folders are named checkpoint_<time>, beside it.
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
RAY_CHECKPOINT_PREFIX = "checkpoint_"


@dataclass(frozen=True)
class RunCheckpoint:
    """One checkpoint folder of a run: where, at which step, and whether Ray Train registered it."""

    uri: str
    step: int
    registered: bool


def tidy_checkpoints(run_uri: str) -> RunCheckpoint | None:
    """Remove the run's checkpoint folders Ray Train never registered, but the newest whole one; return the newest.

    A worker uploads a checkpoint folder, then the controller registers it: a run killed in
    between leaves a folder Ray neither resumes from nor ever deletes. Such a folder is kept
    (and returned, for the loop to resume from) when it is whole and newer than every
    registered one, and removed when it is incomplete or older. Registered folders are
    Ray's: never touched. Returns None for a run with no checkpoint (or a snapshot this
    code cannot read, which Ray then reports itself).
    """
    folders = _checkpoint_folders(run_uri)
    registered = _registered_folders(run_uri, folders)
    if registered is None:
        return None
    found = []
    for name in folders:
        uri = storage.join(run_uri, name)
        try:
            meta = ckpt.verify_checkpoint(uri, train_state=True)
            found.append(RunCheckpoint(uri, int(meta["step"]), name in registered))
        except (ckpt.CheckpointError, KeyError, TypeError, ValueError) as error:
            if name not in registered:
                logger.warning("removing incomplete checkpoint %s: %s", uri, error)
                storage.remove(uri, recursive=True)
    # The newest step wins; of two at one step, Ray's own.
    newest = max(found, key=lambda c: (c.step, c.registered), default=None)
    for stale in found:
        if not stale.registered and stale is not newest:
            logger.warning("removing %s: step %d, never registered by Ray, not the newest", stale.uri, stale.step)
            storage.remove(stale.uri, recursive=True)
    return newest


def _checkpoint_folders(run_uri: str) -> list[str]:
    if not storage.exists(run_uri):
        return []
    fs, path = storage.get_filesystem(run_uri)
    fs.invalidate_cache(path)  # s3fs caches listings: the workers wrote since
    names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=True) if e["type"] == "directory")
    return sorted(n for n in names if n.startswith(RAY_CHECKPOINT_PREFIX))


def _registered_folders(run_uri: str, folders: list[str]) -> set[str] | None:
    """The folders Ray Train's snapshot names (every string in it is looked at: its layout is Ray's)."""
    snapshot = storage.join(run_uri, RAY_SNAPSHOT_FILE)
    if not storage.exists(snapshot):
        return set()
    try:
        record = json.loads(storage.read_text(snapshot))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    strings: set[str] = set()
    pending = [record]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, str):
            strings.add(node.rstrip("/").rsplit("/", 1)[-1])
    return strings & set(folders)


def _resume_checkpoint(adopt: RunCheckpoint | None) -> tuple[Any, bool]:
    """(checkpoint, adopted): Ray's latest registered one, or ``adopt`` where that is newer.

    ``adopt`` is the run's newest whole checkpoint when Ray never registered it
    (tidy_checkpoints); after a worker failure it still competes with what this run
    registered since, by the step in their meta.json.
    """
    import ray.train

    registered = ray.train.get_checkpoint()
    if adopt is None or (registered is not None and _step_of(registered) >= adopt.step):
        return registered, False
    fs, path = storage.pyarrow_filesystem(adopt.uri)
    return ray.train.Checkpoint(path=path, filesystem=fs), True


def _step_of(checkpoint) -> int:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{ckpt.META_FILE}") as f:
        return int(json.loads(f.read())["step"])


def checkpoint_uri(run_storage: str, checkpoint) -> str | None:
    """The URI of a Ray Train checkpoint, in the same scheme as the run's storage."""
    if checkpoint is None:
        return None
    if storage.is_remote(run_storage):
        return "s3://" + checkpoint.path.lstrip("/")
    return checkpoint.path


__all__ = [
    "BEST_CHECKPOINT_DIR",
    "METRICS_FILE",
    "OptimConfig",
    "RunCheckpoint",
    "RunConfig",
    "Task",
    "TrainConfig",
    "checkpoint_uri",
    "fit",
    "history_csv",
    "lr_factor",
    "param_groups",
    "planned_steps",
    "tidy_checkpoints",
    "train_loop_per_worker",
]
