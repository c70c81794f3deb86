"""Join separately fine-tuned classifiers into one weighted ensemble checkpoint (ABAW2021 style).

    affectray finetune --config jobs/configs/finetune-smoke.yaml --set run.name=cnn                       # frame CNN
    affectray finetune --config ... --set model.name=cnn_gru --set data.mode=clip --set run.name=gru      # CNN-GRU
    affectray ensemble runs/cnn/best_checkpoint runs/gru/best_checkpoint --weights 1 2 --out runs/ensemble

The ensemble is a ``weighted_ensemble`` model: the weighted sum of its
members' class probabilities, each member reading what it was trained on (the
centre frame, or its own centred window), so evaluation and labeling take it as
any classifier. Members must predict the same label set from the same pixels
(image size, normalisation, frame stride).
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["combine_ensemble"]


def combine_ensemble(uris: list[str], out_uri: str, weights: list[float] | None = None) -> dict[str, Any]:
    from affectray import checkpoints as ckpt
    from affectray.combine.cascade import load_member, write_composite
    from affectray.models.temporal import WeightedEnsemble

    if len(uris) < 2:
        raise ckpt.CheckpointError("an ensemble needs at least two member checkpoints")
    members, metas = zip(*(load_member(uri) for uri in uris))
    label_sets = {tuple(m["label_set"]["classes"]) for m in metas}
    if len(label_sets) != 1:
        raise ckpt.CheckpointError(f"the members predict different label sets: {sorted(label_sets)}")
    ensemble = WeightedEnsemble(list(members), weights)
    return write_composite(ensemble, list(metas), list(uris), out_uri, job="ensemble")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("members", nargs="+", help="classifier checkpoint URIs (e.g. runs/<name>/best_checkpoint)")
    parser.add_argument(
        "--out", required=True, help="where to write the ensemble checkpoint (local dir or s3:// prefix)"
    )
    parser.add_argument("--weights", type=float, nargs="+", help="one non-negative weight per member (default: equal)")


def main(args: argparse.Namespace) -> dict[str, Any]:
    from affectray.config import resolve_location

    return combine_ensemble([resolve_location(m) for m in args.members], resolve_location(args.out), args.weights)
