"""CNN-GRU and CNN-Transformer window models and their weighted ensemble.

The ABAW2 (2021) expression ensemble: a frame CNN, a CNN whose per-frame
features run through a GRU, and a CNN whose features run through a Transformer
encoder, combined by a weighted sum of probabilities. Both temporal models are
many-to-many: a window [B, T, 3, H, W] gives logits for every frame [B, T, C],
so training uses every labelled frame of the window and prediction takes the
centre frame (:meth:`predict_center`), which has context on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from affectray.models.backbones import centred_input, create_backbone, frame_features
from affectray.models.heads import ClassifierMixin, centre_frame
from affectray.models.registry import (
    ModelError,
    config_from_kwargs,
    create_model_from_description,
    describe_config,
    register_model,
)

__all__ = [
    "CNNGRU",
    "CNNGRUConfig",
    "CNNTransformer",
    "CNNTransformerConfig",
    "WeightedEnsemble",
    "sinusoidal_positions",
]


class _WindowModel(ClassifierMixin, nn.Module):
    """Shared by the many-to-many models: logits [B, T, C] for a window [B, T, 3, H, W].

    Training scores every labelled frame of the window (per-frame targets [B, T]) or
    its centre (one target [B]); prediction is the centre frame (ClassifierMixin).
    """

    input_kind = "window"

    def predict_center(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of each window's centre frame: [B, T, 3, H, W] -> [B, C]."""
        return centre_frame(self(x)["logits"])  # [B, T, C] -> [B, C]

    def describe(self) -> dict[str, Any]:
        return describe_config(self.registry_name, self.cfg, weights_path=None, weights_strict=True)


# ---------------------------------------------------------------------------
# CNN-GRU
# ---------------------------------------------------------------------------


@dataclass
class CNNGRUConfig:
    backbone: str = "resnet18"
    num_classes: int = 8
    img_size: int | None = None
    window: int = 9  # frames per training/inference window
    hidden_size: int = 256
    num_layers: int = 2
    bidirectional: bool = False
    dropout: float = 0.1  # between GRU layers and before the head
    drop_path_rate: float = 0.0
    weights_path: str | None = None
    weights_strict: bool = True  # False: load only the file's tensors that fit the backbone


