"""What a classifier answers besides ``forward``: its training loss and its class probabilities.

Fine-tuning (``train/finetune.py``), evaluation and inference call these two
methods and never look at a family's name or at its output keys. A plain model
(``forward`` returns ``logits`` [B, C], or [B, T, C] for many-to-many window
models) inherits them from :class:`ClassifierMixin`; a family whose outputs are
more than one set of logits overrides them beside its ``forward`` (the CFC
cascade's stage-wise loss, ESR's per-branch loss, the ensemble's mixed probabilities).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ClassifierMixin", "centre_frame", "cross_entropy", "match_targets"]


def centre_frame(x: torch.Tensor) -> torch.Tensor:
    """The centre frame of a window: [B, T, ...] -> [B, ...]."""
    return x[:, x.shape[1] // 2]


def match_targets(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair predictions with targets of another time layout.

    Many-to-many logits [B, T, C] with one target [B] are scored at the centre frame;
    one prediction [B, C] with per-frame targets [B, T] against the centre target.
    Equal layouts ([B, C] with [B], [B, T, C] with [B, T]) pass unchanged.
    """
    if logits.dim() == 3 and targets.dim() == 1:
        return centre_frame(logits), targets
    if logits.dim() == 2 and targets.dim() == 2:
        return logits, centre_frame(targets)
    return logits, targets


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of logits [..., C] against targets [...] over labelled rows (-1 = unlabelled).

    Computed in float32 (logits may come from bf16 autocast). A batch without any
    labelled row gives 0 with a graph, not NaN, so a step on it changes nothing.
    """
    logits, targets = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
    if not (targets >= 0).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, weight=class_weights, ignore_index=-1, label_smoothing=label_smoothing)


class ClassifierMixin:
    """Loss and probabilities of a model whose ``forward`` returns ``logits`` [B, C] or [B, T, C].

    Mixed into an ``nn.Module``: ``class Model(ClassifierMixin, nn.Module)``.
    """

    # Whether loss() takes per-class weights of the model's classes (class-imbalance
    # weighting); a family that balances classes its own way says False.
    class_weighted = True

    def loss(
        self,
        outputs: dict[str, torch.Tensor],
        targets: torch.Tensor,
        *,
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of ``forward``'s outputs against class targets ([B] or [B, T], -1 = unlabelled).

        Returns (loss, extras): extras are scalars the training loop reports beside the loss.
        """
        logits, targets = match_targets(outputs["logits"], targets)
        return cross_entropy(logits, targets, class_weights, label_smoothing), {}

    def probabilities(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``forward``'s outputs -> class probabilities [B, C] in float32 (many-to-many: the centre frame's)."""
        logits = outputs["logits"]
        if logits.dim() == 3:
            logits = centre_frame(logits)
        return logits.float().softmax(dim=-1)
