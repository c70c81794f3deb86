"""Image backbones from timm, as pooled-feature extractors.

Every classifier in ``affectray.models`` starts from :func:`create_backbone`: a
timm model built with ``num_classes=0`` so its forward returns globally pooled
features ``[B, D]``. Nothing is ever downloaded (``pretrained=False`` always);
pretrained weights come from a local file, loaded strictly: every tensor of the
model must be in the file with its shape, and the file may hold nothing else but
the classifier head a pooled backbone lacks (an ImageNet or face-pretrained
checkpoint still fits). ``strict=False`` loads only the tensors that fit and
says how many. :func:`compare_state_dict` is the one comparison of a state dict
with a model, and :func:`apply_state_dict` the one loader, for every loading
path (``weights_path``, fine-tuning's ``init``, the pretrained video encoder).

:func:`split_backbone` cuts a CNN after its k-th feature stage into a shared
base and a tail, for the ESR ensemble (``ensembles.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import timm
import torch
import torch.nn as nn

from affectray.errors import AffectrayError
from affectray.models.registry import ModelError

__all__ = [
    "BackboneError",
    "WeightsFit",
    "WeightsMismatchError",
    "apply_state_dict",
    "centred_input",
    "compare_state_dict",
    "create_backbone",
    "frame_features",
    "load_weights",
    "load_weights_file",
    "split_backbone",
]

log = logging.getLogger(__name__)

# Prefixes that wrap a model's own keys in common training checkpoints (DDP, EMA, Lightning, ...).
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "_orig_mod.")
# Keys under which training scripts nest the weights inside a checkpoint dict.
_NESTED_KEYS = ("state_dict", "model", "model_state", "module", "weights")


class BackboneError(AffectrayError, ValueError):
    """A backbone that cannot be built, split, or loaded from the given weights file."""


class WeightsMismatchError(BackboneError, ModelError):
    """Weights whose keys or shapes do not fit the model they are loaded into (names the keys)."""


def create_backbone(
    name: str,
    *,
    in_chans: int = 3,
    img_size: int | None = None,
    weights_path: str | os.PathLike | None = None,
    weights_strict: bool = True,
    drop_path_rate: float = 0.0,
) -> tuple[nn.Module, int]:
    """A timm model that maps images [B, in_chans, H, W] to pooled features [B, D]; returns (model, D).

    Args:
        img_size: input size for models with a fixed token grid (ViT, Swin, ...);
            CNNs take any size and ignore it.
        weights_path: optional local ``.safetensors`` / ``.pth`` file (see :func:`load_weights`).
        weights_strict: False loads only the file's tensors that fit (a backbone-only transfer).
        drop_path_rate: stochastic depth, for models that support it.
    """
    kwargs: dict = {"pretrained": False, "num_classes": 0, "in_chans": in_chans}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = _timm_create(name, kwargs)
    if weights_path is not None:
        load_weights(model, weights_path, strict=weights_strict)
    return model, int(model.num_features)


def _timm_create(name: str, kwargs: dict) -> nn.Module:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise BackboneError(f"unknown timm model {name!r}" + (f"; similar names: {close}" if close else ""))
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as error:
        # CNN constructors have no img_size argument: their input size is free.
        if "img_size" in kwargs and "img_size" in str(error):
            kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
            return _timm_create(name, kwargs)
        if "drop_path_rate" in kwargs and "drop_path_rate" in str(error):
            raise BackboneError(f"timm model {name!r} does not support drop_path_rate") from None
        raise


def frame_features(backbone: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """Run a frame backbone over every frame of a window: [B, T, C, H, W] -> [B, T, D]."""
    b, t = frames.shape[:2]
    feats = backbone(frames.flatten(0, 1))  # [B*T, D]
    return feats.unflatten(0, (b, t))  # [B, T, D]


def centred_input(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """What a composite model passes a member: the centre frame, or the centred sub-window of its length.

    ``x`` is frames [B, C, H, W] or a window [B, T, C, H, W]; ``model.input_kind``
    is "frame" or "window" (with ``model.window`` frames).
    """
    kind = getattr(model, "input_kind", "frame")
    if x.dim() == 4:
        if kind == "window":
            raise ValueError(f"{type(model).__name__} takes windows [B, T, C, H, W], got frames {tuple(x.shape)}")
        return x
    c = x.shape[1] // 2
    if kind == "frame":
        return x[:, c]  # [B, C, H, W]
    half = min(getattr(model, "window", x.shape[1]), x.shape[1]) // 2
    return x[:, c - half : c + half + 1]  # [B, w, C, H, W]


# ---------------------------------------------------------------------------
# Local weights
# ---------------------------------------------------------------------------


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    # A truncated or foreign file fails anywhere in the parsers (SafetensorError, a zip's
    # RuntimeError, the unpickler's KeyError...): one line naming it, not their traceback.
    except Exception as error:  # noqa: BLE001
        message = str(error).splitlines()[0][:300] if str(error) else ""
        raise BackboneError(f"{path}: not a whole weights file ({type(error).__name__}: {message})") from None
    # Unwrap {"state_dict": {...}} and friends, possibly nested twice.
    for _ in range(2):
        if isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            inner = next((state[k] for k in _NESTED_KEYS if isinstance(state.get(k), Mapping)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, Mapping):
        raise BackboneError(f"{path}: expected a state dict, found {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(state: dict[str, torch.Tensor], own_keys: set[str]) -> dict[str, torch.Tensor]:
    # Drop one wrapper prefix at a time while that makes more keys match the model.
    while True:
        matched = len(own_keys & state.keys())
        best = state
        for prefix in _WRAPPER_PREFIXES:
            stripped = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}
            if len(own_keys & stripped.keys()) > len(own_keys & best.keys()):
                best = stripped
        if best is state or len(own_keys & best.keys()) <= matched:
            return state
        state = best


_SHOWN = 5  # keys named per kind in an error or a log line


@dataclass
class WeightsFit:
    """How a state dict fits a model: what loads, and what is missing, left over or mis-shaped."""

    loaded: list[str]  # same name and shape: these load
    missing: list[str]  # the model's tensors the state dict lacks
    unexpected: list[str]  # the state dict's tensors the model lacks
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (key, its shape, the model's shape)
    total: int  # the model's tensor count
    given: int  # the state dict's tensor count
    spare: list[str] = field(default_factory=list)  # left over, but allowed: a pooled backbone's absent head

    @property
    def exact(self) -> bool:
        """Every tensor of the model loads and nothing else is left over (the spare head aside)."""
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> str:
        """``12 missing: a, b, ... (+7 more); 1 with another shape: k (3, 4) vs model's (4, 4)``."""

        def names(keys: Sequence[str]) -> str:
            more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
            return ", ".join(keys[:_SHOWN]) + more

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} of the model's {self.total} tensors missing: {names(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (not in the model): {names(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{k} {tuple(got)} vs model's {tuple(want)}" for k, got, want in self.mismatched]
            parts.append(f"{len(self.mismatched)} with another shape: {names(shapes)}")
        return "; ".join(parts)


