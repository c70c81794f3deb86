"""Input corpora → work units: the list of things the ingest job turns into shards.

A *work unit* is one video file, one folder of frames, or one chunk of still
images. The ingest job maps one Ray Data task over each unit and writes one
shard per unit, named by the unit's key, so a unit's key must be the same on
every run and every machine and must be safe as a file name and an S3 key.

Generic layouts (``list_units(source, layout)``):

``videos``
    Every video file under SOURCE, one unit each: Aff-Wild2 ``<name>.mp4``,
    VoxCeleb2 ``id00012/<youtube id>/00001.mp4``.
``aligned-frames``
    Aff-Wild2 ``cropped_aligned/<video>/00001.jpg …``: one unit per folder, in
    frame order. File ``00001.jpg`` is frame 0, as Aff-Wild2's annotation line 1.
``image-folder``
    RAF-DB / AffectNet / FER2013 style ``[<split>/]<class>/*.jpg``: class folders
    named by the dataset's number (``--dataset`` picks the numbering) or by class
    name; images are chunked into units of ``images_per_unit``.
``dfew-csv``
    A DFEW split file of ``path label`` lines naming clip folders or videos
    relative to SOURCE, labels 1..7 in DFEW's numbering.

Datasets as their authors distribute them (SOURCE is the dataset's root):

``rafdb``
    RAF-DB basic: ``EmoLabel/list_patition_label.txt`` (``train_00001.jpg 5``,
    labels 1..7 = Surprise, Fear, Disgust, Happiness, Sadness, Anger, Neutral)
    and ``Image/aligned/train_00001_aligned.jpg``. The split is the name's
    prefix (train, test). Images are aligned already: no face detection.
``affectnet``
    AffectNet: ``training.csv`` / ``validation.csv`` (in SOURCE or
    ``Manually_Annotated_file_lists/``; header ``subDirectory_filePath,face_x,
    face_y,face_width,face_height,facial_landmarks,expression,valence,arousal``),
    images under ``Manually_Annotated_Images/`` (or
    ``Manually_Annotated/Manually_Annotated_Images/``). Expressions 0..7 (Neutral,
    Happy, Sad, Surprise, Fear, Disgust, Anger, Contempt; Contempt is stored as
    ABAW8 Other) are kept, 8..10 (None, Uncertain, Non-Face) are skipped and
    counted. Each face is cropped by the csv's box instead of being detected;
    valence and arousal are kept per image. training.csv is split train,
    validation.csv split val.
``dfew``
    DFEW: ``EmoLabel_DataSplit/{train,test}(single-labeled)/set_<fold>.csv``
    (``video_name,label``, labels 1..7 = Happy, Sad, Neutral, Angry, Surprise,
    Disgust, Fear) and clip frame folders ``Clip/jpg_256/<00001>/`` (or the
    official name ``Clip/clip_224x224/``). ``fold`` (1..5) picks the set files;
    splits train and test.
``dfew-maedfer``
    DFEW as MAE-DFER's ``preprocess/dfew.py`` rewrites it: ``split0<fold>/
    {train,val,test}.csv`` of ``<clip folder> <label>`` lines, space separated,
    no header, labels 0..6 in DFEW's order, paths absolute on the machine that
    wrote them (``/data/…/DFEW/Clip/jpg_256/02522 5``). A path is matched to a
    clip folder under SOURCE by its longest tail that exists there, else by the
    clip's folder name alone when that is unique. MAE-DFER's val.csv repeats
    test.csv, so by default train.csv and test.csv are read.

Clip folders of the DFEW layouts hold frames in name order, numbers compared as
numbers (``00001.jpg`` or ``00001_00001.jpg`` alike); frame ``i`` is the i-th.
``csv_uri`` (``--csv``) names a layout's list file or the folder holding them
in place of the default; a relative one is looked for in the working
directory, then under SOURCE.

Every labelled layout maps labels *by name* onto the ABAW8 indices shards
store, and records in :attr:`SourceListing.label_set` which classes the dataset
itself has (``basic7``, ``affectnet8``, ``abaw8``), so a classifier head can be
sized by the dataset rather than by the storage index space.

Inputs that cannot become a unit (a class folder that names no expression, a
csv line that points outside SOURCE) are not fatal: they are returned in
``SourceListing.refused`` with the reason, so one bad entry does not stop a
corpus of thousands. Hidden files and folders (``.DS_Store``, macOS ``._*``
twins, ``__MACOSX``) are skipped silently, as are files of other types.
Whether a video file can actually be decoded is found out later, by decoding.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

from affectray import labels, storage
from affectray.errors import AffectrayError

__all__ = [
    "FRAME_SUFFIXES",
    "IMAGE_SUFFIXES",
    "LAYOUTS",
    "LAYOUT_DATASETS",
    "VIDEO_SUFFIXES",
    "SourceError",
    "SourceListing",
    "UnitKind",
    "WorkUnit",
    "list_relative",
    "list_units",
    "unit_key",
]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LAYOUTS = ("videos", "aligned-frames", "image-folder", "dfew-csv", "rafdb", "affectnet", "dfew", "dfew-maedfer")
# The dataset name a dataset's own layout writes into rows when --dataset is left at its default.
LAYOUT_DATASETS = {"rafdb": "rafdb", "affectnet": "affectnet", "dfew": "dfew", "dfew-maedfer": "dfew"}
DFEW_FOLDS = range(1, 6)

UnitKind = Literal["video", "frames", "images"]

# Keys keep a readable tail of the path; the hash, not this part, makes them unique.
_KEY_TEXT_CHARS = 80
_KEY_HASH_CHARS = 8
_FRAME_NAME = re.compile(r"[0-9]+")


class SourceError(AffectrayError, ValueError):
    """An input corpus that cannot be listed: unknown layout, missing SOURCE or csv, bad arguments."""


# ---------------------------------------------------------------------------
# Work units
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkUnit:
    """One video, frame folder or image chunk: the input of one shard.

    ``frame_indices[i]`` is the frame number of ``uris[i]`` in its video (0-based),
    or the image's position in the chunk; empty for a video, whose frames are
    numbered as it is decoded. ``labels`` holds per-image ABAW8 labels (image
    layouts); ``clip_label`` a whole-clip ABAW8 label (DFEW), -1 if none.
    ``boxes`` holds per-image face boxes ``(x, y, width, height)`` in pixels to crop
    instead of detecting, and ``valence`` / ``arousal`` per-image values (NaN: none)
    (AffectNet).
    """

    key: str
    kind: UnitKind
    video_id: str
    uris: tuple[str, ...]
    frame_indices: tuple[int, ...]
    labels: tuple[int, ...] | None = None
    clip_label: int = -1
    source: str = ""
    split: str | None = None
    boxes: tuple[tuple[int, int, int, int], ...] | None = None
    valence: tuple[float, ...] | None = None
    arousal: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Accept lists and numpy arrays, as rows come back from JSON or Ray Data.
        object.__setattr__(self, "uris", tuple(str(u) for u in self.uris))
        object.__setattr__(self, "frame_indices", tuple(int(i) for i in self.frame_indices))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(int(v) for v in self.labels))
        object.__setattr__(self, "clip_label", int(self.clip_label))
        if self.boxes is not None:
            object.__setattr__(self, "boxes", tuple(tuple(int(v) for v in box) for box in self.boxes))
        for name in ("valence", "arousal"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.kind not in get_args(UnitKind):
            raise SourceError(f"work unit {self.key!r}: kind {self.kind!r} is not one of {get_args(UnitKind)}")
        if not self.uris:
            raise SourceError(f"work unit {self.key!r} has no input files")
        if self.kind == "video" and len(self.uris) != 1:
            raise SourceError(f"work unit {self.key!r}: a video unit holds one file, got {len(self.uris)}")
        if self.kind != "video" and len(self.frame_indices) != len(self.uris):
            raise SourceError(
                f"work unit {self.key!r}: {len(self.frame_indices)} frame indices for {len(self.uris)} files"
            )
        for name in ("labels", "boxes", "valence", "arousal"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.uris):
                raise SourceError(f"work unit {self.key!r}: {len(values)} {name} for {len(self.uris)} files")
        if self.boxes is not None and any(len(box) != 4 for box in self.boxes):
            raise SourceError(f"work unit {self.key!r}: a face box is (x, y, width, height)")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, for Ray Data rows and job summaries."""
        return {
            "key": self.key,
            "kind": self.kind,
            "video_id": self.video_id,
            "uris": list(self.uris),
            "frame_indices": list(self.frame_indices),
            "labels": None if self.labels is None else list(self.labels),
            "clip_label": self.clip_label,
            "source": self.source,
            "split": self.split,
            "boxes": None if self.boxes is None else [list(box) for box in self.boxes],
            "valence": None if self.valence is None else list(self.valence),
            "arousal": None if self.arousal is None else list(self.arousal),
        }

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> WorkUnit:
        """Inverse of :meth:`to_dict`; also takes a Ray Data row (numpy arrays for lists)."""
        try:
            unit_labels = row.get("labels")
            split = row.get("split")
            return cls(
                key=str(row["key"]),
                kind=str(row["kind"]),  # type: ignore[arg-type]  # checked in __post_init__
                video_id=str(row["video_id"]),
                uris=row["uris"],
                frame_indices=row["frame_indices"],
                labels=None if unit_labels is None else unit_labels,
                clip_label=row.get("clip_label", -1),
                source=str(row.get("source", "")),
                split=None if split is None else str(split),
                boxes=row.get("boxes"),
                valence=row.get("valence"),
                arousal=row.get("arousal"),
            )
        except (KeyError, TypeError) as error:
            raise SourceError(f"not a work unit row ({error!r}): keys {sorted(row)}") from error


