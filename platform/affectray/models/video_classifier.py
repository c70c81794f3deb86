"""The video-transformer families by name, and the clip classifier fine-tuned from them.

``build_pretrain_model("videomae" | "mae_dfer", size)`` builds a pretraining model (VideoMAE,
or MAE-DFER's LGI-Former with appearance + motion targets), ``build_video_encoder`` its
encoder alone. :class:`VideoEncoderClassifier` (registry name ``video_encoder_classifier``)
mean-pools such an encoder's tokens into expression logits, its encoder optionally loaded
from a pretraining checkpoint (:func:`load_encoder_from_pretrain`, strict).

Pooling: by default the encoder's last LayerNorm normalises every token and the clip's
tokens are averaged. MAE-DFER's (and VideoMAE's) fine-tuning averages first and
normalises the average (their ``fc_norm``; the encoder's own last norm is an identity
there): ``fc_norm=True`` does that with the same LayerNorm module, ``encoder.norm``, so
a pretraining checkpoint's encoder loads strictly either way. ``pool="regions"`` averages
the LGI-Former's region tokens instead of the clip's (MAE-DFER's DFEW model,
``lg_classify_token_type='region'``), ``pool="all"`` both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from affectray.models.backbones import apply_state_dict, read_state_dict
from affectray.models.heads import ClassifierMixin
from affectray.models.lgi_former import MAE_DFER_SIZES, MAEDFER, LGIFormerEncoder
from affectray.models.mae import VIDEO_MAE_SIZES, VideoMAE, VideoMAEConfig, VideoViTEncoder
from affectray.models.registry import ModelError, config_from_kwargs, describe_config, register_model


def find_encoder(model: nn.Module) -> nn.Module:
    if isinstance(model, VideoViTEncoder):
        return model
    for module in model.modules():
        if isinstance(module, VideoViTEncoder):
            return module
    raise ModelError(f"{type(model).__name__} holds no VideoViTEncoder / LGIFormerEncoder to load into")


def load_encoder_from_pretrain(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "pretrained encoder"
) -> nn.Module:
    """Copy a pretraining checkpoint's encoder weights into ``model``'s encoder; returns that encoder.

    ``model`` is an encoder or any module holding one (a classifier). ``state_dict``
    is a whole pretraining model's (keys ``encoder.*``, optionally under DDP's
    ``module.``) or :meth:`VideoMAE.encoder_state_dict`. A backbone-only transfer by
    definition (the head keeps its initialisation), strict on the encoder: every
    encoder key must be present with the same shape (a size or family mismatch is
    a WeightsMismatchError naming the keys, not a silent partial load).
    """
    encoder = find_encoder(model)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    if any(k.startswith("encoder.") for k in state):
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    apply_state_dict(encoder, state, source=source, strict=True)
    return encoder


# ---------------------------------------------------------------------------
# Entry points by name
# ---------------------------------------------------------------------------

PRETRAIN_MODELS = ("videomae", "mae_dfer")


def _config(name: str, size: str, overrides: Mapping[str, Any]) -> VideoMAEConfig:
    if name == "videomae":
        sizes: Mapping[str, VideoMAEConfig] = VIDEO_MAE_SIZES
    elif name == "mae_dfer":
        sizes = MAE_DFER_SIZES
    else:
        raise ModelError(f"unknown video MAE {name!r}; known: {', '.join(PRETRAIN_MODELS)}")
    if size not in sizes:
        raise ModelError(f"unknown {name} size {size!r}; known: {', '.join(sizes)}")
    base = sizes[size]
    known = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ModelError(f"{name} takes no setting(s) {unknown}; it takes {sorted(known)}")
    return dataclasses.replace(base, **overrides)


def build_pretrain_model(name: str, size: str = "base", **overrides: Any) -> VideoMAE:
    """``build_pretrain_model("mae_dfer", "tiny", mask_ratio=0.75)``: a VideoMAE or MAE-DFER pretraining model."""
    cfg = _config(name, size, overrides)
    if name == "mae_dfer":
        return MAEDFER(cfg)
    return VideoMAE(cfg)


def build_video_encoder(name: str, size: str = "base", **overrides: Any) -> VideoViTEncoder:
    """The encoder alone (no masking, no decoder) of a pretraining model, for fine-tuning."""
    cfg = _config(name, size, overrides)
    if name == "mae_dfer":
        return LGIFormerEncoder(cfg)
    return VideoViTEncoder(cfg)


# ---------------------------------------------------------------------------
# Clip classifier: pretrained encoder -> mean pool -> linear head
# ---------------------------------------------------------------------------


POOLS = ("tokens", "regions", "all")


@dataclass
class VideoEncoderClassifierConfig:
    backbone: str = "mae_dfer"  # the encoder family: "videomae" | "mae_dfer"
    size: str = "tiny"
    num_classes: int = 8
    img_size: int | None = None  # defaults to the size's
    window: int | None = None  # frames per clip; defaults to the size's num_frames
    drop_rate: float = 0.0  # dropout on the pooled features, before the head
    drop_path_rate: float = 0.1
    weights_path: str | None = None  # local pretraining checkpoint, encoder part loaded at construction
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)  # further encoder config overrides
    # The tokens averaged: "tokens" (the clip's), "regions" (LGI-Former's region tokens), "all" (both).
    pool: str = "tokens"
    fc_norm: bool = False  # True: encoder.norm on the average (MAE-DFER's fc_norm); False: on each token

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ModelError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.pool != "tokens" and self.backbone != "mae_dfer":
            raise ModelError(f"pool={self.pool!r} averages LGI-Former region tokens: it needs backbone 'mae_dfer'")


class VideoEncoderClassifier(ClassifierMixin, nn.Module):
    """A clip of one track's frames -> expression logits (MAE-DFER / VideoMAE fine-tuning). Input [B, T, 3, H, W]."""

    registry_name = "video_encoder_classifier"
    input_kind = "window"

    def __init__(self, cfg: VideoEncoderClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        overrides = dict(cfg.encoder_kwargs, drop_path_rate=cfg.drop_path_rate)
        if cfg.img_size is not None:
            overrides["img_size"] = cfg.img_size
        if cfg.window is not None:
            overrides["num_frames"] = cfg.window
        self.encoder = build_video_encoder(cfg.backbone, cfg.size, **overrides)
        self.window = self.encoder.cfg.num_frames
        self.num_classes = cfg.num_classes
        self.num_features = self.encoder.num_features
        self.num_layers = self.encoder.num_layers
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(self.num_features, cfg.num_classes)
        trunc_normal_(self.head.weight, std=2e-5)  # MAE fine-tuning: start from near-uniform predictions
        nn.init.zeros_(self.head.bias)
        if cfg.weights_path is not None:
            load_encoder_from_pretrain(self, read_state_dict(cfg.weights_path), source=cfg.weights_path)

    def pooled(self, videos: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> the clip's feature [B, D]: the tokens ``cfg.pool`` names, averaged and normalised."""
        if self.cfg.pool == "tokens":
            x = self.encoder.forward_blocks(videos)  # [B, L, D]
        else:
            x = self.encoder.forward_regions(videos)  # [B, R, 1+S, D], index 0: region token
            x = x[:, :, 0] if self.cfg.pool == "regions" else x.flatten(1, 2)  # [B, R, D] or [B, R*(1+S), D]
        if self.cfg.fc_norm:
            return self.encoder.norm(x.mean(dim=1))
        return self.encoder.norm(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        videos = x.transpose(1, 2)  # [B, T, C, H, W] -> [B, C, T, H, W]
        feats = self.pooled(videos)  # [B, D]
        return {"logits": self.head(self.head_drop(feats)), "features": feats}  # [B, classes], [B, D]

    def describe(self) -> dict[str, Any]:
        return describe_config(self.registry_name, self.cfg, weights_path=None)


@register_model("video_encoder_classifier")
def video_encoder_classifier(**kwargs: Any) -> VideoEncoderClassifier:
    return VideoEncoderClassifier(config_from_kwargs(VideoEncoderClassifierConfig, "video_encoder_classifier", kwargs))
