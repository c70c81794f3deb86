"""Pretrain a video masked autoencoder (VideoMAE or MAE-DFER) on segment shards.

    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain-smoke.yaml
    affectray pretrain --config jobs/configs/pretrain-smoke.yaml --set train.max_steps=20

Ray Data streams clips (T frames at a stride, sampled inside segments, decoded
and augmented in CPU tasks) into Ray Train workers through streaming_split;
the shared loop (train/loop.py) trains with DDP, checkpoints into the run's
storage and resumes from the latest checkpoint after a failure or on re-run.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from affectray.config import config_to_dict
from affectray.data import shards
from affectray.data.loaders import DataConfig, build_dataset, iter_train_batches, preprocessing_of
from affectray.runtime import add_config_job_arguments, run_config_job
from affectray.train.loop import OptimConfig, RunConfig, TrainConfig, checkpoint_uri, fit, planned_steps


def _pretrain_data() -> DataConfig:
    return DataConfig(mode="clip", label="none", num_frames=16, frame_stride=4, image_size=224)


@dataclass
class PretrainModelConfig:
    name: Literal["videomae", "mae_dfer"] = "videomae"
    size: str = "base"  # tiny | small | base
    # Any other field of the model's config (mask_ratio, motion_weight, depth, ...). The
    # clip geometry (img_size, num_frames) always comes from the data section.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=_pretrain_data)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="pretrain"))
    # Smoke configs: when data.root holds no shards, build the sample corpus there first.
    sample_corpus_if_empty: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        clash = {"img_size", "num_frames"} & set(self.model.overrides)
        if clash:
            raise ValueError(f"set {sorted(clash)} through data.image_size / data.num_frames, not model.overrides")
        if self.data.mode != "clip":
            raise ValueError("pretraining reads clips: data.mode must be 'clip'")


class MAETask:
    """The pretraining task for the shared loop: masked reconstruction of clips."""

    def __init__(self, config: PretrainConfig, manifest: dict[str, Any] | None = None):
        self.config = config
        self.manifest = manifest or {}

    def model_kwargs(self) -> dict[str, Any]:
        data = self.config.data
        return {**self.config.model.overrides, "img_size": data.image_size, "num_frames": data.num_frames}

    def build_model(self):
        from affectray.models.video_classifier import build_pretrain_model

        return build_pretrain_model(self.config.model.name, self.config.model.size, **self.model_kwargs())

    def batches(self, shard, epoch: int, device):

        return iter_train_batches(shard, self.config.data, self.config.train.batch_size, epoch, device)

    def loss(self, model, batch):
        videos, _ = batch  # [B, C, T, H, W]
        loss, _, _ = model(videos)
        return loss, {}

    def batch_size_of(self, batch) -> int:
        return int(batch[0].shape[0])

    def evaluate(self, model, device) -> dict[str, float]:
        return {}

    def checkpoint_meta(self) -> dict[str, Any]:

        data = self.config.data
        return {
            "kind": "pretrain",
            "model": {"family": self.config.model.name, "size": self.config.model.size, "kwargs": self.model_kwargs()},
            "preprocessing": preprocessing_of(data).to_dict(),
            "config": config_to_dict(self.config),
            "data_manifest": {k: self.manifest.get(k) for k in ("dataset", "source", "counts", "image_size")},
        }


def run_pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Pretrain on Ray Train; returns the job summary (steps, first/last loss, checkpoint URI)."""
    from affectray.sample.shards import ensure_sample_shards

    start = time.perf_counter()
    if config.sample_corpus_if_empty:
        ensure_sample_shards(config.data.root, image_size=config.data.image_size, seed=config.seed)
    manifest = shards.read_manifest(config.data.root)
    steps = planned_steps(config.data, config.optim, config.train, config.run)
    task = MAETask(config, manifest)
    result, run_uri = fit(
        task,
        config.optim,
        config.train,
        config.run,
        datasets={"train": build_dataset(config.data, train=True)},
        total_steps=steps,
        seed=config.seed,
    )
    metrics = result.metrics or {}
    return {
        "job": "pretrain",
        "model": f"{config.model.name}-{config.model.size}",
        "steps": int(metrics.get("step", 0)),
        "planned_steps": steps,
        "first_loss": metrics.get("first_loss"),
        "last_loss": metrics.get("loss"),
        "resumed_from_step": metrics.get("resumed_from_step", 0),
        "samples_per_s": metrics.get("samples_per_s"),
        "data_wait_fraction": metrics.get("data_wait_fraction"),
        "nodes": sorted(set(metrics.get("worker_nodes") or [])),  # Ray nodes that ran the train workers
        "checkpoint": checkpoint_uri(config.run.storage, result.checkpoint),
        "run": run_uri,
        "seconds": round(time.perf_counter() - start, 1),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:

    add_config_job_arguments(parser)


def main(args: argparse.Namespace) -> dict[str, Any]:

    return run_config_job(PretrainConfig, args, run_pretrain)


__all__ = ["MAETask", "PretrainConfig", "PretrainModelConfig", "run_pretrain"]
