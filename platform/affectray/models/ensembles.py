"""ESR: ensembles with shared representations (Siqueira et al., AAAI 2020).

Early convolutional layers learn generic, low-level features that every member
of an ensemble would learn alike, so ESR computes them once in a *shared base*
and gives each of N *branches* its own later layers and head. Branches start
from independent random inits and each gets its own loss, so they disagree
where the data is ambiguous; the ensemble averages them at a fraction of the
cost of N full networks.

Here the base is the first ``shared_stages`` feature stages of a timm CNN and
every branch is the rest of a freshly initialised copy of the same CNN
(``backbones.split_backbone``) plus a linear head. A diversity term
(:func:`diversity_loss`) can push the branches' features apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from affectray.models.backbones import create_backbone, load_weights, split_backbone
from affectray.models.heads import ClassifierMixin, cross_entropy, match_targets
from affectray.models.registry import ModelError, config_from_kwargs, describe_config, register_model

__all__ = ["ESR", "ESRConfig", "diversity_loss", "esr_loss"]


@dataclass
class ESRConfig:
    backbone: str = "resnet18"  # a CNN whose forward is a chain of stages (ResNet, ConvNeXt, EfficientNet, ...)
    num_classes: int = 8
    img_size: int | None = None  # size of the construction-time split check; CNNs take any size after
    shared_stages: int = 3  # feature stages in the shared base (ResNet: stem, layer1, layer2)
    num_branches: int = 4
    drop_rate: float = 0.0
    diversity_weight: float = 0.1  # weight of diversity_loss in ESR.loss (finetune's loss.diversity_weight sets it)
    weights_path: str | None = None  # local CNN weights: base and every branch start from them
    weights_strict: bool = True  # False: load only the file's tensors that fit the CNN

    def __post_init__(self) -> None:
        if self.num_branches < 1:
            raise ModelError(f"esr needs at least one branch, got num_branches={self.num_branches}")


class ESRBranch(nn.Module):
    """Later CNN stages + pooling + linear head: shared feature map -> (logits [B, C], features [B, D])."""

    def __init__(self, tail: nn.Module, num_features: int, num_classes: int, drop_rate: float) -> None:
        super().__init__()
        self.tail = tail
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.tail(shared)  # [B, D]
        return self.head(self.head_drop(feats)), feats


class ESR(ClassifierMixin, nn.Module):
    """Shared base + N branches. Input [B, 3, H, W]; ``logits`` [B, C] is the branch mean.

    Extras: ``branch_logits`` [N, B, C] and ``branch_features`` [N, B, D].
    """

    registry_name = "esr"
    input_kind = "frame"
    window = 1

    def __init__(self, cfg: ESRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        check = cfg.img_size or 64
        branches = []
        for i in range(cfg.num_branches + 1):
            # A fresh CNN per branch: independent random inits are what make the branches differ.
            cnn, d = create_backbone(cfg.backbone, img_size=cfg.img_size)
            if cfg.weights_path is not None:
                load_weights(cnn, cfg.weights_path, strict=cfg.weights_strict)
            base, tail = split_backbone(cnn, cfg.shared_stages, check_size=check)
            if i == 0:
                self.base = base
            else:
                branches.append(ESRBranch(tail, d, cfg.num_classes, cfg.drop_rate))
        self.branches = nn.ModuleList(branches)
        self.num_features = d

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.base(x)  # [B, C_k, H/r, W/r]
        logits, feats = zip(*(branch(shared) for branch in self.branches))
        branch_logits = torch.stack(logits)  # [N, B, C]
        branch_features = torch.stack(feats)  # [N, B, D]
        return {"logits": branch_logits.mean(0), "branch_logits": branch_logits, "branch_features": branch_features}

    def loss(
        self,
        outputs: dict[str, torch.Tensor],
        targets: torch.Tensor,
        *,
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """:func:`esr_loss` with the config's diversity weight (per-frame targets [B, T]: the centre frame's)."""
        _, targets = match_targets(outputs["logits"], targets)
        loss = esr_loss(
            outputs, targets, self.cfg.diversity_weight, class_weights=class_weights, label_smoothing=label_smoothing
        )
        return loss, {}

    def describe(self) -> dict[str, Any]:
        return describe_config(self.registry_name, self.cfg, weights_path=None, weights_strict=True)


def diversity_loss(branch_outputs: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity between branches' per-sample outputs [N, B, D] (features or probabilities).

    1 when all branches agree exactly, lower as they differ; minimising it
    diversifies the ensemble. A single branch gives 0.
    """
    n = branch_outputs.shape[0]
    if n < 2:
        return branch_outputs.new_zeros(())
    z = F.normalize(branch_outputs.float(), dim=-1)  # [N, B, D]
    sim = torch.einsum("ibd,jbd->ijb", z, z)  # [N, N, B]
    i, j = torch.triu_indices(n, n, offset=1, device=z.device)  # the N(N-1)/2 pairs
    return sim[i, j].mean()


def esr_loss(
    outputs: dict[str, torch.Tensor],
    targets: torch.Tensor,
    diversity_weight: float = 0.0,
    *,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Sum over branches of cross-entropy (each branch trained on its own) + weight * diversity of branch features.

    ``targets`` [B]: class indices, -1 for unlabelled frames.
    """
    branch_logits = outputs["branch_logits"]  # [N, B, C]
    n = branch_logits.shape[0]
    # One CE over the flattened [N*B] rows is the mean over branches; times N gives the per-branch sum.
    ce = cross_entropy(branch_logits, targets.repeat(n), class_weights, label_smoothing) * n
    if not diversity_weight:
        return ce
    return ce + diversity_weight * diversity_loss(outputs["branch_features"])


@register_model("esr")
def esr(**kwargs: Any) -> ESR:
    return ESR(config_from_kwargs(ESRConfig, "esr", kwargs))
