"""Expression label sets and the maps between them.

The canonical set is Aff-Wild2's ABAW8 order. Public datasets number their
classes differently (RAF-DB's 4 is Happiness, AffectNet's 4 is Fear), so every
map here goes through class *names*, never indices. CFC-SP splits ABAW8 into a
coarse 5-way problem (the four negative classes merged) and a fine 4-way
negative problem; :func:`fuse_cascade` puts the two back together.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np

from affectray.errors import AffectrayError

__all__ = [
    "ABAW8",
    "AFFECTNET8",
    "BASIC7",
    "CFC_COARSE",
    "CFC_NEGATIVE",
    "DATASET_CLASS_NAMES",
    "LABEL_SETS",
    "LabelError",
    "LabelSet",
    "canonical_class_name",
    "dataset_label_to_abaw",
    "fuse_cascade",
    "get_label_set",
    "remap",
    "to_coarse",
    "to_negative",
]


class LabelError(AffectrayError, ValueError):
    """A label, class name, dataset or label set that does not exist or does not fit."""


@dataclass(frozen=True)
class LabelSet:
    """An ordered set of class names; a class's index is its position."""

    name: str
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))  # accept lists from JSON
        if len(set(self.classes)) != len(self.classes):
            raise LabelError(f"label set {self.name!r} repeats a class: {list(self.classes)}")

    def __len__(self) -> int:
        return len(self.classes)

    def index(self, name: str) -> int:
        """Position of the class called exactly ``name``."""
        try:
            return self.classes.index(name)
        except ValueError:
            raise KeyError(f"{name!r} is not a class of label set {self.name!r} {list(self.classes)}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form stored in checkpoints."""
        return {"name": self.name, "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelSet:
        try:
            return cls(name=str(data["name"]), classes=tuple(str(c) for c in data["classes"]))
        except (KeyError, TypeError) as error:
            raise LabelError(f"not a label set dict (needs 'name' and 'classes'): {data!r}") from error


ABAW8 = LabelSet("abaw8", ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other"))
BASIC7 = LabelSet("basic7", ABAW8.classes[:7])
# AffectNet-8: the basic seven and Contempt, which the shards store as ABAW8's Other.
AFFECTNET8 = LabelSet("affectnet8", (*BASIC7.classes, "Contempt"))
CFC_COARSE = LabelSet("cfc_coarse", ("Neutral", "Happiness", "Surprise", "Other", "Negative"))
CFC_NEGATIVE = LabelSet("cfc_negative", ("Anger", "Disgust", "Fear", "Sadness"))

LABEL_SETS: dict[str, LabelSet] = {s.name: s for s in (ABAW8, BASIC7, AFFECTNET8, CFC_COARSE, CFC_NEGATIVE)}


def get_label_set(name: str) -> LabelSet:
    """The built-in label set called ``name`` (abaw8, basic7, affectnet8, cfc_coarse, cfc_negative)."""
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise LabelError(f"unknown label set {name!r}; known: {', '.join(LABEL_SETS)}") from None


# ---------------------------------------------------------------------------
# Class names
# ---------------------------------------------------------------------------

# Normalised spelling -> ABAW8 name. Contempt has no ABAW8 class of its own;
# Aff-Wild2 annotators put such frames under Other.
_SYNONYMS = {
    "neutral": "Neutral",
    "anger": "Anger",
    "angry": "Anger",
    "disgust": "Disgust",
    "disgusted": "Disgust",
    "fear": "Fear",
    "fearful": "Fear",
    "happiness": "Happiness",
    "happy": "Happiness",
    "joy": "Happiness",
    "sadness": "Sadness",
    "sad": "Sadness",
    "surprise": "Surprise",
    "surprised": "Surprise",
    "other": "Other",
    "contempt": "Other",
}

# Annotations that say "no expression label here" rather than naming a class.
_NOT_CLASSES = frozenset({"unknown", "nf"})


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


def canonical_class_name(name: str) -> str:
    """The ABAW8 class name for a dataset's spelling: 'happy', 'HAPPINESS', 'Joy' -> 'Happiness'."""
    if not isinstance(name, str):
        raise LabelError(f"class name must be a string, got {name!r} ({type(name).__name__})")
    try:
        return _SYNONYMS[_normalise(name)]
    except KeyError:
        raise LabelError(f"unknown expression class name {name!r}; known: {', '.join(ABAW8.classes)}") from None


# Published index -> class name, as each dataset's own documentation numbers them.
DATASET_CLASS_NAMES: dict[str, dict[int, str]] = {
    "rafdb": {1: "Surprise", 2: "Fear", 3: "Disgust", 4: "Happiness", 5: "Sadness", 6: "Anger", 7: "Neutral"},
    "affectnet8": {
        0: "Neutral", 1: "Happiness", 2: "Sadness", 3: "Surprise",
        4: "Fear", 5: "Disgust", 6: "Anger", 7: "Contempt",
    },
    "affectnet7": {0: "Neutral", 1: "Happiness", 2: "Sadness", 3: "Surprise", 4: "Fear", 5: "Disgust", 6: "Anger"},
    "dfew": {1: "Happiness", 2: "Sadness", 3: "Neutral", 4: "Anger", 5: "Surprise", 6: "Disgust", 7: "Fear"},
    # FER+ vote columns, in file order; the last two are not expressions.
    "ferplus": {
        0: "neutral", 1: "happiness", 2: "surprise", 3: "sadness",
        4: "anger", 5: "disgust", 6: "fear", 7: "contempt", 8: "unknown", 9: "NF",
    },
}  # fmt: skip


def _dataset_key(dataset: str) -> str:
    # "RAF-DB" -> "rafdb", "AffectNet-8" -> "affectnet8", "FER+" -> "ferplus"
    return re.sub(r"[^a-z0-9]", "", dataset.lower().replace("+", "plus"))


def dataset_label_to_abaw(dataset: str, index_or_name: int | str) -> int:
    """ABAW8 index of one dataset label, given as the dataset's index or class name.

    Returns -1 for annotations that are not an expression (FER+ 'unknown', 'NF')
    and for -1 itself, the shards' "no label".
    """
    key = _dataset_key(dataset)
    if key not in DATASET_CLASS_NAMES:
        raise LabelError(f"unknown dataset {dataset!r}; known: {', '.join(DATASET_CLASS_NAMES)}")
    names = DATASET_CLASS_NAMES[key]
    label = index_or_name
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)  # CSV columns often arrive as text
    if isinstance(label, Integral) and not isinstance(label, bool):
        if label == -1:
            return -1
        if int(label) not in names:
            raise LabelError(f"{dataset!r} has no class index {label}; its indices: {sorted(names)}")
        label = names[int(label)]
    if not isinstance(label, str):
        raise LabelError(f"{dataset!r} label must be an index or a class name, got {label!r}")
    if _normalise(label) in _NOT_CLASSES:
        return -1
    return ABAW8.index(canonical_class_name(label))


# ---------------------------------------------------------------------------
# Label arrays
# ---------------------------------------------------------------------------


def _class_key(name: str) -> str:
    try:
        return canonical_class_name(name)
    except LabelError:
        return name  # e.g. "Negative": matched only by its exact name


def _as_labels(labels: Any, labelset: LabelSet) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise LabelError(f"labels must be integers, got dtype {arr.dtype}")
    bad = (arr < -1) | (arr >= len(labelset))
    if bad.any():
        raise LabelError(
            f"label {int(arr[bad].flat[0])} is outside label set {labelset.name!r} (0..{len(labelset) - 1}, or -1)"
        )
    return arr.astype(np.int64)


def _apply_table(labels: np.ndarray, table: np.ndarray) -> np.ndarray:
    # table[i] is the new index of class i; the appended -1 sends -1 to -1.
    return np.append(table, -1).astype(np.int64)[labels]


def remap(labels: Any, src: LabelSet, dst: LabelSet) -> np.ndarray:
    """Relabel ``src`` indices as ``dst`` indices by class name (int64).

    -1 stays -1; classes that ``dst`` lacks become -1. Names are matched exactly,
    then through :func:`canonical_class_name`, so 'happy' finds 'Happiness'.
    """
    arr = _as_labels(labels, src)
    exact = {c: i for i, c in enumerate(dst.classes)}
    canonical: dict[str, int] = {}
    for i, c in enumerate(dst.classes):
        canonical.setdefault(_class_key(c), i)
    table = np.array([exact.get(c, canonical.get(_class_key(c), -1)) for c in src.classes], dtype=np.int64)
    return _apply_table(arr, table)


_NEGATIVE = CFC_COARSE.index("Negative")


def to_coarse(abaw8_labels: Any) -> np.ndarray:
    """ABAW8 labels -> CFC coarse labels: Anger/Disgust/Fear/Sadness become Negative; -1 stays."""
    arr = _as_labels(abaw8_labels, ABAW8)
    table = np.array(
        [_NEGATIVE if c in CFC_NEGATIVE.classes else CFC_COARSE.index(c) for c in ABAW8.classes], dtype=np.int64
    )
    return _apply_table(arr, table)


def to_negative(abaw8_labels: Any) -> np.ndarray:
    """ABAW8 labels -> CFC negative labels (0..3) for the four negative classes, -1 for all else."""
    return remap(abaw8_labels, ABAW8, CFC_NEGATIVE)


# Column order after concatenating coarse's other classes (Negative is its last) with the negative head.
_JOINT = CFC_COARSE.classes[:_NEGATIVE] + CFC_NEGATIVE.classes
_TO_ABAW8 = [_JOINT.index(c) for c in ABAW8.classes]


def fuse_cascade(p_coarse: Any, p_negative: Any) -> Any:
    """ABAW8 probabilities from the cascade's two heads.

    P(k) = P_coarse(Negative) * P_negative(k) for the four negative classes, and
    P_coarse(k) for the rest, so rows still sum to 1. numpy arrays or torch
    tensors (differentiable) of shape [..., 5] and [..., 4] give [..., 8] of the same type.
    """
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is already imported
    is_tensor = torch is not None and isinstance(p_coarse, torch.Tensor)
    if is_tensor != (torch is not None and isinstance(p_negative, torch.Tensor)):
        raise LabelError("fuse_cascade needs two torch tensors or two numpy arrays, not one of each")
    if not is_tensor:
        p_coarse, p_negative = np.asarray(p_coarse), np.asarray(p_negative)
    if p_coarse.shape[-1:] != (len(CFC_COARSE),) or p_negative.shape[-1:] != (len(CFC_NEGATIVE),):
        raise LabelError(
            f"fuse_cascade expects [..., {len(CFC_COARSE)}] and [..., {len(CFC_NEGATIVE)}] probabilities, "
            f"got {tuple(p_coarse.shape)} and {tuple(p_negative.shape)}"
        )
    if p_coarse.shape[:-1] != p_negative.shape[:-1]:
        raise LabelError(f"fuse_cascade batch shapes differ: {tuple(p_coarse.shape)} vs {tuple(p_negative.shape)}")
    parts = (p_coarse[..., :_NEGATIVE], p_coarse[..., _NEGATIVE:] * p_negative)  # [..., 4], [..., 4]
    joint = torch.cat(parts, dim=-1) if is_tensor else np.concatenate(parts, axis=-1)  # [..., 8] in _JOINT order
    return joint[..., _TO_ABAW8]
