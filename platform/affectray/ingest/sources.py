"""Input corpora → work units: the list of things the ingest job turns into shards.

A *work unit* is one video file, one folder of frames, or one chunk of still
images. The ingest job maps one Ray Data task over each unit and writes one
shard per unit, named by the unit's key, so a unit's key must be the same on
every run and every machine and must be safe as a file name and an S3 key.

Four layouts are understood (``list_units(source, layout)``):

``videos``
    Every video file under SOURCE, one unit each: Aff-Wild2 ``<name>.mp4``,
    VoxCeleb2 ``id00012/<youtube id>/00001.mp4``.
``aligned-frames``
    Aff-Wild2 ``cropped_aligned/<video>/00001.jpg …``: one unit per folder, in
    frame order. File ``00001.jpg`` is frame 0, as Aff-Wild2's annotation line 1.
``image-folder``
    RAF-DB / AffectNet style ``[<split>/]<class>/*.jpg``: class folders named by
    the dataset's number (``--dataset`` picks the numbering) or by class name;
    images are chunked into units of ``images_per_unit``.
``dfew-csv``
    A DFEW split file of ``path label`` lines naming clip folders or videos
    relative to SOURCE, labels 1..7 in DFEW's numbering.

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
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from affectray import labels, storage
from affectray.errors import AffectrayError

__all__ = [
    "FRAME_SUFFIXES",
    "IMAGE_SUFFIXES",
    "LAYOUTS",
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
LAYOUTS = ("videos", "aligned-frames", "image-folder", "dfew-csv")

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
    numbered as it is decoded. ``labels`` holds per-image ABAW8 labels
    (image-folder only); ``clip_label`` a whole-clip ABAW8 label (DFEW), -1 if none.
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

    def __post_init__(self) -> None:
        # Accept lists and numpy arrays, as rows come back from JSON or Ray Data.
        object.__setattr__(self, "uris", tuple(str(u) for u in self.uris))
        object.__setattr__(self, "frame_indices", tuple(int(i) for i in self.frame_indices))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(int(v) for v in self.labels))
        object.__setattr__(self, "clip_label", int(self.clip_label))
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
        if self.labels is not None and len(self.labels) != len(self.uris):
            raise SourceError(f"work unit {self.key!r}: {len(self.labels)} labels for {len(self.uris)} files")

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
            )
        except (KeyError, TypeError) as error:
            raise SourceError(f"not a work unit row ({error!r}): keys {sorted(row)}") from error


@dataclass
class SourceListing:
    """What :func:`list_units` found: units sorted by key, inputs refused, class folder → ABAW8 name."""

    units: list[WorkUnit]
    refused: list[dict[str, str]] = field(default_factory=list)
    class_mapping: dict[str, str] = field(default_factory=dict)


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
) -> SourceListing:
    """List the work units of ``source`` read as ``layout`` (one of LAYOUTS).

    Args:
        images_per_unit: image-folder only: images per unit (per shard).
        csv_uri: dfew-csv only: the split file; default the one ``*.csv`` at SOURCE's top.
        dataset: image-folder: whose numbering numbered class folders use ('rafdb',
            'affectnet8', …); names in any dataset's spelling work without it.
        split: recorded on every unit. For an image-folder tree with split
            folders, selects that split folder; with None, each unit carries the
            split folder it came from.
    """
    if layout not in LAYOUTS:
        raise SourceError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if images_per_unit < 1:
        raise SourceError(f"images_per_unit must be at least 1, got {images_per_unit}")
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
        else:
            listing = _list_dfew_csv(source, csv_uri, split)
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
    by_split: dict[str | None, list[tuple[str, str, int]]] = defaultdict(list)
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
        by_split[split_name].append((rel, uri, label))

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
    return SourceListing(units, refused, class_mapping)


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


def _image_chunks(
    split_name: str | None, images: list[tuple[str, str, int]], images_per_unit: int, unit_split: str | None
) -> list[WorkUnit]:
    """Cut one split's images (sorted by path) into units of ``images_per_unit``."""
    images = sorted(images)
    base = split_name or "images"
    units = []
    for start in range(0, len(images), images_per_unit):
        chunk = images[start : start + images_per_unit]
        name = f"{base}/chunk-{start // images_per_unit:05d}"
        units.append(
            WorkUnit(
                # The hash covers the chunk's files: a changed folder never reuses an old shard.
                key=unit_key(name, hashed="\n".join(rel for rel, _, _ in chunk)),
                kind="images",
                video_id=name,
                uris=tuple(uri for _, uri, _ in chunk),
                frame_indices=tuple(range(len(chunk))),
                labels=tuple(label for _, _, label in chunk),
                source=f"{split_name or '.'}[{start}:{start + len(chunk)}]",
                split=unit_split,
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
    return SourceListing(units, refused)


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


def _is_int(text: str) -> bool:
    return re.fullmatch(r"[+-]?[0-9]+", text) is not None


def _check_unique(units: list[WorkUnit]) -> None:
    seen: dict[str, str] = {}
    for unit in units:
        if unit.key in seen:
            raise SourceError(f"inputs {seen[unit.key]!r} and {unit.source!r} share the key {unit.key!r}")
        seen[unit.key] = unit.source
