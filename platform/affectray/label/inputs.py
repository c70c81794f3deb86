"""VIDEOS → the videos to label, each with the stable key that names its outputs.

VIDEOS may be

* a local directory or an ``s3://`` prefix: every video file under it (hidden files skipped);
* a glob (``s3://corpus/raw/*/clip_*.mp4``, ``videos/**/*.mkv``): the video files it matches;
* a manifest, by its suffix: a text file (``.txt``/``.lst``: one URI or path per line, ``#``
  comments), a ``.csv`` with a ``video_uri`` (or ``uri``/``path``/``video``) column, or a
  ``.parquet`` file with such a column. Relative entries are resolved against the
  manifest's folder; entries with a ``..`` component are refused, as are relative
  entries that are absolute paths in disguise (see :func:`affectray.storage.join_relative`);
* one video file.

With ``layout="aligned-frames"`` VIDEOS is instead a root of Aff-Wild2
``cropped_aligned``-style folders of aligned face frames (``<video>/00001.jpg``):
each folder is one video whose every frame is one face, labelled without detection.

A key is a function of the video's canonical URI alone (absolute local path, or
``s3://bucket/key``), made by :func:`affectray.ingest.sources.unit_key`: the last
three path components plus a hash of the whole URI. It is the same on every run
whichever way VIDEOS names the file, and two ``clip.mp4`` in different folders
never share outputs.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Literal
from urllib.parse import urlparse

from affectray import storage
from affectray.ingest.sources import VIDEO_SUFFIXES, SourceError, list_relative, list_units, unit_key

__all__ = ["MANIFEST_SUFFIXES", "InputListing", "VideoInput", "canonical_uri", "list_inputs", "video_key"]

MANIFEST_SUFFIXES = (".txt", ".lst", ".list", ".csv", ".parquet")
_URI_COLUMNS = ("video_uri", "uri", "path", "video", "file")
_GLOB_CHARS = "*?["
_KEY_COMPONENTS = 3  # path components in a key's readable part

Layout = Literal["videos", "aligned-frames"]


@dataclass(frozen=True)
class VideoInput:
    """One video to label: a video file, or a folder of aligned frames."""

    key: str  # names the video's outputs: labels/<key>.parquet, timelines/<key>.png, _done/<key>.json
    uri: str  # the video file, or the frame folder
    name: str  # readable: the path relative to what VIDEOS named
    kind: Literal["video", "frames"] = "video"
    frames: tuple[str, ...] = ()  # kind "frames": frame files in order
    frame_indices: tuple[int, ...] = ()  # kind "frames": each file's frame number (00001.jpg is frame 0)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> VideoInput:
        row = json.loads(text)
        return cls(**{**row, "frames": tuple(row["frames"]), "frame_indices": tuple(row["frame_indices"])})


@dataclass
class InputListing:
    """What VIDEOS holds: videos sorted by key, and entries refused with the reason."""

    videos: list[VideoInput]
    refused: list[dict[str, str]] = field(default_factory=list)  # {"input", "uri", "reason"}


def canonical_uri(uri: str) -> str:
    """The one spelling of a URI that keys hash: ``s3://bucket/key``, or an absolute local path."""
    uri = os.fspath(uri)
    if storage.is_remote(uri):
        parsed = urlparse(uri)
        return f"s3://{parsed.netloc}/{parsed.path.strip('/')}"
    if uri.startswith("file://"):
        uri = urlparse(uri).path
    return os.path.abspath(os.path.expanduser(uri))


def video_key(uri: str) -> str:
    """A video's output key, a function of its canonical URI alone: ``<folder>_<name>-<hash>``.

    The readable part is the last three path components; the hash covers the whole
    canonical URI. Listing the same file through a folder, a glob or a manifest
    gives the same key, so a re-run skips it whichever way VIDEOS names it.
    """
    canonical = canonical_uri(uri)
    path = canonical[len("s3://") :] if canonical.startswith("s3://") else canonical
    tail = "/".join(path.replace("\\", "/").strip("/").split("/")[-_KEY_COMPONENTS:])
    return unit_key(tail, hashed=canonical)


def list_inputs(videos: str, layout: Layout = "videos") -> InputListing:
    """List what VIDEOS names (see the module docstring); raises SourceError if it holds nothing."""
    try:
        if layout == "aligned-frames":
            listing = _list_frame_folders(videos)
        elif layout != "videos":
            raise SourceError(f"layout must be 'videos' or 'aligned-frames', got {layout!r}")
        elif any(ch in videos for ch in _GLOB_CHARS):
            listing = _list_glob(videos)
        elif videos.lower().endswith(MANIFEST_SUFFIXES):
            listing = _list_manifest(videos)
        else:
            listing = InputListing(
                [VideoInput(video_key(uri), uri, rel) for rel, uri in list_relative(videos, VIDEO_SUFFIXES)]
            )
    except storage.StorageError as error:
        raise SourceError(f"cannot list videos in {videos!r}: {error}") from error
    if not listing.videos and not listing.refused:
        what = "aligned frame folders (<video>/00001.jpg)" if layout == "aligned-frames" else "video files"
        raise SourceError(f"found no {what} in {videos!r} ({', '.join(VIDEO_SUFFIXES)})")
    seen: dict[str, str] = {}
    for video in listing.videos:
        if video.key in seen:  # a hash collision, or one video listed twice under two spellings
            raise SourceError(f"{seen[video.key]!r} and {video.uri!r} share the key {video.key!r}")
        seen[video.key] = video.uri
    listing.videos.sort(key=lambda v: v.key)
    return listing


