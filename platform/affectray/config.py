"""Job configs: nested dataclasses filled from a YAML file and dotted overrides.

A job declares its config as dataclasses with defaults (nanoGPT style), a YAML
file documents one concrete run, and the command line changes single values::

    cfg = load_config(FinetuneConfig, "jobs/configs/finetune-smoke.yaml",
                      ["train.lr=1e-4", "model.depths=[2,2]"])

Values are checked against the annotations (resolved with ``get_type_hints``,
so modules may use ``from __future__ import annotations``). Every mistake a
user can make raises :class:`ConfigError` naming the full dotted key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import os
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TextIO, TypeVar, Union

import yaml

from affectray.errors import AffectrayError

__all__ = [
    "ConfigError",
    "FieldError",
    "add_config_arguments",
    "at_least",
    "check_fields",
    "config_from_args",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_override",
    "positive",
    "print_config",
    "save_config",
    "update_config",
    "location",
    "resolve_location",
    "resolve_locations",
]

T = TypeVar("T")


_YAML_BOOL_WORDS = {True: ("yes", "true", "on", "y"), False: ("no", "false", "off", "n")}


class ConfigError(AffectrayError, ValueError):
    """A config that does not fit its dataclasses: unknown key, wrong type, missing value."""


class FieldError(ConfigError):
    """A value of the right type that cannot work (``checkpoint_every: 0``), raised by a section's ``__post_init__``.

    It names the field within its section; the loader names it by its full dotted key
    (``train.checkpoint_every=0: must be at least 1``).
    """

    def __init__(self, name: str, value: Any, why: str):
        super().__init__(f"{name}={value!r}: {why}")
        self.name, self.value, self.why = name, value, why

    def under(self, prefix: str) -> FieldError:
        return FieldError(_join(prefix, self.name), self.value, self.why)


def check_fields(section: Any, rules: Mapping[str, tuple[Any, str]]) -> None:
    """Raise FieldError for the first field of ``section`` that fails its rule: {name: (test, why)}."""
    for name, (test, why) in rules.items():
        value = getattr(section, name)
        if not test(value):
            raise FieldError(name, value, why)


def at_least(low: float) -> Any:
    """A check_fields test: the value (None passes: left unset) is at least ``low``."""
    return lambda value: value is None or value >= low


def positive(value: float | None) -> bool:
    """A check_fields test: the value (None passes: left unset) is above zero."""
    return value is None or value > 0


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot, so ``lr: 1e-4`` would
    arrive as the string '1e-4'. YAML 1.2 (and every human) reads it as a number.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


# ---------------------------------------------------------------------------
# Reading: YAML + overrides -> dict -> dataclasses
# ---------------------------------------------------------------------------


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a ``cls`` instance from an optional YAML file plus ``KEY=VALUE`` overrides.

    Args:
        path: local path, ``file://`` or ``s3://`` URI of a YAML mapping; None uses
            only the dataclass defaults.
        overrides: dotted assignments such as ``train.lr=1e-4``, applied in order
            after the file; values are parsed as YAML (``[2,2]``, ``true``, ``null``).
    """
    data = _read_yaml(os.fspath(path)) if path is not None else {}
    return config_from_dict(cls, data, overrides)


