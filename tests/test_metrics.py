"""Expression metrics agree with scikit-learn, figure by figure."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

from affectray.metrics import expression_metrics, valence_arousal_ccc


def _draw(seed: int, num_classes: int, n: int, missing: tuple[int, ...], unlabelled: float):
    """Random labels where some classes never occur in y_true and some samples are -1."""
    rng = np.random.default_rng(seed)
    present = [c for c in range(num_classes) if c not in missing]
    y_true = rng.choice(present, size=n)
    # Predictions agree with the truth about half the time, so scores are far from 0 and 1.
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(0, num_classes, size=n))
    y_true[rng.random(n) < unlabelled] = -1
    return y_true, y_pred


@pytest.mark.parametrize(
    ("seed", "num_classes", "n", "missing", "unlabelled"),
    [
        (0, 8, 500, (), 0.0),
        (1, 8, 300, (7,), 0.2),
        (2, 7, 50, (0, 3), 0.1),
        (3, 5, 20, (1, 2, 4), 0.3),
        (4, 4, 1000, (), 0.5),
        (5, 8, 9, (), 0.0),  # fewer samples than classes: some classes neither true nor predicted
    ],
)
def test_matches_sklearn(seed, num_classes, n, missing, unlabelled):
    y_true, y_pred = _draw(seed, num_classes, n, missing, unlabelled)
    m = expression_metrics(y_true, y_pred, num_classes)

    keep = y_true != -1
    t, p = y_true[keep], y_pred[keep]
    labels = list(range(num_classes))
    f1 = f1_score(t, p, average="macro", zero_division=0)  # over the classes that occur, true or predicted
    per_class = f1_score(t, p, average=None, labels=labels, zero_division=0)
    acc = accuracy_score(t, p)
    with warnings.catch_warnings():
        # sklearn warns when y_pred holds classes y_true lacks: exactly the case under test.
        warnings.simplefilter("ignore")
        uar = balanced_accuracy_score(t, p)

    assert m["count"] == int(keep.sum())
    assert m["f1_macro"] == pytest.approx(f1, abs=1e-12)
    np.testing.assert_allclose(m["per_class_f1"], per_class, atol=1e-12)
    assert m["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert m["war"] == pytest.approx(acc, abs=1e-12)
    assert m["uar"] == pytest.approx(uar, abs=1e-12)
    assert m["abaw2"] == pytest.approx(0.67 * f1 + 0.33 * acc, abs=1e-12)
    assert m["confusion"] == confusion_matrix(t, p, labels=labels).tolist()
    assert 0.0 < m["f1_macro"] < 1.0


def test_uar_differs_from_accuracy_on_imbalanced_data():
    # 90 Neutral all right, 10 Anger all wrong: accuracy 0.9, but UAR only 0.5.
    y_true = np.array([0] * 90 + [1] * 10)
    y_pred = np.zeros(100, dtype=np.int64)
    m = expression_metrics(y_true, y_pred, num_classes=8)
    assert m["accuracy"] == pytest.approx(0.9)
    assert m["uar"] == pytest.approx(0.5)
    # F1 over the two classes that occur: Neutral 2*90/(90+100), Anger 0; the six absent ones do not count.
    assert m["f1_macro"] == pytest.approx((180 / 190) / 2)
    assert m["per_class_f1"][2:] == [0.0] * 6
    assert m["confusion"][1][0] == 10 and sum(map(sum, m["confusion"])) == 100


def test_result_is_plain_json():
    m = expression_metrics([0, 1, 2, -1], [0, 2, 2, 5], num_classes=3)
    assert json.loads(json.dumps(m)) == m
    assert m["count"] == 3
    assert isinstance(m["confusion"][0][0], int) and isinstance(m["f1_macro"], float)


def test_input_errors():
    with pytest.raises(ValueError, match="no samples"):
        expression_metrics([], [], 8)
    with pytest.raises(ValueError, match="no labelled samples: all 2 have y_true == -1"):
        expression_metrics([-1, -1], [0, 1], 8)
    with pytest.raises(ValueError, match="y_pred holds 8, outside 0..7"):
        expression_metrics([0, 1], [0, 8], 8)
    with pytest.raises(ValueError, match="y_pred holds -1"):
        expression_metrics([0, 1], [0, -1], 8)
    with pytest.raises(ValueError, match="y_true holds 9"):
        expression_metrics([9], [0], 8)
    with pytest.raises(ValueError, match="differ in length: 2 vs 3"):
        expression_metrics([0, 1], [0, 1, 2], 8)
    with pytest.raises(ValueError, match="integer class indices"):
        expression_metrics([0.0, 1.0], [0, 1], 8)


def _ccc_reference(x, y):
    # Lin (1989), written out the long way with numpy's own statistics.
    cov = np.cov(x, y, bias=True)[0, 1]
    return 2 * cov / (np.var(x) + np.var(y) + (np.mean(x) - np.mean(y)) ** 2)


def test_ccc():
    rng = np.random.default_rng(0)
    y = rng.uniform(-1, 1, 200)
    x = 0.7 * y + 0.2 + rng.normal(0, 0.2, 200)
    assert valence_arousal_ccc(x, y) == pytest.approx(_ccc_reference(x, y))
    assert valence_arousal_ccc(y, y) == pytest.approx(1.0)
    assert valence_arousal_ccc(-y, y) == pytest.approx(-1.0, abs=0.05)
    # A constant offset keeps Pearson at 1 but lowers CCC.
    assert valence_arousal_ccc(y + 0.5, y) < 0.9
    assert valence_arousal_ccc([0.3, 0.3], [0.3, 0.3]) == 1.0
    with pytest.raises(ValueError, match="no samples"):
        valence_arousal_ccc([], [])
    with pytest.raises(ValueError, match="NaN"):
        valence_arousal_ccc([0.1, np.nan], [0.1, 0.2])
    with pytest.raises(ValueError, match="one length"):
        valence_arousal_ccc([0.1, 0.2], [0.1])
