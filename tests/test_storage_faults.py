"""Storage that misbehaves: throttling, 5xx, dropped connections and cut bodies; stale listings; racing runs.

A small HTTP proxy on 127.0.0.1 sits between the code and the moto server and
breaks chosen requests (a scripted count, or a fraction) the way S3 does under
load. Everything reaches it through AWS_ENDPOINT_URL, as production reaches S3.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from tests.conftest import REPO_ROOT
from tests.test_label import save_classifier

from affectray import storage
from affectray.data import shards
from affectray.errors import JobError
from affectray.ingest.job import IngestConfig, run_ingest
from affectray.label import job, outputs
from affectray.label.job import LabelConfig, run_label
from affectray.labels import ABAW8
from affectray.models.registry import create_model

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>FAULTPROXY</RequestId></Error>"
)
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te", "upgrade"}


@dataclass
class Fault:
    """Break requests whose path contains ``match``: ``count`` of them, or each with probability ``rate``."""

    kind: str  # "slowdown": 503 SlowDown XML; "reset": drop the connection unanswered; "cut": half a body
    match: str = ""
    methods: tuple[str, ...] = ("GET", "HEAD", "PUT", "POST", "DELETE")
    count: int | None = None  # None: no limit (with ``rate``, or every request)
    rate: float = 1.0


class FaultProxy:
    """An HTTP proxy in front of an S3 endpoint that answers chosen requests with faults."""

    def __init__(self, upstream: str, seed: int = 0) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.faults: list[Fault] = []
        self.injected: Counter = Counter()  # (kind, path) -> faults answered
        self.seen: Counter = Counter()  # (method, path) -> requests
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        handler = type("Handler", (_ProxyHandler,), {"proxy": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.injected.clear()
            self.seen.clear()

    def pick(self, method: str, path: str) -> str | None:
        """The fault to answer this request with, if any (counted)."""
        with self._lock:
            self.seen[method, path] += 1
            for fault in self.faults:
                if method not in fault.methods or fault.match not in path or fault.count == 0:
                    continue
                if fault.rate < 1.0 and self._random.random() >= fault.rate:
                    continue
                if fault.count is not None:
                    fault.count -= 1
                self.injected[fault.kind, path] += 1
                return fault.kind
        return None

    def faults_on(self, match: str, kind: str | None = None) -> int:
        with self._lock:
            return sum(n for (k, path), n in self.injected.items() if match in path and kind in (None, k))


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    proxy: FaultProxy

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - the http.server convention
        self._forward()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET  # noqa: N815

    def _forward(self) -> None:
        body = self._body()
        path = urlparse(self.path).path
        fault = self.proxy.pick(self.command, path)
        if fault == "slowdown":
            self._reply(503, [("Content-Type", "application/xml")], SLOWDOWN)
            return
        if fault == "reset":
            self._reset()
            return
        status, headers, data = self._upstream(body)
        if fault == "cut" and self.command == "GET" and len(data) > 1:
            # The full length announced, half the body sent, then the connection dropped.
            self._reply(status, headers, data[: len(data) // 2], length=len(data))
            self._reset()
            return
        self._reply(status, headers, data)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _upstream(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        if self.headers.get("Transfer-Encoding"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self.proxy.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_HEADERS]
            return response.status, kept, data
        finally:
            conn.close()

    def _reply(self, status: int, headers, data: bytes, length: int | None = None) -> None:
        self.send_response_only(status)
        announced = False
        for key, value in headers:
            if key.lower() == "content-length":
                if self.command == "HEAD":  # HEAD announces the object's size, sends no body
                    self.send_header(key, value)
                    announced = True
                continue
            self.send_header(key, value)
        if not announced:
            self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def _reset(self) -> None:
        """Drop the connection with a TCP reset, as a load balancer under pressure does."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()


# ---------------------------------------------------------------------------
# Fixtures: the proxy as this process's and Ray's S3 endpoint
# ---------------------------------------------------------------------------

# Short waits keep the tests short: botocore tries each request once (s3fs still retries SlowDown
# five times, quickly), so affectray's own retries (6 attempts, backoff from 50 ms) do the work.
RETRY_ENV = {
    "AWS_RETRY_MODE": "standard",
    "AWS_MAX_ATTEMPTS": "1",
    "AFFECTRAY_STORAGE_ATTEMPTS": "6",
    "AFFECTRAY_STORAGE_BACKOFF": "0.05",
}


