"""Config loading: YAML + dotted overrides into nested dataclasses, and every error a user can cause."""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from affectray import config
from affectray.config import (
    ConfigError,
    add_config_arguments,
    config_from_args,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
    print_config,
    save_config,
    update_config,
)


@dataclass
class DataCfg:
    root: str  # required
    splits: tuple[str, ...] = ("train", "val")
    image_size: int = 64
    max_videos: int | None = None


@dataclass
class ModelCfg:
    name: Literal["vit", "resnet"] = "vit"
    depths: list[int] = field(default_factory=lambda: [1, 1])
    drop_path: float = 0.1
    head: str | None = None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainCfg:
    lr: float = 1e-3
    epochs: int = 2
    amp: bool = True
    window: tuple[int, int] = (8, 2)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class JobCfg:
    data: DataCfg
    model: ModelCfg = field(default_factory=ModelCfg)
    train: TrainCfg = field(default_factory=lambda: TrainCfg(epochs=5))
    seed: int = 0


YAML = """
data:
  root: /tmp/shards
  image_size: 32
model:
  name: resnet
  depths: [2, 2, 6]
train:
  lr: 3e-4
"""


@pytest.fixture
def yaml_path(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(YAML)
    return str(path)


def test_load_yaml_fills_nested_dataclasses_and_keeps_defaults(yaml_path):
    cfg = load_config(JobCfg, yaml_path)
    assert isinstance(cfg.data, DataCfg) and isinstance(cfg.train, TrainCfg)
    assert cfg.data.root == "/tmp/shards"
    assert cfg.data.image_size == 32
    assert cfg.data.splits == ("train", "val")
    assert cfg.model.name == "resnet" and cfg.model.depths == [2, 2, 6]
    # "3e-4" is a float (YAML 1.2), not the string PyYAML's 1.1 rules give.
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    # A partial section keeps the field's default_factory values, not just the class defaults.
    assert cfg.train.epochs == 5
    assert cfg.seed == 0


def test_overrides_parse_values_as_yaml(yaml_path):
    cfg = load_config(
        JobCfg,
        yaml_path,
        [
            "train.lr=1e-4",
            "train.epochs=7",
            "train.amp=false",
            "train.window=[16, 4]",
            "data.root=s3://bucket/shards",
            "data.splits=[test]",
            "data.max_videos=10",
            "model.depths=[2,2]",
            "model.head=linear",
            "model.extra={smoothing: 0.1, mixup: 1}",
            "seed=3",
        ],
    )
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.epochs == 7
    assert cfg.train.amp is False
    assert cfg.train.window == (16, 4)
    assert cfg.data.root == "s3://bucket/shards"
    assert cfg.data.splits == ("test",)
    assert cfg.data.max_videos == 10
    assert cfg.model.depths == [2, 2]
    assert cfg.model.head == "linear"
    assert cfg.model.extra == {"smoothing": 0.1, "mixup": 1.0}
    assert isinstance(cfg.model.extra["mixup"], float)
    assert cfg.seed == 3
    assert cfg.data.image_size == 32  # untouched keys keep the file's values


def test_overrides_apply_in_order_and_null_clears_optional(yaml_path):
    cfg = load_config(JobCfg, yaml_path, ["seed=1", "seed=2", "data.max_videos=5", "data.max_videos=null"])
    assert cfg.seed == 2
    assert cfg.data.max_videos is None


def test_no_file_builds_from_defaults_and_overrides():
    cfg = load_config(JobCfg, None, ["data.root=/x"])
    assert cfg.data.root == "/x"
    assert cfg.train == TrainCfg(epochs=5)


def test_int_is_accepted_where_float_is_declared():
    cfg = load_config(JobCfg, None, ["data.root=/x", "train.lr=1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_empty_yaml_file_means_all_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    cfg = load_config(JobCfg, str(path), ["data.root=/d"])
    assert cfg.model == ModelCfg()


def test_file_uri_goes_through_storage(yaml_path):
    cfg = load_config(JobCfg, "file://" + yaml_path)
    assert cfg.data.root == "/tmp/shards"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=abc", "train.lr: expected float, got 'abc' (str)"),
        ("train.lr=true", "train.lr: expected float, got True (bool)"),
        ("train.epochs=2.5", "train.epochs: expected int, got 2.5 (float)"),
        ("train.epochs=true", "train.epochs: expected int, got True (bool)"),
        ("train.amp=1", "train.amp: expected bool, got 1 (int)"),
        ("train.window=[1, 2, 3]", "train.window: expected 2 values"),
        ("train.window=[1, x]", "train.window[1]: expected int, got 'x' (str)"),
        ("model.depths=[2, two]", "model.depths[1]: expected int, got 'two' (str)"),
        ("model.depths=3", "model.depths: expected list[int], got 3 (int)"),
        ("model.name=vgg", "model.name: expected one of 'vit', 'resnet', got 'vgg' (str)"),
        ("model.head=3", "model.head: expected str, got 3 (int)"),
        ("model.extra={a: b}", "model.extra.a: expected float, got 'b' (str)"),
        ("model.extra=[1]", "model.extra: expected dict[str, float]"),
        ("data.max_videos=many", "data.max_videos: expected int, got 'many' (str)"),
        ("data.root=null", "data.root: expected str, got None (NoneType)"),
        ("model=3", "model: expected a section (ModelCfg fields), got 3 (int)"),
    ],
)
def test_wrong_types_name_the_dotted_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(JobCfg, None, ["data.root=/x", override])
    assert message in str(info.value)


def test_str_field_given_a_number_suggests_quoting():
    with pytest.raises(ConfigError, match=r"data\.root: expected str, got 2024 \(int\); quote it"):
        load_config(JobCfg, None, ["data.root=2024"])
    assert load_config(JobCfg, None, ["data.root='2024'"]).data.root == "2024"


def test_unknown_key_suggests_close_match(yaml_path):
    with pytest.raises(ConfigError) as info:
        load_config(JobCfg, yaml_path, ["train.lrr=0.1"])
    assert "unknown key: train.lrr" in str(info.value)
    assert "did you mean train.lr?" in str(info.value)


def test_unknown_key_in_yaml_and_unknown_section(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  root: /x\n  imagesize: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key: data\.imagesize; did you mean data\.image_size\?"):
        load_config(JobCfg, str(path))
    with pytest.raises(ConfigError, match=r"unknown key: optim\b"):
        load_config(JobCfg, None, ["data.root=/x", "optim.lr=0.1"])


def test_missing_required_value_names_the_leaf():
    with pytest.raises(ConfigError, match=r"^missing required value: data\.root$"):
        load_config(JobCfg)
    with pytest.raises(ConfigError, match=r"^missing required value: data\.root$"):
        load_config(JobCfg, None, ["data.image_size=8"])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match=r"override 'train\.lr' has no '='"):
        load_config(JobCfg, None, ["train.lr"])
    with pytest.raises(ConfigError, match="not a dotted key"):
        parse_override("train..lr=1")


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match=r"cannot set seed\.x: seed is 0, not a section"):
        load_config(JobCfg, None, ["data.root=/x", "seed=0", "seed.x=1"])


