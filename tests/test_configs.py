"""Every shipped YAML under jobs/configs/ loads into its job's config, as the job loads it.

The job is the file name's prefix (``finetune-smoke.yaml`` → finetune); a tune config's
``base`` is loaded as the finetune config it sweeps. Every config file a YAML names, in
its keys or its comments, must exist (torchtune's and litgpt's config tests, in spirit).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from tests.conftest import REPO_ROOT

from affectray.config import config_from_dict, config_to_dict, load_config
from affectray.ingest.job import IngestConfig
from affectray.label.job import LabelConfig
from affectray.runtime import job_config
from affectray.train.finetune import FinetuneConfig
from affectray.train.pretrain import PretrainConfig
from affectray.tune import TuneConfig

CONFIGS = REPO_ROOT / "jobs" / "configs"
JOBS = {
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "tune": TuneConfig,
    "ingest": IngestConfig,
    "label": LabelConfig,
}
SHIPPED = sorted(CONFIGS.glob("*.yaml"))
# Cluster manifests name job configs too (a RayJob's entrypoint).
MANIFESTS = sorted((REPO_ROOT / "cluster").rglob("*.yaml"))

# A YAML file named in text: `jobs/configs/x.yaml`, `/home/ray/affectray/jobs/configs/x.yaml`,
# `cluster/aws/affectray.yaml` or a bare `x.yaml`; not `s3://…` or `~/…`.
_NAMED_YAML = re.compile(r"(?<![\w.~:/-])(/?(?:[\w.-]+/)*[\w.-]+\.yaml)\b")


def _job_of(path: Path) -> str:
    for job in JOBS:
        if path.name.startswith(f"{job}-"):
            return job
    pytest.fail(f"{path.name}: no job of this name; name a config <job>-<what>.yaml, job one of {', '.join(JOBS)}")


def test_there_is_a_config_for_every_job():
    assert {_job_of(path) for path in SHIPPED} == set(JOBS)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_as_its_job_loads_it(path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # relative paths resolve as they do for a user in the repo root
    cls = JOBS[_job_of(path)]
    config = job_config(cls, argparse.Namespace(config=str(path), overrides=None))
    assert isinstance(config, cls)
    # What the job prints as its resolved config loads back to the same config.
    assert config_from_dict(cls, config_to_dict(config)) == config
    if isinstance(config, TuneConfig):
        assert Path(config.base).is_file(), f"{path.name}: base {config.base} does not exist"
        assert isinstance(load_config(FinetuneConfig, config.base, config.overrides), FinetuneConfig)


def _named_configs(path: Path) -> list[tuple[str, Path]]:
    """(name, the file it means) for every YAML file ``path`` names, comments included."""
    named = []
    for name in _NAMED_YAML.findall(path.read_text(encoding="utf-8")):
        if "jobs/configs/" in name:  # also an image's copy of the repo: /home/ray/affectray/jobs/configs/…
            named.append((name, CONFIGS / name.rsplit("jobs/configs/", 1)[1]))
        elif "/" not in name:  # a bare name is a sibling
            named.append((name, path.parent / name))
        elif not name.startswith("/"):
            named.append((name, REPO_ROOT / name))
    return named


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_yaml_files_a_config_names_exist(path):
    for name, target in _named_configs(path):
        assert target.is_file(), f"{path.name} names {name}, which does not exist"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_job_configs_a_cluster_manifest_names_exist(path):
    for name, target in _named_configs(path):
        if target.parent == CONFIGS:
            assert target.is_file(), f"{path.relative_to(REPO_ROOT)} names {name}, which does not exist"
