"""Join the two CFC-SP stages into one 8-class cascade checkpoint.

    affectray finetune --config jobs/configs/finetune-smoke.yaml --set class_view=coarse --set run.name=coarse
    affectray finetune --config jobs/configs/finetune-smoke.yaml --set class_view=negative --set run.name=negative
    affectray cascade runs/coarse/best_checkpoint runs/negative/best_checkpoint runs/cfc

The coarse stage (Neutral, Happiness, Surprise, Other, Negative) and the
negative stage (Anger, Disgust, Fear, Sadness) train as two runs on the same
shards; the joined checkpoint is a ``cfc_cascade`` model whose output is the
fused ABAW8 distribution, P(Anger) = P(Negative) * P(Anger | Negative), so
evaluation and labeling treat it as any 8-class classifier.
"""

from __future__ import annotations

import argparse
from typing import Any

from affectray import checkpoints as ckpt
from affectray.config import config_from_dict, config_to_dict, resolve_location
from affectray.data.loaders import DataConfig
from affectray.labels import ABAW8

__all__ = ["combine_cascade", "joint_preprocessing", "load_member", "write_composite"]


def load_member(uri: str, *, class_view: str | None = None):
    """(model with its trained weights, meta) of a classifier checkpoint to join into a composite."""
    from affectray.models.registry import create_model_from_description

    with ckpt.open_checkpoint(uri) as directory:
        meta = ckpt.read_meta(directory)
        if meta.get("kind") != "classifier" or (class_view and meta.get("class_view") != class_view):
            view = f"{class_view}-view " if class_view else ""
            raise ckpt.CheckpointError(f"{uri!r} is not a {view}classifier (class_view={meta.get('class_view')!r})")
        model = create_model_from_description(meta["model"])
        model.load_state_dict(ckpt.load_weights(directory))
    return model, meta


def joint_preprocessing(metas: list[dict[str, Any]], window: int) -> dict[str, Any]:
    """One preprocessing for members that must agree on pixels; clips take the longest window.

    A composite hands each member the centre frame or its own centred sub-window
    (``centred_input``), so frame and window members combine when their image size,
    normalisation and (for windows) frame stride agree.
    """

    pres = [m["preprocessing"] for m in metas]
    for key in ("image_size", "mean", "std"):
        values = [p[key] for p in pres]
        if any(v != values[0] for v in values):
            raise ckpt.CheckpointError(f"the members differ in preprocessing {key}: {values}")
    strides = {p["frame_stride"] for p in pres if p["mode"] == "clip"}
    if len(strides) > 1:
        raise ckpt.CheckpointError(f"the members' windows use different frame strides: {sorted(strides)}")
    joint = dict(pres[0])
    if strides:
        joint.update(mode="clip", num_frames=window, frame_stride=strides.pop())
    return joint


def write_composite(
    model, metas: list[dict[str, Any]], uris: list[str], out_uri: str, *, job: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Save a composite of trained members as a self-describing 8-class-or-whatever checkpoint.

    ``extra``: more meta entries (an ensemble's fitted weights and how they were fitted).
    """
    import dataclasses
    import tempfile

    preprocessing = joint_preprocessing(metas, getattr(model, "window", 1))
    validation = dict(metas[0].get("validation") or {})
    if validation.get("data"):  # evaluate reads what the composite takes: frames or its window
        data = config_from_dict(DataConfig, validation["data"])
        data = dataclasses.replace(
            data, mode=preprocessing["mode"], num_frames=preprocessing["num_frames"],
            frame_stride=preprocessing["frame_stride"],
        )  # fmt: skip
        validation["data"] = config_to_dict(data)
    validation["metrics"] = {}
    label_set = metas[-1]["label_set"] if job == "ensemble" else None
    meta = {
        "kind": "classifier",
        "model": model.describe(),
        "label_set": label_set or _abaw8(),
        "class_view": metas[0].get("class_view", "abaw8") if job == "ensemble" else "abaw8",
        "preprocessing": preprocessing,
        "validation": validation,
        "members": [{"uri": u, "metrics": m.get("validation", {}).get("metrics")} for u, m in zip(uris, metas)],
        "step": 0,
        "git_revision": ckpt.git_revision(),
        **(extra or {}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save_checkpoint(tmp, model, meta)
        ckpt.publish(tmp, out_uri)
    return {"job": job, "checkpoint": out_uri, "num_classes": len(meta["label_set"]["classes"]),
            "classes": meta["label_set"]["classes"]}  # fmt: skip


def _abaw8() -> dict[str, Any]:

    return ABAW8.to_dict()


def combine_cascade(coarse_uri: str, negative_uri: str, out_uri: str) -> dict[str, Any]:
    """Join a coarse-view and a negative-view checkpoint into one 8-class CFC cascade checkpoint."""
    from affectray.models.cascade import CascadeClassifier

    coarse, coarse_meta = load_member(coarse_uri, class_view="coarse")
    negative, negative_meta = load_member(negative_uri, class_view="negative")
    cascade = CascadeClassifier(coarse, negative)
    return write_composite(cascade, [coarse_meta, negative_meta], [coarse_uri, negative_uri], out_uri, job="cascade")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("coarse", help="checkpoint URI of the coarse-view run (class_view=coarse)")
    parser.add_argument("negative", help="checkpoint URI of the negative-view run (class_view=negative)")
    parser.add_argument("out", help="where to write the cascade checkpoint (local dir or s3:// prefix)")


def main(args: argparse.Namespace) -> dict[str, Any]:

    return combine_cascade(*(resolve_location(uri) for uri in (args.coarse, args.negative, args.out)))
