"""End-to-end ingest on a real local Ray: frame folders, real videos with MTCNN, S3, bad inputs; its config (fast)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from tests.conftest import REPO_ROOT

from affectray import config as config_lib
from affectray import storage
from affectray.config import ConfigError
from affectray.data import shards
from affectray.faces.jpeg import decode_jpeg
from affectray.ingest import job as ingest
from affectray.ingest.annotations import parse_expr_annotation
from affectray.ingest.job import IngestConfig, run_ingest
from affectray.ingest.sources import SourceError


def _read_rows(root: str) -> pd.DataFrame:
    files = shards.list_shards(root)
    tables = []
    for uri in files:
        with storage.open_input(uri) as f:
            tables.append(pq.read_table(f))
    import pyarrow as pa

    return pa.concat_tables(tables).to_pandas()


@pytest.mark.slow
def test_aligned_frames_with_annotations_and_rerun(ray_session, sample_corpus, tmp_path):
    out = str(tmp_path / "shards out")
    config = IngestConfig(
        source=str(sample_corpus / "aligned"),
        out=out,
        layout="aligned-frames",
        annotations=str(sample_corpus / "annotations"),
        dataset="affwild2",
        image_size=64,
        segment_length=20,
    )
    summary = run_ingest(config, progress=False)
    assert summary["failed"] == 0 and summary["processed"] == summary["units"] == 6

    rows = _read_rows(out)
    manifest = shards.read_manifest(out)
    assert manifest["counts"]["rows"] == len(rows)
    assert manifest["image_size"] == 64
    # Every annotated frame of every folder is in the shards with its label, exactly once.
    for folder in sorted((sample_corpus / "aligned").iterdir()):
        expected = parse_expr_annotation((sample_corpus / "annotations" / f"{folder.name}.txt").read_text())
        mine = rows[rows.video_id == folder.name].sort_values("segment_index")
        frames = np.concatenate(mine.frame_index.to_list())
        labels = np.concatenate(mine.labels.to_list())
        assert list(frames) == list(range(len(expected)))
        assert np.array_equal(labels, expected)
        assert all(len(f) <= 20 for f in mine.frame_index)
    first = decode_jpeg(rows.images.iloc[0][0])
    assert first.shape == (64, 64, 3)
    assert sum(manifest["labels"].values()) == manifest["counts"]["face_frames"] == 288

    # A re-run skips every finished unit and leaves the shards byte-identical.
    before = {u: storage.read_bytes(u) for u in shards.list_shards(out)}
    again = run_ingest(config, progress=False)
    assert again["processed"] == 0 and again["skipped"] == 6
    assert {u: storage.read_bytes(u) for u in shards.list_shards(out)} == before
    assert shards.read_manifest(out)["shards"] == manifest["shards"]


@pytest.mark.slow
def test_videos_on_s3_with_bad_inputs(ray_session, s3_bucket, real_video, tmp_path):
    """Real faces are found and aligned; broken inputs are reported and the rest goes on."""
    src = tmp_path / "videos"
    (src / "folder one").mkdir(parents=True)
    shutil.copy(real_video, src / "folder one" / "visage é.mp4")
    (src / "empty.mp4").write_bytes(b"")
    (src / "garbage.mkv").write_bytes(np.random.default_rng(0).bytes(4096))
    (src / "half.mp4").write_bytes(real_video.read_bytes()[: real_video.stat().st_size // 2])
    (src / "readme.txt").write_text("not a video, and not named like one")
    storage.upload_dir(src, f"{s3_bucket}/raw")

    out = f"{s3_bucket}/shards"
    summary = run_ingest(
        IngestConfig(source=f"{s3_bucket}/raw", out=out, image_size=96, detect_max_side=320, dataset="demo"),
        progress=False,
    )
    assert summary["units"] == 4 and summary["videos"] >= 1
    manifest = shards.read_manifest(out)
    failures = {f["input"]: f for f in manifest["failures"]}
    assert "empty.mp4" in failures and "empty" in failures["empty.mp4"]["reason"]
    assert "garbage.mkv" in failures and failures["garbage.mkv"]["status"] == "failed"
    # A truncated mp4 either fails outright or keeps the frames before the cut as partial.
    assert "half.mp4" in failures or any(r["input"] == "half.mp4" for r in manifest["failures"])
    assert summary["failed"] + summary["partial"] >= 3

    rows = _read_rows(out)
    real = rows[rows.video_id == "folder one/visage é"]
    frames = np.concatenate(real.frame_index.to_list())
    assert list(frames) == list(range(72)), "one face in every one of the 72 frames"
    pts = np.concatenate(real.pts_seconds.to_list())
    assert np.allclose(pts, np.arange(72) / 30.0, atol=1e-3)
    assert set(real.track_id) == {0}
    face = decode_jpeg(real.images.iloc[0][0])
    assert face.shape == (96, 96, 3)
    # fastparquet, a second Parquet implementation, reads the shard straight from S3.
    import fastparquet

    shard = [s for s in manifest["shards"] if s["rows"]][0]
    fs, _ = storage.get_filesystem(out)
    frame = fastparquet.ParquetFile(f"{out[5:]}/{shard['file']}", fs=fs).to_pandas(columns=["video_id", "clip_label"])
    assert len(frame) == shard["rows"]


@pytest.mark.slow
def test_image_folder_by_number_and_by_name(ray_session, tmp_path):
    import cv2

    src = tmp_path / "rafdb"
    rng = np.random.default_rng(1)
    for split, folder, count in [("train", "4", 3), ("train", "7", 2), ("test", "Happy", 2)]:
        (src / split / folder).mkdir(parents=True)
        for i in range(count):
            cv2.imwrite(str(src / split / folder / f"img_{i}.jpg"), rng.integers(0, 255, (100, 100, 3), np.uint8))
    (src / "train" / "7" / "broken.jpg").write_bytes(b"not a jpeg")
    out = str(tmp_path / "out")
    summary = run_ingest(
        IngestConfig(source=str(src), out=out, layout="image-folder", dataset="rafdb", image_size=48), progress=False
    )
    rows = _read_rows(out)
    assert len(rows) == 7 and summary["partial"] == 1
    by_id = {row.video_id: (row.split, int(row.labels[0])) for row in rows.itertuples()}
    # RAF-DB numbers 4 = Happiness, 7 = Neutral; ABAW8 indices 4 and 0. Names map by name.
    assert by_id["train/4/img_0"] == ("train", 4)
    assert by_id["train/7/img_1"] == ("train", 0)
    assert by_id["test/Happy/img_0"] == ("test", 4)
    assert shards.read_manifest(out)["class_mapping"]["4"] == "Happiness"


@pytest.mark.slow
def test_dfew_csv_refuses_traversal(ray_session, sample_corpus, tmp_path):
    src = tmp_path / "dfew"
    shutil.copytree(sample_corpus / "aligned" / "synth_000", src / "clips" / "0001")
    shutil.copytree(sample_corpus / "aligned" / "synth_001", src / "clips" / "0002")
    (src / "split.csv").write_text("clips/0001 1\nclips/0002 5\n../outside 3\n")
    out = str(tmp_path / "out")
    summary = run_ingest(
        IngestConfig(source=str(src), out=out, layout="dfew-csv", dataset="dfew", image_size=48), progress=False
    )
    assert summary["units"] == 2
    manifest = shards.read_manifest(out)
    refused = [f for f in manifest["failures"] if f["status"] == "refused"]
    assert len(refused) == 1 and "outside" in refused[0]["input"]
    rows = _read_rows(out)
    # DFEW 1 = Happiness (ABAW8 4), 5 = Surprise (ABAW8 6): one label per clip.
    assert dict(zip(rows.video_id, rows.clip_label)) == {"clips/0001": 4, "clips/0002": 6}


@pytest.mark.slow
def test_job_script_help_and_bad_source(tmp_path):
    script = REPO_ROOT / "jobs" / "ingest.py"
    help_text = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--layout" in help_text and "aligned-frames" in help_text
    missing = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "nope"), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert missing.returncode != 0
    assert "nope" in missing.stderr and "not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# Config: YAML, --set and flags through one loader (no Ray)
# ---------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ingest.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def ingest_yaml(tmp_path):
    path = tmp_path / "ingest.yaml"
    path.write_text("source: corpus/aligned\nout: shards\nlayout: aligned-frames\nimage_size: 64\nmin_face_size: 30\n")
    return str(path)


def test_yaml_and_set_reach_fields_without_a_flag(ingest_yaml, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _args("--config", ingest_yaml, "--set", "min_face_score=0.8", "--set", "jpeg_quality=75")
    config = ingest.config_from_args(args)
    assert (config.min_face_score, config.jpeg_quality, config.min_face_size) == (0.8, 75, 30)
    assert (config.layout, config.image_size) == ("aligned-frames", 64)
    assert config.segment_length == IngestConfig.segment_length
    # SOURCE and OUT came from the YAML; relative locations are made absolute on the driver.
    assert (config.source, config.out) == (str(tmp_path / "corpus" / "aligned"), str(tmp_path / "shards"))
    assert config.annotations is None


def test_flags_win_over_yaml_and_set(ingest_yaml, tmp_path):
    args = _args(str(tmp_path / "src"), "s3://bucket/shards", "--config", ingest_yaml, "--set", "image_size=96",
                 "--image-size", "112", "--layout", "videos", "--all-faces")  # fmt: skip
    config = ingest.config_from_args(args)
    assert (config.source, config.out) == (str(tmp_path / "src"), "s3://bucket/shards")  # a URI stays as it is
    assert (config.image_size, config.layout, config.all_faces) == (112, "videos", True)
    assert config.min_face_size == 30  # what no flag names keeps the YAML's value
    # Flags left out keep the dataclass defaults, which live in IngestConfig alone.
    plain = ingest.config_from_args(_args("src", "out"))
    assert config_lib.config_to_dict(plain) == config_lib.config_to_dict(
        config_lib.resolve_locations(IngestConfig(source="src", out="out"))
    )


def test_unknown_set_key_and_missing_source_name_the_key(ingest_yaml):
    with pytest.raises(ConfigError, match="unknown key: min_face_scor.*did you mean min_face_score"):
        ingest.config_from_args(_args("--config", ingest_yaml, "--set", "min_face_scor=0.8"))
    with pytest.raises(ConfigError, match="missing required value: out"):
        ingest.config_from_args(_args("only-source"))
    with pytest.raises(ConfigError, match="jpeg_quality: expected int"):
        ingest.config_from_args(_args("a", "b", "--set", "jpeg_quality=high"))


def test_main_prints_the_resolved_config_before_it_fails(tmp_path, capsys):
    with pytest.raises(SourceError, match="nope"):
        ingest.main(_args(str(tmp_path / "nope"), str(tmp_path / "out"), "--set", "min_face_score=0.7"))
    printed = capsys.readouterr().out
    assert printed.startswith("resolved config:") and "min_face_score: 0.7" in printed
    assert not (tmp_path / "out").exists()


def test_detecting_whole_frames_every_4th_frame_ingests_the_same_faces(ray_session, real_video, tmp_path):
    """--detect-every 4 (near the key frames' faces between them) writes the faces every frame's detection writes."""
    (tmp_path / "videos").mkdir()
    shutil.copy(real_video, tmp_path / "videos" / "clip.mp4")
    faces = {}
    for every in (1, 4):
        out = str(tmp_path / f"every-{every}")
        config = IngestConfig(source=str(tmp_path / "videos"), out=out, image_size=64, detect_max_side=320,
                              detect_every=every)  # fmt: skip
        assert run_ingest(config, progress=False)["failed"] == 0
        assert shards.read_manifest(out)["detection"]["detect_every"] == every
        rows = _read_rows(out)
        faces[every] = (
            np.concatenate(rows.frame_index.to_list()),
            np.stack([decode_jpeg(j) for images in rows.images for j in images]).astype(np.float32),
        )
    (frames_1, crops_1), (frames_4, crops_4) = faces[1], faces[4]
    assert list(frames_1) == list(frames_4) == list(range(72))
    # The same detections (boxes within 1e-3 px, tests/test_label.py): crops differ by JPEG noise at most.
    assert np.abs(crops_1 - crops_4).mean() < 1.0