@dataclass
class SourceListing:
    """What :func:`list_units` found: units sorted by key, inputs refused, class folder → ABAW8 name.

    ``label_set`` names the classes the dataset itself has (shards.DATASET_LABEL_SETS):
    ``basic7`` (no Other), ``affectnet8`` (basic7 + Contempt, stored as ABAW8 Other)
    or ``abaw8`` (Aff-Wild2, or an Other that is not Contempt).
    """

    units: list[WorkUnit]
    refused: list[dict[str, str]] = field(default_factory=list)
    class_mapping: dict[str, str] = field(default_factory=dict)
    label_set: str = "abaw8"


def unit_key(relative: str, *, hashed: str | None = None) -> str:
    """A stable, ASCII, file-name-safe key for a path relative to SOURCE.

    ``id00012/abc/00001.mp4`` → ``id00012_abc_00001-<8 hex>``. The readable part
    drops the extension and folds accents and odd characters to ``_``; the hash
    of the whole path (or of ``hashed``, if given) keeps same-named files in
    different folders, and paths that fold alike, apart.
    """
    # Hash the NFC form: macOS writes NFD file names, and the same corpus copied
    # from a Mac must give the same keys as on Linux.
    digest = hashlib.sha1(unicodedata.normalize("NFC", hashed if hashed is not None else relative).encode("utf-8"))
    stem = _strip_suffix(relative)
    ascii_text = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_text).strip("_-")
    # Keep the end of long paths: the file and its folder say more than the corpus root.
    text = text[-_KEY_TEXT_CHARS:].lstrip("_-") or "unit"
    return f"{text}-{digest.hexdigest()[:_KEY_HASH_CHARS]}"


# ---------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------


