"""Labeling video corpora: inputs and keys, chunking, output tables, and end to end on a real local Ray.

End-to-end tests use real MTCNN on the real video in ../shared/data/real and the
sample corpus's animated real-face videos, tiny classifiers at 48 px, a moto S3
server, and a real killed driver process for the resume test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from tests.conftest import REPO_ROOT

from affectray import storage
from affectray.checkpoints import save_checkpoint
from affectray.config import ConfigError
from affectray.errors import JobError
from affectray.ingest.annotations import parse_expr_annotation
from affectray.ingest.sources import SourceError
from affectray.label import job, outputs
from affectray.label.inputs import list_inputs, video_key
from affectray.label.job import LabelConfig, run_label
from affectray.label.pipeline import (
    ClassifyFaces,
    DetectFaces,
    LabelFaces,
    StageSettings,
    _row,
    _video_chunks,
    _with_halo,
)
from affectray.labels import ABAW8
from affectray.models.inference import load_classifier
from affectray.models.registry import create_model

SIZE = 48  # classifier input side: faces are aligned straight to it
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
PROBS = [outputs.prob_column(c) for c in ABAW8.classes]


def save_classifier(directory: Path, model: torch.nn.Module, mode: str = "frame", num_frames: int = 1) -> str:
    meta = {
        "kind": "classifier",
        "model": model.describe(),
        "label_set": {"name": "abaw8", "classes": list(ABAW8.classes)},
        "preprocessing": {
            "mode": mode, "image_size": SIZE, "num_frames": num_frames, "frame_stride": 1,
            "mean": list(MEAN), "std": list(STD),
        },
    }  # fmt: skip
    save_checkpoint(directory, model, meta)
    return str(directory)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """An untrained tiny frame classifier: enough to check rows, probabilities and plumbing."""
    torch.manual_seed(0)
    model = create_model("frame", backbone="test_resnet", num_classes=8)
    return save_classifier(tmp_path_factory.mktemp("ckpt") / "frame", model)


def faststart_truncated(src: Path, dst: Path, keep_packets: int) -> None:
    """src remuxed with its index first (as streaming MP4s are), cut after ``keep_packets`` packets."""
    full = dst.with_suffix(".full.mp4")
    with av.open(str(src)) as inp, av.open(str(full), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    with av.open(str(full)) as container:
        ends = [p.pos + p.size for p in container.demux(container.streams.video[0]) if p.size]
    dst.write_bytes(full.read_bytes()[: ends[keep_packets - 1]])
    full.unlink()


def read_parquet(uri: str) -> pd.DataFrame:
    with storage.open_input(uri) as f:
        return pq.read_table(f).to_pandas()


# ---------------------------------------------------------------------------
# Inputs: keys, folders, globs, manifests
# ---------------------------------------------------------------------------


def _touch_videos(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"\x00" * 16)


def test_inputs_from_a_folder_a_glob_and_manifests_share_stable_keys(tmp_path):
    root = tmp_path / "corpus"
    _touch_videos(root, ["a/clip.mp4", "b/clip.mp4", "c/talk é.MKV", ".hidden/x.mp4", "a/._clip.mp4"])
    (root / "notes.txt").write_text("not listed: a folder lists video files only")
    folder = list_inputs(str(root))
    assert sorted(v.name for v in folder.videos) == ["a/clip.mp4", "b/clip.mp4", "c/talk é.MKV"]
    keys = {v.name: v.key for v in folder.videos}
    assert keys["a/clip.mp4"] != keys["b/clip.mp4"]  # same file name, different folders: never one output
    assert all(k.isascii() and "/" not in k and " " not in k for k in keys.values())
    assert list_inputs(str(root)).videos == folder.videos  # stable across runs

    globbed = list_inputs(str(root / "*" / "clip.mp4"))
    assert {v.key for v in globbed.videos} == {keys["a/clip.mp4"], keys["b/clip.mp4"]}

    # A text manifest: relative entries resolve against its folder, absolute ones stay, '..' is refused.
    outside = tmp_path / "elsewhere" / "x.mp4"
    _touch_videos(tmp_path, ["elsewhere/x.mp4"])
    manifest = root / "list.txt"
    manifest.write_text(
        "# videos to label\n"
        "a/clip.mp4\n"
        f"{root / 'b' / 'clip.mp4'}\n"
        "../elsewhere/x.mp4\n"
        "a/../b/clip.mp4\n"
        f"{root}/../elsewhere/x.mp4\n"
        "a/clip.mp4\n"
        f"{outside}\n"
    )
    listed = list_inputs(str(manifest))
    assert {v.key for v in listed.videos} == {keys["a/clip.mp4"], keys["b/clip.mp4"], video_key(str(outside))}
    reasons = [r["reason"] for r in listed.refused]
    assert len(reasons) == 4 and sum("refused" in r for r in reasons) == 3 and any("twice" in r for r in reasons)
    # Each refusal records where its entry points, absolute and resolved (never opened), beside the text as typed.
    assert [(r["input"], r["uri"]) for r in listed.refused] == [
        ("../elsewhere/x.mp4", str(outside)),
        ("a/../b/clip.mp4", str(root / "b" / "clip.mp4")),
        (f"{root}/../elsewhere/x.mp4", str(outside)),
        ("a/clip.mp4", str(root / "a" / "clip.mp4")),
    ]

    pd.DataFrame({"video_uri": ["a/clip.mp4", "c/talk é.MKV"], "other": [1, 2]}).to_parquet(root / "list.parquet")
    from_parquet = list_inputs(str(root / "list.parquet"))
    assert {v.key for v in from_parquet.videos} == {keys["a/clip.mp4"], keys["c/talk é.MKV"]}
    (root / "list.csv").write_text("id,path\n1,b/clip.mp4\n2,../../etc/passwd\n")
    from_csv = list_inputs(str(root / "list.csv"))
    assert [v.key for v in from_csv.videos] == [keys["b/clip.mp4"]] and len(from_csv.refused) == 1

    with pytest.raises(SourceError, match="not found"):
        list_inputs(str(tmp_path / "missing"))
    with pytest.raises(SourceError, match="no video files"):
        list_inputs(str(tmp_path / "elsewhere" / "*.avi"))


def test_inputs_from_an_s3_prefix_and_glob(tmp_path, s3_bucket):
    _touch_videos(tmp_path, ["a/clip.mp4", "b/clip.mp4", "b/other.webm"])
    storage.upload_dir(tmp_path, f"{s3_bucket}/raw")
    listed = list_inputs(f"{s3_bucket}/raw/")
    assert sorted(v.uri for v in listed.videos) == [
        f"{s3_bucket}/raw/{n}" for n in ("a/clip.mp4", "b/clip.mp4", "b/other.webm")
    ]
    globbed = list_inputs(f"{s3_bucket}/raw/*/clip.mp4")
    assert {v.key for v in globbed.videos} == {v.key for v in listed.videos if v.name.endswith("clip.mp4")}


# ---------------------------------------------------------------------------
# Chunks, windows and the output table (no Ray)
# ---------------------------------------------------------------------------


def test_chunks_partition_the_frames_and_carry_halos():
    frames = [(i, i / 30, np.zeros((2, 2, 3), np.uint8), 1.0) for i in range(23)]
    chunks = list(_with_halo(iter(frames), 5, 2))
    cores = [list(range(*c["core"])) for c in chunks]
    assert sum(cores, []) == list(range(23))  # every frame labelled by exactly one chunk
    for chunk, core in zip(chunks, cores):
        expected = list(range(max(0, core[0] - 2), min(23, core[-1] + 3)))
        assert chunk["frame_index"].tolist() == expected
    assert [c["core"] for c in _with_halo(iter(frames), 8, 0)] == [(0, 8), (8, 16), (16, 23)]


def test_window_classifier_over_chunks_equals_the_whole_track(tmp_path):
    """Halos make chunk-by-chunk window predictions identical to predicting the whole track at once."""
    torch.manual_seed(0)
    model = create_model("cfc_sp", backbone="test_resnet", num_classes=8, window=5)
    ckpt = save_classifier(tmp_path / "window", model, mode="clip", num_frames=5)
    track = np.random.default_rng(0).integers(0, 256, (23, SIZE, SIZE, 3), dtype=np.uint8)
    settings = StageSettings(image_size=SIZE, chunk_frames=6, halo=2, batch_size=4)
    stage = ClassifyFaces(ckpt, settings, torch_threads=1)
    frames = [(i, i / 30, None, 1.0) for i in range(23)]
    probs = []
    import pickle

    for part, chunk in enumerate(_with_halo(iter(frames), settings.chunk_frames, settings.halo)):
        pos = chunk["frame_index"]
        chunk.update(
            face_count=np.ones(len(pos), np.int64),
            face_pos=np.arange(len(pos)),
            boxes=np.tile(np.float32([10, 10, 60, 60]), (len(pos), 1)) + pos[:, None].astype(np.float32),
            scores=np.ones(len(pos), np.float32),
            landmarks=np.zeros((len(pos), 5, 2), np.float32),
            crops=track[pos],
            seconds={},
        )
        chunk.pop("images")
        row = stage(
            {"key": np.array(["v"]), "part": np.array([part]), "payload": np.array([pickle.dumps(chunk)], dtype=object)}
        )
        out = pickle.loads(row["payload"][0])
        assert "crops" not in out and out["frame_index"].tolist() == list(range(*chunk["core"]))
        probs.append(out["probs"])
    whole = load_classifier(ckpt).predict_track(track)
    np.testing.assert_allclose(np.concatenate(probs), whole, atol=1e-5)


def test_detector_then_classifier_actors_give_the_rows_one_labelling_actor_gives(real_video, checkpoint):
    """With GPUs the stages run as two actor pools, without as one: the same rows either way."""
    import pickle

    settings = StageSettings(image_size=SIZE, chunk_frames=8, detect_every=4)
    video = list_inputs(str(real_video)).videos[0]
    rows = [_row(video.key, part, payload) for part, payload in _video_chunks(video, settings)][:2]
    two = [ClassifyFaces(checkpoint, settings, 1)(DetectFaces(settings, 1)(row)) for row in rows]
    one = [LabelFaces(checkpoint, settings, 1)(row) for row in rows]
    for a, b in zip(two, one):
        a, b = pickle.loads(a["payload"][0]), pickle.loads(b["payload"][0])
        assert "crops" not in a and len(a["probs"]) == len(a["frame_index"]) == 8  # one face per frame
        for name in ("frame_index", "face_count", "boxes", "landmarks", "probs"):
            np.testing.assert_allclose(a[name], b[name], atol=1e-5)


def test_label_table_has_a_row_per_frame_and_face():
    probs = np.random.default_rng(0).dirichlet(np.ones(8), size=4).astype(np.float32)
    video = outputs.VideoLabels(
        frame_index=np.arange(4),
        pts_seconds=np.arange(4) / 25,
        face_count=np.array([1, 0, 2, 1]),
        face_frame=np.array([0, 2, 2, 3]),
        boxes=np.array([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10], [1, 1, 11, 11]], np.float32),
        scores=np.full(4, 0.99, np.float32),
        landmarks=np.zeros((4, 5, 2), np.float32),
        probs=probs,
        track_id=np.array([0, 1, 0, 0]),
        label=probs.argmax(1),
        label_smoothed=np.array([4, 4, 4, 4]),
    )
    table = outputs.labels_table(video, video_uri="s3://b/v.mp4", key="v-1234", classes=ABAW8.classes, model_id="m")
    df = table.to_pandas()
    assert df.frame_index.tolist() == [0, 1, 2, 2, 3] and df.face_count.tolist() == [1, 0, 2, 2, 1]
    assert df.track_id.tolist()[2:4] == [0, 1]  # sorted by frame, then track
    empty = table.slice(1, 1).to_pylist()[0]  # the frame without a face: nulls in every face column
    face_columns = ["track_id", "bbox_x1", "bbox_y2", "det_score", "landmarks", "label", "label_smoothed", *PROBS]
    assert all(empty[c] is None for c in face_columns)
    assert (empty["face_count"], empty["frame_index"], empty["pts_seconds"]) == (0, 1, 1 / 25)
    np.testing.assert_allclose(df.loc[df.face_count > 0, PROBS].sum(axis=1), 1.0, atol=1e-5)
    assert set(df.label_smoothed.dropna()) == {"Happiness"} and set(df.model_id) == {"m"}
    assert table.schema.equals(outputs.label_schema(ABAW8.classes), check_metadata=False)


def test_detecting_between_key_frames_near_their_faces_finds_what_detection_finds(real_video):
    """--detect-every 4: between key frames MTCNN looks only near the key frame's faces, and finds the same."""
    from affectray.faces.detect import FaceDetector, detect_and_align
    from affectray.faces.video import iter_frames

    frames = next(iter(iter_frames(real_video, batch_size=16))).images
    detector = FaceDetector()
    every = detect_and_align(detector, frames, SIZE, 640)
    keyed = detect_and_align(detector, frames, SIZE, 640, detect_every=4)
    for k, ((faces, crops), (found, aligned)) in enumerate(zip(every, keyed)):
        assert len(faces) == len(found) == len(aligned) == 1, k
        np.testing.assert_allclose(found[0].box, faces[0].box, atol=1e-3)
        np.testing.assert_allclose(found[0].landmarks, faces[0].landmarks, atol=1e-3)
        assert np.abs(aligned.astype(int) - crops).max() <= 1  # the same crop, to rounding
    assert detector.detect(frames[:2], near=[]) == [[], []]  # no face to look near: nothing looked for


