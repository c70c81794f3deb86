"""Sweeps: Optuna + ASHA over the finetune loop, errored trials reported, best config trains,
a second start without --resume refused. (A sweep whose driver is killed resumes to exactly
num_samples trials: tests/test_readme_commands.py, with the README's tune commands.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tests.conftest import REPO_ROOT, SAMPLE_SHARDS_SIZE

from affectray import storage
from affectray.config import ConfigError, load_config
from affectray.errors import JobError
from affectray.train.finetune import FinetuneConfig, run_finetune
from affectray.tune import TuneConfig, run_tune, search_space

pytestmark = pytest.mark.slow

SIZE = SAMPLE_SHARDS_SIZE  # the shared sample shards


@pytest.fixture(scope="module")
def shards(sample_shards) -> str:
    return sample_shards


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
    # Starting it again without --resume is refused instead of silently mixing two sweeps.
    # (A sweep killed midway and resumed: test_readme_commands, with the README's own commands.)
    with pytest.raises(JobError, match="--resume"):
        run_tune(config)
