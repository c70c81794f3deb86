"""What a classifier answers besides ``forward``: its training loss and its class probabilities.

Fine-tuning (``train/finetune.py``), evaluation and inference call these two
methods and never look at a family's name or at its output keys. A plain model
(``forward`` returns ``logits`` [B, C], or [B, T, C] for many-to-many window
models) inherits them from :class:`ClassifierMixin`; a family whose outputs are
more than one set of logits overrides them beside its ``forward`` (the CFC
cascade's stage-wise loss, ESR's per-branch loss, the ensemble's mixed probabilities).

A model with a valence/arousal head (``va_head``, e.g. the frame family's) also returns
``va`` [B, 2] in [-1, 1]; :func:`va_loss` is ABAW's loss for it, (1 - CCC_valence) +
(1 - CCC_arousal) over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ClassifierMixin", "batch_ccc", "centre_frame", "cross_entropy", "match_targets", "va_loss"]


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


def batch_ccc(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Concordance correlation of each column over the rows whose target is finite: [B, K] -> [K].

    Population moments, as ``affectray.metrics.valence_arousal_ccc``. A column with fewer
    than two annotated rows has no correlation to speak of: it gives 1 (no loss), with a graph.
    """
    pred, target = pred.float(), target.float()
    mask = torch.isfinite(target)  # [B, K]
    w = mask.float()
    n = w.sum(0)  # [K]
    count = n.clamp(min=1.0)
    t = torch.where(mask, target, torch.zeros_like(target))
    mean_p, mean_t = (pred * w).sum(0) / count, (t * w).sum(0) / count  # [K]
    dp, dt = (pred - mean_p) * w, (t - mean_t) * w  # [B, K], 0 on unannotated rows
    cov = (dp * dt).sum(0) / count
    var_p, var_t = (dp * dp).sum(0) / count, (dt * dt).sum(0) / count
    ccc = 2 * cov / (var_p + var_t + (mean_p - mean_t) ** 2 + eps)
    return torch.where(n >= 2, ccc, torch.ones_like(ccc))


def va_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ABAW's valence/arousal loss: (1 - CCC_valence) + (1 - CCC_arousal), pred and target [B, 2] (NaN = none)."""
    return (1 - batch_ccc(pred, target)).sum()


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

    @property
    def predicts_va(self) -> bool:
        """Whether ``forward`` also returns ``va`` [B, 2] (valence, arousal): the model has a ``va_head``."""
        return getattr(self, "va_head", None) is not None

    def valence_arousal(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``forward``'s outputs -> [B, 2] valence and arousal in float32 (a model with a VA head only)."""
        if "va" not in outputs:
            raise ValueError(f"{type(self).__name__} has no valence/arousal head: its outputs have no 'va'")
        return outputs["va"].float()

    def probabilities(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``forward``'s outputs -> class probabilities [B, C] in float32 (many-to-many: the centre frame's)."""
        logits = outputs["logits"]
        if logits.dim() == 3:
            logits = centre_frame(logits)
        return logits.float().softmax(dim=-1)