def list_relative(uri: str, suffixes: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """``(path relative to uri, file URI)`` for every visible file under ``uri``, sorted by path.

    Relative paths use ``/`` on every filesystem. Hidden entries are skipped.
    Raises storage.StorageError if ``uri`` does not exist.
    """
    uris = storage.list_files(uri, tuple(suffixes) if suffixes else None)
    prefix = storage.join(uri, "")  # list_files builds its URIs with the same join
    out = []
    for file_uri in uris:
        if file_uri.startswith(prefix):
            rel = file_uri[len(prefix) :].replace("\\", "/")
        else:  # ``uri`` names a single file
            rel = file_uri.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        if _hidden(rel):
            continue
        out.append((rel, file_uri))
    return sorted(out)


def list_units(
    source: str,
    layout: str,
    *,
    images_per_unit: int = 512,
    csv_uri: str | None = None,
    dataset: str | None = None,
    split: str | None = None,
    fold: int | None = None,
) -> SourceListing:
    """List the work units of ``source`` read as ``layout`` (one of LAYOUTS).

    Args:
        images_per_unit: image layouts: images per unit (per shard).
        csv_uri: the list file, or the folder of list files, of the csv layouts
            (dfew-csv: the split file, default the one ``*.csv`` at SOURCE's top;
            rafdb, affectnet, dfew, dfew-maedfer: see the module docstring).
        dataset: image-folder: whose numbering numbered class folders use ('rafdb',
            'affectnet8', …); names in any dataset's spelling work without it.
        split: recorded on every unit. Where the layout knows splits (split
            folders, RAF-DB name prefixes, AffectNet's and DFEW's list files),
            selects that split; with None, each unit carries the split it came from.
        fold: dfew, dfew-maedfer: the DFEW fold (1..5) whose lists are read.
    """
    if layout not in LAYOUTS:
        raise SourceError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if images_per_unit < 1:
        raise SourceError(f"images_per_unit must be at least 1, got {images_per_unit}")
    if fold is not None and fold not in DFEW_FOLDS:
        raise SourceError(f"fold must be one of DFEW's folds 1..5, got {fold}")
    if dataset is not None:
        try:
            labels.dataset_label_to_abaw(dataset, -1)  # -1 is valid for every dataset: checks the name only
        except labels.LabelError as error:
            raise SourceError(str(error)) from None
    try:
        if layout == "videos":
            listing = _list_videos(source, split)
        elif layout == "aligned-frames":
            listing = _list_aligned_frames(source, split)
        elif layout == "image-folder":
            listing = _list_image_folder(source, images_per_unit, dataset, split)
        elif layout == "dfew-csv":
            listing = _list_dfew_csv(source, csv_uri, split)
        elif layout == "rafdb":
            listing = _list_rafdb(source, csv_uri, split, images_per_unit)
        elif layout == "affectnet":
            listing = _list_affectnet(source, csv_uri, split, images_per_unit)
        elif layout == "dfew":
            listing = _list_dfew(source, csv_uri, split, fold)
        else:
            listing = _list_dfew_maedfer(source, csv_uri, split, fold)
    except storage.StorageError as error:
        raise SourceError(f"cannot list {layout} source {source!r}: {error}") from error
    if not listing.units and not listing.refused:
        raise SourceError(f"found nothing to ingest under {source!r} as layout {layout!r}: {_EXPECTED[layout]}")
    _check_unique(listing.units)
    listing.units.sort(key=lambda unit: unit.key)
    return listing


_EXPECTED = {
    "videos": f"expected video files ({', '.join(VIDEO_SUFFIXES)})",
    "aligned-frames": "expected folders of numbered frames (<video>/00001.jpg)",
    "image-folder": "expected [<split>/]<class>/<image> files",
    "dfew-csv": "expected 'path label' lines",
    "rafdb": "expected 'train_00001.jpg 5' lines in EmoLabel/list_patition_label.txt",
    "affectnet": "expected training.csv / validation.csv rows",
    "dfew": "expected 'video_name,label' rows in EmoLabel_DataSplit/*/set_<fold>.csv",
    "dfew-maedfer": "expected '<clip folder> <label>' lines",
}


def _list_videos(source: str, split: str | None) -> SourceListing:
    units = [_video_unit(rel, uri, -1, split) for rel, uri in list_relative(source, VIDEO_SUFFIXES)]
    return SourceListing(units)


def _list_aligned_frames(source: str, split: str | None) -> SourceListing:
    refused: list[dict[str, str]] = []
    units = []
    for folder, files in _group_by_folder(list_relative(source, FRAME_SUFFIXES)).items():
        # Frames lying directly in SOURCE form one video named after SOURCE itself.
        video_id = folder or _last_component(source)
        unit = _frames_unit(folder or video_id, video_id, files, refused, split=split)
        if unit is not None:
            units.append(unit)
    return SourceListing(units, refused)


def _frames_unit(
    folder: str,
    video_id: str,
    files: list[tuple[str, str]],
    refused: list[dict[str, str]],
    *,
    clip_label: int = -1,
    split: str | None = None,
) -> WorkUnit | None:
    """One frames unit from the images of one folder, in frame order; refusals appended to ``refused``."""
    numbered: list[tuple[int, str, str]] = []
    for rel, uri in files:
        stem = _strip_suffix(rel.rsplit("/", 1)[-1])
        if _FRAME_NAME.fullmatch(stem):
            numbered.append((int(stem), rel, uri))
        elif len(files) > 1:
            refused.append({"input": rel, "reason": "frame file name is not a number (expected 00001.jpg …)"})
    if not numbered:
        refused.append({"input": folder, "reason": "no numbered frame files (expected 00001.jpg …)"})
        return None
    numbered.sort()
    # Aff-Wild2 and DFEW number frames from 1 (00001.jpg is frame 0, matching
    # annotation line 1). A folder holding frame 0 can only be numbered from 0.
    offset = 0 if numbered[0][0] == 0 else 1
    uris, indices, seen = [], [], {}
    for number, rel, uri in numbered:
        if number in seen:  # 00001.jpg beside 00001.png or 1.jpg: one frame, two files
            refused.append({"input": rel, "reason": f"duplicate frame number {number} (also {seen[number]})"})
            continue
        seen[number] = rel
        uris.append(uri)
        indices.append(number - offset)
    return WorkUnit(
        key=unit_key(folder),
        kind="frames",
        video_id=video_id,
        uris=tuple(uris),
        frame_indices=tuple(indices),
        clip_label=clip_label,
        source=folder,
        split=split,
    )


def _list_image_folder(source: str, images_per_unit: int, dataset: str | None, split: str | None) -> SourceListing:
    refused: list[dict[str, str]] = []
    class_mapping: dict[str, str] = {}
    class_index: dict[str, int | None] = {}  # folder name -> ABAW8 index, None if it names no class
    skipped: dict[str, list[str]] = defaultdict(list)  # class folder -> images it made us skip
    by_split: dict[str | None, list[_Image]] = defaultdict(list)
    found_splits: set[str] = set()

    for rel, uri in list_relative(source, IMAGE_SUFFIXES):
        parts = rel.split("/")
        if len(parts) == 2:
            split_name, class_name = None, parts[0]
        elif len(parts) == 3:
            split_name, class_name = parts[0], parts[1]
            found_splits.add(split_name)
        else:
            where = "directly in SOURCE" if len(parts) == 1 else "nested too deep"
            refused.append({"input": rel, "reason": f"image {where}; expected [<split>/]<class>/<image>"})
            continue
        if class_name not in class_index:
            class_index[class_name] = _class_folder_index(class_name, dataset, class_mapping)
        label = class_index[class_name]
        if label is None:
            skipped["/".join(parts[:-1])].append(rel)
            continue
        by_split[split_name].append(_Image(rel, uri, label))

    for folder, rels in sorted(skipped.items()):
        name = folder.rsplit("/", 1)[-1]
        refused.append({"input": folder, "reason": f"{_class_refusal(name, dataset)}; {len(rels)} images skipped"})

    if split is not None and found_splits:
        if split not in found_splits:
            raise SourceError(
                f"no split folder {split!r} under {source!r}; split folders found: {', '.join(sorted(found_splits))}"
            )
        by_split = defaultdict(list, {split: by_split.get(split, [])})

    units = []
    for split_name, images in by_split.items():
        unit_split = split_name if split_name is not None else split
        units.extend(_image_chunks(split_name, images, images_per_unit, unit_split))
    # Every dataset numbering that has Contempt lacks Other, so a numbered folder meaning Other is Contempt.
    other_folders = [name for name, abaw in class_mapping.items() if abaw == "Other"]
    contempt = all(_FRAME_NAME.fullmatch(name) or _normalise(name) == "contempt" for name in other_folders)
    label_set = _label_set({image.label for images in by_split.values() for image in images}, contempt)
    return SourceListing(units, refused, class_mapping, label_set)


def _class_folder_index(name: str, dataset: str | None, class_mapping: dict[str, str]) -> int | None:
    """ABAW8 index of a class folder name (a number in ``dataset``'s numbering, or a class name)."""
    try:
        if _FRAME_NAME.fullmatch(name):
            if dataset is None:
                return None
            index = labels.dataset_label_to_abaw(dataset, int(name))
        elif dataset is not None:
            index = labels.dataset_label_to_abaw(dataset, name)
        else:
            index = labels.ABAW8.index(labels.canonical_class_name(name))
    except labels.LabelError:
        return None
    if index < 0:  # FER+ 'unknown' / 'NF': a real folder, but not an expression
        return None
    class_mapping[name] = labels.ABAW8.classes[index]
    return index


def _class_refusal(name: str, dataset: str | None) -> str:
    """Why a class folder name maps to no ABAW8 class, in words."""
    if _FRAME_NAME.fullmatch(name) and dataset is None:
        return f"class folder {name!r} is a number: pass the dataset whose numbering it uses (--dataset rafdb, …)"
    if dataset is not None:
        return f"class folder {name!r} is no expression class of dataset {dataset!r}"
    return f"class folder {name!r} names no expression class ({', '.join(labels.ABAW8.classes)} or a synonym)"


class _Image(NamedTuple):
    """One still image of an image layout, before it is put in a chunk."""

    rel: str
    uri: str
    label: int
    box: tuple[int, int, int, int] | None = None  # (x, y, width, height) to crop
    valence: float = math.nan
    arousal: float = math.nan


def _image_chunks(
    split_name: str | None,
    images: list[_Image],
    images_per_unit: int,
    unit_split: str | None,
    *,
    from_list: bool = False,
    with_va: bool = False,
) -> list[WorkUnit]:
    """Cut one split's images into units of ``images_per_unit``, in a stable shuffled order.

    Image folders list one class after another; chunks in path order would each hold
    one class, and a training reader's local shuffle buffer (a few batches) would feed
    the model one class at a time. Ordering by a hash of the path mixes the classes in
    every chunk, the same way on every run (unit keys stay stable).

    ``from_list``: labels, boxes and valence/arousal come from a list file, not from
    the path, so they are hashed into the key too. ``with_va``: the units carry
    valence and arousal. Boxes are carried when every image has one.
    """
    images = sorted(images, key=lambda image: (hashlib.sha256(image.rel.encode()).hexdigest(), image.rel))
    base = split_name or "images"
    boxed = bool(images) and all(image.box is not None for image in images)
    units = []
    for start in range(0, len(images), images_per_unit):
        chunk = images[start : start + images_per_unit]
        name = f"{base}/chunk-{start // images_per_unit:05d}"
        # The hash covers the chunk's files (and what a list says of them): a changed
        # folder or list never reuses an old shard.
        lines = [f"{i.rel}\t{i.label}\t{i.box}\t{i.valence}\t{i.arousal}" if from_list else i.rel for i in chunk]
        units.append(
            WorkUnit(
                key=unit_key(name, hashed="\n".join(lines)),
                kind="images",
                video_id=name,
                uris=tuple(i.uri for i in chunk),
                frame_indices=tuple(range(len(chunk))),
                labels=tuple(i.label for i in chunk),
                source=f"{split_name or '.'}[{start}:{start + len(chunk)}]",
                split=unit_split,
                boxes=tuple(i.box for i in chunk if i.box is not None) if boxed else None,
                valence=tuple(i.valence for i in chunk) if with_va else None,
                arousal=tuple(i.arousal for i in chunk) if with_va else None,
            )
        )
    return units


def _list_dfew_csv(source: str, csv_uri: str | None, split: str | None) -> SourceListing:
    files = list_relative(source)
    csv_uri = csv_uri or _find_split_file(source, files)
    tree = _Tree.index(files)
    refused: list[dict[str, str]] = []
    units: list[WorkUnit] = []
    first_line: dict[str, int] = {}  # unit key -> csv line that listed it
    for number, path, label_text in _split_file_rows(storage.read_text(csv_uri), csv_uri, refused):
        reason, unit = _dfew_unit(source, tree, path, label_text, split, refused)
        if unit is not None and unit.key in first_line:
            reason, unit = f"clip listed twice (first on line {first_line[unit.key]})", None
        if reason:
            refused.append({"input": path, "reason": f"line {number} of {csv_uri}: {reason}"})
        elif unit is not None:
            first_line[unit.key] = number
            units.append(unit)
    return SourceListing(units, refused, label_set="basic7")


@dataclass
class _Tree:
    """SOURCE's files, indexed the ways a split-file line may name a clip."""

    files: dict[str, str]  # rel -> uri
    frame_folders: dict[str, list[tuple[str, str]]]  # folder rel -> its frame images
    videos_by_stem: dict[str, list[str]]  # rel without extension -> video rels

    @classmethod
    def index(cls, files: list[tuple[str, str]]) -> _Tree:
        videos_by_stem: dict[str, list[str]] = defaultdict(list)
        for rel, _ in files:
            if rel.lower().endswith(VIDEO_SUFFIXES):
                videos_by_stem[_strip_suffix(rel)].append(rel)
        frames = [(rel, uri) for rel, uri in files if rel.lower().endswith(FRAME_SUFFIXES)]
        return cls(dict(files), _group_by_folder(frames), dict(videos_by_stem))


def _split_file_rows(text: str, csv_uri: str, refused: list[dict[str, str]]) -> Iterator[tuple[int, str, str]]:
    """Yield ``(line number, path, label text)``; skip blanks, comments and a header line."""
    first = True
    for number, raw in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = _split_csv_line(line)
        if fields is None:
            refused.append({"input": line, "reason": f"line {number} of {csv_uri}: expected 'path label'"})
        elif first and not _is_int(fields[1]):
            pass  # a first line like 'video_name,label' is a header
        else:
            yield number, fields[0], fields[1]
        first = False


def _dfew_unit(
    source: str, tree: _Tree, path: str, label_text: str, split: str | None, refused: list[dict[str, str]]
) -> tuple[str | None, WorkUnit | None]:
    """The unit one split-file line names, or the reason it cannot be one."""
    try:
        label = labels.dataset_label_to_abaw("dfew", int(label_text)) if _is_int(label_text) else -1
    except labels.LabelError:
        label = -1
    if label < 0:
        return f"label {label_text!r} is not a DFEW class index (1..7)", None
    try:
        storage.join_relative(source, path)  # refuses '..', absolute paths and URIs
    except storage.StorageError as error:
        return str(error), None
    rel = "/".join(part for part in path.replace("\\", "/").split("/") if part not in ("", "."))
    if rel in tree.frame_folders:
        return None, _frames_unit(rel, rel, tree.frame_folders[rel], refused, clip_label=label, split=split)
    if rel in tree.files and not rel.lower().endswith(VIDEO_SUFFIXES):
        return "names a file that is neither a video nor a folder of frames", None
    if rel not in tree.files:
        # DFEW lists clips without an extension: find the one video of that name.
        matches = tree.videos_by_stem.get(rel, [])
        if len(matches) > 1:
            return f"ambiguous: several videos are named like it ({', '.join(matches)})", None
        if not matches:
            return "no such clip folder or video under SOURCE", None
        rel = matches[0]
    return None, _video_unit(rel, tree.files[rel], label, split)


def _video_unit(rel: str, uri: str, clip_label: int, split: str | None) -> WorkUnit:
    return WorkUnit(
        key=unit_key(rel),
        kind="video",
        video_id=_strip_suffix(rel),
        uris=(uri,),
        frame_indices=(),  # a video's frames are known only once it is decoded
        clip_label=clip_label,
        source=rel,
        split=split,
    )


def _find_split_file(source: str, files: list[tuple[str, str]]) -> str:
    """The one ``*.csv`` directly in SOURCE, when no csv was named."""
    candidates = [uri for rel, uri in files if "/" not in rel and rel.lower().endswith(".csv")]
    if len(candidates) != 1:
        found = "none" if not candidates else ", ".join(candidates)
        raise SourceError(
            f"layout dfew-csv needs one split file: found {found} as *.csv in {source!r}; name one with --annotations"
        )
    return candidates[0]


def _split_csv_line(line: str) -> tuple[str, str] | None:
    """``(path, label)`` from a comma- or whitespace-separated line; paths may hold spaces."""
    if "," in line:
        fields = [f.strip() for f in next(csv.reader([line]))]
        fields = [f for f in fields if f]
        return (fields[0], fields[1]) if len(fields) >= 2 else None
    # Whitespace: the label is the last field, so a path may contain spaces.
    parts = line.rsplit(None, 1)
    return (parts[0], parts[1]) if len(parts) == 2 else None


# ---------------------------------------------------------------------------
# Datasets as their authors distribute them
# ---------------------------------------------------------------------------

_OTHER = labels.ABAW8.index("Other")
_RAFDB_LIST = "list_patition_label.txt"  # sic: RAF-DB's own spelling
_RAFDB_SPLITS = ("train", "test")
_AFFECTNET_LISTS = {"train": "training.csv", "val": "validation.csv"}
_AFFECTNET_BOX = ("face_x", "face_y", "face_width", "face_height")
_AFFECTNET_COLUMNS = ("subDirectory_filePath", *_AFFECTNET_BOX, "expression", "valence", "arousal")
_AFFECTNET_NOT_EXPRESSIONS = {8: "None", 9: "Uncertain", 10: "Non-Face"}
_DFEW_CLIP_ROOTS = ("Clip/jpg_256", "Clip/clip_224x224", "jpg_256", "clip_224x224")
_MAEDFER_LISTS = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}


