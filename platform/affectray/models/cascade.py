"""CFC-SP: coarse-to-fine cascaded networks with smooth predicting (Xue et al., ABAW3 2022).

Coarse-to-fine cascade (CFC). The eight Aff-Wild2 expressions are not equally
separable: Anger, Disgust, Fear and Sadness are rare and easily confused with
one another. A *coarse* network classifies Neutral / Happiness / Surprise /
Other / Negative (the four merged), a *negative* network splits Negative into
its four classes, and the two are fused into one 8-way distribution::

    P(Anger) = P_coarse(Negative) * P_negative(Anger),   P(Happiness) = P_coarse(Happiness), ...

Both stages are the same model kind (a :class:`FrameClassifier` or a
:class:`SmoothPredictingClassifier`) trained on relabelled targets
(``affectray.labels.to_coarse`` / ``to_negative``); :class:`CascadeClassifier`
wraps the trained pair as one 8-class model for evaluation and labeling.

Smooth predicting (SP). An expression changes slowly, so the frames around a
target frame carry its *universal* features (what the expression is over a
short period) while the target frame carries its *unique* features (what it
is now). :class:`SmoothPredictingClassifier` encodes every frame of a window
centred on the target, pools the window into the universal feature, and
classifies it fused with the centre frame's unique feature. At inference,
:func:`smooth_predictions` further smooths per-frame probabilities along a
face track (used by the label job as well).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from affectray.labels import ABAW8, CFC_COARSE, CFC_NEGATIVE, fuse_cascade, to_coarse, to_negative
from affectray.models.backbones import centred_input, create_backbone, frame_features
from affectray.models.heads import ClassifierMixin, centre_frame, cross_entropy, va_loss
from affectray.models.registry import (
    ModelError,
    config_from_kwargs,
    create_model_from_description,
    describe_config,
    register_model,
)

__all__ = [
    "CascadeClassifier",
    "FrameClassifier",
    "FrameClassifierConfig",
    "SmoothPredictingClassifier",
    "SmoothPredictingConfig",
    "cascade_loss",
    "smooth_predictions",
]


# ---------------------------------------------------------------------------
# Frame classifier: backbone + linear head (one cascade stage, or a plain baseline)
# ---------------------------------------------------------------------------


@dataclass
class FrameClassifierConfig:
    backbone: str = "resnet18"
    num_classes: int = 8
    img_size: int | None = None  # for ViT-like backbones with a fixed token grid
    in_chans: int = 3  # 1 for grey input (data.channels: 1)
    drop_rate: float = 0.0  # dropout on the pooled features, before the head
    drop_path_rate: float = 0.0
    weights_path: str | None = None  # local backbone weights, used at construction only
    weights_strict: bool = True  # False: load only the file's tensors that fit the backbone
    va_head: bool = False  # also predict valence and arousal in [-1, 1] (ABAW VA): outputs["va"] [B, 2]


class FrameClassifier(ClassifierMixin, nn.Module):
    """One face image -> expression logits (and, with ``va_head``, valence/arousal). Input [B, 3, H, W]."""

    registry_name = "frame"
    input_kind = "frame"
    window = 1
    classifier = "head"  # the module whose output rows are the classes (timm's name for it)

    def __init__(self, cfg: FrameClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.backbone, self.num_features = create_backbone(
            cfg.backbone,
            img_size=cfg.img_size,
            in_chans=cfg.in_chans,
            weights_path=cfg.weights_path,
            weights_strict=cfg.weights_strict,
            drop_path_rate=cfg.drop_path_rate,
        )
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(self.num_features, cfg.num_classes)
        self.va_head = nn.Linear(self.num_features, 2) if cfg.va_head else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)  # [B, D]
        pooled = self.head_drop(feats)
        outputs = {"logits": self.head(pooled), "features": feats}  # [B, C], [B, D]
        if self.va_head is not None:
            outputs["va"] = torch.tanh(self.va_head(pooled))  # [B, 2]: valence, arousal
        return outputs

    def loss(
        self,
        outputs: dict[str, torch.Tensor],
        targets: torch.Tensor,
        *,
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        va_targets: torch.Tensor | None = None,
        expression_weight: float = 1.0,
        va_weight: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy; with ``va_targets`` [B, 2] (NaN = none) joint with ABAW's VA loss.

        expression_weight * CE + va_weight * ((1 - CCC_valence) + (1 - CCC_arousal)), the
        CCCs over the batch's annotated rows; extras: both terms.
        """
        expression, extras = super().loss(
            outputs, targets, class_weights=class_weights, label_smoothing=label_smoothing
        )
        if va_targets is None:
            return expression, extras
        va = va_loss(self.valence_arousal(outputs), va_targets)
        loss = expression_weight * expression + va_weight * va
        return loss, {**extras, "loss_expression": float(expression.detach()), "loss_va": float(va.detach())}

    def describe(self) -> dict[str, Any]:
        # weights_path (and how strictly it loaded) is dropped: a checkpoint carries the trained weights itself.
        return describe_config(self.registry_name, self.cfg, weights_path=None, weights_strict=True)