# ---------------------------------------------------------------------------
# End to end on a real local Ray
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, real_video, sample_corpus) -> Path:
    """Real faces, no face, two videos of one name, and every kind of bad input."""
    root = tmp_path_factory.mktemp("label_corpus")
    astronaut = sample_corpus / "videos" / "astronaut_000.mp4"
    for target, source in {
        "real/single_face.mp4": real_video,
        "take 1/astronaut.mp4": astronaut,
        "take 2/astronaut.mp4": sample_corpus / "videos" / "astronaut_001.mp4",
        "no_face.mp4": sample_corpus / "videos" / "no_face.mp4",
    }.items():
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / target)
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "garbage.mkv").write_bytes(np.random.default_rng(0).bytes(4096))
    (bad / "notes.mp4").write_text("frame,label\n0,happy\n" * 100)  # text with a video's name
    data = real_video.read_bytes()
    fourcc = data.find(b"avc1", data.find(b"stsd"))
    (bad / "codec.mp4").write_bytes(data[:fourcc] + b"zzzz" + data[fourcc + 4 :])  # no decoder for 'zzzz'
    faststart_truncated(astronaut, bad / "truncated.mp4", keep_packets=12)
    return root


def test_corpus_on_s3_every_frame_a_row_bad_inputs_reported(ray_session, s3_bucket, corpus, checkpoint):
    storage.upload_dir(corpus, f"{s3_bucket}/raw")
    out = f"{s3_bucket}/labels"
    config = LabelConfig(f"{s3_bucket}/raw", out, checkpoint, detect_max_side=320, chunk_frames=12)
    summary = run_label(config, progress=False)
    assert summary["videos"] == 9 and summary["processed"] == 9
    assert (summary["ok"], summary["partial"], summary["failed"]) == (4, 1, 4)
    model_id = load_classifier(checkpoint).model_id
    assert summary["model_id"] == model_id
    assert summary["nodes"] == [ray_session.get_runtime_context().get_node_id()]

    # videos.parquet, read back with pandas (through s3fs) and fastparquet, straight from S3.
    videos = read_parquet(summary["videos_parquet"]).set_index("name")
    import fastparquet

    fs, _ = storage.get_filesystem(out)
    assert fastparquet.ParquetFile(f"{out[5:]}/videos.parquet", fs=fs).to_pandas().shape[0] == 9
    reasons = videos.reason.to_dict()
    assert reasons["bad/empty.mp4"] == "empty file"
    assert reasons["bad/garbage.mkv"] == reasons["bad/notes.mp4"] == "not a video"
    assert reasons["bad/codec.mp4"] == "unsupported codec"
    assert videos.loc["bad/truncated.mp4", "status"] == "partial" and reasons["bad/truncated.mp4"] == "truncated"
    assert all(videos.loc[n, "error"] for n in reasons if n.startswith("bad/"))
    assert set(videos.status[~videos.index.str.startswith("bad/")]) == {"ok"}
    assert videos.loc["real/single_face.mp4", "fps"] == 30.0 and videos.loc["real/single_face.mp4", "frames"] == 72

    labels = {name: read_parquet(uri) for name, uri in videos.output.dropna().items()}
    assert len(labels) == 5 and len({videos.loc[n, "video_key"] for n in labels}) == 5
    real = labels["real/single_face.mp4"]
    assert real.frame_index.tolist() == list(range(72)), "one row per decoded frame"
    assert (real.face_count == 1).all() and real.track_id.eq(0).all()
    np.testing.assert_allclose(real.pts_seconds, np.arange(72) / 30.0, atol=1e-3)
    assert ((real.bbox_x2 - real.bbox_x1) > 80).all() and (real.det_score > 0.9).all()
    for name in ("take 1/astronaut.mp4", "take 2/astronaut.mp4"):
        rows = labels[name]
        assert rows.frame_index.tolist() == list(range(24)) and (rows.face_count == 1).all()
        assert set(rows.video_uri) == {f"{s3_bucket}/raw/{name}"}
    truncated = labels["bad/truncated.mp4"]
    assert 0 < len(truncated) < 24 and truncated.frame_index.tolist() == list(range(len(truncated)))
    no_face = labels["no_face.mp4"]
    assert no_face.frame_index.tolist() == list(range(24)) and (no_face.face_count == 0).all()
    assert no_face.track_id.isna().all() and no_face[PROBS].isna().all().all() and no_face.label.isna().all()

    faces = pd.concat([real, labels["take 1/astronaut.mp4"]])
    np.testing.assert_allclose(faces[PROBS].sum(axis=1), 1.0, atol=1e-4)
    assert (faces.label == faces[PROBS].idxmax(axis=1).str.removeprefix("prob_")).all()
    assert set(faces.label_smoothed) <= set(ABAW8.classes) and set(faces.model_id) == {model_id}
    # fastparquet, a second Parquet implementation, reads a label file from S3 too.
    key = videos.loc["real/single_face.mp4", "video_key"]
    frame = fastparquet.ParquetFile(f"{out[5:]}/labels/{key}.parquet", fs=fs).to_pandas()
    assert len(frame) == 72 and len(frame.landmarks.iloc[0]) == 10

    assert storage.read_bytes(outputs.timeline_uri(out, key))[:8] == b"\x89PNG\r\n\x1a\n"
    report = storage.read_text(summary["report"])
    assert "unsupported codec" in report and "bad/garbage.mkv" in report and "frames/s" in report

    # A second run finds every video finished and writes nothing new.
    before = {u: storage.read_bytes(u) for u in storage.list_files(f"{out}/labels")}
    again = run_label(config, progress=False)
    assert again["processed"] == 0 and again["skipped"] == 9
    assert {u: storage.read_bytes(u) for u in storage.list_files(f"{out}/labels")} == before

    # The same OUT with another model is refused rather than mixed.
    torch.manual_seed(1)
    other = save_classifier(
        Path(checkpoint).parent / "other", create_model("frame", backbone="test_resnet", num_classes=8)
    )
    with pytest.raises(JobError, match="model_id"):
        run_label(LabelConfig(f"{s3_bucket}/raw", out, other, detect_max_side=320), progress=False)


