"""Aff-Wild2 per-frame annotation files: parsing, and matching them to work units.

An Aff-Wild2 (ABAW) annotation file is named after its video (``118-30-640x480.txt``;
two-subject videos have ``<video>_left.txt`` and ``<video>_right.txt``) and holds
a header line, then one line per video frame: line 2 is frame 0.

* EXPR: header of class names (``Neutral,Anger,…,Other``), then one class index
  per line, -1 for frames without a label. The header is read by name, so a file
  with its classes in another order (or spelled 'happy') is remapped onto ABAW8.
* VA: header ``valence,arousal``, then two values in [-1, 1] per line; -5 marks
  a frame without annotation and becomes NaN here.

Every problem in a file raises :class:`AnnotationError` naming the file and the line.
"""

from __future__ import annotations

import math
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

from affectray import labels, storage
from affectray.errors import AffectrayError
from affectray.ingest.sources import WorkUnit, list_relative

__all__ = [
    "AnnotationError",
    "AnnotationKind",
    "VA_MISSING",
    "detect_annotation_kind",
    "find_annotations",
    "frame_labels",
    "parse_expr_annotation",
    "parse_va_annotation",
    "read_annotation",
]

AnnotationKind = Literal["expr", "va"]
VA_MISSING = -5.0  # Aff-Wild2's "not annotated" value in VA files
_VA_COLUMNS = ("valence", "arousal")


class AnnotationError(AffectrayError, ValueError):
    """An annotation file that cannot be read: bad header, bad value, ambiguous match."""


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


def detect_annotation_kind(text: str, *, source: str = "") -> AnnotationKind:
    """'expr' or 'va', from the file's header line."""
    header = _header_fields(text, source)
    if sorted(f.lower() for f in header) == sorted(_VA_COLUMNS):
        return "va"
    try:
        for name in header:
            labels.canonical_class_name(name)
    except labels.LabelError:
        raise AnnotationError(
            f"{_where(source, 1)}: header {','.join(header)!r} is neither EXPR class names "
            f"({','.join(labels.ABAW8.classes)}) nor 'valence,arousal'"
        ) from None
    return "expr"


def parse_expr_annotation(text: str, *, source: str = "") -> np.ndarray:
    """Per-frame ABAW8 class indices (int16, -1 = no label) from an EXPR file's text."""
    header = _header_fields(text, source)
    to_abaw = _expr_column_map(header, source)  # file index -> ABAW8 index
    rows = _body_lines(text, source)
    values = np.empty(len(rows), dtype=np.int16)
    for i, (number, line) in enumerate(rows):
        try:
            value = int(line)
        except ValueError:
            raise AnnotationError(f"{_where(source, number)}: expected an integer class index, got {line!r}") from None
        if not -1 <= value < len(to_abaw):
            raise AnnotationError(
                f"{_where(source, number)}: class index {value} is out of range "
                f"(-1, or 0..{len(to_abaw) - 1} for the {len(to_abaw)} classes in the header)"
            )
        values[i] = -1 if value == -1 else to_abaw[value]
    return values


def parse_va_annotation(text: str, *, source: str = "") -> np.ndarray:
    """Per-frame ``[valence, arousal]`` (float32, [N, 2]) from a VA file's text; -5 becomes NaN."""
    header = [f.lower() for f in _header_fields(text, source)]
    if sorted(header) != sorted(_VA_COLUMNS):
        raise AnnotationError(f"{_where(source, 1)}: expected the header 'valence,arousal', got {','.join(header)!r}")
    order = [header.index(name) for name in _VA_COLUMNS]  # a file may list arousal first
    rows = _body_lines(text, source)
    values = np.empty((len(rows), 2), dtype=np.float32)
    for i, (number, line) in enumerate(rows):
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 2:
            raise AnnotationError(f"{_where(source, number)}: expected two comma-separated values, got {line!r}")
        values[i] = [_va_value(fields[column], source, number) for column in order]
    return values


def read_annotation(uri: str) -> tuple[AnnotationKind, np.ndarray]:
    """Read, recognise and parse one annotation file: ``('expr', int16 [N])`` or ``('va', float32 [N, 2])``."""
    try:
        text = storage.read_text(uri)
    except (storage.StorageError, UnicodeDecodeError) as error:
        raise AnnotationError(f"cannot read annotation file {uri!r}: {error}") from None
    kind = detect_annotation_kind(text, source=uri)
    parsed = parse_expr_annotation(text, source=uri) if kind == "expr" else parse_va_annotation(text, source=uri)
    return kind, parsed


