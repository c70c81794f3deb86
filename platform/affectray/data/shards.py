"""Segment shards: the Parquet contract between ingest and everything downstream.

One row is a *segment*: up to ``segment_length`` consecutive face frames of one
face track of one video, with the aligned face JPEGs and per-frame labels.
Frame models explode segments into frames; clip models sample windows inside a
segment, so a window never crosses a video or a track. Any Parquet reader
(pyarrow, fastparquet, pandas, DuckDB) reads a shard.

Layout under a shard root::

    <root>/shards/<unit key>.parquet     one file per work unit, written atomically
    <root>/_done/<unit key>.json         that unit's outcome (counts or failure)
    <root>/_manifest.json                rebuilt from _done/ at the end of every run
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from affectray import storage

SCHEMA_VERSION = 1
SHARDS_DIR = "shards"
DONE_DIR = "_done"
MANIFEST_NAME = "_manifest.json"
ROW_GROUP_SIZE = 64  # segments per Parquet row group: a reader's unit, and a writer's memory bound
# The classes of the dataset a shard root came from, as the manifest's "dataset_label_set"
# names them. Labels are stored as ABAW8 indices whatever the dataset (the manifest's
# "label_set"); this says which of those indices the dataset can have, so a head can be
# sized by it: basic7 = ABAW8's first 7 (no Other); affectnet8 = basic7 + Contempt, stored
# as ABAW8 Other; abaw8 = all 8, Other meaning Aff-Wild2's Other.
DATASET_LABEL_SETS = ("basic7", "affectnet8", "abaw8")

SEGMENT_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("track_id", pa.int32(), nullable=False),
        pa.field("segment_index", pa.int32(), nullable=False),
        pa.field("frame_index", pa.list_(pa.int32()), nullable=False),
        pa.field("pts_seconds", pa.list_(pa.float64()), nullable=False),
        pa.field("images", pa.list_(pa.binary()), nullable=False),
        pa.field("labels", pa.list_(pa.int16()), nullable=False),
        pa.field("clip_label", pa.int16(), nullable=False),
        pa.field("valence", pa.list_(pa.float32()), nullable=True),
        pa.field("arousal", pa.list_(pa.float32()), nullable=True),
        pa.field("detection_score", pa.list_(pa.float32()), nullable=True),
        pa.field("source", pa.string(), nullable=False),
    ],
    metadata={"affectray.schema_version": str(SCHEMA_VERSION)},
)


@dataclass
class Segment:
    """Consecutive face frames of one track, before they become a Parquet row."""

    video_id: str
    track_id: int
    frame_index: list[int] = field(default_factory=list)
    pts_seconds: list[float] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    detection_score: list[float] | None = None
    valence: list[float] | None = None
    arousal: list[float] | None = None
    clip_label: int = -1

    def __len__(self) -> int:
        return len(self.frame_index)


def split_runs(frame_index: Sequence[int], max_length: int, max_gap: int = 1) -> list[tuple[int, int]]:
    """Cut a track's sorted frame indices into [start, stop) runs.

    A run ends after ``max_length`` frames, or where the index jumps by more
    than ``max_gap`` (frames lost to failed detection), so a segment is a
    stretch of nearly consecutive frames and windows inside it stay meaningful.
    """
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(frame_index) + 1):
        ended = i == len(frame_index) or frame_index[i] - frame_index[i - 1] > max_gap
        if ended or i - start == max_length:
            runs.append((start, i))
            start = i
    return [r for r in runs if r[1] > r[0]]


def segments_to_table(segments: Iterable[Segment], *, dataset: str, split: str, source: str) -> pa.Table:
    """Segments of one work unit → a table in SEGMENT_SCHEMA, numbered per (video, track)."""
    columns: dict[str, list[Any]] = {name: [] for name in SEGMENT_SCHEMA.names}
    counters: dict[tuple[str, int], int] = {}
    for seg in segments:
        _append_row(columns, seg, _next_number(counters, seg), dataset=dataset, split=split, source=source)
    return pa.table(columns, schema=SEGMENT_SCHEMA)


def _next_number(counters: dict[tuple[str, int], int], seg: Segment) -> int:
    """The segment's index within its (video, track): 0, 1, 2… in the order segments come."""
    number = counters.get((seg.video_id, seg.track_id), 0)
    counters[(seg.video_id, seg.track_id)] = number + 1
    return number


