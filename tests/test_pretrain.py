"""Pretraining end to end on a real local Ray: Ray Data clips → Ray Train → checkpoints in S3."""

from __future__ import annotations

import pytest
from tests.conftest import REPO_ROOT

from affectray import checkpoints as ckpt
from affectray import storage
from affectray.config import load_config
from affectray.sample.shards import ensure_sample_shards
from affectray.train.pretrain import PretrainConfig, run_pretrain

pytestmark = pytest.mark.slow

SMOKE = REPO_ROOT / "jobs" / "configs" / "pretrain-smoke.yaml"


@pytest.fixture(scope="module")
def sample_shards_s3(ray_session, s3_server, tmp_path_factory):
    """The sample corpus ingested once into a bucket on the moto server."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="pretrain-data")
    root = "s3://pretrain-data/sample"
    assert ensure_sample_shards(root, image_size=32)
    assert not ensure_sample_shards(root, image_size=32), "a second call finds the shards and does nothing"
    return root


def test_videomae_survives_a_worker_failure_and_checkpoints_to_s3(sample_shards_s3):
    config = load_config(
        PretrainConfig,
        SMOKE,
        [
            f"data.root={sample_shards_s3}",
            "run.storage=s3://pretrain-data/runs",
            "run.name=videomae-fail",
            "train.max_steps=12",
            "train.epochs=20",
            "train.checkpoint_every=4",
            "run.fail_once_at_step=6",
            "run.max_failures=1",
        ],
    )
    summary = run_pretrain(config)
    # The failure at step 6 came after the step-4 checkpoint: the run resumed there, not at 0.
    assert summary["steps"] == 12
    assert summary["resumed_from_step"] == 4
    assert storage.exists("s3://pretrain-data/runs/videomae-fail/_injected_failure")
    assert summary["last_loss"] < summary["first_loss"]
    uri = summary["checkpoint"]
    assert uri.startswith("s3://pretrain-data/runs/videomae-fail/")
    with ckpt.open_checkpoint(uri) as directory:
        meta = ckpt.read_meta(directory)
        state = ckpt.load_train_state(directory)
        weights = ckpt.load_weights(directory)
    assert meta["kind"] == "pretrain" and meta["step"] == 12
    assert meta["model"]["family"] == "videomae" and meta["preprocessing"]["num_frames"] == 4
    assert state["step"] == 12 and "optimizer" in state
    assert any(k.startswith("encoder.") for k in weights)

    # The same command again finds the finished run and continues from its checkpoint.
    again = run_pretrain(
        load_config(
            PretrainConfig,
            SMOKE,
            [
                f"data.root={sample_shards_s3}",
                "run.storage=s3://pretrain-data/runs",
                "run.name=videomae-fail",
                "train.max_steps=14",
                "train.epochs=20",
                "train.checkpoint_every=4",
            ],
        )
    )
    assert again["resumed_from_step"] == 12 and again["steps"] == 14


def test_mae_dfer_trains(ray_session, tmp_path):
    root = str(tmp_path / "shards")
    config = load_config(
        PretrainConfig,
        SMOKE,
        [
            f"data.root={root}",
            f"run.storage={tmp_path / 'runs'}",
            "run.name=maedfer",
            "model.name=mae_dfer",
            "train.max_steps=10",
            "train.epochs=20",
            "train.checkpoint_every=5",
            "model.overrides={motion_weight: 0.5}",
        ],
    )
    summary = run_pretrain(config)
    assert summary["steps"] == 10 and summary["last_loss"] < summary["first_loss"]
    with ckpt.open_checkpoint(summary["checkpoint"]) as directory:
        meta = ckpt.read_meta(directory)
    assert meta["model"]["family"] == "mae_dfer" and meta["model"]["kwargs"]["motion_weight"] == 0.5