def test_post_init_value_error_becomes_config_error_naming_section():
    with pytest.raises(ConfigError, match=r"invalid train: lr must be positive, got -1\.0"):
        load_config(JobCfg, None, ["data.root=/x", "train.lr=-1"])


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(JobCfg, str(missing))
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config(JobCfg, str(broken))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml must hold a mapping"):
        load_config(JobCfg, str(listy))


def test_postponed_annotations_are_resolved():
    # This module uses `from __future__ import annotations`: field types are strings
    # until get_type_hints resolves them, so "2" must still be rejected for an int.
    with pytest.raises(ConfigError, match="expected int"):
        config_from_dict(JobCfg, {"data": {"root": "/x", "image_size": "2"}})


def test_dump_and_load_round_trip(tmp_path, yaml_path):
    cfg = load_config(JobCfg, yaml_path, ["model.extra={a: 0.5}", "data.max_videos=3"])
    plain = config_to_dict(cfg)
    assert plain["data"]["splits"] == ["train", "val"]  # tuples become YAML lists
    assert yaml.safe_load(dump_config(cfg)) == plain
    path = tmp_path / "sub" / "resolved.yaml"
    save_config(cfg, path)
    assert load_config(JobCfg, str(path)) == cfg


def test_save_config_to_file_uri(tmp_path):
    cfg = load_config(JobCfg, None, ["data.root=/r"])
    uri = "file://" + str(tmp_path / "cfg.yaml")
    save_config(cfg, uri)
    assert load_config(JobCfg, uri) == cfg


def test_update_config_validates_and_does_not_mutate():
    cfg = load_config(JobCfg, None, ["data.root=/r"])
    new = update_config(cfg, {"train.lr": 0.01, "model.depths": [3]})
    assert new.train.lr == 0.01 and new.model.depths == [3]
    assert cfg.train.lr == 1e-3 and cfg.model.depths == [1, 1]
    with pytest.raises(ConfigError, match="train.epochs: expected int"):
        update_config(cfg, {"train.epochs": "ten"})


