"""Join separately fine-tuned classifiers into one weighted ensemble checkpoint (ABAW2021 style).

    affectray finetune --config jobs/configs/finetune-smoke.yaml --set run.name=cnn                       # frame CNN
    affectray finetune --config ... --set model.name=cnn_gru --set data.mode=clip --set run.name=gru      # CNN-GRU
    affectray ensemble runs/cnn/best_checkpoint runs/gru/best_checkpoint --weights 1 2 --out runs/ensemble
    affectray ensemble runs/cnn/best_checkpoint runs/gru/best_checkpoint --fit-on shards --out runs/ensemble

The ensemble is a ``weighted_ensemble`` model: the weighted sum of its
members' class probabilities, each member reading what it was trained on (the
centre frame, or its own centred window), so evaluation and labeling take it as
any classifier. Members must predict the same label set from the same pixels
(image size, normalisation, frame stride).

The weights are typed (``--weights``), equal, or fitted on validation data as
Zhang et al. fit theirs (``--fit-on``, ``combine/fit_weights.py``): each member
scores the rows ``affectray evaluate`` would (the runs' held-out videos when the
shards are where they trained, else every row, or ``--split``), and the weights
on a grid over the simplex that maximise ``--metric`` win. The checkpoint's
``meta.json`` records them under ``ensemble``: the weights and how they were fitted
(data, selection, metric, the fitted, equal-weights and single-member scores).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch

from affectray import checkpoints as ckpt
from affectray.combine.cascade import load_member, write_composite
from affectray.combine.fit_weights import METRICS, fit_weights, member_probabilities
from affectray.config import resolve_location
from affectray.errors import JobError
from affectray.models.temporal import WeightedEnsemble
from affectray.runtime import init_ray

__all__ = ["combine_ensemble", "format_fit"]


def combine_ensemble(
    uris: list[str],
    out_uri: str,
    weights: list[float] | None = None,
    *,
    fit_on: str | None = None,
    split: str | None = None,
    metric: str = "f1_macro",
    batch_size: int = 64,
    device: Any = "cpu",
) -> dict[str, Any]:
    """Write the ensemble of ``uris`` to ``out_uri``; ``fit_on`` (a shard root) fits the weights there.

    ``split`` picks that split's rows of ``fit_on``; ``metric`` is one of METRICS.
    """
    if len(uris) < 2:
        raise ckpt.CheckpointError("an ensemble needs at least two member checkpoints")
    if fit_on is not None and weights is not None:
        raise JobError("give the weights (--weights) or fit them (--fit-on), not both")
    if fit_on is None and split is not None:
        raise JobError(f"--split {split!r} picks the rows --fit-on fits on: give --fit-on too")
    members, metas = zip(*(load_member(uri) for uri in uris))
    label_sets = {tuple(m["label_set"]["classes"]) for m in metas}
    if len(label_sets) != 1:
        raise ckpt.CheckpointError(f"the members predict different label sets: {sorted(label_sets)}")
    fit = None
    if fit_on is not None:
        probs, y_true, selection = member_probabilities(
            list(members), list(metas), list(uris), fit_on, split=split, batch_size=batch_size, device=device
        )
        fitted = fit_weights(probs, y_true, metric)
        weights = fitted.weights
        fit = {"data": fit_on, "selection": selection, "method": "simplex grid", **dataclasses.asdict(fitted)}
    ensemble = WeightedEnsemble(list(members), weights)
    given = [1.0] * len(uris) if weights is None else [float(w) for w in weights]
    record = {"weights": [w / sum(given) for w in given], "fit": fit}  # the model holds them in float32
    summary = write_composite(ensemble, list(metas), list(uris), out_uri, job="ensemble", extra={"ensemble": record})
    return {**summary, "checkpoint": out_uri, "members": list(uris), **record}


def format_fit(fit: dict[str, Any], uris: list[str]) -> str:
    """The fit as people read it: every member's score, equal weights', the fitted weights' score."""
    metric = fit["metric"]
    selection = fit["selection"]
    rows = (
        f"split {selection['split']!r}" if selection["split"] is not None
        else "the runs' held-out videos" if selection["holdout"] else "every row"
    )  # fmt: skip
    width = max(len(u) for u in uris)
    lines = [f"fitted on {fit['data']} ({rows}): {fit['samples']} samples, {metric}, grid step {fit['grid_step']:.4g}"]
    lines += [f"  member  {u:<{width}s}  {metric} {s:.4f}" for u, s in zip(uris, fit["member_scores"])]
    equal = " ".join(f"{1 / len(uris):.3f}" for _ in uris)
    lines.append(f"  equal weights   [{equal}]  {metric} {fit['equal_weights_score']:.4f}")
    fitted = " ".join(f"{w:.3f}" for w in fit["weights"])
    lines.append(f"  fitted weights  [{fitted}]  {metric} {fit['score']:.4f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("members", nargs="+", help="classifier checkpoint URIs (e.g. runs/<name>/best_checkpoint)")
    parser.add_argument(
        "--out", required=True, help="where to write the ensemble checkpoint (local dir or s3:// prefix)"
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", type=float, nargs="+", help="one non-negative weight per member (default: equal)")
    weights.add_argument(
        "--fit-on",
        metavar="SHARDS",
        help="fit the weights on this shard root (local dir or s3:// prefix): the rows `affectray evaluate` "
        "scores (the runs' held-out videos when they trained on it, else every row)",
    )
    parser.add_argument("--split", help="with --fit-on: fit on this split's rows only (e.g. val)")
    parser.add_argument(
        "--metric", choices=METRICS, default="f1_macro", help="with --fit-on: the figure to maximise (default f1_macro)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="with --fit-on: evaluation batch size")
    parser.add_argument("--address", help="with --fit-on: Ray address (default: RAY_ADDRESS, else a new local Ray)")


def main(args: argparse.Namespace) -> dict[str, Any]:
    uris = [resolve_location(m) for m in args.members]
    fit_on = getattr(args, "fit_on", None)
    device = "cpu"
    if fit_on is not None:
        # Ray Data's readers run in directories of their own: local paths become absolute here.
        fit_on = resolve_location(fit_on)
        init_ray(getattr(args, "address", None))
        device = "cuda" if torch.cuda.is_available() else "cpu"
    summary = combine_ensemble(
        uris, resolve_location(args.out), args.weights, fit_on=fit_on, split=getattr(args, "split", None),
        metric=getattr(args, "metric", "f1_macro"), batch_size=getattr(args, "batch_size", 64), device=device,
    )  # fmt: skip
    if summary["fit"] is not None:
        print(format_fit(summary["fit"], uris), flush=True)
    return summary