def test_fail_fast_stops_at_the_first_bad_video(ray_session, tmp_path, checkpoint):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "empty.mp4").write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(JobError, match="empty.mp4"):
        run_label(LabelConfig(str(videos), str(out), checkpoint, fail_fast=True), progress=False)
    recorded = pd.read_parquet(out / "videos.parquet")
    assert recorded.status.tolist() == ["failed"] and recorded.reason.tolist() == ["empty file"]


def test_killed_run_resumes_with_exactly_one_output_per_video(ray_session, tmp_path, sample_corpus, checkpoint):
    """Kill the job's driver (SIGKILL) once some videos are done; a re-run finishes the rest, no duplicates."""
    videos = tmp_path / "videos"
    names = [f"{folder}/astronaut.mp4" for folder in ("a", "b", "c", "d", "e", "f")]
    for k, name in enumerate(names):
        (videos / name).parent.mkdir(parents=True)
        shutil.copy(sample_corpus / "videos" / f"astronaut_{k % 2:03d}.mp4", videos / name)
    out = tmp_path / "out"
    command = [
        sys.executable, str(REPO_ROOT / "jobs" / "label_videos.py"), str(videos), str(out),
        "--checkpoint", checkpoint, "--detect-max-side", "320", "--detectors", "1", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    log = tmp_path / "job.log"  # a file, not a pipe: a full pipe would stall the job
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    done_dir = out / outputs.DONE_DIR
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and job.poll() is None:
        if done_dir.exists() and any(done_dir.glob("*.json")):
            break
        time.sleep(0.05)
    assert job.poll() is None, f"the job ended before it could be killed: {log.read_text()[-2000:]}"
    job.send_signal(signal.SIGKILL)
    job.wait()
    finished_before = len(list(done_dir.glob("*.json")))
    assert 0 < finished_before < len(names)

    summary = run_label(LabelConfig(str(videos), str(out), checkpoint, detect_max_side=320), progress=False)
    assert summary["skipped"] >= finished_before and summary["skipped"] + summary["processed"] == len(names)
    assert summary["ok"] == len(names) and summary["failed"] == 0  # OUT's state: this run's videos and the earlier ones
    files = sorted(p.name for p in (out / outputs.LABELS_DIR).iterdir() if not p.name.startswith("."))
    assert len(files) == len(names) and all(f.endswith(".parquet") for f in files)
    rows = outputs.read_labels(str(out)).to_pandas()
    assert len(rows) == 24 * len(names)
    assert not rows.duplicated(["video_key", "frame_index", "track_id"]).any()
    assert rows.groupby("video_uri").frame_index.apply(list).map(lambda f: f == list(range(24))).all()


def test_trained_checkpoint_labels_held_out_videos_well_above_chance(ray_session, tmp_path):
    """Train on drawn faces, label the corpus's videos (identities never seen) through the aligned path.

    MTCNN cannot see drawings, so the frames go in as aligned faces. 8 classes: chance is 12.5%.
    """
    import torch.nn.functional as F

    from affectray.sample.synth import SynthConfig, draw_face, write_sample_corpus

    # Training faces: the corpus's own generator, a fresh identity, pose and colour per face.
    rng = np.random.default_rng(7)
    y = rng.integers(0, 8, 1000)

    def drawn(label: int) -> np.ndarray:
        face = cv2.cvtColor(draw_face(label, rng, 64), cv2.COLOR_BGR2RGB)
        return cv2.resize(face, (SIZE, SIZE), interpolation=cv2.INTER_AREA)

    x = np.stack([drawn(int(k)) for k in y])
    root = tmp_path / "synth"
    write_sample_corpus(root, SynthConfig(seed=3, num_videos=2, image_size=64, num_real_videos=0, no_face_video=False))
    held_out = sorted((root / "aligned").iterdir())

    torch.manual_seed(0)
    model = create_model("frame", backbone="test_resnet", num_classes=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    rng = np.random.default_rng(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(150):
            batch = rng.integers(0, len(x), 32)
            inputs = (torch.from_numpy(x[batch]).movedim(-1, -3).float() / 255 - mean) / std
            loss = F.cross_entropy(model(inputs)["logits"], torch.from_numpy(y[batch]).long())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    ckpt = save_classifier(tmp_path / "trained", model.eval())

    videos = root / "aligned"
    out = tmp_path / "out"
    summary = run_label(
        LabelConfig(str(videos), str(out), ckpt, layout="aligned-frames", frames_fps=25), progress=False
    )
    assert summary["ok"] == 2 and summary["frames"] == summary["faces"] == 96
    rows = outputs.read_labels(str(out)).to_pandas()
    for folder in held_out:
        truth = parse_expr_annotation((root / "annotations" / f"{folder.name}.txt").read_text())
        mine = rows[rows.video_uri == str(videos / folder.name)].sort_values("frame_index")
        assert mine.frame_index.tolist() == list(range(48)) and (mine.face_count == 1).all()
        np.testing.assert_allclose(mine.pts_seconds, np.arange(48) / 25)
        known = truth >= 0
        raw = np.mean(mine.label.to_numpy()[known] == np.asarray(ABAW8.classes)[truth[known]])
        smoothed = np.mean(mine.label_smoothed.to_numpy()[known] == np.asarray(ABAW8.classes)[truth[known]])
        assert raw > 0.5 and smoothed > 0.5, (folder.name, raw, smoothed)


# ---------------------------------------------------------------------------
# The job script
# ---------------------------------------------------------------------------


def test_job_script_help_and_bad_inputs_exit_2_without_traceback(tmp_path, checkpoint):
    script = REPO_ROOT / "jobs" / "label_videos.py"
    help_text = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--checkpoint" in help_text and "--fail-fast" in help_text and "manifest" in help_text
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "clip.mp4").write_bytes(b"")
    for args, expected in [
        ([str(tmp_path / "nope"), str(tmp_path / "out"), "--checkpoint", checkpoint], "not found"),
        (
            [str(tmp_path / "videos"), str(tmp_path / "out"), "--checkpoint", str(tmp_path)],
            "not an affectray checkpoint",
        ),
        ([str(tmp_path / "videos"), str(tmp_path / "out"), "--checkpoint", checkpoint, "--smooth-window", "4"], "odd"),
    ]:
        run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
        assert run.returncode == 2 and expected in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# Config: YAML, --set and flags through one loader (no Ray)
# ---------------------------------------------------------------------------


def _label_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def label_yaml(tmp_path):
    path = tmp_path / "label.yaml"
    path.write_text("videos: corpus/videos\nout: labels\ncheckpoint: builtin:tiny\ndetect_every: 2\nsmooth_window: 5\n")
    return str(path)


def test_label_yaml_and_set_reach_fields_without_a_flag(label_yaml, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = job.config_from_args(_label_args("--config", label_yaml, "--set", "min_face_size=40"))
    assert (config.min_face_size, config.detect_every, config.smooth_window) == (40, 2, 5)
    assert (config.videos, config.out) == (str(tmp_path / "corpus" / "videos"), str(tmp_path / "labels"))
    assert config.checkpoint == "builtin:tiny"  # a URI is not a path: left as it is
    assert config.timelines and not config.overwrite


def test_label_flags_win_over_yaml_and_set(label_yaml, tmp_path):
    args = _label_args(
        "s3://corpus/raw", str(tmp_path / "out"), "--config", label_yaml, "--set", "detect_every=3",
        "--detect-every", "1", "--checkpoint", "s3://runs/best", "--fps", "25", "--no-timelines",
    )  # fmt: skip
    config = job.config_from_args(args)
    assert (config.videos, config.checkpoint) == ("s3://corpus/raw", "s3://runs/best")
    assert config.out == str(tmp_path / "out")
    assert (config.detect_every, config.frames_fps, config.timelines, config.smooth_window) == (1, 25.0, False, 5)


def test_label_defaults_live_in_one_place():
    config = job.config_from_args(_label_args("v", "o", "--checkpoint", "c"))
    assert config.detect_every == LabelConfig.detect_every == StageSettings.detect_every
    assert config.min_face_size == StageSettings.min_face_size and config.frames_fps == StageSettings.frames_fps
    help_text = argparse.ArgumentParser()
    job.add_arguments(help_text)
    assert f"(default {LabelConfig.detect_every};" in " ".join(help_text.format_help().split())


def test_label_unknown_set_key_is_named_and_no_checkpoint_means_the_builtin(label_yaml, tmp_path):
    with pytest.raises(ConfigError, match="unknown key: min_face_sise.*did you mean min_face_size"):
        job.config_from_args(_label_args("--config", label_yaml, "--set", "min_face_sise=40"))
    # No checkpoint given: the built-in model labels.
    config = job.config_from_args(_label_args(str(tmp_path), str(tmp_path / "out")))
    assert config.checkpoint == job.DEFAULT_CHECKPOINT == "builtin:fer-minixception"