def _label_set(present: set[int], other_is_contempt: bool) -> str:
    """Which of shards.DATASET_LABEL_SETS a dataset whose labels (ABAW8 indices) are ``present`` has."""
    if _OTHER not in present:
        return "basic7"
    return "affectnet8" if other_is_contempt else "abaw8"


def _list_rafdb(source: str, csv_uri: str | None, split: str | None, images_per_unit: int) -> SourceListing:
    _check_split(split, _RAFDB_SPLITS, "rafdb")
    base = source if csv_uri is None else _find_given(source, csv_uri, "RAF-DB label list")
    list_uri = base if _is_file(base) else _first_existing(base, [f"EmoLabel/{_RAFDB_LIST}", _RAFDB_LIST])
    if list_uri is None:
        raise SourceError(f"no RAF-DB label list in {base!r}: expected EmoLabel/{_RAFDB_LIST}; name it with --csv")
    images_root = _first_existing(source, ["Image/aligned", "aligned"]) or source
    aligned: dict[str, list[tuple[str, str]]] = defaultdict(list)  # image name without extension -> files
    for rel, uri in list_relative(images_root, IMAGE_SUFFIXES):
        aligned[_strip_suffix(rel.rsplit("/", 1)[-1])].append((rel, uri))

    refused: list[dict[str, str]] = []
    by_split: dict[str, list[_Image]] = defaultdict(list)
    first_line: dict[str, int] = {}
    for number, name, label_text in _split_file_rows(storage.read_text(list_uri), list_uri, refused):
        stem = _strip_suffix(name.replace("\\", "/").rsplit("/", 1)[-1])
        image_split = stem.split("_", 1)[0]
        label = _dataset_label("rafdb", label_text)
        matches = aligned.get(f"{stem}_aligned", [])
        if image_split not in _RAFDB_SPLITS:
            reason = "the name starts with neither train_ nor test_, so it has no split"
        elif label is None:
            reason = f"label {label_text!r} is not a RAF-DB class index (1..7)"
        elif stem in first_line:
            reason = f"image listed twice (first on line {first_line[stem]})"
        elif len(matches) != 1:
            where = f"{stem}_aligned.* under {images_root!r}"
            reason = f"no aligned image {where}" if not matches else f"several aligned images {where}"
        else:
            first_line[stem] = number
            if split is None or image_split == split:
                rel, uri = matches[0]
                by_split[image_split].append(_Image(rel, uri, label))
            continue
        refused.append({"input": name, "reason": f"line {number} of {list_uri}: {reason}"})
    units = [
        unit
        for split_name, images in sorted(by_split.items())
        for unit in _image_chunks(split_name, images, images_per_unit, split_name, from_list=True)
    ]
    return SourceListing(units, refused, label_set="basic7")