def test_cli_arguments(yaml_path):
    parser = add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--config", yaml_path, "--set", "train.lr=0.5", "--set", "seed=9"])
    cfg = config_from_args(JobCfg, args)
    assert cfg.train.lr == 0.5 and cfg.seed == 9 and cfg.data.root == "/tmp/shards"
    help_text = parser.format_help()
    assert "--config PATH" in help_text and "--set KEY=VALUE" in help_text
    no_sets = parser.parse_args(["--config", yaml_path])
    assert config_from_args(JobCfg, no_sets).train.lr == pytest.approx(3e-4)


def test_print_config_writes_header_then_yaml(capsys, yaml_path):
    cfg = load_config(JobCfg, yaml_path)
    print_config(cfg)
    out = capsys.readouterr().out
    header, body = out.split("\n", 1)
    assert header == "resolved config:"
    assert yaml.safe_load(body) == config_to_dict(cfg)
    buffer = io.StringIO()
    print_config(cfg, file=buffer)
    assert buffer.getvalue() == out


def test_s3_config_round_trip_and_missing_key(s3_bucket):
    cfg = load_config(JobCfg, None, ["data.root=s3://b/x", "train.lr=2e-4"])
    uri = f"{s3_bucket}/configs/job.yaml"
    save_config(cfg, uri)
    assert load_config(JobCfg, uri) == cfg
    with pytest.raises(ConfigError, match=r"cannot read config file .*configs/missing\.yaml"):
        load_config(JobCfg, f"{s3_bucket}/configs/missing.yaml")


def test_yaml_yes_and_no_reach_a_string_choice_as_words():
    """`--set run.use_gpu=yes`: YAML 1.1 reads yes as true; a Literal of words takes it back."""

    @dataclass
    class Gpu:
        use_gpu: Literal["auto", "yes", "no"] = "auto"

    assert config_from_dict(Gpu, {}, ["use_gpu=yes"]).use_gpu == "yes"
    assert config_from_dict(Gpu, {"use_gpu": False}).use_gpu == "no"
    with pytest.raises(ConfigError, match="use_gpu"):
        config_from_dict(Gpu, {"use_gpu": 1})


# --------------------------------------------------------------------------- locations


@dataclasses.dataclass
class _Run:
    storage: str = config.location("runs")
    name: str = "run"


@dataclasses.dataclass
class _Job:
    base: str = config.location("", shipped=True)
    data: str = config.location("")
    inputs: list[str] = config.location(default_factory=list)
    run: _Run = dataclasses.field(default_factory=_Run)


def test_locations_become_absolute_on_the_driver_and_uris_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.resolve_locations(
        _Job(base="jobs/x.yaml", data="s3://bucket/shards", inputs=["a.mp4", "builtin:fer", "file:///v.mp4"])
    )
    assert cfg.base == str(tmp_path / "jobs" / "x.yaml")
    assert cfg.data == "s3://bucket/shards"
    assert cfg.inputs == [str(tmp_path / "a.mp4"), "builtin:fer", "file:///v.mp4"]
    assert cfg.run.storage == str(tmp_path / "runs") and cfg.run.name == "run"
    assert config.resolve_location("~/x") == os.path.expanduser("~/x")
    assert config.resolve_location("") == ""


def test_in_a_ray_job_package_data_and_outputs_go_under_affectray_home(tmp_path, monkeypatch):
    """`ray job submit --working-dir .` runs the driver in a temporary copy that Ray deletes."""
    package = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc123"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)
    monkeypatch.setenv(config.JOB_HOME_ENV, str(tmp_path / "home"))
    assert config.in_ray_job_package()
    cfg = config.resolve_locations(_Job(base="jobs/x.yaml", data="demo-output/shards"))
    assert cfg.base == str(package / "jobs" / "x.yaml")  # shipped with the job: read from the package
    assert cfg.data == str(tmp_path / "home" / "demo-output" / "shards")
    assert cfg.run.storage == str(tmp_path / "home" / "runs")
    monkeypatch.delenv(config.JOB_HOME_ENV)
    assert config.job_home() == Path("~/affectray").expanduser()


def test_config_from_args_resolves_locations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = config.add_config_arguments(argparse.ArgumentParser())
    cfg = config.config_from_args(_Job, parser.parse_args(["--set", "data=shards", "--set", "run.storage=s3://b/r"]))
    assert cfg.data == str(tmp_path / "shards") and cfg.run.storage == "s3://b/r"
