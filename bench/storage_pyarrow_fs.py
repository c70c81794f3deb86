"""Which pyarrow filesystem should Ray Data use for s3://? Measured side by side.

Writes a Parquet dataset of JPEG-sized binary rows (like segment shards) to a
local moto S3 server, then reads it back through (a) pyarrow's native
S3FileSystem and (b) s3fs wrapped in PyFileSystem(FSSpecHandler(...)),
alternating the two several times, and prints MB/s and the ratio.

    .venv/bin/python bench/storage_pyarrow_fs.py [--shards 8] [--rows 400] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rows", type=int, default=400, help="rows per shard, ~20 KB each")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import boto3
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from moto.server import ThreadedMotoServer
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from affectray import storage

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ[name] = "bench"
    os.environ["AWS_REGION"] = "us-east-1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    boto3.client("s3").create_bucket(Bucket="bench")
    root = "s3://bench/shards"

    rng = np.random.default_rng(0)
    native_fs, _ = storage.pyarrow_filesystem(root)
    for i in range(args.shards):
        blobs = [rng.bytes(20_000) for _ in range(args.rows)]
        table = pa.table({"video_id": [f"v{i}"] * args.rows, "image": pa.array(blobs, pa.binary())})
        pq.write_table(table, f"bench/shards/part-{i:05d}.parquet", filesystem=native_fs)
    total_mb = args.shards * args.rows * 20_000 / 1e6

    s3fs_fs, _ = storage.get_filesystem(root)
    candidates = {
        "pyarrow.fs.S3FileSystem": native_fs,
        "PyFileSystem(FSSpecHandler(s3fs))": PyFileSystem(FSSpecHandler(s3fs_fs)),
    }
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.repeats):
        for name, fs in candidates.items():  # alternate so drift hits both alike
            start = time.perf_counter()
            table = pq.read_table("bench/shards", filesystem=fs)
            times[name].append(time.perf_counter() - start)
            assert table.num_rows == args.shards * args.rows
    server.stop()

    print(f"read {total_mb:.0f} MB of Parquet from a local moto S3 server, {args.repeats} alternating repeats")
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["PyFileSystem(FSSpecHandler(s3fs))"]
    for name, median in medians.items():
        print(f"  {name:38s} {total_mb / median:8.1f} MB/s   speed ratio vs s3fs wrapper: {base / median:5.2f}x")


if __name__ == "__main__":
    main()
