"""The built-in sample corpus: determinism, Aff-Wild2 layout, decodable videos, real faces MTCNN finds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from affectray.sample.synth import (
    EXPR_CLASSES,
    EXPR_HEADER,
    SEGMENT_FRAMES,
    Pose,
    SampleCorpusError,
    SynthConfig,
    draw_face,
    expression_track,
    render_face,
    sample_style,
    write_sample_corpus,
)

# Small enough to write in well under a second, big enough to hold every kind of file.
TINY = SynthConfig(num_videos=3, frames_per_video=16, image_size=48, num_real_videos=1, real_video_frames=6)


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read_annotation(path: Path) -> tuple[str, list[int]]:
    header, *rows = path.read_text(encoding="utf-8").splitlines()
    return header, [int(r) for r in rows]


def _read_video(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = _digests(Path(write_sample_corpus(tmp_path / "a", TINY)["root"]))
    b = _digests(Path(write_sample_corpus(tmp_path / "b", TINY)["root"]))
    c = _digests(Path(write_sample_corpus(tmp_path / "c", SynthConfig(**{**TINY.__dict__, "seed": 1}))["root"]))

    assert a == b
    assert set(a) == set(c)  # same layout, but every image and video is new
    media = [name for name in a if name.endswith((".jpg", ".mp4"))]
    assert len(media) == TINY.num_videos * TINY.frames_per_video + TINY.num_real_videos + 1
    assert all(a[name] != c[name] for name in media)


def test_adding_videos_leaves_earlier_videos_unchanged(tmp_path):
    small = SynthConfig(**{**TINY.__dict__, "num_videos": 2, "num_real_videos": 0, "no_face_video": False})
    large = SynthConfig(**{**small.__dict__, "num_videos": 4})
    a = _digests(Path(write_sample_corpus(tmp_path / "a", small)["root"]))
    b = _digests(Path(write_sample_corpus(tmp_path / "b", large)["root"]))

    first = {k: v for k, v in a.items() if k.startswith(("aligned/synth_000/", "annotations/synth_000."))}
    assert len(first) == small.frames_per_video + 1
    assert all(b[k] == v for k, v in first.items())


# --------------------------------------------------------------------------- layout and annotations


def test_layout_and_annotations_follow_affwild2(sample_corpus):
    config = SynthConfig(seed=0)
    aligned = sorted(p.name for p in (sample_corpus / "aligned").iterdir())
    assert len(aligned) == config.num_videos
    assert "synth_000" in aligned
    # One id exercises quoting and encoding of paths downstream.
    assert any(" " in v and not v.isascii() for v in aligned)

    seen: set[int] = set()
    for video_id in aligned:
        frames = sorted((sample_corpus / "aligned" / video_id).iterdir())
        assert [f.name for f in frames] == [f"{i:05d}.jpg" for i in range(1, config.frames_per_video + 1)]
        header, labels = _read_annotation(sample_corpus / "annotations" / f"{video_id}.txt")
        assert header == EXPR_HEADER == "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
        assert len(labels) == len(frames)
        assert set(labels) <= set(range(-1, 8))
        seen |= set(labels)
    assert seen == set(range(-1, 8)), "every class and some unlabelled frames must appear"


def test_summary_matches_the_files(sample_corpus):
    record = json.loads((sample_corpus / "synth.json").read_text(encoding="utf-8"))
    assert record["config"]["seed"] == 0
    summary = record["summary"]

    histogram = dict.fromkeys((*EXPR_CLASSES, "unlabelled"), 0)
    for entry in summary["aligned"]:
        _, labels = _read_annotation(sample_corpus / entry["annotation"])
        for v in labels:
            histogram["unlabelled" if v == -1 else EXPR_CLASSES[v]] += 1
        assert len(list((sample_corpus / entry["frames_dir"]).glob("*.jpg"))) == entry["frames"]
    assert summary["label_histogram"] == histogram
    assert summary["num_frames"] == sum(histogram.values()) == 6 * 48
    assert (sample_corpus / "README.txt").read_text(encoding="utf-8").strip()


def test_frames_decode_at_the_configured_size(sample_corpus):
    paths = sorted((sample_corpus / "aligned").rglob("*.jpg"))
    assert len(paths) == 6 * 48
    for path in paths:
        image = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape == (112, 112, 3), path


def test_ingest_reads_the_annotations_as_written(sample_corpus):
    from affectray.ingest.annotations import parse_expr_annotation

    paths = sorted((sample_corpus / "annotations").glob("*.txt"))
    assert len(paths) == 6
    for path in paths:
        parsed = parse_expr_annotation(path.read_text(encoding="utf-8"), source=str(path))
        assert parsed.tolist() == _read_annotation(path)[1], path


@pytest.mark.parametrize("seed", range(4))
def test_four_videos_cover_every_class_for_any_seed(tmp_path, seed):
    config = SynthConfig(seed=seed, num_videos=4, image_size=16, num_real_videos=0, no_face_video=False)
    root = Path(write_sample_corpus(tmp_path, config)["root"])
    labels = set()
    for path in (root / "annotations").glob("*.txt"):
        labels |= set(_read_annotation(path)[1])
    assert labels - {-1} == set(range(len(EXPR_CLASSES)))


@pytest.mark.parametrize("num_frames", [37, 48, 100])
def test_expression_track_is_piecewise_constant_and_cycles(num_frames):
    low, high = SEGMENT_FRAMES
    for seed in range(20):
        labels, annotated = expression_track(num_frames, 6, 0.05, np.random.default_rng(seed))
        change = np.flatnonzero(np.diff(labels)) + 1
        lengths = np.diff(np.concatenate([[0], change, [num_frames]]))
        # No sliver segments: an unlabelled run could hide a whole one and lose its class.
        assert lengths.min() >= low and lengths.max() < low + high, (seed, lengths)
        segment_classes = labels[np.concatenate([[0], change])]
        assert list(segment_classes) == [(6 + i) % 8 for i in range(len(segment_classes))]
        hidden = np.flatnonzero(annotated == -1)
        assert len(hidden) == round(0.05 * num_frames) and np.all(np.diff(hidden) == 1)  # one contiguous run
        assert np.array_equal(annotated[annotated != -1], labels[annotated != -1])


# --------------------------------------------------------------------------- rewriting a directory


def test_rewrite_replaces_an_earlier_corpus_and_refuses_other_dirs(tmp_path):
    write_sample_corpus(tmp_path / "corpus", TINY)
    write_sample_corpus(tmp_path / "corpus", SynthConfig(**{**TINY.__dict__, "num_videos": 1}))
    assert len(list((tmp_path / "corpus" / "aligned").iterdir())) == 1  # no stale videos left

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SampleCorpusError, match="not empty"):
        write_sample_corpus(tmp_path / "other", TINY)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_cli_verb_writes_a_corpus_and_urls_are_refused(tmp_path):
    import argparse

    from affectray.sample import synth

    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "out"), "--set", "num_videos=2", "--set", "num_real_videos=0"])
    summary = synth.main(args)
    assert summary["num_videos"] == 2 and summary["videos"] == ["videos/no_face.mp4"]
    assert len(list((tmp_path / "out" / "aligned").iterdir())) == 2
    with pytest.raises(SampleCorpusError, match="local directory"):
        write_sample_corpus("s3://bucket/corpus", TINY)


# --------------------------------------------------------------------------- drawn faces


def test_draw_face_is_deterministic_and_the_right_shape():
    a = draw_face(3, np.random.default_rng(0), 64)
    b = draw_face(3, np.random.default_rng(0), 64)
    c = draw_face(3, np.random.default_rng(1), 64)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="label"):
        draw_face(8, np.random.default_rng(0), 64)


def test_every_pair_of_expressions_looks_different_at_32px():
    """Same identity, pose and noise: only the expression differs, and it must show at 32 px."""
    style = sample_style(np.random.default_rng(3))
    images = [
        cv2.resize(render_face(k, style, Pose(), 112, np.random.default_rng(0)), (32, 32), interpolation=cv2.INTER_AREA)
        for k in range(len(EXPR_CLASSES))
    ]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            diff = np.abs(images[i].astype(int) - images[j].astype(int))
            # At least 10 pixels change clearly: a whole feature, not a shade.
            assert (diff.max(axis=2) > 40).sum() >= 10, (EXPR_CLASSES[i], EXPR_CLASSES[j])


# --------------------------------------------------------------------------- videos


def test_videos_decode_with_the_configured_frames(sample_corpus):
    config = SynthConfig(seed=0)
    names = sorted(p.name for p in (sample_corpus / "videos").glob("*.mp4"))
    assert names == ["astronaut_000.mp4", "astronaut_001.mp4", "no_face.mp4"]
    for name in names:
        frames = _read_video(sample_corpus / "videos" / name)
        assert len(frames) == config.real_video_frames, name
        assert frames[0].shape == (config.real_video_size[1], config.real_video_size[0], 3)
        # Moving, not a still: consecutive frames differ.
        assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 2.0, name


def _face_probs(mtcnn, frame_bgr: np.ndarray) -> list[float]:
    # facenet-pytorch on numpy 2 returns (None, array([None], dtype=object)) for no face.
    boxes, probs = mtcnn.detect(np.ascontiguousarray(frame_bgr[:, :, ::-1]))
    if boxes is None:
        return []
    return [float(p) for p in np.atleast_1d(probs) if p is not None]


def test_mtcnn_finds_the_real_face_and_nothing_in_no_face(sample_corpus):
    from facenet_pytorch import MTCNN

    mtcnn = MTCNN(keep_all=True, device="cpu")
    for name in ("astronaut_000.mp4", "astronaut_001.mp4"):
        frames = _read_video(sample_corpus / "videos" / name)
        for i in (0, len(frames) // 2, len(frames) - 1):
            probs = _face_probs(mtcnn, frames[i])
            assert len(probs) == 1 and probs[0] > 0.9, (name, i, probs)
    frames = _read_video(sample_corpus / "videos" / "no_face.mp4")
    for i in range(0, len(frames), 6):
        assert all(p < 0.9 for p in _face_probs(mtcnn, frames[i])), i
