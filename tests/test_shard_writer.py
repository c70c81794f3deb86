"""The streaming shard writer and the face spool: what bounds an ingest actor's memory by a row group (fast)."""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from affectray.data import shards
from affectray.ingest.spool import FaceSpool


def _segments() -> list[shards.Segment]:
    """150 segments of 3 tracks over 2 videos, interleaved, so numbering runs across row groups."""
    segments = []
    for k in range(50):
        for track in range(3):
            frames = list(range(3 * k, 3 * k + 3))
            segments.append(
                shards.Segment(
                    video_id=f"video{track % 2}",
                    track_id=track,
                    frame_index=frames,
                    pts_seconds=[f / 30 for f in frames],
                    images=[os.urandom(40) for _ in frames],
                    labels=[k % 8, -1, 2],
                    detection_score=[0.99, 0.95, 0.9] if track else None,
                    valence=[0.1, 0.2, -0.3] if track == 2 else None,
                    arousal=[0.0, 0.5, -0.5] if track == 2 else None,
                    clip_label=track - 1,
                )
            )
    return segments


def _old_shard(table) -> bytes:
    """What write_shard made before it streamed: the whole table serialised at once."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", row_group_size=64)
    return buffer.getvalue()


def test_streamed_shard_equals_the_whole_table_written_at_once(tmp_path):
    segments = _segments()
    table = shards.segments_to_table(segments, dataset="d", split="train", source="v.mp4")
    with shards.ShardWriter(str(tmp_path), "unit", dataset="d", split="train", source="v.mp4") as writer:
        for segment in segments:
            writer.add(segment)
    written = pq.read_table(shards.shard_uri(str(tmp_path), "unit"))
    assert written.equals(table) and written.schema.metadata == shards.SEGMENT_SCHEMA.metadata
    assert pq.ParquetFile(shards.shard_uri(str(tmp_path), "unit")).metadata.num_row_groups == 3  # 64 + 64 + 22
    assert sorted(written.column("segment_index").to_pylist())[-3:] == [49, 49, 49]

    old = pq.read_table(io.BytesIO(_old_shard(table)))
    assert written.equals(old)
    data = open(shards.shard_uri(str(tmp_path), "unit"), "rb").read()
    assert writer.shard == {"file": "shards/unit.parquet", "rows": 150, "bytes": len(data), "sha256": _sha(data)}
    # write_shard is the same writer given a whole table: same bytes, same record.
    assert shards.write_shard(str(tmp_path / "b"), "unit", table) == writer.shard


def test_a_failure_mid_write_leaves_no_shard_and_no_staging_file(tmp_path):
    segments = _segments()
    with pytest.raises(RuntimeError, match="decoder died"):
        with shards.ShardWriter(str(tmp_path), "unit", dataset="d", split="train", source="v.mp4") as writer:
            for segment in segments[:100]:  # a row group already written
                writer.add(segment)
            raise RuntimeError("decoder died")
    assert writer.shard is None
    assert os.listdir(tmp_path / shards.SHARDS_DIR) == []


def test_a_row_group_that_fails_at_close_leaves_nothing_either(tmp_path):
    segment = shards.Segment("v", 2**40, [0], [0.0], [b"\xff\xd8"], [0])  # a track id past int32
    with pytest.raises(pa.ArrowInvalid):
        with shards.ShardWriter(str(tmp_path), "unit", dataset="d", split="train", source="v.mp4") as writer:
            writer.add(segment)
    assert os.listdir(tmp_path / shards.SHARDS_DIR) == []


def test_spool_reads_back_the_bytes_written_and_removes_its_file(tmp_path):
    jpegs = {track: [os.urandom(100 + 7 * i + track) for i in range(20)] for track in (3, 5)}
    with FaceSpool(str(tmp_path)) as spool:
        for i in range(20):  # interleaved, as faces of two tracks are found frame by frame
            for track in (3, 5):
                spool.add(track, i, i / 30, jpegs[track][i], 0.5 + i / 100)
        assert os.listdir(tmp_path) == []  # no name: a killed actor leaves nothing behind either
        fd = spool._file.fileno()
        frames, pts, scores, images = spool.track(5)  # flushes the file: every JPEG is on disk now
        assert os.fstat(fd).st_size == spool.bytes == sum(len(j) for t in jpegs.values() for j in t)
        assert frames == list(range(20)) and pts == [i / 30 for i in range(20)] and scores[3] == 0.53
        assert len(images) == 20 and images[4:9] == jpegs[5][4:9] and images[-1] == jpegs[5][-1]
        assert list(spool.track(3)[3]) == jpegs[3]
    assert spool._file.closed


def test_spool_file_goes_when_the_unit_fails(tmp_path):
    with pytest.raises(ValueError):
        with FaceSpool(str(tmp_path)) as spool:
            spool.add(0, 0, 0.0, b"\xff\xd8", 0.9)
            raise ValueError("bad video")
    assert spool._file.closed and os.listdir(tmp_path) == []


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