def _s3fs_fresh() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def proxy(s3_server):
    """The fault proxy in front of moto, the S3 endpoint of this process while the module runs."""
    faults = FaultProxy(s3_server).start()
    names = ("AWS_ENDPOINT_URL", *RETRY_ENV)
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(RETRY_ENV, AWS_ENDPOINT_URL=faults.endpoint)
    _s3fs_fresh()
    yield faults
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _s3fs_fresh()
    faults.stop()


@pytest.fixture(scope="module")
def faulty_ray(proxy):
    """A local Ray whose workers reach S3 through the proxy; the session's Ray comes back after."""
    import ray

    had_ray = ray.is_initialized()
    ray.shutdown()
    env = {**RETRY_ENV, "AWS_ENDPOINT_URL": proxy.endpoint}
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()
    if had_ray:  # as tests/conftest.py's ray_session started it
        ray.init(
            num_cpus=8,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}},
        )


@pytest.fixture
def faults(proxy):
    """The proxy with no faults set, cleared again after the test."""
    proxy.clear()
    yield proxy
    proxy.clear()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[str, str]:
    """Two untrained tiny frame classifiers with different weights (so different model ids)."""
    root = tmp_path_factory.mktemp("ckpts")
    made = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        made.append(
            save_classifier(root / f"frame{seed}", create_model("frame", backbone="test_resnet", num_classes=8))
        )
    return made[0], made[1]


SHORT_FRAMES = 24


@pytest.fixture(scope="module")
def short_video(tmp_path_factory, real_video) -> bytes:
    """The real face video's first 24 frames, re-encoded: a third of the detection work."""
    import av

    path = tmp_path_factory.mktemp("short") / "short.mp4"
    with av.open(str(real_video)) as src, av.open(str(path), "w") as dst:
        stream = dst.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        for i, frame in enumerate(src.decode(video=0)):
            if i == SHORT_FRAMES:
                break
            dst.mux(stream.encode(frame.reformat(format="yuv420p")))
        dst.mux(stream.encode())
    return path.read_bytes()


def _videos(uri: str) -> pd.DataFrame:
    with storage.open_input(storage.join(uri, outputs.VIDEOS_FILE)) as f:
        return pq.read_table(f).to_pandas().set_index("name")