def _list_frame_folders(root: str) -> InputListing:
    units = list_units(root, "aligned-frames")
    videos = []
    for unit in units.units:
        first = unit.uris[0]
        folder = posixpath.dirname(first) if storage.is_remote(first) else os.path.dirname(first)
        videos.append(
            VideoInput(
                key=video_key(folder),
                uri=folder,
                name=unit.video_id,
                kind="frames",
                frames=unit.uris,
                frame_indices=unit.frame_indices,
            )
        )
    return InputListing(videos, list(units.refused))


def _list_glob(pattern: str) -> InputListing:
    fs, path = _glob_filesystem(pattern)
    parts = path.split("/")
    base_parts = []
    for part in parts:
        if any(ch in part for ch in _GLOB_CHARS):
            break
        base_parts.append(part)
    base = "/".join(base_parts)
    try:
        found = fs.glob(path, detail=True)
    except Exception as error:  # noqa: BLE001 - a missing bucket, no access: name the pattern, not credentials
        raise SourceError(f"cannot expand the glob {pattern!r}: {type(error).__name__}") from None
    remote = storage.is_remote(pattern)
    videos = []
    for match, info in sorted(found.items()):
        rel = match[len(base) :].lstrip("/") if match.startswith(base) else posixpath.basename(match)
        if info.get("type") != "file" or not match.lower().endswith(VIDEO_SUFFIXES):
            continue
        if any(p.startswith(".") for p in rel.split("/")):
            continue
        uri = f"s3://{match}" if remote else match
        videos.append(VideoInput(video_key(uri), uri, rel))
    return InputListing(videos)


def _glob_filesystem(pattern: str):
    if storage.is_remote(pattern):
        parsed = urlparse(pattern)
        fs, _ = storage.get_filesystem(f"s3://{parsed.netloc}")
        return fs, f"{parsed.netloc}/{parsed.path.lstrip('/')}"
    import fsspec

    return fsspec.filesystem("file"), canonical_uri(pattern)


def _list_manifest(manifest: str) -> InputListing:
    entries = _manifest_entries(manifest)
    canonical = canonical_uri(manifest)
    base = posixpath.dirname(canonical) if storage.is_remote(manifest) else os.path.dirname(canonical)
    videos, refused, seen = [], [], {}
    for number, entry in entries:
        try:
            uri, name = _resolve_entry(base, entry)
        except storage.StorageError as error:
            reason = f"line {number} of {manifest}: {error}"
            refused.append({"input": entry, "uri": _recorded_location(base, entry), "reason": reason})
            continue
        canonical = canonical_uri(uri)
        if canonical in seen:
            reason = f"line {number} of {manifest}: listed twice (first on line {seen[canonical]})"
            refused.append({"input": entry, "uri": uri, "reason": reason})
            continue
        seen[canonical] = number
        videos.append(VideoInput(video_key(uri), uri, name))
    return InputListing(videos, refused)


def _resolve_entry(base: str, entry: str) -> tuple[str, str]:
    """(URI, readable name) of a manifest entry; refuses '..' anywhere and relative paths that leave base."""
    text = entry.replace("\\", "/")
    scheme = urlparse(text).scheme
    if (scheme and len(scheme) > 1) or text.startswith("/"):
        if any(part == ".." for part in urlparse(text).path.split("/")):
            raise storage.StorageError(f"path {entry!r} has a '..' component; refused")
        if scheme and scheme.lower() not in ("s3", "s3a", "file"):
            raise storage.StorageError(f"unsupported URI scheme {scheme!r} in {entry!r}")
        path = urlparse(text).path if scheme else text
        return entry, path.strip("/")
    return storage.join_relative(base, entry), text.strip("/")


def _recorded_location(base: str, entry: str) -> str:
    """Where a refused entry points, for the record only (never opened): absolute, '..' resolved."""
    text = entry.replace("\\", "/")
    if urlparse(text).scheme and len(urlparse(text).scheme) > 1:
        return text
    if storage.is_remote(base):
        return posixpath.normpath(posixpath.join(base, text)).replace(":/", "://", 1)
    return os.path.normpath(os.path.join(base, text))


def _manifest_entries(manifest: str) -> list[tuple[int, str]]:
    """(line or row number, entry) of every entry in a text, csv or Parquet manifest."""
    lower = manifest.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        with storage.open_input(manifest) as f:
            table = pq.read_table(f)
        column = _uri_column(table.column_names, manifest)
        return [(i + 1, str(v)) for i, v in enumerate(table.column(column).to_pylist()) if v]
    text = storage.read_text(manifest).lstrip("\ufeff")
    if lower.endswith(".csv"):
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return []
        column = _uri_column([c.strip() for c in rows[0]], manifest)
        index = [c.strip() for c in rows[0]].index(column)
        return [
            (n, row[index].strip())
            for n, row in enumerate(rows[1:], start=2)
            if len(row) > index and row[index].strip()
        ]
    return [
        (n, line.strip())
        for n, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.strip().startswith("#")
    ]


def _uri_column(names: list[str], manifest: str) -> str:
    for candidate in _URI_COLUMNS:
        if candidate in names:
            return candidate
    raise SourceError(f"manifest {manifest!r} has no column {' / '.join(_URI_COLUMNS)}; columns: {names}")