def compare_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> WeightsFit:
    """Compare ``state`` with ``model``'s own state dict, key by key and shape by shape.

    A pooled timm backbone (built with ``num_classes=0``) lacks its classifier by
    construction: the file's keys under that classifier are ``spare``, not unexpected.
    """
    own = model.state_dict()
    head = _absent_classifier(model)
    loaded, mismatched, unexpected, spare = [], [], [], []
    for key in sorted(state):
        if key in own:
            if tuple(own[key].shape) == tuple(state[key].shape):
                loaded.append(key)
            else:
                mismatched.append((key, tuple(state[key].shape), tuple(own[key].shape)))
        elif any(key.startswith(f"{h}.") for h in head):
            spare.append(key)
        else:
            unexpected.append(key)
    missing = sorted(k for k in own if k not in state)
    return WeightsFit(loaded, missing, unexpected, mismatched, total=len(own), given=len(state), spare=spare)


def _absent_classifier(model: nn.Module) -> tuple[str, ...]:
    # timm names its classifier in pretrained_cfg ("fc", "head", "head.fc", ("head", "head_dist")).
    if getattr(model, "num_classes", None) != 0:
        return ()
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not name:
        return ()
    return (name,) if isinstance(name, str) else tuple(name)


def apply_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    strict: bool = True,
    opt_out: str | None = None,
) -> WeightsFit:
    """Load ``state`` into ``model``: all of it (strict), or only the tensors that fit; returns the fit.

    Raises WeightsMismatchError when nothing fits, or when ``strict`` and any key is
    missing, unexpected or mis-shaped; the message names them (the first few of each
    kind, with counts) and ``opt_out``, the setting that allows a partial load.
    """
    fit = compare_state_dict(model, state)
    target = type(model).__name__
    if not fit.loaded:
        own = sorted(model.state_dict())
        raise WeightsMismatchError(
            f"{source} does not fit {target}: none of its {fit.given} keys fits "
            f"(it has e.g. {sorted(state)[:3]}, the model has e.g. {own[:3]}; another project's key layout?)"
            + (f": {fit.problems()}" if fit.mismatched else "")
        )
    if strict and not fit.exact:
        hint = f" To load only what fits ({len(fit.loaded)} of {fit.total} tensors), set {opt_out}." if opt_out else ""
        raise WeightsMismatchError(f"{source} does not fit {target} (strict loading): {fit.problems()}.{hint}")
    model.load_state_dict({k: state[k] for k in fit.loaded}, strict=False)
    if fit.exact:
        log.info("loaded all %d tensors of %s from %s", fit.total, target, source)
    else:
        log.warning(
            "loaded %d of %d tensors of %s from %s (not strict; the rest keep their initialisation): %s",
            len(fit.loaded),
            fit.total,
            target,
            source,
            fit.problems(),
        )
    if fit.spare:
        log.info(
            "%s: left out the %d classifier tensors the pooled %s lacks: %s", source, len(fit.spare), target, fit.spare
        )
    return fit