def _list_affectnet(source: str, csv_uri: str | None, split: str | None, images_per_unit: int) -> SourceListing:
    _check_split(split, tuple(_AFFECTNET_LISTS), "affectnet")
    lists = _split_lists(
        source, csv_uri, split, _AFFECTNET_LISTS, ["Manually_Annotated_file_lists", ""], "AffectNet list"
    )
    images_root = (
        _first_existing(source, ["Manually_Annotated_Images", "Manually_Annotated/Manually_Annotated_Images"]) or source
    )
    available = dict(list_relative(images_root, IMAGE_SUFFIXES))
    refused: list[dict[str, str]] = []
    by_split: dict[str | None, list[_Image]] = defaultdict(list)
    first_row: dict[str, str] = {}
    for list_split, list_uri in lists:
        skipped: Counter[int] = Counter()
        for where, image in _affectnet_rows(list_uri, images_root, available, refused, skipped):
            if image.rel in first_row:
                reason = f"{where}: image listed twice (first on {first_row[image.rel]})"
                refused.append({"input": image.rel, "reason": reason})
                continue
            first_row[image.rel] = where
            by_split[list_split].append(image)
        for expression, count in sorted(skipped.items()):
            name = _AFFECTNET_NOT_EXPRESSIONS[expression]
            reason = f"{count} rows of expression {expression} ({name}): not an expression class, skipped"
            refused.append({"input": list_uri, "reason": reason})
    units = [
        unit
        for split_name, images in by_split.items()
        for unit in _image_chunks(split_name, images, images_per_unit, split_name, from_list=True, with_va=True)
    ]
    present = {image.label for images in by_split.values() for image in images}
    return SourceListing(units, refused, label_set=_label_set(present, other_is_contempt=True))