def _append_row(columns: dict[str, list[Any]], seg: Segment, number: int, *, dataset: str, split: str, source: str):
    columns["dataset"].append(dataset)
    columns["split"].append(split)
    columns["video_id"].append(seg.video_id)
    columns["track_id"].append(int(seg.track_id))
    columns["segment_index"].append(number)
    columns["frame_index"].append([int(i) for i in seg.frame_index])
    columns["pts_seconds"].append([float(t) for t in seg.pts_seconds])
    columns["images"].append(list(seg.images))
    columns["labels"].append([int(v) for v in seg.labels])
    columns["clip_label"].append(int(seg.clip_label))
    columns["valence"].append(seg.valence)
    columns["arousal"].append(seg.arousal)
    columns["detection_score"].append(seg.detection_score)
    columns["source"].append(source)


def shard_uri(root: str, key: str) -> str:
    return storage.join(root, SHARDS_DIR, f"{key}.parquet")


def done_uri(root: str, key: str) -> str:
    return storage.join(root, DONE_DIR, f"{key}.json")


class ShardWriter:
    """One shard written a segment at a time: it appears at ``shard_uri(root, key)`` whole, or not at all.

    Segments are numbered per (video, track) as ``segments_to_table`` numbers them and
    written ROW_GROUP_SIZE at a time, zstd, through a ParquetWriter into the store's
    staging file (``storage.atomic_writer``: a temporary file beside a local target,
    renamed at the end; a local file uploaded whole, with retries, for S3), hashed as the
    bytes pass. Memory holds one row group, not the shard: an hour of video costs what a
    minute does. An exception inside the block leaves neither the shard nor the staging file.

        with ShardWriter(root, key, dataset="affwild2", split="train", source=uri) as writer:
            for segment in segments:
                writer.add(segment)
        writer.shard  # {"file", "rows", "bytes", "sha256"}: the manifest's record of it
    """

    def __init__(
        self,
        root: str,
        key: str,
        *,
        dataset: str = "",
        split: str = "",
        source: str = "",
        schema: pa.Schema = SEGMENT_SCHEMA,
    ) -> None:
        self.uri = shard_uri(root, key)
        self.file = f"{SHARDS_DIR}/{key}.parquet"
        self.row_fields = {"dataset": dataset, "split": split, "source": source}
        self.schema = schema
        self.rows = 0
        self.shard: dict[str, Any] | None = None  # set once the shard is in place
        self._columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        self._counters: dict[tuple[str, int], int] = {}
        self._scope = contextlib.ExitStack()
        self._sink: _HashingSink | None = None
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> ShardWriter:
        with self._scope:  # a failure here closes the staging file again
            self._sink = _HashingSink(self._scope.enter_context(storage.atomic_writer(self.uri)))
            self._writer = pq.ParquetWriter(self._sink, self.schema, compression="zstd")
            self._scope = self._scope.pop_all()
        return self

    def add(self, segment: Segment) -> None:
        """Append one segment as the shard's next row (written out with every full row group)."""
        number = _next_number(self._counters, segment)
        _append_row(self._columns, segment, number, **self.row_fields)
        if len(self._columns["video_id"]) >= ROW_GROUP_SIZE:
            self._flush()

    def write_table(self, table: pa.Table) -> None:
        """Append the rows of a whole table, numbered already (``segments_to_table``)."""
        self._flush()
        self._writer.write_table(table, row_group_size=ROW_GROUP_SIZE)
        self.rows += table.num_rows

    def _flush(self) -> None:
        if not self._columns["video_id"]:
            return
        table = pa.table(self._columns, schema=self.schema)
        self._columns = {name: [] for name in self.schema.names}  # the segments' bytes go with them
        self._writer.write_table(table, row_group_size=ROW_GROUP_SIZE)
        self.rows += table.num_rows

    def __exit__(self, exc_type, exc, tb) -> None:
        with self._scope:  # the staging file becomes the shard when this block ends, or goes if it raises
            if exc is not None:
                self._abandon()
                raise exc
            try:
                self._flush()
                self._writer.close()  # the footer
            except BaseException:
                self._abandon()
                raise
        self.shard = {"file": self.file, "rows": self.rows, "bytes": self._sink.size, "sha256": self._sink.sha256()}

    def _abandon(self) -> None:
        with contextlib.suppress(Exception):  # a footer for a file about to go; the sink may be what failed
            self._writer.close()


