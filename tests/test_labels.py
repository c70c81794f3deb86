"""Label sets: dataset labels map onto ABAW8 by name, CFC views, cascade fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from affectray.labels import (
    ABAW8,
    BASIC7,
    CFC_COARSE,
    CFC_NEGATIVE,
    DATASET_CLASS_NAMES,
    LABEL_SETS,
    LabelError,
    LabelSet,
    canonical_class_name,
    dataset_label_to_abaw,
    fuse_cascade,
    get_label_set,
    remap,
    to_coarse,
    to_negative,
)


def test_canonical_orders():
    assert ABAW8.classes == ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other")
    assert BASIC7.classes == ABAW8.classes[:7]
    assert CFC_COARSE.classes == ("Neutral", "Happiness", "Surprise", "Other", "Negative")
    assert CFC_NEGATIVE.classes == ("Anger", "Disgust", "Fear", "Sadness")
    assert [len(s) for s in (ABAW8, BASIC7, CFC_COARSE, CFC_NEGATIVE)] == [8, 7, 5, 4]
    assert get_label_set("cfc_coarse") is CFC_COARSE
    assert set(LABEL_SETS) == {"abaw8", "basic7", "affectnet8", "cfc_coarse", "cfc_negative"}
    assert LABEL_SETS["affectnet8"].classes == (*BASIC7.classes, "Contempt")  # Contempt: stored as Other


def test_label_set_index_and_checkpoint_round_trip():
    assert ABAW8.index("Happiness") == 4
    with pytest.raises(KeyError, match="'Joy' is not a class of label set 'abaw8'"):
        ABAW8.index("Joy")
    restored = LabelSet.from_dict(ABAW8.to_dict())
    assert restored == ABAW8 and isinstance(restored.classes, tuple)
    assert ABAW8.to_dict() == {"name": "abaw8", "classes": list(ABAW8.classes)}
    with pytest.raises(LabelError, match="needs 'name' and 'classes'"):
        LabelSet.from_dict({"classes": ["a"]})
    with pytest.raises(LabelError, match="repeats a class"):
        LabelSet("dup", ("a", "a"))
    with pytest.raises(LabelError, match="unknown label set 'abaw7'"):
        get_label_set("abaw7")


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("happy", "Happiness"), ("Happiness", "Happiness"), ("JOY", "Happiness"),
        ("sad", "Sadness"), ("Sadness", "Sadness"),
        ("angry", "Anger"), ("anger", "Anger"),
        ("Surprised", "Surprise"), ("surprise", "Surprise"),
        ("fearful", "Fear"), ("Fear", "Fear"),
        ("disgusted", "Disgust"), (" Disgust ", "Disgust"),
        ("neutral", "Neutral"), ("contempt", "Other"), ("OTHER", "Other"),
    ],
)  # fmt: skip
def test_canonical_class_name(name, canonical):
    assert canonical_class_name(name) == canonical


def test_canonical_class_name_rejects_unknown():
    with pytest.raises(LabelError, match="unknown expression class name 'bored'"):
        canonical_class_name("bored")
    with pytest.raises(LabelError, match="must be a string"):
        canonical_class_name(3)


@pytest.mark.parametrize(
    ("dataset", "label", "abaw_name"),
    [
        ("rafdb", 4, "Happiness"),  # same index in both sets, by coincidence of names
        ("RAF-DB", 1, "Surprise"),
        ("rafdb", 7, "Neutral"),
        ("affectnet8", 4, "Fear"),  # same number, different class than RAF-DB's 4
        ("AffectNet-8", 7, "Other"),  # contempt
        ("affectnet7", 6, "Anger"),
        ("dfew", 1, "Happiness"),
        ("DFEW", 3, "Neutral"),
        ("dfew", "7", "Fear"),  # CSV text
        ("ferplus", 0, "Neutral"),
        ("FER+", "contempt", "Other"),
        ("ferplus", "happiness", "Happiness"),
    ],
)
def test_dataset_labels_map_by_name(dataset, label, abaw_name):
    assert dataset_label_to_abaw(dataset, label) == ABAW8.index(abaw_name)


def test_every_dataset_class_reaches_abaw8():
    for dataset, names in DATASET_CLASS_NAMES.items():
        mapped = {dataset_label_to_abaw(dataset, i) for i in names}
        real = {n for n in names.values() if n.lower() not in ("unknown", "nf")}
        assert len(mapped - {-1}) == len(real), dataset
    # The basic seven of each dataset land on BASIC7 exactly.
    assert sorted(dataset_label_to_abaw("rafdb", i) for i in range(1, 8)) == list(range(7))
    assert sorted(dataset_label_to_abaw("dfew", i) for i in range(1, 8)) == list(range(7))
    assert sorted(dataset_label_to_abaw("affectnet7", i) for i in range(7)) == list(range(7))


def test_non_classes_and_bad_inputs():
    assert dataset_label_to_abaw("ferplus", "unknown") == -1
    assert dataset_label_to_abaw("ferplus", "NF") == -1
    assert dataset_label_to_abaw("ferplus", 9) == -1
    assert dataset_label_to_abaw("rafdb", -1) == -1
    with pytest.raises(LabelError, match="'rafdb' has no class index 0"):
        dataset_label_to_abaw("rafdb", 0)
    with pytest.raises(LabelError, match="'affectnet7' has no class index 7"):
        dataset_label_to_abaw("affectnet7", 7)
    with pytest.raises(LabelError, match="unknown dataset 'ckplus'"):
        dataset_label_to_abaw("ckplus", 1)


def test_remap_by_name():
    ferplus = LabelSet(
        "ferplus", ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
    )
    labels = np.array([0, 1, 7, 3, -1])
    out = remap(labels, ferplus, ABAW8)
    assert out.dtype == np.int64
    assert out.tolist() == [ABAW8.index(n) for n in ("Neutral", "Happiness", "Other", "Sadness")] + [-1]
    # Other is not in BASIC7: it becomes -1; 2-D shape is kept.
    out = remap(np.array([[7, 4], [0, -1]]), ABAW8, BASIC7)
    assert out.tolist() == [[-1, 4], [0, -1]]
    # CFC coarse -> ABAW8: Negative has no single ABAW8 class.
    assert remap([0, 1, 4], CFC_COARSE, ABAW8).tolist() == [0, 4, -1]
    with pytest.raises(LabelError, match="label 8 is outside label set 'abaw8'"):
        remap([8], ABAW8, BASIC7)
    with pytest.raises(LabelError, match="must be integers"):
        remap(np.array([0.5]), ABAW8, BASIC7)


def test_cfc_views():
    abaw = np.arange(-1, 8)  # -1, Neutral, Anger, Disgust, Fear, Happiness, Sadness, Surprise, Other
    coarse = to_coarse(abaw)
    assert coarse.dtype == np.int64
    names = [CFC_COARSE.classes[i] if i >= 0 else None for i in coarse]
    assert names == [None, "Neutral", "Negative", "Negative", "Negative", "Happiness", "Negative", "Surprise", "Other"]
    negative = to_negative(abaw)
    names = [CFC_NEGATIVE.classes[i] if i >= 0 else None for i in negative]
    assert names == [None, None, "Anger", "Disgust", "Fear", None, "Sadness", None, None]


def _random_probs(rng, shape):
    x = rng.random(shape) + 1e-3
    return x / x.sum(-1, keepdims=True)


def test_fuse_cascade_matches_hand_computation():
    p_coarse = np.array([0.1, 0.2, 0.05, 0.05, 0.6])  # Neutral, Happiness, Surprise, Other, Negative
    p_negative = np.array([0.5, 0.25, 0.125, 0.125])  # Anger, Disgust, Fear, Sadness
    fused = fuse_cascade(p_coarse, p_negative)
    expected = {
        "Neutral": 0.1, "Anger": 0.3, "Disgust": 0.15, "Fear": 0.075,
        "Happiness": 0.2, "Sadness": 0.075, "Surprise": 0.05, "Other": 0.05,
    }  # fmt: skip
    np.testing.assert_allclose(fused, [expected[c] for c in ABAW8.classes])
    assert fused.sum() == pytest.approx(1.0)


def test_fuse_cascade_batched_rows_sum_to_one():
    rng = np.random.default_rng(0)
    fused = fuse_cascade(_random_probs(rng, (3, 6, 5)), _random_probs(rng, (3, 6, 4)))
    assert isinstance(fused, np.ndarray) and fused.shape == (3, 6, 8)
    np.testing.assert_allclose(fused.sum(-1), 1.0)
    # argmax of a confident non-negative coarse class survives fusion.
    p_coarse = np.array([[0.0, 0.9, 0.0, 0.0, 0.1]])
    assert ABAW8.classes[int(fuse_cascade(p_coarse, np.full((1, 4), 0.25)).argmax())] == "Happiness"


def test_fuse_cascade_torch_is_differentiable():
    logits_c = torch.randn(4, 5, requires_grad=True)
    logits_n = torch.randn(4, 4, requires_grad=True)
    fused = fuse_cascade(logits_c.softmax(-1), logits_n.softmax(-1))
    assert isinstance(fused, torch.Tensor) and fused.shape == (4, 8)
    torch.testing.assert_close(fused.sum(-1), torch.ones(4))
    # Cross-entropy on a negative class must push both heads.
    target = torch.full((4,), ABAW8.index("Fear"))
    torch.nn.functional.nll_loss(fused.log(), target).backward()
    assert logits_c.grad is not None and logits_c.grad.abs().sum() > 0
    assert logits_n.grad is not None and logits_n.grad.abs().sum() > 0
    np.testing.assert_allclose(
        fused.detach().numpy(),
        fuse_cascade(logits_c.softmax(-1).detach().numpy(), logits_n.softmax(-1).detach().numpy()),
        rtol=1e-6,
    )


def test_fuse_cascade_rejects_bad_shapes_and_mixed_types():
    with pytest.raises(LabelError, match=r"expects \[..., 5\] and \[..., 4\]"):
        fuse_cascade(np.ones((2, 4)), np.ones((2, 4)))
    with pytest.raises(LabelError, match="batch shapes differ"):
        fuse_cascade(np.ones((2, 5)), np.ones((3, 4)))
    with pytest.raises(LabelError, match="not one of each"):
        fuse_cascade(torch.ones(1, 5), np.ones((1, 4)))