def _affectnet_rows(
    list_uri: str, images_root: str, available: dict[str, str], refused: list[dict[str, str]], skipped: Counter[int]
) -> Iterator[tuple[str, _Image]]:
    """``(where, image)`` for each usable row of an AffectNet list; the rest refused or counted in ``skipped``."""
    reader = csv.DictReader(io.StringIO(storage.read_text(list_uri).lstrip("\ufeff")))
    missing = [column for column in _AFFECTNET_COLUMNS if column not in (reader.fieldnames or [])]
    if missing:
        raise SourceError(f"{list_uri!r} is not an AffectNet list: its header lacks {', '.join(missing)}")
    for row in reader:
        where = f"line {reader.line_num} of {list_uri}"
        path = (row["subDirectory_filePath"] or "").strip().replace("\\", "/")
        try:
            expression = int(row["expression"])
            x, y, width, height = (int(float(row[column])) for column in _AFFECTNET_BOX)
        except (TypeError, ValueError):
            refused.append({"input": path, "reason": f"{where}: expression and face box must be numbers"})
            continue
        if expression in _AFFECTNET_NOT_EXPRESSIONS:
            skipped[expression] += 1
            continue
        label = _dataset_label("affectnet8", str(expression))
        if label is None:
            reason = f"expression {expression} is not an AffectNet class (0..10)"
        elif width <= 0 or height <= 0:
            reason = f"face box {(x, y, width, height)} (x, y, width, height) has no area"
        elif path not in available:
            reason = f"no such image under {images_root!r}"
        else:
            box = (x, y, width, height)
            yield where, _Image(path, available[path], label, box, _va(row["valence"]), _va(row["arousal"]))
            continue
        refused.append({"input": path, "reason": f"{where}: {reason}"})


