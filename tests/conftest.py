"""Shared fixtures: a moto S3 server on 127.0.0.1, a local Ray session, test data paths.

The S3 server is reached only through AWS_ENDPOINT_URL, exactly as production
code reaches MinIO or AWS, so what runs under test is the production code.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
REAL_VIDEO = SHARED_DATA / "real" / "single_face.mp4"

# Tests import the package from the source root even without an editable install.
if str(REPO_ROOT / "platform") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "platform"))

# Dummy credentials for moto, set before anything creates an S3 client. Real
# credentials of whoever runs the tests must never reach the fake server.
for _name, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}.items():
    os.environ[_name] = _value
os.environ.pop("AWS_PROFILE", None)
# Keep Ray quiet and local in tests.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1, exported through AWS_ENDPOINT_URL for the session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    server.stop()
    if previous is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = previous


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server; yields its s3:// URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    # s3fs caches listings per process; a new bucket must not see stale ones.
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{name}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny-model tests, restored after it.

    Tiny models gain nothing from threads, and on a busy 2-core box two threads contend
    (10x slower, seen). Set per module, never at import: that would change every later test.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """A local Ray instance reused by every test that needs one.

    More logical CPUs than the 2 physical cores: Ray Train workers hold CPU
    slots and Ray Data tasks need slots too, or pipelines deadlock (DESIGN.md).
    Started after the S3 server so workers inherit AWS_ENDPOINT_URL.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=8,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}},
        )
    yield ray
    ray.shutdown()


SAMPLE_SHARDS_SIZE = 32  # px: the drawn faces at the size the training tests use


@pytest.fixture(scope="session")
def sample_shards(ray_session, tmp_path_factory) -> str:
    """The sample corpus ingested once for the whole run (32 px): training tests read it, never write it."""
    from affectray.sample.shards import ensure_sample_shards

    root = str(tmp_path_factory.mktemp("sample_shards") / "shards")
    assert ensure_sample_shards(root, image_size=SAMPLE_SHARDS_SIZE)
    return root


@pytest.fixture(scope="session")
def real_video() -> Path:
    """The real face video from ../shared/data/real (72 frames, one face each)."""
    if not REAL_VIDEO.exists():
        pytest.fail(f"missing test data {REAL_VIDEO}: the shared/ folder must sit beside the repo")
    return REAL_VIDEO


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory):
    """The built-in synthetic corpus (drawn faces + real-face videos), written once."""
    from affectray.sample.synth import SynthConfig, write_sample_corpus

    root = tmp_path_factory.mktemp("sample_corpus")
    write_sample_corpus(root, SynthConfig(seed=0))
    return root


FER2013 = SHARED_DATA / "fer2013"


def fer2013_members(split: str = "publictest", every: int = 1) -> list[str]:
    """Names of FER2013 images in ``split``'s tar, sorted; every ``every``-th of each class."""
    import tarfile

    with tarfile.open(FER2013 / f"{split}.tar") as tar:
        names = sorted(n for n in tar.getnames() if n.endswith(".jpg"))
    by_class: dict[str, list[str]] = {}
    for name in names:
        by_class.setdefault(name.split("/")[1], []).append(name)
    return [n for members in by_class.values() for n in members[::every]]


def unpack_fer2013(target: Path, members: list[str], split: str = "publictest") -> Path:
    """Unpack ``members`` of FER2013's ``split`` tar under ``target``; returns target/<split>."""
    import tarfile

    if not (FER2013 / f"{split}.tar").exists():
        pytest.fail(f"missing test data {FER2013 / split}.tar: the shared/ folder must sit beside the repo")
    with tarfile.open(FER2013 / f"{split}.tar") as tar:
        wanted = set(members)
        tar.extractall(target, members=[m for m in tar.getmembers() if m.name in wanted], filter="data")
    return target / split


# One clear face per class: MTCNN finds each of them once the 48 px image is enlarged.
GROUP_FER_FACES = {
    "Happiness": "publictest/happy/PublicTest_10130075.jpg",
    "Surprise": "publictest/surprise/PublicTest_10709121.jpg",
    "Anger": "publictest/angry/PublicTest_10116449.jpg",
    "Neutral": "publictest/neutral/PublicTest_10262886.jpg",
}


@pytest.fixture(scope="session")
def group_photo(tmp_path_factory, real_video) -> tuple[Path, list[tuple[int, int, int, int]]]:
    """A group photo of six real people: (JPEG path, the six tiles' x1, y1, x2, y2).

    No licensed group photo ships with the data, so it is a 3 x 2 montage of real faces on
    grey: the astronaut (scikit-image), a frame of the real video, and four FER2013 faces.
    """
    import av
    import cv2
    import numpy as np
    from skimage import data

    tmp = tmp_path_factory.mktemp("group")
    fer = unpack_fer2013(tmp, list(GROUP_FER_FACES.values()))
    with av.open(str(real_video)) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="bgr24")
    faces = [
        cv2.cvtColor(data.astronaut()[20:276, 96:352], cv2.COLOR_RGB2BGR),  # her face and shoulders
        frame[:, 140:500],
        *[cv2.imread(str(fer.parent / name)) for name in GROUP_FER_FACES.values()],
    ]
    tile, pad = 200, 20
    canvas = np.full((2 * (tile + 2 * pad), 3 * (tile + 2 * pad), 3), 128, np.uint8)
    tiles = []
    for k, face in enumerate(faces):
        x, y = (k % 3) * (tile + 2 * pad) + pad, (k // 3) * (tile + 2 * pad) + pad
        canvas[y : y + tile, x : x + tile] = cv2.resize(face, (tile, tile), interpolation=cv2.INTER_CUBIC)
        tiles.append((x, y, x + tile, y + tile))
    path = tmp / "group.jpg"
    cv2.imwrite(str(path), canvas, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return path, tiles