class _HashingSink:
    """A write-only file that hashes and counts what passes into ``f`` (closing it is the owner's job)."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self._hash = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self._f.write(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def sha256(self) -> str:
        return self._hash.hexdigest()


def write_shard(root: str, key: str, table: pa.Table) -> dict[str, Any]:
    """Write one shard whole (or not at all) from a table; returns its name, rows and checksum."""
    with ShardWriter(root, key, schema=table.schema) as writer:
        writer.write_table(table)
    return writer.shard


def list_shards(root: str, *, verify: bool | str = False) -> list[str]:
    """The shard files under a root, sorted (an empty list if there are none yet).

    ``verify`` checks them against the manifest's per-shard record (``verify_shards``):
    True for the sizes (from the listing: free), ``"sha256"`` to read and hash each one too.
    """
    shards = storage.join(root, SHARDS_DIR)
    if not storage.exists(shards):
        return []
    sizes = storage.file_sizes(shards, suffixes=(".parquet",))
    if verify:
        verify_shards(root, sizes, checksums=verify == "sha256")
    return sorted(sizes)


class ShardIntegrityError(storage.StorageError):
    """A shard that is not the one the manifest describes (truncated, replaced, foreign)."""


def verify_shards(root: str, sizes: dict[str, int], *, checksums: bool = False) -> None:
    """Check shard files (URI -> size) against the manifest's record of what ingest wrote.

    A root without a manifest, or a manifest without a shard record, is not checked:
    shards written by hand are allowed. A mismatch names the shard and what differs.
    """
    manifest_uri = storage.join(root, MANIFEST_NAME)
    if not storage.exists(manifest_uri):
        return
    record = {entry["file"]: entry for entry in storage.read_json(manifest_uri).get("shards") or []}
    if not record:
        return
    prefix = storage.join(root, SHARDS_DIR)
    for uri, size in sorted(sizes.items()):
        name = f"{SHARDS_DIR}/{uri[len(prefix) :].replace(chr(92), '/').lstrip('/')}"
        entry = record.get(name)
        if entry is None:
            raise ShardIntegrityError(
                f"shard {uri!r} is not in {manifest_uri!r}: re-run `affectray ingest` into {root!r} to rebuild it"
            )
        if size != entry["bytes"]:
            raise ShardIntegrityError(
                f"shard {uri!r} has {size} bytes, the manifest says {entry['bytes']}: truncated or replaced"
            )
        if checksums and hashlib.sha256(storage.read_bytes(uri)).hexdigest() != entry["sha256"]:
            raise ShardIntegrityError(f"shard {uri!r} does not match its sha256 in {manifest_uri!r}: corrupted")


def read_manifest(root: str) -> dict[str, Any]:
    uri = storage.join(root, MANIFEST_NAME)
    if not storage.exists(uri):
        raise storage.StorageError(f"no shard manifest at {uri!r}: run `affectray ingest` into {root!r} first")
    return storage.read_json(uri)


def dataset_label_set(manifest: dict[str, Any]) -> str:
    """The dataset's own label set a manifest records (one of DATASET_LABEL_SETS).

    Manifests written before ingest recorded it say nothing; they are read as "abaw8",
    the index space every shard stores.
    """
    name = manifest.get("dataset_label_set") or "abaw8"
    if name not in DATASET_LABEL_SETS:
        raise storage.StorageError(
            f"manifest names dataset_label_set {name!r}, not one of {', '.join(DATASET_LABEL_SETS)}"
        )
    return name


def frames_per_segment(table: pa.Table) -> np.ndarray:
    """Number of frames in each row of a shard table."""
    return np.asarray(pa.compute.list_value_length(table.column("frame_index")))