def _va(text: str | None) -> float:
    """A valence or arousal value; NaN for AffectNet's -2 ('not applicable') and anything outside [-1, 1]."""
    try:
        value = float(text or "nan")
    except ValueError:
        return math.nan
    return value if -1.0 <= value <= 1.0 else math.nan


def _list_dfew(source: str, csv_uri: str | None, split: str | None, fold: int | None) -> SourceListing:
    _check_split(split, ("train", "test"), "dfew")
    given_file = csv_uri is not None and _is_file(_find_given(source, csv_uri, "DFEW split list"))
    if fold is None and not given_file:
        raise SourceError("layout dfew needs --fold 1..5: it picks EmoLabel_DataSplit/*(single-labeled)/set_<fold>.csv")
    names = {s: f"{s}(single-labeled)/set_{fold}.csv" for s in ("train", "test")}
    lists = _split_lists(source, csv_uri, split, names, ["EmoLabel_DataSplit", ""], "DFEW split list")
    clip_root = next((r for r in _DFEW_CLIP_ROOTS if storage.exists(storage.join_relative(source, r))), None)
    if clip_root is None:
        raise SourceError(
            f"no DFEW clip frames under {source!r}: expected Clip/jpg_256/<clip>/ or Clip/clip_224x224/<clip>/"
        )
    folders = _ClipFolders.index(source, clip_root)

    def clip_folder(name: str) -> tuple[str | None, str]:
        if not _is_int(name):
            return None, f"video_name {name!r} is not a clip number"
        return folders.find(f"{int(name):05d}")

    return _clip_list_units(lists, folders, "dfew", 0, clip_folder)


def _list_dfew_maedfer(source: str, csv_uri: str | None, split: str | None, fold: int | None) -> SourceListing:
    _check_split(split, tuple(_MAEDFER_LISTS), "dfew-maedfer")
    folders_to_try = [f"split{fold:02d}"] if fold is not None else [""]
    lists = _split_lists(
        source, csv_uri, split, _MAEDFER_LISTS, folders_to_try, "MAE-DFER split list", default=("train", "test", "val")
    )
    if split is None and any(s == "test" for s, _ in lists):
        lists = [(s, uri) for s, uri in lists if s != "val"]  # MAE-DFER's val.csv is a copy of test.csv
    folders = _ClipFolders.index(source)
    return _clip_list_units(lists, folders, "dfew", 1, folders.find)


@dataclass
class _ClipFolders:
    """The frame folders under SOURCE, found by their path or, when unique, their name."""

    files: dict[str, list[tuple[str, str]]]  # folder rel to SOURCE -> its frames
    by_name: dict[str, list[str]]  # folder name -> folder rels

    @classmethod
    def index(cls, source: str, under: str = "") -> _ClipFolders:
        root = storage.join_relative(source, under) if under else source
        prefix = f"{under}/" if under else ""
        files = _group_by_folder([(prefix + rel, uri) for rel, uri in list_relative(root, FRAME_SUFFIXES)])
        by_name: dict[str, list[str]] = defaultdict(list)
        for rel in files:
            by_name[rel.rsplit("/", 1)[-1]].append(rel)
        return cls(files, dict(by_name))

    def find(self, path: str) -> tuple[str | None, str]:
        """The folder a list names, by the longest tail of its path found under SOURCE, else by its name."""
        parts = [part for part in path.replace("\\", "/").split("/") if part not in ("", ".")]
        for start in range(len(parts)):
            if "/".join(parts[start:]) in self.files:
                return "/".join(parts[start:]), ""
        matches = self.by_name.get(parts[-1], []) if parts else []
        if len(matches) == 1:
            return matches[0], ""
        if matches:
            return None, f"ambiguous: several frame folders are named {parts[-1]!r} ({', '.join(sorted(matches))})"
        return None, "no such clip frame folder under SOURCE"


