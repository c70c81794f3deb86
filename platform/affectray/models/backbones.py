"""Image backbones from timm, as pooled-feature extractors.

Every classifier in ``affectray.models`` starts from :func:`create_backbone`: a
timm model built with ``num_classes=0`` so its forward returns globally pooled
features ``[B, D]``. Nothing is ever downloaded (``pretrained=False`` always);
pretrained weights come from a local file, loaded non-strictly with the
missing/unexpected keys logged, so an ImageNet or face-pretrained checkpoint
with a different head still fits.

:func:`split_backbone` cuts a CNN after its k-th feature stage into a shared
base and a tail, for the ESR ensemble (``ensembles.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import timm
import torch
import torch.nn as nn

from affectray.errors import AffectrayError

__all__ = [
    "BackboneError",
    "centred_input",
    "create_backbone",
    "frame_features",
    "load_weights",
    "split_backbone",
]

log = logging.getLogger(__name__)

# Prefixes that wrap a model's own keys in common training checkpoints (DDP, EMA, Lightning, ...).
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "_orig_mod.")
# Keys under which training scripts nest the weights inside a checkpoint dict.
_NESTED_KEYS = ("state_dict", "model", "model_state", "module", "weights")


class BackboneError(AffectrayError, ValueError):
    """A backbone that cannot be built, split, or loaded from the given weights file."""


def create_backbone(
    name: str,
    *,
    in_chans: int = 3,
    img_size: int | None = None,
    weights_path: str | os.PathLike | None = None,
    drop_path_rate: float = 0.0,
) -> tuple[nn.Module, int]:
    """A timm model that maps images [B, in_chans, H, W] to pooled features [B, D]; returns (model, D).

    Args:
        img_size: input size for models with a fixed token grid (ViT, Swin, ...);
            CNNs take any size and ignore it.
        weights_path: optional local ``.safetensors`` / ``.pth`` file, loaded with strict=False.
        drop_path_rate: stochastic depth, for models that support it.
    """
    kwargs: dict = {"pretrained": False, "num_classes": 0, "in_chans": in_chans}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = _timm_create(name, kwargs)
    if weights_path is not None:
        load_weights(model, weights_path)
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
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
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


def load_weights(model: nn.Module, path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Load a local weights file into ``model`` non-strictly; returns (missing, unexpected) keys.

    Raises BackboneError when the file is missing, no key matches, or a matching
    key has another shape (a different architecture, not a different head).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BackboneError(f"weights file not found: {path}")
    own = model.state_dict()
    state = _strip_prefixes(read_state_dict(path), set(own))
    matched = own.keys() & state.keys()
    if not matched:
        raise BackboneError(
            f"{path}: none of its {len(state)} keys fits {type(model).__name__} "
            f"(file has e.g. {sorted(state)[:3]}, model has e.g. {sorted(own)[:3]})"
        )
    bad = sorted(k for k in matched if own[k].shape != state[k].shape)
    if bad:
        k = bad[0]
        raise BackboneError(
            f"{path}: {len(bad)} tensors have another shape than the model's, "
            f"e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        )
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    log.info(
        "loaded %d tensors from %s into %s; missing %d %s; unexpected %d %s",
        len(matched),
        path,
        type(model).__name__,
        len(missing),
        missing[:5],
        len(unexpected),
        unexpected[:5],
    )
    if missing:
        log.warning("%s: %d model tensors not in the file (kept at init), e.g. %s", path, len(missing), missing[:5])
    return missing, unexpected


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
