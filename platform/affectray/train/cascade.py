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

__all__ = ["combine_cascade"]


def combine_cascade(coarse_uri: str, negative_uri: str, out_uri: str) -> dict[str, Any]:
    """Join a coarse-view and a negative-view checkpoint into one 8-class CFC cascade checkpoint."""
    import tempfile

    from affectray.models.cascade import CascadeClassifier
    from affectray.models.registry import create_model_from_description
    from affectray.train import checkpoint as ckpt

    stages, metas = {}, {}
    for stage, uri in (("coarse", coarse_uri), ("negative", negative_uri)):
        with ckpt.open_checkpoint(uri) as directory:
            meta = ckpt.read_meta(directory)
            if meta.get("kind") != "classifier" or meta.get("class_view") != stage:
                raise ckpt.CheckpointError(
                    f"{uri!r} is not a {stage}-view classifier (class_view={meta.get('class_view')!r})"
                )
            model = create_model_from_description(meta["model"])
            model.load_state_dict(ckpt.load_weights(directory))
        stages[stage], metas[stage] = model, meta
    pre = {s: metas[s]["preprocessing"] for s in stages}
    for key in ("image_size", "mean", "std"):
        if pre["coarse"][key] != pre["negative"][key]:
            raise ckpt.CheckpointError(f"the stages differ in preprocessing {key}: {pre['coarse'][key]} vs {pre['negative'][key]}")
    clip = [p for p in pre.values() if p["mode"] == "clip"]
    if len({p["frame_stride"] for p in clip}) > 1:
        raise ckpt.CheckpointError("the stages' windows use different frame strides")
    cascade = CascadeClassifier(stages["coarse"], stages["negative"])
    preprocessing = dict(pre["coarse"])
    if clip:  # the cascade takes the longer window and hands each stage its centred part
        preprocessing.update(mode="clip", num_frames=cascade.window, frame_stride=clip[0]["frame_stride"])
    from affectray.labels import ABAW8

    meta = {
        "kind": "classifier",
        "model": cascade.describe(),
        "label_set": ABAW8.to_dict(),
        "class_view": "abaw8",
        "preprocessing": preprocessing,
        "validation": {**metas["coarse"].get("validation", {}), "metrics": {}},
        "stages": {s: {"uri": u, "metrics": metas[s].get("validation", {}).get("metrics")} for s, u in
                   (("coarse", coarse_uri), ("negative", negative_uri))},
        "step": 0,
        "git_revision": ckpt.git_revision(),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save_checkpoint(tmp, cascade, meta)
        ckpt.publish(tmp, out_uri)
    return {"job": "cascade", "checkpoint": out_uri, "num_classes": len(ABAW8), "classes": list(ABAW8.classes)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("coarse", help="checkpoint URI of the coarse-view run (class_view=coarse)")
    parser.add_argument("negative", help="checkpoint URI of the negative-view run (class_view=negative)")
    parser.add_argument("out", help="where to write the cascade checkpoint (local dir or s3:// prefix)")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return combine_cascade(args.coarse, args.negative, args.out)