def _clip_list_units(
    lists: list[tuple[str | None, str]],
    folders: _ClipFolders,
    dataset: str,
    label_offset: int,
    clip_folder: Callable[[str], tuple[str | None, str]],
) -> SourceListing:
    """One frames unit per clip the lists name; ``clip_folder(path)`` finds it (folder rel, or None and why)."""
    refused: list[dict[str, str]] = []
    units: list[WorkUnit] = []
    first: dict[str, str] = {}  # folder rel -> where it was listed
    for list_split, list_uri in lists:
        for number, path, label_text in _split_file_rows(storage.read_text(list_uri), list_uri, refused):
            label = _dataset_label(dataset, label_text, offset=label_offset)
            if label is None:
                low, high = 1 - label_offset, 7 - label_offset
                rel, reason = None, f"label {label_text!r} is not a DFEW class index ({low}..{high})"
            else:
                rel, reason = clip_folder(path)
            if rel is not None and rel in first:
                rel, reason = None, f"clip listed twice (first on {first[rel]})"
            if rel is None or label is None:
                refused.append({"input": path, "reason": f"line {number} of {list_uri}: {reason}"})
                continue
            first[rel] = f"line {number} of {list_uri}"
            units.append(_clip_unit(rel, folders.files[rel], label, list_split))
    return SourceListing(units, refused, label_set="basic7")


def _clip_unit(rel: str, files: list[tuple[str, str]], clip_label: int, split: str | None) -> WorkUnit:
    """A frames unit of a clip folder whose frames are in name order (numbers compared as numbers)."""
    ordered = sorted(files, key=lambda file: _natural_key(file[0].rsplit("/", 1)[-1]))
    return WorkUnit(
        key=unit_key(rel),
        kind="frames",
        video_id=rel.rsplit("/", 1)[-1],
        uris=tuple(uri for _, uri in ordered),
        frame_indices=tuple(range(len(ordered))),
        clip_label=clip_label,
        source=rel,
        split=split,
    )


def _split_lists(
    source: str,
    csv_uri: str | None,
    split: str | None,
    names: dict[str, str],
    folders: list[str],
    what: str,
    *,
    default: Sequence[str] | None = None,
) -> list[tuple[str | None, str]]:
    """``(split, list URI)`` pairs to read.

    ``csv_uri`` naming a file: that file, its split ``split`` or read from its name.
    Otherwise ``names[split]`` (every split of ``default`` or ``names`` when ``split``
    is None) in the first of ``folders`` under ``csv_uri`` (or SOURCE) that holds any.
    """
    base = source
    if csv_uri is not None:
        base = _find_given(source, csv_uri, what)
        if _is_file(base):
            return [(split or _split_of(base, names), base)]
    wanted = [split] if split is not None else list(default or names)
    roots = [storage.join_relative(base, folder) if folder else base for folder in folders]
    for root in roots:
        listed = [(s, storage.join_relative(root, names[s])) for s in wanted]
        found: list[tuple[str | None, str]] = [(s, uri) for s, uri in listed if storage.exists(uri)]
        if found:
            return found
    expected = " or ".join(names[s] for s in wanted)
    raise SourceError(f"no {what} in {' or '.join(repr(r) for r in roots)}: expected {expected}; name it with --csv")


def _split_of(uri: str, names: dict[str, str]) -> str | None:
    """The split a list file's name (or its folder's) starts with: training.csv, test(single-labeled)/…."""
    parts = uri.replace("\\", "/").rstrip("/").split("/")
    for part in reversed(parts[-2:]):
        for name in names:
            if part.lower().startswith(name):
                return name
    return None


def _find_given(source: str, given: str, what: str) -> str:
    """A list file or folder the user named: as given (relative to the working directory), else under SOURCE."""
    candidates = [given]
    if not storage.is_remote(given) and not given.startswith("file:"):
        relative = given if not os.path.isabs(given) else os.path.relpath(given, os.getcwd())
        if not relative.startswith(".."):
            candidates.append(storage.join(source, *relative.replace("\\", "/").split("/")))
    for candidate in candidates:
        if storage.exists(candidate):
            return candidate
    raise SourceError(f"{what} {given!r} not found (looked in the working directory and under {source!r})")


def _first_existing(base: str, rels: Sequence[str]) -> str | None:
    for rel in rels:
        uri = storage.join_relative(base, rel)
        if storage.exists(uri):
            return uri
    return None


def _is_file(uri: str) -> bool:
    fs, path = storage.get_filesystem(uri)
    try:
        return bool(fs.isfile(path))
    except Exception:  # noqa: BLE001 - an unreachable file is reported when it is read
        return False


def _check_split(split: str | None, splits: Sequence[str], layout: str) -> None:
    if split is not None and split not in splits:
        raise SourceError(f"layout {layout} has the splits {', '.join(splits)}; got --split {split!r}")


def _dataset_label(dataset: str, text: str, *, offset: int = 0) -> int | None:
    """ABAW8 index of a dataset's class number given as text (plus ``offset``), or None if it is none."""
    if not _is_int(text):
        return None
    try:
        label = labels.dataset_label_to_abaw(dataset, int(text) + offset)
    except labels.LabelError:
        return None
    return label if label >= 0 else None


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _strip_suffix(rel: str) -> str:
    head, _, name = rel.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return f"{head}/{stem}" if head else stem


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


def _last_component(uri: str) -> str:
    return uri.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _group_by_folder(files: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for rel, uri in files:
        groups[rel.rpartition("/")[0]].append((rel, uri))
    return dict(groups)


def _natural_key(name: str) -> list[Any]:
    # re.split with a group alternates text and digits, so keys compare str to str and int to int.
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"([0-9]+)", name))]


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


def _is_int(text: str) -> bool:
    return re.fullmatch(r"[+-]?[0-9]+", text) is not None


def _check_unique(units: list[WorkUnit]) -> None:
    seen: dict[str, str] = {}
    for unit in units:
        if unit.key in seen:
            raise SourceError(f"inputs {seen[unit.key]!r} and {unit.source!r} share the key {unit.key!r}")
        seen[unit.key] = unit.source
