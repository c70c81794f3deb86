"""Fit an ensemble's member weights on validation data (ABAW2021, Zhang et al.).

Each member scores the validation rows once through ``affectray evaluate``'s pass
(its own preprocessing, the same deterministic selection), so the members' class
probabilities line up frame by frame; the weights are the point of a grid on the
simplex whose weighted average of probabilities scores best on the chosen metric.

A grid, not a gradient: the figures the challenge ranks by (macro F1, UAR) are step
functions of the weights, and the weights that maximise the likelihood need not
maximise them. An exhaustive grid finds the best point at its resolution, runs the
same way every time, and holds every single member (the corners) and equal weights
(the step divides 1/M), so the fitted score is never below either. Ties go to the
point nearest equal weights: among equally good answers, the least fitted one.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import numpy as np

from affectray.errors import AffectrayError, JobError
from affectray.metrics import expression_metrics
from affectray.runtime import init_ray
from affectray.train.evaluation import checkpoint_class_view, checkpoint_data_config, evaluate_model

__all__ = ["METRICS", "EnsembleFitError", "WeightFit", "align_members", "fit_weights", "member_probabilities"]

METRICS = ("f1_macro", "accuracy", "uar", "war", "abaw2")  # scalar figures of expression_metrics
MAX_GRID_POINTS = 2000  # 2 members: step 0.01; 3: 1/60; 4: 1/20; ... 7: 1/7
FINEST_STEPS = 100
TIE_TOLERANCE = 1e-9


class EnsembleFitError(JobError):
    """Weights that cannot be fitted as asked: members that read the data differently, no rows, too many members."""


@dataclasses.dataclass(frozen=True)
class WeightFit:
    weights: list[float]  # [M], non-negative, sum 1
    score: float  # the metric of the fitted weighted average
    member_scores: list[float]  # [M] each member alone
    equal_weights_score: float
    metric: str
    metrics: dict[str, Any]  # every figure of the fitted ensemble on the same rows
    samples: int
    grid_step: float
    candidates: int  # grid points scored


def grid_steps(num_members: int) -> int:
    """K of the weight grid: the finest multiple of M (so equal weights is on the grid), at most
    FINEST_STEPS, whose grid has at most MAX_GRID_POINTS points."""
    steps = FINEST_STEPS // num_members * num_members
    while steps >= num_members and math.comb(steps + num_members - 1, num_members - 1) > MAX_GRID_POINTS:
        steps -= num_members
    if steps < num_members:
        most = max(m for m in range(2, 32) if math.comb(2 * m - 1, m - 1) <= MAX_GRID_POINTS)
        raise EnsembleFitError(f"fitting weights takes at most {most} members, got {num_members}: give --weights")
    return steps


def simplex_grid(num_members: int, steps: int) -> np.ndarray:
    """Every weight vector of multiples of 1/steps summing to 1, in a fixed order: [P, M]."""
    # Stars and bars: M-1 bars among K+M-1 slots; the gaps between bars are the parts.
    slots = steps + num_members - 1
    bars = np.array(list(itertools.combinations(range(slots), num_members - 1)), dtype=np.int64)  # [P, M-1]
    edges = np.concatenate([np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), slots)], axis=1)
    return (np.diff(edges, axis=1) - 1) / steps  # [P, M]


def score(probs: np.ndarray, y_true: np.ndarray, metric: str) -> float:
    """``metric`` of the argmax of probs [N, C] against y_true [N]."""
    return float(expression_metrics(y_true, probs.argmax(axis=1), probs.shape[1])[metric])


def fit_weights(member_probs: np.ndarray, y_true: np.ndarray, metric: str = "f1_macro") -> WeightFit:
    """The grid weights whose average of member_probs [M, N, C] maximises ``metric`` on y_true [N].

    Rows with y_true == -1 (a class the members do not predict) are left out.
    """
    if metric not in METRICS:
        raise EnsembleFitError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    member_probs = np.asarray(member_probs, dtype=np.float64)
    y_true = np.asarray(y_true)
    keep = y_true >= 0
    if not keep.any():
        raise EnsembleFitError("no validation row has a class the members predict")
    member_probs, y_true = member_probs[:, keep], y_true[keep]  # [M, N, C], [N]
    num_members = len(member_probs)
    steps = grid_steps(num_members)
    grid = simplex_grid(num_members, steps)  # [P, M]
    scores = np.array([score(np.tensordot(w, member_probs, axes=1), y_true, metric) for w in grid])  # [P]
    tied = np.flatnonzero(scores >= scores.max() - TIE_TOLERANCE)
    spread = ((grid[tied] - 1.0 / num_members) ** 2).sum(axis=1)
    best = tied[np.argmin(spread)]  # argmin: the first in grid order among equal distances
    fitted = np.tensordot(grid[best], member_probs, axes=1)  # [N, C]
    metrics = expression_metrics(y_true, fitted.argmax(axis=1), fitted.shape[-1])
    # The single members and equal weights are grid points: their scores are read off the same search.
    corners = [int(np.flatnonzero(grid[:, m] == 1.0)[0]) for m in range(num_members)]
    equal = int(np.flatnonzero((np.rint(grid * steps) == steps // num_members).all(axis=1))[0])
    return WeightFit(
        weights=[float(w) for w in grid[best]],
        score=float(scores[best]),
        member_scores=[float(scores[c]) for c in corners],
        equal_weights_score=float(scores[equal]),
        metric=metric,
        metrics={k: v for k, v in metrics.items() if k in METRICS or k == "count"},
        samples=int(keep.sum()),
        grid_step=1.0 / steps,
        candidates=len(grid),
    )


# --------------------------------------------------------------------------- members' validation probabilities


def align_members(results: list[Any], uris: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Members' EvalResults → (probabilities [M, N, C], targets [N]), once they scored the same rows in one order."""
    first = results[0]
    for uri, result in zip(uris[1:], results[1:]):
        same_rows = len(result.y_true) == len(first.y_true) and (
            np.array_equal(result.video_id, first.video_id) and np.array_equal(result.frame_index, first.frame_index)
        )
        if not same_rows:
            n = min(len(result.y_true), len(first.y_true))
            differ = (result.video_id[:n] != first.video_id[:n]) | (result.frame_index[:n] != first.frame_index[:n])
            at = int(np.argmax(differ)) if differ.any() else n
            where = (
                f"row {at}: ({first.video_id[at]}, frame {first.frame_index[at]}) vs "
                f"({result.video_id[at]}, frame {result.frame_index[at]})"
                if at < n
                else f"row {at}: one ends there"
            )
            raise EnsembleFitError(
                f"the members scored different rows: {uris[0]!r} {len(first.y_true)}, {uri!r} {len(result.y_true)} "
                f"(first difference at {where}); members must read the data the same way (per-frame labels, "
                "the same held-out videos): pick the rows with --split"
            )
        if not np.array_equal(result.y_true, first.y_true):
            raise EnsembleFitError(f"{uris[0]!r} and {uri!r} scored the same rows against different targets")
    return np.stack([r.probs for r in results]), first.y_true  # [M, N, C], [N]


