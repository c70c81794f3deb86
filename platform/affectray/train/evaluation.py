"""Evaluate an expression classifier on segment shards.

One pass serves validation during fine-tuning and ``affectray evaluate``, so
the two agree by construction: the same deterministic Ray Data pipeline
(no augmentation; every labelled frame once, through a window centred on it for
window models; one clip per segment for clip labels), the same class view and
the same metrics (``affectray.metrics.expression_metrics``; for a model with a
valence/arousal head read with ``data.va``, ``valence_arousal_metrics`` too).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import numpy as np

from affectray.checkpoints import Preprocessing
from affectray.config import config_from_dict, resolve_location
from affectray.data.loaders import DataConfig, build_dataset, data_config_for, iter_eval_batches
from affectray.labels import (
    ABAW8,
    AFFECTNET8,
    BASIC7,
    CFC_COARSE,
    CFC_NEGATIVE,
    LabelSet,
    remap,
    to_coarse,
    to_negative,
)
from affectray.metrics import expression_metrics, valence_arousal_metrics
from affectray.runtime import init_ray

__all__ = ["CLASS_VIEWS", "EvalResult", "eval_data_config", "evaluate_model", "view_targets"]

# class_view -> the label set a model of that view predicts. Shards carry ABAW8 labels:
# basic7 drops Other (FER2013, RAF-DB, DFEW, AffectNet-7 have none), affectnet8 names it
# Contempt (AffectNet's eighth class, stored as Other), coarse / negative are CFC-SP's stages.
CLASS_VIEWS: dict[str, LabelSet] = {
    "abaw8": ABAW8,
    "basic7": BASIC7,
    "affectnet8": AFFECTNET8,
    "coarse": CFC_COARSE,
    "negative": CFC_NEGATIVE,
}


def view_targets(abaw8_labels: Any, class_view: str | LabelSet) -> Any:
    """ABAW8 targets → the class view's indices (-1 where a frame has no class in the view).

    ``class_view`` is a name of CLASS_VIEWS or any label set, matched by class name
    (a FER2013 model's seven classes in its own order). Works on numpy arrays and torch tensors alike.
    """
    if class_view == "abaw8":
        return abaw8_labels
    if class_view in ("coarse", "negative"):
        convert = to_coarse if class_view == "coarse" else to_negative
    else:
        labelset = class_view if isinstance(class_view, LabelSet) else CLASS_VIEWS[class_view]

        def convert(labels):
            return remap(labels, ABAW8, labelset)

    try:
        import torch

        if isinstance(abaw8_labels, torch.Tensor):
            table = torch.as_tensor(convert(np.arange(len(ABAW8))), device=abaw8_labels.device)
            mapped = table[abaw8_labels.clamp(min=0)]
            return torch.where(abaw8_labels >= 0, mapped, torch.full_like(mapped, -1))
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return convert(np.asarray(abaw8_labels))


def eval_data_config(data: DataConfig) -> DataConfig:
    """The deterministic evaluation variant of a training data config.

    Per-frame labels are scored once per labelled frame (a dense centred window
    for clip models; ``frames`` targets are scored at the centre); clip labels
    once per clip window of each segment.
    """
    label = "center" if data.label == "frames" else data.label
    per_frame = data.mode == "clip" and label == "center"
    return dataclasses.replace(
        data, label=label, clips_per_segment=0 if per_frame else data.clips_per_segment, skip_unlabelled=True
    )


@dataclasses.dataclass
class EvalResult:
    metrics: dict[str, Any]  # expression_metrics(...), plus the class names
    y_true: np.ndarray  # [N] in the class view (-1 = not in the view)
    probs: np.ndarray  # [N, C]
    video_id: np.ndarray  # [N] str
    frame_index: np.ndarray  # [N] centre frame
    va_true: np.ndarray | None = None  # [N, 2] valence, arousal (NaN = none), when VA is scored
    va_pred: np.ndarray | None = None  # [N, 2]


def evaluate_model(
    model,
    data: DataConfig,
    *,
    holdout: bool,
    class_view: str | LabelSet = "abaw8",
    batch_size: int = 64,
    device: Any = "cpu",
    smooth_window: int = 1,
    flip: bool = False,
    crops: float | None = None,
    cache: list | None = None,
) -> EvalResult:
    """Predict every evaluation sample of ``data`` with ``model.probabilities`` and score it in ``class_view``.

    ``holdout`` reads the videos that ``data.val_fraction`` holds out; otherwise the
    rows ``data`` selects. ``smooth_window`` > 1 averages probabilities over that many
    consecutive predicted frames of a video first (the smoothing the label job applies);
    ``flip`` averages each prediction with its mirror image's (``Preprocessing.test_flip``),
    ``crops`` with its five crops' of that side (``Preprocessing.test_crops``).
    ``cache`` keeps the decoded inputs between calls (:func:`~affectray.data.loaders.iter_eval_batches`).
    A model with a VA head (``model.predicts_va``) on ``data.va`` samples is also scored
    with ``ccc_valence``, ``ccc_arousal`` and ``ccc_mean`` on its raw per-frame VA (what the
    label job writes); expression figures then need only exist where rows have labels.
    """
    import torch

    from affectray.models.cascade import smooth_predictions
    from affectray.models.inference import predict_batch

    cfg = eval_data_config(data)
    device = torch.device(device)
    labelset = class_view if isinstance(class_view, LabelSet) else CLASS_VIEWS[class_view]
    was_training = model.training
    model.eval()
    score_va = cfg.va and getattr(model, "predicts_va", False)
    probs, targets, ids, frames, va_true, va_pred = [], [], [], [], [], []
    unlabelled = 0  # rows kept for their valence/arousal alone
    with torch.inference_mode():
        dataset = None if cache else build_dataset(cfg, train=False, holdout=holdout)
        for inputs, y, meta, *va in iter_eval_batches(
            dataset, cfg, batch_size, device, clip_layout="BTCHW", cache=cache
        ):
            outputs = predict_batch(model, inputs, flip=flip, crops=crops)  # clips as windows of frames [B, T, C, H, W]
            probs.append(outputs["probs"].cpu().numpy())
            if score_va:
                va_true.append(va[0].cpu().numpy())
                va_pred.append(outputs["va"].cpu().numpy())
            targets.append(view_targets(y, class_view).cpu().numpy())
            unlabelled += int((y < 0).sum())
            ids += list(meta["video_id"])
            frames.append(meta["frame_index"].numpy())
    model.train(was_training)
    if not probs:
        raise ValueError(f"no labelled evaluation samples in {data.root!r} (split={data.split!r}, holdout={holdout})")
    result = EvalResult(
        metrics={},
        y_true=np.concatenate(targets),
        probs=np.concatenate(probs),
        video_id=np.array(ids),
        frame_index=np.concatenate(frames),
        va_true=np.concatenate(va_true) if score_va else None,
        va_pred=np.concatenate(va_pred) if score_va else None,
    )
    # Arrival order is the pipeline's; sort by (video, frame) for smoothing and stable output.
    order = np.lexsort((result.frame_index, result.video_id))
    for name in ("y_true", "probs", "video_id", "frame_index", *(("va_true", "va_pred") if score_va else ())):
        setattr(result, name, getattr(result, name)[order])
    scored = result.probs
    if smooth_window > 1:
        _, groups = np.unique(result.video_id, return_inverse=True)
        scored = smooth_predictions(result.probs, smooth_window, groups=groups)
    keep = result.y_true >= 0
    if not keep.any() and not score_va:
        raise ValueError(
            f"no evaluation sample of {data.root!r} has a class the model predicts ({', '.join(labelset.classes)})"
        )
    # A VA corpus may have no expression labels at all: then only the VA figures.
    metrics = expression_metrics(result.y_true[keep], scored[keep].argmax(axis=1), len(labelset)) if keep.any() else {}
    if score_va:
        metrics.update(valence_arousal_metrics(result.va_pred, result.va_true))
    view_name = class_view.name if isinstance(class_view, LabelSet) else class_view
    # Rows whose class the model does not have (e.g. Other, for a 7-class model) are left out.
    result.metrics = {**metrics, "classes": list(labelset.classes), "class_view": view_name,
                      "excluded": int((~keep).sum()) - unlabelled}  # fmt: skip
    return result


# --------------------------------------------------------------------------- affectray evaluate


def checkpoint_data_config(meta: dict[str, Any], root: str) -> tuple[DataConfig, bool]:
    """(data config, holdout) that scores ``root`` the way the checkpoint's validation did.

    When ``root`` is the shard root the run validated on, the same selection (the
    held-out videos or the split); otherwise every row of ``root``.
    """

    validation = meta.get("validation") or {}
    if validation.get("data"):
        data = config_from_dict(DataConfig, validation["data"])
        if data.root.rstrip("/") == root.rstrip("/"):
            return data, bool(validation.get("holdout"))
        return dataclasses.replace(data, root=root, split=None, val_fraction=0.0), False
    data = data_config_for(Preprocessing.from_meta(meta), root)
    return data, False


def _crop_side(text: str) -> float:
    side = float(text)
    if not 0.0 <= side < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a side fraction in [0, 1) (e.g. 0.9; 0 for no crops)")
    return side


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="classifier checkpoint URI (a finetune run's best_checkpoint, or a cascade)")
    parser.add_argument("shards", help="shard root to score (local dir or s3:// prefix)")
    parser.add_argument("--split", help="score only rows of this split (e.g. val)")
    parser.add_argument(
        "--all", action="store_true", help="score every row of SHARDS, even where it is the run's own training root"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--smooth-window", type=int, default=None, help="default: the run's eval.smooth_window")
    parser.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average each prediction with its mirror image's (default: the checkpoint's preprocessing.test_flip)",
    )
    parser.add_argument(
        "--crops",
        type=_crop_side,
        default=None,
        metavar="SIDE",
        help="also average the predictions of five crops of this side (a fraction, e.g. 0.9: the corners and the "
        "centre, resized back), 0 for none (default: the checkpoint's preprocessing.test_crops)",
    )
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a new local Ray)")


def main(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from affectray.models.inference import load_classifier

    # Ray Data's readers run in directories of their own: local paths become absolute here.
    checkpoint, shards_root = resolve_location(args.checkpoint), resolve_location(args.shards)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    classifier = load_classifier(checkpoint, device=device)  # before Ray starts: a bad checkpoint fails in a second
    init_ray(args.address)
    meta = classifier.meta
    data, holdout = checkpoint_data_config(meta, shards_root)
    if args.split is not None or args.all:
        data, holdout = dataclasses.replace(data, split=args.split, val_fraction=0.0), False
    flip = classifier.preprocessing.test_flip if args.flip is None else args.flip
    crops = classifier.preprocessing.test_crops if args.crops is None else (args.crops or None)
    smooth = args.smooth_window or int((meta.get("validation") or {}).get("smooth_window", 1))
    result = evaluate_model(
        classifier.model, data, holdout=holdout, class_view=checkpoint_class_view(meta),
        batch_size=args.batch_size, device=device, smooth_window=smooth,
        flip=flip, crops=crops,
    )  # fmt: skip
    metrics = result.metrics
    print(format_metrics(metrics))
    return {
        "job": "evaluate",
        "checkpoint": checkpoint,
        "model_id": classifier.model_id,
        "shards": shards_root,
        "selection": {"split": data.split, "holdout": holdout, "val_fraction": data.val_fraction},
        "test_flip": flip,
        "test_crops": crops,
        "num_classes": len(metrics["classes"]),
        "classes": metrics["classes"],
        "metrics": {k: v for k, v in metrics.items() if k != "classes"},
    }


def checkpoint_class_view(meta: dict[str, Any]) -> str | LabelSet:
    """The class view a checkpoint predicts in: a fine-tuning view's name, or its own label set.

    Shards carry ABAW8 labels; a model with other classes (a built-in FER2013 model's
    seven, in their own order) is scored on the classes it shares with them, by name.
    """
    view = meta.get("class_view")
    if view in CLASS_VIEWS:
        return view
    if meta.get("label_set"):
        return LabelSet.from_dict(meta["label_set"])
    return "abaw8"


def format_metrics(metrics: dict[str, Any]) -> str:
    """A readable block: the headline figures, per-class F1 and the confusion matrix."""
    classes = metrics["classes"]
    excluded = metrics.get("excluded", 0)
    lines = [
        f"scored on the model's classes ({', '.join(classes)}); {excluded} samples of other classes left out"
    ] if excluded else []  # fmt: skip
    if "ccc_mean" in metrics:
        lines.append(
            f"valence/arousal samples {metrics['va_count']}   CCC valence {metrics['ccc_valence']:.4f}   "
            f"CCC arousal {metrics['ccc_arousal']:.4f}   CCC mean {metrics['ccc_mean']:.4f}"
        )
    if "confusion" not in metrics:  # VA alone: no expression-labelled sample
        return "\n".join(lines)
    lines += [
        f"samples {metrics['count']}   macro F1 {metrics['f1_macro']:.4f}   accuracy {metrics['accuracy']:.4f}   "
        f"UAR {metrics['uar']:.4f}   WAR {metrics['war']:.4f}   ABAW2 {metrics['abaw2']:.4f}",
        "per-class F1: " + "  ".join(f"{c} {f:.3f}" for c, f in zip(classes, metrics["per_class_f1"])),
        "confusion (rows = true):",
        "           " + " ".join(f"{c[:8]:>8s}" for c in classes),
    ]
    lines += [f"  {c[:8]:>8s} " + " ".join(f"{v:8d}" for v in row) for c, row in zip(classes, metrics["confusion"])]
    return "\n".join(lines)