def read_weights_file(model: nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A local weights file's tensors, wrapper prefixes (``module.``, ...) off where they hide the model's keys."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BackboneError(f"weights file not found: {path}")
    return _strip_prefixes(read_state_dict(path), set(model.state_dict()))


def load_weights_file(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, opt_out: str | None = "weights_strict: false"
) -> WeightsFit:
    """:func:`apply_state_dict` of a local ``.safetensors`` / ``.pth`` file; returns the fit."""
    return apply_state_dict(
        model, read_weights_file(model, path), source=os.fspath(path), strict=strict, opt_out=opt_out
    )


def load_weights(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, opt_out: str | None = "weights_strict: false"
) -> tuple[list[str], list[str]]:
    """Load a local weights file into ``model``; returns (missing, unexpected) keys (a spare head is unexpected).

    Strict by default (see :func:`apply_state_dict`): a missing, unexpected or
    mis-shaped key is a WeightsMismatchError, except the classifier head of a
    pooled timm backbone. ``strict=False`` loads the tensors that fit; a file of
    which nothing fits is refused either way. BackboneError when the file is missing.
    """
    fit = load_weights_file(model, path, strict=strict, opt_out=opt_out)
    return fit.missing, sorted(fit.unexpected + fit.spare)


# ---------------------------------------------------------------------------
# Splitting a CNN into a shared base and a tail (ESR)
# ---------------------------------------------------------------------------


def _flat_children(model: nn.Module, feature_modules: list[str]) -> list[tuple[str, nn.Module]]:
    # Top-level children in forward order; a Sequential that holds feature stages
    # ("stages" for "stages.1", "blocks" for "blocks.3") is opened one level.
    containers = {m.split(".")[0] for m in feature_modules if "." in m}
    flat = []
    for name, child in model.named_children():
        if name in containers and isinstance(child, nn.Sequential):
            flat.extend((f"{name}.{sub}", grand) for sub, grand in child.named_children())
        else:
            flat.append((name, child))
    return flat


def split_backbone(
    model: nn.Module, shared_stages: int, *, check_size: int = 64
) -> tuple[nn.Sequential, nn.Sequential]:
    """Cut a timm CNN (built with num_classes=0) after feature stage ``shared_stages``.

    Returns (base, tail) with ``tail(base(x)) == model(x)``: base maps images to
    the stage's feature map [B, C_k, H/r_k, W/r_k], tail maps that to pooled
    features [B, D]. Works for models whose forward runs their children in
    order (ResNet, ConvNeXt, EfficientNet, RegNet, MobileNet, ...); anything
    else is refused after a numerical check on a ``check_size`` input.
    """
    info = getattr(model, "feature_info", None)
    name = type(model).__name__
    if not info:
        raise BackboneError(f"{name} has no feature_info: cannot split it into stages")
    modules = [f["module"] for f in info]
    if not 1 <= shared_stages < len(modules):
        raise BackboneError(f"shared_stages must be in [1, {len(modules) - 1}] for {name}, got {shared_stages}")
    cut = modules[shared_stages - 1]
    flat = _flat_children(model, modules)
    names = [n for n, _ in flat]
    if cut not in names:
        raise BackboneError(f"{name}: feature stage {cut!r} is not a top-level block; cannot split it")
    i = names.index(cut) + 1
    base = nn.Sequential(*(m for _, m in flat[:i]))
    tail = nn.Sequential(*(m for _, m in flat[i:]), nn.Flatten(1))

    was_training = model.training
    model.eval()
    x = torch.randn(2, _in_chans(model), check_size, check_size)
    try:
        with torch.no_grad():
            ok = torch.allclose(tail(base(x)), model(x), atol=1e-5, rtol=1e-4)
    except (RuntimeError, ValueError, TypeError):  # a token model's blocks fed a feature map, ...
        ok = False
    finally:
        model.train(was_training)
    if not ok:
        raise BackboneError(f"{name}'s forward is not a plain chain of its children: cannot split it")
    return base, tail


def _in_chans(model: nn.Module) -> int:
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first_conv.in_channels if first_conv is not None else 3