def config_from_dict(cls: type[T], data: Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> T:
    """Build a ``cls`` instance from a plain mapping (e.g. a Ray Tune trial config) plus overrides."""
    data = _deep_copy(dict(data or {}))
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    return _build(cls, data, "")


def update_config(cfg: T, updates: Mapping[str, Any]) -> T:
    """A new config with dotted keys replaced by values, validated like a file.

    ``updates`` maps dotted keys to Python values, e.g. ``{"train.lr": 3e-4}``
    from a Tune search space; the input config is not modified.
    """
    data = config_to_dict(cfg)
    for key, value in updates.items():
        _set_dotted(data, _check_key(key, key), value)
    return _build(type(cfg), data, "")


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``'train.lr=1e-4'`` into ``('train.lr', 1e-4)``; the value is read as YAML."""
    key, sep, text = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r} has no '=': write KEY=VALUE, e.g. train.lr=1e-4")
    key = _check_key(key.strip(), item)
    try:
        value = _yaml_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({error})") from None
    return key, value


def _check_key(key: str, item: str) -> str:
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: {key!r} is not a dotted key like train.lr")
    return key


def _read_yaml(path: str) -> dict[str, Any]:
    if "://" in path:
        from affectray import storage  # lazy: fsspec/s3fs only when a URI is given

        try:
            text = storage.read_text(path)
        except (storage.StorageError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read config file {path}: {error}") from None
    else:
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read config file {path}: {error}") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if data is None:  # an empty file means "all defaults"
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:  # absent, or an empty YAML section ("model:")
            child = node[part] = {}
        elif dataclasses.is_dataclass(child) and not isinstance(child, type):
            child = node[part] = config_to_dict(child)
        elif not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"cannot set {key}: {where} is {child!r}, not a section")
        node = child
    node[parts[-1]] = value


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in update.items():
        merged[k] = _deep_merge(merged[k], v) if isinstance(v, Mapping) and isinstance(merged.get(k), dict) else v
    return merged


def _deep_copy(value: Any) -> Any:
    # Overrides write into nested dicts; never into the caller's.
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


# ---------------------------------------------------------------------------
# Type checking against annotations
# ---------------------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _got(value: Any) -> str:
    return f"got {value!r} ({type(value).__name__})"


def _mismatch(key: str, tp: Any, value: Any, hint: str = "") -> ConfigError:
    return ConfigError(f"{key or 'config'}: expected {_type_name(tp)}, {_got(value)}{hint}")


def _build(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert it (mappings → dataclasses, lists → tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any or tp is object:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build_dataclass(tp, value, key)
    if origin is Union or origin is types.UnionType:
        return _build_union(tp, args, value, key)
    if origin is Literal:
        # `True == 1`, so compare types too: Literal[1] must not accept True.
        for choice in args:
            if value == choice and type(value) is type(choice):
                return value
        # YAML 1.1 reads a bare yes/no/on/off as a boolean: give it back as the word it was.
        if isinstance(value, bool):
            for choice in args:
                if isinstance(choice, str) and choice.lower() in _YAML_BOOL_WORDS[value]:
                    return choice
        choices = ", ".join(repr(c) for c in args)
        raise ConfigError(f"{key}: expected one of {choices}, {_got(value)}")
    if origin in (list, Sequence) or tp in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise _mismatch(key, tp, value)
        item_tp = args[0] if args else Any
        return [_build(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise _mismatch(key, tp, value)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item_tp = args[0] if args else Any
            return tuple(_build(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(tp)}), got {len(value)}: {value!r}")
        return tuple(_build(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(args, value)))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _mismatch(key, tp, value)
        key_tp, val_tp = args if args else (Any, Any)
        return {_build(key_tp, k, f"{key} key {k!r}"): _build(val_tp, v, _join(key, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _mismatch(key, tp, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _mismatch(key, tp, value)
        return value
    if tp is float:
        # An int is a fine float ("lr: 1"); a bool is not.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _mismatch(key, tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            hint = f"; quote it to mean text: {key}='{value}'" if isinstance(value, (int, float, bool)) else ""
            raise _mismatch(key, tp, value, hint)
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in tp)
            raise ConfigError(f"{key}: expected one of {choices}, {_got(value)}") from None
    if isinstance(tp, type) and issubclass(tp, os.PathLike) and isinstance(value, str):
        return tp(value)
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise _mismatch(key, tp, value)
        return value
    raise TypeError(f"{key}: config annotation {tp!r} is not supported")


def _build_union(tp: Any, args: tuple[Any, ...], value: Any, key: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise _mismatch(key, tp, value)
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:
        # Optional[X]: X's own error names the nested key precisely.
        return _build(options[0], value, key)
    # Try exact types first so `int | float` keeps 3 an int and `float | str` keeps "3" a str.
    for option in sorted(options, key=lambda a: a is not type(value)):
        try:
            return _build(option, value, key)
        except ConfigError:
            continue
    raise _mismatch(key, tp, value)


def _has_default(field: dataclasses.Field) -> bool:
    return field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a section ({cls.__name__} fields), {_got(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}

    for name in data:
        if name not in fields:
            key = _join(prefix, str(name))
            close = difflib.get_close_matches(str(name), list(fields), n=3)
            hint = f"; did you mean {' or '.join(_join(prefix, c) for c in close)}?" if close else ""
            known = ", ".join(fields) or "none"
            raise ConfigError(f"unknown key: {key}{hint} (known keys in {prefix or 'the top level'}: {known})")

    kwargs = {}
    for name, field in fields.items():
        key = _join(prefix, name)
        tp = hints[name]
        if name in data:
            value = data[name]
            # A partial section keeps the field's own default for what it leaves out
            # (a default_factory may differ from the nested class's defaults).
            if isinstance(value, Mapping) and _has_default(field):
                default = _default(field)
                if dataclasses.is_dataclass(default) and not isinstance(default, type):
                    value = _deep_merge(config_to_dict(default), value)
            kwargs[name] = _build(tp, value, key)
        elif not _has_default(field):
            if dataclasses.is_dataclass(tp) and isinstance(tp, type):
                # A required section the file left out may still be complete from defaults;
                # if not, the error names the missing leaf (data.root), not just "data".
                kwargs[name] = _build_dataclass(tp, {}, key)
            else:
                raise ConfigError(f"missing required value: {key}")
    try:
        return cls(**kwargs)
    except FieldError as error:
        raise error.under(prefix) from None
    except ConfigError:
        raise
    except ValueError as error:  # __post_init__ validation
        raise ConfigError(f"invalid {prefix or cls.__name__}: {error}") from error


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> Any:
    """A plain, YAML-safe copy of a config: dicts, lists, str, int, float, bool, None."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        # Only init fields: the rest are derived in __post_init__ and would not load back.
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Mapping):
        return {k if isinstance(k, (str, int, float, bool)) else str(k): config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, enum.Enum):
        return config_to_dict(cfg.value)
    if isinstance(cfg, os.PathLike):
        return os.fspath(cfg)
    if isinstance(cfg, (str, int, float, bool)) or cfg is None:
        return cfg
    raise TypeError(f"config value {cfg!r} ({type(cfg).__name__}) has no YAML form")