def frame_labels(annotation: np.ndarray, frame_indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """The annotation of each of ``frame_indices``; frames outside the file get -1 (or NaN for VA).

    Aff-Wild2 files often stop a few frames before the video does, and aligned
    folders skip frames where no face was found, so indices are looked up, not
    zipped. EXPR labels come back as int16, VA rows as float32 [len, 2].
    """
    annotation = np.asarray(annotation)
    idx = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
    integer = np.issubdtype(annotation.dtype, np.integer)
    dtype = np.int16 if integer else np.float32
    out = np.full((len(idx),) + annotation.shape[1:], -1 if integer else np.nan, dtype=dtype)
    # Negative indices must not wrap around to the end of the file.
    inside = (idx >= 0) & (idx < len(annotation))
    out[inside] = annotation[idx[inside]]
    return out


def _header_fields(text: str, source: str) -> list[str]:
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or not lines[0].strip():
        raise AnnotationError(f"{_where(source, 1)}: expected a header line, the file starts empty")
    fields = [f.strip() for f in lines[0].split(",")]
    if fields and not fields[-1]:
        fields.pop()  # a trailing comma
    if not fields or any(not f or _is_number(f) for f in fields):
        raise AnnotationError(
            f"{_where(source, 1)}: expected a header of class names or 'valence,arousal', got {lines[0].strip()!r}"
        )
    return fields


def _body_lines(text: str, source: str) -> list[tuple[int, str]]:
    """``(line number, stripped text)`` of every line after the header; only trailing blanks may be empty."""
    lines = [line.strip() for line in text.lstrip("\ufeff").splitlines()[1:]]
    while lines and not lines[-1]:
        lines.pop()
    for offset, line in enumerate(lines):
        if not line:  # a blank line inside the body would shift every later frame by one
            raise AnnotationError(f"{_where(source, offset + 2)}: blank line before the end of the file")
    return [(offset + 2, line) for offset, line in enumerate(lines)]


def _expr_column_map(header: list[str], source: str) -> np.ndarray:
    """ABAW8 index of each class the header names, in the file's order."""
    out = []
    for name in header:
        try:
            out.append(labels.ABAW8.index(labels.canonical_class_name(name)))
        except labels.LabelError as error:
            raise AnnotationError(f"{_where(source, 1)}: header names an unknown class: {error}") from None
    return np.array(out, dtype=np.int16)


def _va_value(text: str, source: str, number: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise AnnotationError(f"{_where(source, number)}: expected a number, got {text!r}") from None
    if value == VA_MISSING:
        return math.nan
    if not -1.0 <= value <= 1.0:  # also refuses nan and inf written in the file
        raise AnnotationError(f"{_where(source, number)}: value {text} is outside [-1, 1] (and is not -5)")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _where(source: str, line: int) -> str:
    return f"{source or '<annotation text>'} line {line}"


# ---------------------------------------------------------------------------
# Matching files to units
# ---------------------------------------------------------------------------


def find_annotations(annotations_uri: str, units: Iterable[WorkUnit]) -> dict[str, str]:
    """``{unit key: annotation URI}`` for the video and frame units that have an annotation file.

    A unit matches ``<video_id>.txt`` at any depth under ``annotations_uri``
    (``Train_Set/118-30-640x480.txt``), else the one file named after the last
    part of its video id. Names match exactly: ``video5_left.txt`` belongs to the
    folder ``video5_left`` only, never to ``video5``. A name found twice raises
    AnnotationError: point ``annotations_uri`` at one task's folder (EXPR_Set or VA_Set).
    """
    try:
        files = list_relative(annotations_uri, (".txt",))
    except storage.StorageError as error:
        raise AnnotationError(f"cannot list annotations {annotations_uri!r}: {error}") from None
    by_tail = _index_by_tail(files)
    found = {}
    for unit in units:
        if unit.kind == "images":
            continue  # image folders carry their labels in the folder names
        video_id = _nfc(unit.video_id)
        matches = by_tail.get(video_id, [])
        if len(matches) > 1:
            raise AnnotationError(
                f"video {unit.video_id!r} matches several annotation files under {annotations_uri!r}: "
                f"{', '.join(matches)}"
            )
        if not matches:
            # Fall back to the bare name only where it is unique: in a tree of
            # VoxCeleb-style ids many files are called 00001.txt, and any one of
            # them would be a guess.
            matches = by_tail.get(video_id.rsplit("/", 1)[-1], [])
        if len(matches) == 1:
            found[unit.key] = matches[0]
    return found


def _index_by_tail(files: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Annotation URIs by every trailing part of their path without '.txt' ('a/b/c', 'b/c', 'c')."""
    index: dict[str, list[str]] = defaultdict(list)
    for rel, uri in files:
        parts = _nfc(rel[: -len(".txt")]).split("/")
        for start in range(len(parts)):
            index["/".join(parts[start:])].append(uri)
    return dict(index)


def _nfc(text: str) -> str:
    # Files written on macOS carry NFD names; compare names in one normal form.
    return unicodedata.normalize("NFC", text)
