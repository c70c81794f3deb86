"""Optimiser parameter groups: layer-wise learning-rate decay for ViT encoders (MAE ``lr_decay.py``)."""

from __future__ import annotations

import re
from typing import Any

import torch.nn as nn

from affectray.models.video_classifier import find_encoder

_EMBEDDING_NAMES = {"patch_embed", "pos_embed", "cls_token", "mask_token", "region_embed"}
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def _layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for ``blocks.i``, num_layers + 1 for the rest (final norm, head)."""
    if _EMBEDDING_NAMES & set(name.split(".")):
        return 0
    match = _BLOCK_RE.search(name)
    return int(match.group(1)) + 1 if match else num_layers + 1


def param_groups_lrd(
    model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.75, num_layers: int | None = None
) -> list[dict[str, Any]]:
    """Optimizer param groups with layer-wise lr decay (MAE ``lr_decay.py``): block i gets lr * decay^(L - i).

    Each group has ``params``, ``weight_decay``, ``lr_scale`` (multiply the scheduled lr by it)
    and ``name``. Biases, norms (any 1-D tensor) and names from ``no_weight_decay()`` get no
    weight decay. ``num_layers`` defaults to the encoder's depth.
    """
    if num_layers is None:
        num_layers = find_encoder(model).num_layers
    scales = [layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]
    skip: set[str] = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            skip |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and name not in skip
        layer = _layer_id(name, num_layers)
        key = f"layer_{layer}_{'decay' if decay else 'no_decay'}"
        group = groups.setdefault(
            key, {"name": key, "params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scales[layer]}
        )
        group["params"].append(param)
    return list(groups.values())
