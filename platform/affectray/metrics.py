"""Expression recognition metrics, in plain numpy.

The figures FER papers report: macro F1 over all classes (the ABAW EXPR
metric), accuracy (= WAR, weighted average recall), UAR (mean recall over the
classes present, DFEW's headline number), the ABAW2 combined score and the
confusion matrix. Definitions match scikit-learn's, which the tests check, but
scikit-learn is not needed at run time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["expression_metrics", "valence_arousal_ccc", "valence_arousal_metrics"]


def _as_int_labels(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def expression_metrics(y_true: Any, y_pred: Any, num_classes: int) -> dict[str, Any]:
    """Classification metrics for one evaluation; samples with ``y_true == -1`` are ignored.

    Returns plain Python values: ``f1_macro``, ``accuracy``, ``uar``, ``war``, ``abaw2``
    (0.67 * F1 + 0.33 * accuracy), ``per_class_f1``, ``confusion`` (rows = true class)
    and ``count`` (samples scored).

    Args:
        num_classes: size of the label set. Macro F1 averages over the classes that occur,
            as a true or a predicted class (sklearn's default labels): a class with no sample
            and no prediction has no F1 to speak of, and averaging its 0 in would only say
            how many classes the data lacks. ``per_class_f1`` still lists every class (0 there).
    """
    y_true = _as_int_labels(y_true, "y_true")
    y_pred = _as_int_labels(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.size} vs {y_pred.size}")
    if y_true.size == 0:
        raise ValueError("expression_metrics got no samples (empty y_true and y_pred)")
    bad = (y_true < -1) | (y_true >= num_classes)
    if bad.any():
        raise ValueError(f"y_true holds {int(y_true[bad][0])}, outside 0..{num_classes - 1} (or -1 for no label)")

    keep = y_true != -1
    if not keep.any():
        raise ValueError(f"expression_metrics got no labelled samples: all {y_true.size} have y_true == -1")
    y_true, y_pred = y_true[keep], y_pred[keep]
    bad = (y_pred < 0) | (y_pred >= num_classes)
    if bad.any():
        raise ValueError(f"y_pred holds {int(y_pred[bad][0])}, outside 0..{num_classes - 1}")

    confusion = np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    hits = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)  # true samples per class
    predicted = confusion.sum(axis=0)

    # F1 = 2TP / (2TP + FP + FN) = 2TP / (support + predicted); 0 where both are empty.
    denom = support + predicted
    per_class_f1 = np.divide(2 * hits, denom, out=np.zeros(num_classes), where=denom > 0)
    present = support > 0
    recall = hits[present] / support[present]

    count = int(y_true.size)
    f1_macro = float(per_class_f1[denom > 0].mean())
    accuracy = float(hits.sum() / count)
    return {
        "f1_macro": f1_macro,
        "accuracy": accuracy,
        "uar": float(recall.mean()),
        "war": accuracy,  # recall weighted by support is exactly accuracy
        "abaw2": 0.67 * f1_macro + 0.33 * accuracy,
        "per_class_f1": [float(f) for f in per_class_f1],
        "confusion": confusion.tolist(),
        "count": count,
    }


def valence_arousal_ccc(x: Any, y: Any) -> float:
    """Concordance correlation coefficient of two 1-D series (predicted and true valence, or arousal).

    CCC = 2 cov(x, y) / (var x + var y + (mean x - mean y)^2), with population
    moments as in the ABAW VA challenge. Two identical constant series score 1.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"valence_arousal_ccc needs two 1-D series of one length, got {x.shape} and {y.shape}")
    if x.size == 0:
        raise ValueError("valence_arousal_ccc got no samples")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("valence_arousal_ccc got NaN or infinite values; drop unlabelled frames first")
    mx, my = x.mean(), y.mean()
    cov = ((x - mx) * (y - my)).mean()
    denom = x.var() + y.var() + (mx - my) ** 2
    if denom == 0:  # both constant and equal: perfect agreement
        return 1.0
    return float(2 * cov / denom)


def valence_arousal_metrics(pred: Any, true: Any) -> dict[str, Any]:
    """ABAW VA figures of predictions [N, 2] against annotations [N, 2] (valence, arousal; NaN = none).

    Each CCC is taken over the rows annotated in its column. Returns ``ccc_valence``,
    ``ccc_arousal``, ``ccc_mean`` (their mean: the ABAW VA score) and ``va_count``
    (rows with any annotation).
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.ndim != 2 or pred.shape[1] != 2 or pred.shape != true.shape:
        raise ValueError(
            f"valence_arousal_metrics needs [N, 2] predictions and annotations, got {pred.shape}, {true.shape}"
        )
    annotated = np.isfinite(true)
    for column, name in enumerate(("valence", "arousal")):
        if not annotated[:, column].any():
            raise ValueError(f"valence_arousal_metrics got no {name} annotation among {len(true)} rows")
    ccc = [valence_arousal_ccc(pred[annotated[:, c], c], true[annotated[:, c], c]) for c in range(2)]
    return {
        "ccc_valence": ccc[0],
        "ccc_arousal": ccc[1],
        "ccc_mean": (ccc[0] + ccc[1]) / 2,
        "va_count": int(annotated.any(axis=1).sum()),
    }