def member_probabilities(
    models: list[Any],
    metas: list[dict[str, Any]],
    uris: list[str],
    root: str,
    *,
    split: str | None = None,
    batch_size: int = 64,
    device: Any = "cpu",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Each member's class probabilities on ``root``'s validation rows: ([M, N, C], targets [N], selection).

    The rows are those ``affectray evaluate CHECKPOINT ROOT [--split SPLIT]`` scores:
    the run's held-out videos when ``root`` is where it trained, else every row
    (``split``: only that split's rows). Probabilities are unsmoothed.
    """
    selections = []
    for meta in metas:
        data, holdout = checkpoint_data_config(meta, root)
        if split is not None:
            data, holdout = dataclasses.replace(data, split=split, val_fraction=0.0), False
        selections.append((data, holdout))
    chosen = [{"split": d.split, "holdout": h, "val_fraction": d.val_fraction} for d, h in selections]
    if any(c != chosen[0] for c in chosen):
        rows = "; ".join(f"{u!r} {c}" for u, c in zip(uris, chosen))
        raise EnsembleFitError(f"the members select different rows of {root!r} ({rows}): pick the rows with --split")
    init_ray()
    results = []
    for model, meta, uri, (data, holdout) in zip(models, metas, uris, selections):
        view = checkpoint_class_view(meta)
        model.to(device)
        try:
            results.append(
                evaluate_model(model, data, holdout=holdout, class_view=view, batch_size=batch_size, device=device)
            )
        except AffectrayError:
            raise
        except ValueError as error:  # no labelled rows in this selection
            raise EnsembleFitError(f"cannot score {uri!r} on {root!r}: {error}") from None
        finally:
            model.to("cpu")
    probs, y_true = align_members(results, uris)
    return probs, y_true, chosen[0]