class CNNGRU(_WindowModel):
    """Per-frame CNN features -> GRU -> per-frame logits."""

    registry_name = "cnn_gru"

    def __init__(self, cfg: CNNGRUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.window = cfg.window
        self.backbone, d = create_backbone(
            cfg.backbone,
            img_size=cfg.img_size,
            weights_path=cfg.weights_path,
            weights_strict=cfg.weights_strict,
            drop_path_rate=cfg.drop_path_rate,
        )
        self.gru = nn.GRU(
            d, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0, bidirectional=cfg.bidirectional,
        )  # fmt: skip
        out_dim = cfg.hidden_size * (2 if cfg.bidirectional else 1)
        self.head_drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(out_dim, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = frame_features(self.backbone, x)  # [B, T, D]
        hidden, _ = self.gru(feats)  # [B, T, H * dirs]
        return {"logits": self.head(self.head_drop(hidden)), "features": hidden}  # [B, T, C]


@register_model("cnn_gru")
def cnn_gru(**kwargs: Any) -> CNNGRU:
    return CNNGRU(config_from_kwargs(CNNGRUConfig, "cnn_gru", kwargs))


# ---------------------------------------------------------------------------
# CNN-Transformer
# ---------------------------------------------------------------------------


def sinusoidal_positions(length: int, dim: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed sin/cos position codes (Vaswani et al.): [length, dim]."""
    pos = torch.arange(length, device=device, dtype=torch.float64).unsqueeze(1)  # [T, 1]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float64) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe.to(dtype)


@dataclass
class CNNTransformerConfig:
    backbone: str = "resnet18"
    num_classes: int = 8
    img_size: int | None = None
    window: int = 9
    embed_dim: int = 256
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1
    drop_path_rate: float = 0.0  # of the backbone
    weights_path: str | None = None
    weights_strict: bool = True  # False: load only the file's tensors that fit the backbone

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads or self.embed_dim % 2:
            raise ModelError(
                f"cnn_transformer embed_dim {self.embed_dim} must be even and divisible by num_heads {self.num_heads}"
            )


class CNNTransformer(_WindowModel):
    """Per-frame CNN features -> projection + sinusoidal positions -> Transformer encoder -> per-frame logits."""

    registry_name = "cnn_transformer"

    def __init__(self, cfg: CNNTransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.window = cfg.window
        self.backbone, d = create_backbone(
            cfg.backbone,
            img_size=cfg.img_size,
            weights_path=cfg.weights_path,
            weights_strict=cfg.weights_strict,
            drop_path_rate=cfg.drop_path_rate,
        )
        self.proj = nn.Linear(d, cfg.embed_dim)
        layer = nn.TransformerEncoderLayer(
            cfg.embed_dim, cfg.num_heads, dim_feedforward=int(cfg.embed_dim * cfg.mlp_ratio),
            dropout=cfg.dropout, activation="gelu", batch_first=True, norm_first=True,
        )  # fmt: skip
        # Pre-norm layers leave the residual stream unnormalised: one final LayerNorm before the head.
        self.encoder = nn.TransformerEncoder(
            layer, cfg.depth, norm=nn.LayerNorm(cfg.embed_dim), enable_nested_tensor=False
        )
        self.head_drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = frame_features(self.backbone, x)  # [B, T, D]
        tokens = self.proj(feats)  # [B, T, E]
        t, e = tokens.shape[1:]
        tokens = tokens + sinusoidal_positions(t, e, device=tokens.device, dtype=tokens.dtype)
        hidden = self.encoder(tokens)  # [B, T, E]
        return {"logits": self.head(self.head_drop(hidden)), "features": hidden}  # [B, T, C]


@register_model("cnn_transformer")
def cnn_transformer(**kwargs: Any) -> CNNTransformer:
    return CNNTransformer(config_from_kwargs(CNNTransformerConfig, "cnn_transformer", kwargs))


# ---------------------------------------------------------------------------
# Weighted ensemble
# ---------------------------------------------------------------------------


class WeightedEnsemble(ClassifierMixin, nn.Module):
    """Weighted sum of members' class probabilities; weights are normalised to sum to 1.

    Members may be frame models ([B, 3, H, W] -> [B, C]), window models with
    clip output ([B, C]) or many-to-many output ([B, T, C], centre frame taken),
    and any model returning ``probs`` (e.g. the CFC cascade). Given a window
    [B, T, 3, H, W], each member sees what it takes: the centre frame, or the
    centred sub-window of its own length. Returns ``probs`` [B, C] and
    ``logits`` = log(probs). Members are trained apart and joined by ``affectray ensemble``.
    """

    registry_name = "weighted_ensemble"

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not members:
            raise ModelError("a weighted ensemble needs at least one member")
        classes = {m.num_classes for m in members}
        if len(classes) != 1:
            counts = [m.num_classes for m in members]
            raise ModelError(f"ensemble members predict different numbers of classes: {counts}")
        weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
        if len(weights) != len(members) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ModelError(f"ensemble weights must be {len(members)} non-negative numbers, not all 0; got {weights}")
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor(weights) / sum(weights))  # [M]
        self.num_classes = classes.pop()
        kinds = {getattr(m, "input_kind", "frame") for m in members}
        self.input_kind = "window" if "window" in kinds else "frame"
        self.window = max(getattr(m, "window", 1) for m in members)

    def member_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's centre-frame probabilities: [M, B, C]."""
        probs = [member.probabilities(member(centred_input(x, member))) for member in self.members]
        return torch.stack(probs)  # [M, B, C]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        member_probs = self.member_probs(x)  # [M, B, C]
        # Elementwise, so autocast keeps it in float32 (an einsum would run in bf16).
        probs = (self.weights.float()[:, None, None] * member_probs).sum(0)  # [B, C]
        logits = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        return {"logits": logits, "probs": probs, "member_probs": member_probs}

    def probabilities(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs["probs"].float()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.registry_name,
            "kwargs": {"members": [m.describe() for m in self.members], "weights": self.weights.tolist()},
        }


@register_model("weighted_ensemble", finetune="ensembles are joined from trained checkpoints by `affectray ensemble`")
def weighted_ensemble(members: Sequence[dict[str, Any]], weights: Sequence[float] | None = None) -> WeightedEnsemble:
    """``members``: model descriptions (``{"name", "kwargs"}``), built fresh; weights come from the checkpoint."""
    return WeightedEnsemble([create_model_from_description(m) for m in members], weights)