@register_model("frame", va_head=True)
def frame_classifier(**kwargs: Any) -> FrameClassifier:
    return FrameClassifier(config_from_kwargs(FrameClassifierConfig, "frame", kwargs))


# ---------------------------------------------------------------------------
# Smooth predicting: universal (window) + unique (centre frame) features
# ---------------------------------------------------------------------------


@dataclass
class SmoothPredictingConfig(FrameClassifierConfig):
    window: int = 5  # odd: frames centred on the target frame
    pooling: str = "mean"  # "mean" | "attention": how the window becomes the universal feature
    fusion: str = "concat"  # "concat" | "gate": how universal and unique features combine

    def __post_init__(self) -> None:
        if self.window < 1 or self.window % 2 == 0:
            raise ModelError(f"cfc_sp window must be a positive odd number of frames, got {self.window}")
        if self.pooling not in ("mean", "attention"):
            raise ModelError(f"cfc_sp pooling must be 'mean' or 'attention', got {self.pooling!r}")
        if self.fusion not in ("concat", "gate"):
            raise ModelError(f"cfc_sp fusion must be 'concat' or 'gate', got {self.fusion!r}")
        if self.va_head:
            raise ModelError("cfc_sp has no valence/arousal head (va_head): the frame family has one")


class SmoothPredictingClassifier(ClassifierMixin, nn.Module):
    """A window of one track's frames -> logits of its centre frame. Input [B, T, 3, H, W] (or [B, 3, H, W] as T=1)."""

    registry_name = "cfc_sp"
    input_kind = "window"

    def __init__(self, cfg: SmoothPredictingConfig) -> None:
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
        self.num_features = d
        # Attention pooling scores each frame; mean pooling has no parameters.
        self.attn_score = nn.Linear(d, 1) if cfg.pooling == "attention" else None
        if cfg.fusion == "gate":
            self.gate = nn.Linear(2 * d, d)
            fused_dim = d
        else:
            self.gate = None
            fused_dim = 2 * d
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(fused_dim, cfg.num_classes)

    def universal_features(self, feats: torch.Tensor) -> torch.Tensor:
        """What the window shares: [B, T, D] -> [B, D]."""
        if self.attn_score is None:
            return feats.mean(dim=1)
        weights = self.attn_score(feats).softmax(dim=1)  # [B, T, 1]
        return (weights * feats).sum(dim=1)  # [B, D]

    def fuse(self, universal: torch.Tensor, unique: torch.Tensor) -> torch.Tensor:
        """Combine [B, D] universal and [B, D] unique features for the head."""
        both = torch.cat([universal, unique], dim=-1)  # [B, 2D]
        if self.gate is None:
            return both
        g = torch.sigmoid(self.gate(both))  # [B, D]: per channel, how much of "now" to keep
        return g * unique + (1 - g) * universal  # [B, D]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() == 4:
            x = x.unsqueeze(1)  # a single frame is a window of one
        feats = frame_features(self.backbone, x)  # [B, T, D]
        unique = feats[:, feats.shape[1] // 2]  # [B, D]: the target (centre) frame
        fused = self.fuse(self.universal_features(feats), unique)  # [B, D or 2D]
        return {"logits": self.head(self.head_drop(fused)), "features": fused}  # [B, C]

    def describe(self) -> dict[str, Any]:
        return describe_config(self.registry_name, self.cfg, weights_path=None, weights_strict=True)


@register_model("cfc_sp")
def smooth_predicting_classifier(**kwargs: Any) -> SmoothPredictingClassifier:
    return SmoothPredictingClassifier(config_from_kwargs(SmoothPredictingConfig, "cfc_sp", kwargs))


# ---------------------------------------------------------------------------
# The cascade as one 8-class model
# ---------------------------------------------------------------------------


class CascadeClassifier(ClassifierMixin, nn.Module):
    """Coarse (5) and negative (4) models fused into ABAW8 probabilities.

    ``forward`` returns ``probs`` [B, 8] (ABAW8 order) and ``logits`` = log(probs),
    so softmax(logits) == probs and cross-entropy on ``logits`` is the NLL of the
    fused distribution. Training uses the stage-wise loss instead (:func:`cascade_loss`).
    """

    registry_name = "cfc_cascade"
    class_weighted = False  # the coarse/negative split is the cascade's own answer to class imbalance

    def __init__(self, coarse: nn.Module, negative: nn.Module) -> None:
        super().__init__()
        for stage, model, labelset in (("coarse", coarse, CFC_COARSE), ("negative", negative, CFC_NEGATIVE)):
            if model.num_classes != len(labelset):
                raise ModelError(
                    f"cascade {stage} model must have {len(labelset)} classes {list(labelset.classes)}, "
                    f"got {model.num_classes}"
                )
        self.coarse = coarse
        self.negative = negative
        self.num_classes = len(ABAW8)
        # Stages may differ (a frame coarse model, a window negative one): each gets its own input.
        self.input_kind = "window" if "window" in (coarse.input_kind, negative.input_kind) else "frame"
        self.window = max(coarse.window, negative.window)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        coarse_logits = self.coarse(centred_input(x, self.coarse))["logits"]  # [B, 5]
        negative_logits = self.negative(centred_input(x, self.negative))["logits"]  # [B, 4]
        # Softmax in float32 even under autocast: the product of two small probabilities underflows in bf16.
        probs = fuse_cascade(coarse_logits.float().softmax(-1), negative_logits.float().softmax(-1))  # [B, 8]
        logits = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()  # [B, 8]
        return {"logits": logits, "probs": probs, "coarse_logits": coarse_logits, "negative_logits": negative_logits}

    def loss(
        self,
        outputs: dict[str, torch.Tensor],
        targets: torch.Tensor,
        *,
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """:func:`cascade_loss` on ABAW8 targets [B] (per-frame targets [B, T]: the centre frame's, as it predicts)."""
        if class_weights is not None:
            raise ValueError("the CFC cascade takes no class weights: its coarse/negative split balances the classes")
        if targets.dim() == 2:
            targets = centre_frame(targets)
        return cascade_loss(outputs, targets, label_smoothing=label_smoothing), {}

    def probabilities(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs["probs"].float()

    def describe(self) -> dict[str, Any]:
        stages = {"coarse": self.coarse.describe(), "negative": self.negative.describe()}
        return {"name": self.registry_name, "kwargs": stages}


@register_model("cfc_cascade", num_classes=len(ABAW8))
def cascade_classifier(coarse: dict[str, Any], negative: dict[str, Any]) -> CascadeClassifier:
    """``coarse`` / ``negative``: model descriptions, e.g. ``{"name": "frame", "kwargs": {"num_classes": 5}}``."""
    return CascadeClassifier(create_model_from_description(coarse), create_model_from_description(negative))


# ABAW8 index -> coarse / negative index (-1: not in that view), as lookup tables so no host sync per step.
_TO_COARSE = torch.as_tensor(to_coarse(np.arange(len(ABAW8))))
_TO_NEGATIVE = torch.as_tensor(to_negative(np.arange(len(ABAW8))))


def _relabel(targets: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    mapped = table.to(targets.device)[targets.clamp(min=0)]
    return torch.where(targets >= 0, mapped, torch.full_like(mapped, -1))


def cascade_loss(
    outputs: dict[str, torch.Tensor], abaw8_targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Stage-wise CFC loss: CE(coarse, coarse targets) + CE(negative, negative targets on negative frames).

    ``abaw8_targets`` [B] holds ABAW8 indices, -1 for unlabelled frames. Frames that
    are not negative do not train the negative stage; a batch without any gives it 0.
    ``label_smoothing`` applies to both stages.
    """
    coarse_t = _relabel(abaw8_targets, _TO_COARSE)  # [B]
    negative_t = _relabel(abaw8_targets, _TO_NEGATIVE)  # [B], -1 off-negative
    coarse = cross_entropy(outputs["coarse_logits"], coarse_t, label_smoothing=label_smoothing)
    return coarse + cross_entropy(outputs["negative_logits"], negative_t, label_smoothing=label_smoothing)


# ---------------------------------------------------------------------------
# Inference-time smoothing along a track
# ---------------------------------------------------------------------------


def smooth_predictions(
    probs: torch.Tensor | np.ndarray,
    window: int,
    *,
    method: str = "mean",
    groups: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor | np.ndarray:
    """Smooth per-frame class probabilities [N, C] along time with a centred sliding window.

    Rows are consecutive frames of one track (or of several, told apart by ``groups``
    [N], each group's rows in frame order); the window shrinks at a track's ends
    instead of padding. ``method``:

    - ``"mean"``: moving average of the probabilities.
    - ``"majority"``: each class's share of the window's per-frame argmax votes,
      ties broken by mean probability; ``(votes + mean) / (n + 1)`` still sums to 1.

    Returns the same type, shape and dtype as ``probs``.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"smoothing window must be a positive odd number of frames, got {window}")
    if method not in ("mean", "majority"):
        raise ValueError(f"smoothing method must be 'mean' or 'majority', got {method!r}")
    is_numpy = isinstance(probs, np.ndarray)
    p = torch.as_tensor(probs)
    if p.dim() != 2:
        raise ValueError(f"smooth_predictions expects [N, C] probabilities, got shape {tuple(p.shape)}")
    if groups is None:
        out = _smooth_track(p, window, method)
    else:
        g = torch.as_tensor(groups)
        if g.shape != p.shape[:1]:
            raise ValueError(f"groups must have shape [{p.shape[0]}], got {tuple(g.shape)}")
        out = torch.empty_like(p)
        for value in torch.unique(g):
            rows = (g == value).nonzero().squeeze(1)
            out[rows] = _smooth_track(p[rows], window, method)
    return out.numpy() if is_numpy else out


def _smooth_track(p: torch.Tensor, window: int, method: str) -> torch.Tensor:
    n = p.shape[0]
    if n == 0 or window == 1:
        return p.clone()
    x = p.double()  # [N, C]; float64 so a constant track comes back exactly constant
    half = window // 2
    t = torch.arange(n)
    lo, hi = (t - half).clamp(min=0), (t + half + 1).clamp(max=n)  # [N] window bounds
    count = (hi - lo).unsqueeze(1).double()  # [N, 1]

    def window_sum(v: torch.Tensor) -> torch.Tensor:  # [N, C] -> [N, C], sums over each row's window
        cs = F.pad(v.cumsum(0), (0, 0, 1, 0))  # [N+1, C]
        return cs[hi] - cs[lo]

    mean = window_sum(x) / count
    if method == "mean":
        return mean.to(p.dtype)
    votes = F.one_hot(x.argmax(dim=1), x.shape[1]).double()  # [N, C]
    return ((window_sum(votes) + mean) / (count + 1)).to(p.dtype)