def _label_config(bucket: str, checkpoint: str) -> LabelConfig:
    return LabelConfig(
        f"{bucket}/raw", f"{bucket}/labels", checkpoint, detect_max_side=320, chunk_frames=12, detectors=1,
        timelines=False,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# 1. Transient errors are retried; past the bound, recorded as retryable
# ---------------------------------------------------------------------------


def test_storage_retries_transient_errors_then_names_what_the_service_said(faults, s3_bucket, monkeypatch):
    uri = f"{s3_bucket}/blob.bin"
    data = np.random.default_rng(0).bytes(300_000)
    storage.write_bytes(uri, data)
    faults.add(Fault("slowdown", match="blob.bin", count=3))
    faults.add(Fault("reset", match="blob.bin", count=3))
    faults.add(Fault("cut", match="blob.bin", methods=("GET",), count=3))
    assert storage.read_bytes(uri) == data and faults.faults_on("blob.bin") == 9

    with storage.open_input(uri) as f:  # a stream's ranges are fetched while it is read: retried there too
        faults.add(Fault("cut", match="blob.bin", methods=("GET",), count=2))
        faults.add(Fault("slowdown", match="blob.bin", methods=("GET",), count=2))
        f.seek(1000)
        assert f.read(5000) == data[1000:6000] and faults.faults_on("blob.bin") == 13

    monkeypatch.setenv("AFFECTRAY_STORAGE_ATTEMPTS", "2")
    faults.add(Fault("slowdown", match="blob.bin", methods=("GET",)))  # for good
    with pytest.raises(storage.StorageUnavailable) as info:
        storage.read_bytes(uri)
    text = str(info.value)
    assert text.startswith(f"storage unavailable: {uri!r}") and "(2 attempts)" in text
    assert "SlowDown" in text and "reduce your request rate" in text
    # Bad input is final at once, never retried: a missing key is one request (and a bucket check).
    faults.clear()
    with pytest.raises(storage.StorageError, match="not found") as info:
        storage.read_bytes(f"{s3_bucket}/missing.bin")
    assert not isinstance(info.value, storage.StorageUnavailable)
    assert sum(n for (method, path), n in faults.seen.items() if path.endswith("/missing.bin")) == 1


def test_label_waits_out_transient_errors_and_retries_what_the_store_kept_failing(
    faulty_ray, faults, s3_bucket, short_video, checkpoints
):
    """Nine faults on one video are waited out; a video the store keeps throttling is 'storage unavailable',
    a plain re-run labels it, and a bad video stays skipped (counted in the summary all the same)."""
    for name in ("throttled.mp4", "outage.mp4"):
        storage.write_bytes(f"{s3_bucket}/raw/{name}", short_video)
    storage.write_bytes(f"{s3_bucket}/raw/empty.mp4", b"")
    # 9 faults on one video's requests, of every kind: 503 SlowDown, dropped connections, cut bodies.
    faults.add(Fault("slowdown", match="throttled.mp4", count=4))
    faults.add(Fault("reset", match="throttled.mp4", count=3))
    faults.add(Fault("cut", match="throttled.mp4", methods=("GET",), count=2))
    faults.add(Fault("slowdown", match="outage.mp4", methods=("GET",)))  # every read, for good
    config = _label_config(s3_bucket, checkpoints[0])

    summary = run_label(config, progress=False)
    assert faults.faults_on("throttled.mp4") == 9
    videos = _videos(config.out)
    assert videos.loc["throttled.mp4", "status"] == "ok" and videos.loc["throttled.mp4", "frames"] == SHORT_FRAMES
    outage = videos.loc["outage.mp4"]
    assert (outage.status, outage.reason) == ("failed", storage.STORAGE_UNAVAILABLE)
    assert "SlowDown" in outage.error and "reduce your request rate" in outage.error  # the service's own words
    assert videos.loc["empty.mp4", "reason"] == "empty file"
    assert (summary["ok"], summary["failed"], summary["retryable"]) == (1, 2, 1)

    faults.clear()  # the store is back: a plain re-run (no --retry-failed) takes the retryable one only
    again = run_label(config, progress=False)
    assert (again["processed"], again["skipped"]) == (1, 2)
    assert (again["ok"], again["failed"], again["retryable"]) == (2, 1, 0)  # empty.mp4's failure still counted
    videos = _videos(config.out)
    assert videos.loc["outage.mp4", "status"] == "ok" and videos.loc["outage.mp4", "frames"] == SHORT_FRAMES
    assert videos.loc["empty.mp4", "status"] == "failed"


def _aligned_corpus(root: Path, names: tuple[str, ...], frames: int = 6) -> Path:
    """Folders of aligned face frames (<video>/00001.jpg): ingest's cheapest layout, no detection."""
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(frames):
            image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            cv2.imwrite(str(root / name / f"{i + 1:05d}.jpg"), image)
    return root


def _ingest_config(bucket: str) -> IngestConfig:
    return IngestConfig(source=f"{bucket}/raw", out=f"{bucket}/out", layout="aligned-frames", image_size=32,
                        workers=1)  # fmt: skip


def test_ingest_records_a_failed_shard_upload_writes_its_manifest_and_retries_it(
    faulty_ray, faults, s3_bucket, tmp_path
):
    storage.upload_dir(_aligned_corpus(tmp_path / "raw", ("alpha", "bravo", "charlie")), f"{s3_bucket}/raw")
    faults.add(Fault("slowdown", match="/raw/alpha/", count=9))  # frame reads, waited out
    faults.add(Fault("slowdown", match="/shards/bravo", methods=("PUT",)))  # bravo's shard upload, for good
    config = _ingest_config(s3_bucket)

    summary = run_ingest(config, progress=False)
    assert faults.faults_on("/raw/alpha/") == 9 and faults.faults_on("/shards/bravo") > 0
    assert (summary["units"], summary["failed"], summary["retryable"], summary["rows"]) == (3, 1, 1, 2)
    manifest = shards.read_manifest(config.out)
    [failure] = manifest["failures"]
    assert failure["input"] == "bravo" and failure["retryable"]
    assert failure["reason"].startswith(storage.STORAGE_UNAVAILABLE) and "SlowDown" in failure["reason"]
    assert sorted(s["file"].split("/")[1].split("-")[0] for s in manifest["shards"]) == ["alpha", "charlie"]

    faults.clear()
    again = run_ingest(config, progress=False)
    assert (again["processed"], again["skipped"], again["failed"], again["rows"]) == (1, 2, 0, 3)
    assert shards.read_manifest(config.out)["counts"]["face_frames"] == 18


# ---------------------------------------------------------------------------
# 2. A resumed ingest reads markers that actors wrote after it listed them
# ---------------------------------------------------------------------------


def test_resumed_ingest_sees_the_markers_its_actors_wrote(faulty_ray, faults, s3_bucket, tmp_path):
    """The state a run killed after its first unit leaves: one marker; the others' shards may be there."""
    storage.upload_dir(_aligned_corpus(tmp_path / "raw", ("alpha", "bravo", "charlie")), f"{s3_bucket}/raw")
    config = _ingest_config(s3_bucket)
    first = run_ingest(config, progress=False)
    assert first["processed"] == 3
    for key in [u for u in storage.list_files(f"{config.out}/{shards.DONE_DIR}") if "/alpha-" not in u]:
        storage.remove(key)  # as if killed: bravo and charlie have shards but no done marker yet
    storage.remove(f"{config.out}/{shards.MANIFEST_NAME}")

    faults.add(Fault("slowdown", match="/_done/", rate=0.3))  # and a throttled store on the way
    resumed = run_ingest(config, progress=False)
    assert (resumed["processed"], resumed["skipped"], resumed["failed"], resumed["rows"]) == (2, 1, 0, 3)
    manifest = shards.read_manifest(config.out)
    assert manifest["counts"]["ok_units"] == 3 and len(manifest["shards"]) == 3


# ---------------------------------------------------------------------------
# 3. Two runs with different checkpoints racing for one OUT: exactly one gets it
# ---------------------------------------------------------------------------


def _race_for(out: str, models: tuple[str, ...]) -> list[tuple[str, str]]:
    """Runs with these models claim ``out`` at the same instant: (model, "accepted" or the refusal) each."""
    barrier = threading.Barrier(len(models))
    outcomes = [""] * len(models)

    def claim(i: int) -> None:
        config = LabelConfig("videos", out, f"ckpt-{models[i]}")
        barrier.wait()
        try:
            job._check_job(config, models[i], ABAW8.classes)
            outcomes[i] = "accepted"
        except JobError as error:
            outcomes[i] = str(error)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return list(zip(models, outcomes))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_runs_claiming_one_out_with_different_models_exactly_one_wins(where, request, tmp_path):
    root = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    for round_ in range(8):
        out = storage.join(root, f"out{round_}")
        outcomes = _race_for(out, ("model-a", "model-b"))
        winners = [model for model, text in outcomes if text == "accepted"]
        assert len(winners) == 1, outcomes
        [refusal] = [text for _, text in outcomes if text != "accepted"]
        assert "model_id" in refusal and "\n" not in refusal
        assert storage.read_json(storage.join(out, outputs.JOB_FILE))["model_id"] == winners[0]
    # Runs with one model share OUT, together or one after the other.
    shared = storage.join(root, "shared")
    assert _race_for(shared, ("model-a", "model-a")) == [("model-a", "accepted")] * 2
    assert _race_for(shared, ("model-a",)) == [("model-a", "accepted")]


def test_two_label_commands_into_one_out_with_different_checkpoints(faulty_ray, tmp_path, checkpoints):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "empty.mp4").write_bytes(b"")  # fails in a second: the claim is what is tested
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": faulty_ray.get_runtime_context().gcs_address}
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO_ROOT / "jobs" / "label_videos.py"),
                str(videos),
                str(out),
                "--checkpoint",
                ckpt,
                "--no-progress",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for ckpt in checkpoints
    ]
    results = [(run.wait(timeout=180), *run.communicate()) for run in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [(code, err[-1500:]) for code, _, err in results]
    [(_, _, refused)] = [r for r in results if r[0] == 2]
    lines = [line for line in refused.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "was labelled with other settings (model_id" in lines[0]
    assert "Traceback" not in refused
    [(_, accepted, _)] = [r for r in results if r[0] == 0]
    winner = json.loads(accepted.strip().splitlines()[-1])
    assert json.loads((out / outputs.JOB_FILE).read_text())["model_id"] == winner["model_id"]