def dump_config(cfg: Any) -> str:
    """The config as YAML, in field order; ``load_config`` reads it back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the config's YAML to a local path, ``file://`` or ``s3://`` URI."""
    path = os.fspath(path)
    text = dump_config(cfg)
    if "://" in path:
        from affectray import storage

        storage.write_text(path, text)
        return
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")


def print_config(cfg: Any, file: TextIO | None = None) -> None:
    """Print ``resolved config:`` and the YAML, so a job's log records exactly what ran.

    Jobs call this first; their last stdout line stays the JSON summary.
    """
    file = file if file is not None else sys.stdout
    print("resolved config:", file=file)
    print(dump_config(cfg), end="", file=file, flush=True)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config PATH`` and repeatable ``--set KEY=VALUE`` to a job's parser."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="YAML config: a local path, file:// or s3:// URI; keys it leaves out keep their defaults",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=None,
        help=(
            "override one value after --config, e.g. --set train.lr=1e-4 --set model.depths=[2,2]; "
            "VALUE is read as YAML (numbers, true/false, null, [lists]); repeatable, applied in order"
        ),
    )
    return parser


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The config that ``--config`` and ``--set`` describe, its local paths made absolute."""
    config = load_config(cls, getattr(args, "config", None), getattr(args, "overrides", None) or ())
    return resolve_locations(config)


# ---------------------------------------------------------------------------
# Locations: local paths become absolute on the driver, before Ray sees them
# ---------------------------------------------------------------------------

# Field metadata of a value that names a storage location (local path or URI). Ray tasks,
# actors, Train workers and Tune trials run in directories of their own, so every local
# path is made absolute once, on the driver (`resolve_locations`), and nothing inside Ray
# depends on a working directory.
_LOCATION_KEY = "affectray_location"

# Under `ray job submit --working-dir`, the driver runs inside Ray's temporary copy of the
# working directory, which Ray deletes: a relative data or output location lands there
# under this folder of the user's home instead (like Ray Train's ~/ray_results), or
# under $AFFECTRAY_HOME.
JOB_HOME_ENV = "AFFECTRAY_HOME"
DEFAULT_JOB_HOME = "~/affectray"


def location(default: Any = dataclasses.MISSING, *, shipped: bool = False, **kwargs: Any) -> Any:
    """A dataclass field that names a storage location: made absolute by ``resolve_locations``.

    ``shipped=True`` marks a file that travels with the job's code (a config YAML):
    relative to the working directory even inside a Ray job's package. Every other
    location is data or output, which must outlive the job.
    """
    kind = "shipped" if shipped else "data"
    return dataclasses.field(default=default, metadata={_LOCATION_KEY: kind}, **kwargs)


def is_uri(value: str) -> bool:
    """``s3://…``, ``file://…``, ``builtin:name``: anything with a scheme (not a path)."""
    scheme, sep, _ = value.partition(":")
    return bool(sep) and len(scheme) > 1 and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) is not None


def in_ray_job_package(cwd: str | os.PathLike | None = None) -> bool:
    """Whether this process runs inside the package ``ray job submit --working-dir`` unpacked."""
    parts = Path(cwd or os.getcwd()).parts
    return "working_dir_files" in parts or any(part.startswith("_ray_pkg_") for part in parts)


def job_home() -> Path:
    """Where relative data and output locations go when the driver runs in a Ray job's package."""
    return Path(os.environ.get(JOB_HOME_ENV) or DEFAULT_JOB_HOME).expanduser().resolve()


def resolve_location(value: str, *, shipped: bool = False) -> str:
    """``value`` as an absolute local path, or unchanged when it is a URI or empty.

    Relative data and output locations resolve against the working directory, except in
    the temporary package of a ``ray job submit --working-dir`` driver, where they resolve
    under ``job_home()`` so that what the job writes outlives it.
    """
    if not value or is_uri(value):
        return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        base = job_home() if not shipped and in_ray_job_package() else Path.cwd()
        path = base / path
    return os.path.normpath(path)


def resolve_locations(cfg: T) -> T:
    """A copy of a config with every location field resolved (``resolve_location``), at any depth."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        return cfg
    changes = {}
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        value = getattr(cfg, f.name)
        kind = f.metadata.get(_LOCATION_KEY)
        if kind is not None:
            shipped = kind == "shipped"
            if isinstance(value, str):
                changes[f.name] = resolve_location(value, shipped=shipped)
            elif isinstance(value, (list, tuple)):
                changes[f.name] = type(value)(
                    resolve_location(v, shipped=shipped) if isinstance(v, str) else v for v in value
                )
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = resolve_locations(value)
        elif isinstance(value, (list, tuple)) and any(dataclasses.is_dataclass(v) for v in value):
            changes[f.name] = type(value)(resolve_locations(v) for v in value)  # e.g. finetune's prepare list
    return dataclasses.replace(cfg, **changes) if changes else cfg
