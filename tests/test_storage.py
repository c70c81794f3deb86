"""affectray.storage against local paths, file:// URIs and a real S3 protocol server (moto)."""

from __future__ import annotations

import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from affectray import storage
from affectray.storage import StorageError


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root dir é")
    if request.param == "file":
        return f"file://{tmp_path}/root"
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_round_trip_list_exists_remove(root):
    a = storage.join(root, "a.json")
    b = storage.join(root, "sub", "b vidé.mp4")
    storage.write_json(a, {"x": 1})
    storage.write_bytes(b, b"\x00\x01video")
    assert storage.read_json(a) == {"x": 1}
    assert storage.read_bytes(b) == b"\x00\x01video"
    assert storage.exists(a) and storage.exists(b)
    assert storage.size(b) == 7
    assert storage.list_files(root) == sorted([a, b])
    assert storage.list_files(root, suffixes=(".MP4",)) == [b]
    with storage.open_input(b) as f:
        f.seek(2)
        assert f.read() == b"video"
    with storage.local_copy(b) as path:
        assert open(path, "rb").read() == b"\x00\x01video"
    storage.remove(a)
    assert not storage.exists(a)
    storage.remove(storage.join(root, "sub"), recursive=True)
    assert not storage.exists(b)


def test_failed_write_leaves_nothing(root):
    target = storage.join(root, "partial.bin")
    with pytest.raises(RuntimeError):
        with storage.atomic_writer(target) as f:
            f.write(b"x" * 1000)
            raise RuntimeError("writer died halfway")
    assert not storage.exists(target)
    with storage.atomic_writer(target) as f:
        f.write(b"complete")
    assert storage.read_bytes(target) == b"complete"


def test_overwrite_is_whole(root):
    target = storage.join(root, "obj.txt")
    storage.write_text(target, "first version, longer")
    storage.write_text(target, "second")
    assert storage.read_text(target) == "second"


def test_missing_key_and_bucket_are_clear(s3_bucket):
    with pytest.raises(StorageError, match="not found: 's3://.*/nope.txt'"):
        storage.read_bytes(f"{s3_bucket}/nope.txt")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-xyz' does not exist"):
        storage.read_bytes("s3://no-such-bucket-xyz/key.txt")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-xyz' does not exist"):
        storage.list_files("s3://no-such-bucket-xyz/prefix")


def test_missing_local_file_is_clear(tmp_path):
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(str(tmp_path / "missing.bin"))
    with pytest.raises(StorageError, match="not found"):
        storage.list_files(str(tmp_path / "missing_dir"))


@pytest.mark.parametrize("uri", ["gs://bucket/x", "http://host/x", "ftp://a/b"])
def test_bad_scheme_is_clear(uri):
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.read_bytes(uri)


def test_s3_uri_without_bucket():
    with pytest.raises(StorageError, match="without a bucket"):
        storage.exists("s3:///key")


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/../../b", "/abs/path", "s3://other/x", "a\\..\\b"])
def test_join_relative_refuses_traversal(bad):
    with pytest.raises(StorageError, match="refused|URI"):
        storage.join_relative("s3://bucket/root", bad)


def test_join_relative_accepts_inside():
    assert storage.join_relative("s3://b/root", "vid/./x y.mp4") == "s3://b/root/vid/x y.mp4"


def test_endpoint_redirects_every_client(s3_bucket, s3_server):
    """s3fs, pyarrow's S3 client and boto3 all land on the moto server via AWS_ENDPOINT_URL."""
    import boto3

    table = pa.table({"x": [1, 2, 3]})
    fs, path = storage.pyarrow_filesystem(f"{s3_bucket}/t/data.parquet")
    pq.write_table(table, path, filesystem=fs)
    # written by pyarrow, read by s3fs, listed by boto3 with no endpoint given explicitly
    assert storage.exists(f"{s3_bucket}/t/data.parquet")
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket[5:])["Contents"]]
    assert keys == ["t/data.parquet"]
    with storage.open_input(f"{s3_bucket}/t/data.parquet") as f:
        assert pq.read_table(f).equals(table)


def test_credentials_never_in_errors_or_logs(s3_bucket, caplog):
    caplog.set_level(logging.DEBUG, logger="affectray")
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    key_id = os.environ["AWS_ACCESS_KEY_ID"]
    messages = []
    for call in (
        lambda: storage.read_bytes(f"{s3_bucket}/missing"),
        lambda: storage.read_bytes("s3://no-such-bucket-xyz/k"),
    ):
        with pytest.raises(StorageError) as info:
            call()
        messages.append(str(info.value))
    text = "\n".join(messages + [r.getMessage() for r in caplog.records])
    assert messages and secret not in text and key_id not in text


def test_upload_dir(tmp_path, s3_bucket):
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "one.txt").write_text("1")
    (tmp_path / "d" / "e" / "two.txt").write_text("2")
    written = storage.upload_dir(tmp_path / "d", f"{s3_bucket}/up")
    assert written == [f"{s3_bucket}/up/e/two.txt", f"{s3_bucket}/up/one.txt"]
    assert storage.list_files(f"{s3_bucket}/up") == written
    assert storage.read_text(f"{s3_bucket}/up/e/two.txt") == "2"
