"""Model registry: every classifier is built from a name and keyword arguments.

timm-style: a model family registers a factory ``fn(**kwargs) -> nn.Module``
with ``@register_model("name")``; configs and checkpoints name models by
string. Every registered model has ``describe() -> {"name", "kwargs"}`` and
``create_model(**model.describe())`` rebuilds it (weights come from the
checkpoint's state dict), which is what makes checkpoints self-describing.

A family may register what a job must know before building one (:class:`ModelInfo`,
like timm's per-model ``pretrained_cfg``): a fixed class count, or that fine-tuning
does not train it. Everything else a job needs, the built model answers itself
(``affectray.models.heads``: its loss and its probabilities).

Built-in families live in their own modules and are imported only when one of
their names is asked for, so ``import affectray.models.registry`` stays light.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch.nn as nn

from affectray.errors import AffectrayError

__all__ = [
    "ModelConfig",
    "ModelError",
    "ModelInfo",
    "build_model",
    "config_from_kwargs",
    "create_model",
    "create_model_from_description",
    "describe_config",
    "is_model",
    "list_models",
    "model_info",
    "register_model",
]

C = TypeVar("C")
F = TypeVar("F", bound=Callable[..., nn.Module])


class ModelError(AffectrayError, ValueError):
    """An unknown model name, or arguments a model does not take."""


@dataclass(frozen=True)
class ModelInfo:
    """What a job must know about a family before it builds one."""

    num_classes: int | None = None  # a fixed class count: the family takes no num_classes argument
    finetune: str | None = None  # why `affectray finetune` does not train this family (None: it does)
    va_head: bool = False  # the family takes va_head=True: a valence/arousal head beside the classes


_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_INFO: dict[str, ModelInfo] = {}

# Name -> module that registers it on import. "video_encoder_classifier" (the
# MAE-DFER clip classifier over the pretrained video encoder) lives with the video
# families' dispatch in affectray.models.video_classifier.
_PROVIDERS: dict[str, str] = {
    "frame": "affectray.models.cascade",
    "cfc_sp": "affectray.models.cascade",
    "cfc_cascade": "affectray.models.cascade",
    "cnn_gru": "affectray.models.temporal",
    "cnn_transformer": "affectray.models.temporal",
    "weighted_ensemble": "affectray.models.temporal",
    "esr": "affectray.models.ensembles",
    "ma_net": "affectray.models.ma_net",
    "video_encoder_classifier": "affectray.models.video_classifier",
    "fer_minixception": "affectray.models.minixception",
    "poster_v2": "affectray.models.poster_v2",
}


def register_model(name: str, **info: Any) -> Callable[[F], F]:
    """Decorator: register ``fn(**kwargs) -> nn.Module`` under ``name`` (a second registration replaces the first).

    ``info``: fields of :class:`ModelInfo`.
    """
    details = ModelInfo(**info)  # a wrong field fails at import, where the family is registered

    def decorator(fn: F) -> F:
        _REGISTRY[name] = fn
        _INFO[name] = details
        return fn

    return decorator


def list_models() -> list[str]:
    """Every model name that ``create_model`` accepts."""
    return sorted(set(_REGISTRY) | set(_PROVIDERS))


def is_model(name: str) -> bool:
    return name in _REGISTRY or name in _PROVIDERS


def _lookup(name: str) -> Callable[..., nn.Module]:
    if name not in _REGISTRY and name in _PROVIDERS:
        module = _PROVIDERS[name]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise  # the provider exists but one of its own imports is missing: a real bug
            raise ModelError(f"model {name!r} is provided by {module}, which is not installed") from None
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_info(name: str) -> ModelInfo:
    """What ``name``'s family registered about itself (ModelError for an unknown name)."""
    _lookup(name)
    return _INFO[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` with its keyword arguments."""
    return _lookup(name)(**kwargs)


def create_model_from_description(description: Mapping[str, Any]) -> nn.Module:
    """Rebuild a model from its ``describe()`` dict (as stored in a checkpoint), with fresh weights."""
    if "name" not in description:
        raise ModelError(f"a model description needs 'name' (and 'kwargs'), got keys {sorted(description)}")
    return create_model(description["name"], **dict(description.get("kwargs") or {}))


# ---------------------------------------------------------------------------
# Config dataclasses <-> keyword arguments
# ---------------------------------------------------------------------------


def config_from_kwargs(cls: type[C], model: str, kwargs: Mapping[str, Any]) -> C:
    """Build a model's config dataclass, naming the model and its valid keys on a wrong one."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ModelError(f"model {model!r} takes no argument(s) {unknown}; it takes {sorted(names)}")
    return cls(**kwargs)


def describe_config(name: str, cfg: Any, **overrides: Any) -> dict[str, Any]:
    """``{"name": name, "kwargs": fields of cfg}`` (JSON-safe), with some fields replaced."""
    kwargs = dataclasses.asdict(cfg)
    kwargs.update(overrides)
    return {"name": name, "kwargs": kwargs}


@dataclass
class ModelConfig:
    """The model section of a job config (YAML ``model:``).

    The common fields are passed only when set, so one dataclass serves frame
    models (no ``window``), window models and composites (``cfc_cascade`` takes
    its members in ``extra``).
    """

    name: str = "frame"
    backbone: str | None = None
    num_classes: int | None = None
    img_size: int | None = None
    window: int | None = None  # frames per input window, for window models
    extra: dict[str, Any] = field(default_factory=dict)

    def to_kwargs(self) -> dict[str, Any]:
        common = {
            "backbone": self.backbone,
            "num_classes": self.num_classes,
            "img_size": self.img_size,
            "window": self.window,
        }
        kwargs = {k: v for k, v in common.items() if v is not None}
        clash = sorted(kwargs.keys() & self.extra.keys())
        if clash:
            raise ModelError(f"model config sets {clash} both as fields and in 'extra'")
        return {**kwargs, **self.extra}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the model a :class:`ModelConfig` names."""
    return create_model(cfg.name, **cfg.to_kwargs())
