"""Sweeps: Optuna + ASHA over the finetune loop, errored trials reported, best config trains,
and a sweep whose driver is killed resumes to exactly num_samples trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tests.conftest import REPO_ROOT

from affectray import storage
from affectray.config import ConfigError, load_config
from affectray.sample.shards import ensure_sample_shards
from affectray.train.finetune import FinetuneConfig, run_finetune
from affectray.tune import TuneConfig, run_tune, search_space

pytestmark = pytest.mark.slow

SIZE = 32


@pytest.fixture(scope="module")
def shards(ray_session, tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("tune") / "shards")
    ensure_sample_shards(root, image_size=SIZE)
    return root


def write_sweep(tmp_path: Path, shards: str, name: str, space: dict, num_samples: int, **search) -> Path:
    """A sweep YAML over the finetune smoke config, shrunk to seconds per trial."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": str(REPO_ROOT / "jobs" / "configs" / "finetune-smoke.yaml"),
                "overrides": [
                    f"data.root={shards}",
                    f"data.image_size={SIZE}",
                    f"run.storage={tmp_path / 'unused-runs'}",
                    "train.epochs=2",
                    "train.max_steps=6",
                ],
                "space": space,
                "search": {
                    "name": name,
                    "storage": str(tmp_path / "sweeps"),
                    "num_samples": num_samples,
                    "max_concurrent_trials": 2,
                    "seed": 3,
                    **search,
                },
            }  # fmt: skip
        )
    )
    return path


def test_space_mistakes_are_named():
    with pytest.raises(ConfigError, match="space.optim.lr"):
        search_space({"optim.lr": {"loguniform": [0.0, 1.0]}})
    with pytest.raises(ConfigError, match="space.optim.lr"):
        search_space({"optim.lr": {"gaussian": [0.0, 1.0]}})
    with pytest.raises(ConfigError, match="choice"):
        search_space({"model.backbone": {"choice": []}})
    domains = search_space({"train.batch_size": {"int": [16, 17]}})
    assert {domains["train.batch_size"].sample() for _ in range(50)} == {16, 17}  # both ends included


def test_sweep_reports_errored_trials_and_its_best_config_trains(shards, tmp_path):
    space = {
        "optim.lr": {"loguniform": [1.0e-3, 1.0e-2]},
        # One backbone does not exist: those trials raise, and the sweep must go on.
        "model.backbone": {"choice": ["test_resnet", "no_such_backbone"]},
    }
    config = load_config(TuneConfig, write_sweep(tmp_path, shards, "sweep", space, num_samples=4))
    summary = run_tune(config)
    assert summary["trials"] == 4
    assert summary["errored"] >= 1 and summary["finished"] >= 1
    assert summary["errored"] + summary["finished"] == 4
    assert all("no_such_backbone" in e for e in summary["errors"])
    assert summary["best_params"]["model.backbone"] == "test_resnet"
    assert 0.0 <= summary["best_metric"] <= 1.0
    table = storage.read_text(summary["results_csv"]).splitlines()
    assert len(table) == 1 + 4 and "best_val_f1_macro" in table[0]  # errored trials listed too
    assert sum(",errored," in row for row in table[1:]) == summary["errored"]
    assert storage.read_bytes(summary["trials_png"])[:4] == b"\x89PNG"
    assert storage.exists(summary["best_checkpoint"] + "/meta.json")
    # The best config is a finetune config as it is: it loads and trains.
    best = load_config(FinetuneConfig, summary["best_config"], [f"run.storage={tmp_path / 'runs'}", "run.name=best"])
    assert best.optim.lr == pytest.approx(summary["best_params"]["optim.lr"])
    trained = run_finetune(best)
    assert trained["steps"] == 6 and trained["num_classes"] == 8


def _terminated_trials(sweep_dir: Path) -> int:
    """Trials the experiment state on disk records as finished."""
    count = 0
    for state in sweep_dir.glob("experiment_state-*.json"):
        try:
            data = json.loads(state.read_text())
        except (json.JSONDecodeError, OSError):
            continue  # being rewritten
        # Each trial is a list whose first item is the trial's own JSON document.
        statuses = [json.loads(trial[0]).get("status") for trial in data.get("trial_data", [])]
        count = max(count, statuses.count("TERMINATED"))
    return count


def test_a_killed_sweep_resumes_to_exactly_num_samples(shards, tmp_path):
    space = {"optim.lr": {"loguniform": [1.0e-3, 1.0e-2]}}
    path = write_sweep(tmp_path, shards, "killed", space, num_samples=3, max_concurrent_trials=1)
    sweep_dir = tmp_path / "sweeps" / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "platform"), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    # Its own Ray: killing the whole process group takes the driver and that Ray down together.
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "jobs" / "tune.py"), "--config", str(path)],
        cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while _terminated_trials(sweep_dir) < 1:
            assert driver.poll() is None, f"the sweep ended before it could be killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no trial finished within 10 minutes"
            time.sleep(2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finished_before = _terminated_trials(sweep_dir)
    assert 1 <= finished_before < 3
    summary = run_tune(load_config(TuneConfig, path), resume=True)
    assert summary["trials"] == 3 and summary["finished"] == 3 and summary["errored"] == 0
    table = storage.read_text(summary["results_csv"]).splitlines()
    ids = [row.split(",")[0] for row in table[1:]]
    assert len(ids) == len(set(ids)) == 3  # no trial counted twice
    # Starting it again without --resume is refused instead of silently mixing two sweeps.
    from affectray.errors import JobError

    with pytest.raises(JobError, match="--resume"):
        run_tune(load_config(TuneConfig, path))
