"""Ray Data loaders: windows stay inside segments, labels follow frames, splits are clean.

The shards are made here: 4 videos x 2 segments of 7–40 frames, 32x32 JPEGs whose
pixels encode where they came from (top half: frame index; bottom-left quadrant:
video number; bottom-right quadrant: black, so a horizontal flip shows), so every
check reads the answer back from the decoded, sampled pixels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading

import numpy as np
import pytest
import torch

from affectray.data import loaders, shards
from affectray.data.loaders import (
    DataConfig,
    LoaderError,
    build_dataset,
    class_counts,
    count_samples,
    iter_eval_batches,
    iter_train_batches,
    stable_video_hash,
    to_model_input,
    window_positions,
)
from affectray.faces.jpeg import encode_jpeg

# (first segment length, second segment length) per video; 7 is shorter than the span.
SEGMENT_LENGTHS = [(20, 40), (33, 7), (25, 30), (40, 22)]
GAP = 4  # frames lost between a video's two segments: a window crossing them shows a jump
SPLITS = ["train", "train", "train", "test"]
CLIP_LABELS = [2, -1, 5, 1]
SIZE = 32
# Small clips keep the suite fast: 4 frames, 3 apart -> a span of 10 frames.
BASE = dict(num_frames=4, frame_stride=3, image_size=SIZE, color_jitter=0.0, segments_per_batch=2)


def video_id(v: int) -> str:
    return f"clipvid_{v}"


def frame_label(v: int, f: int) -> int:
    """Expression label of frame f of video v; every 7th frame is unlabelled."""
    return -1 if f % 7 == 3 else (f // 5 + v) % 8


def frame_image(v: int, f: int) -> np.ndarray:
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    image[: SIZE // 2] = 5 + 3 * f
    image[SIZE // 2 :, : SIZE // 2] = 40 + 50 * v
    return image


def read_code(image: np.ndarray) -> tuple[int, int, bool]:
    """(video number, frame index, flipped) from an unaugmented (or only flipped) output image."""
    top = float(image[: SIZE // 2].mean())
    left = float(image[SIZE // 2 :, : SIZE // 2].mean())
    right = float(image[SIZE // 2 :, SIZE // 2 :].mean())
    flipped = right > left
    return round((max(left, right) - 40) / 50), round((top - 5) / 3), flipped


def segment_frames(v: int) -> list[list[int]]:
    first, second = SEGMENT_LENGTHS[v]
    return [list(range(first)), list(range(first + GAP, first + GAP + second))]


def all_frames(videos=range(4)) -> dict[tuple[str, int], int]:
    """(video_id, frame index) -> label of every frame in the corpus."""
    return {(video_id(v), f): frame_label(v, f) for v in videos for seg in segment_frames(v) for f in seg}


def write_corpus(root: str) -> str:
    """One shard per video, like ingest's one work unit per video."""
    for v in range(4):
        segments = [
            shards.Segment(
                video_id=video_id(v),
                track_id=0,
                frame_index=frames,
                pts_seconds=[f / 25 for f in frames],
                images=[encode_jpeg(frame_image(v, f)) for f in frames],
                labels=[frame_label(v, f) for f in frames],
                clip_label=CLIP_LABELS[v],
            )
            for frames in segment_frames(v)
        ]
        table = shards.segments_to_table(segments, dataset="unit", split=SPLITS[v], source=f"v{v}.mp4")
        shards.write_shard(root, f"video{v}", table)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_corpus(str(tmp_path_factory.mktemp("loader_shards")))


def rows(ds) -> list[dict]:
    return list(ds.iter_rows())


def decode_clip(video: np.ndarray) -> list[tuple[int, int, bool]]:
    return [read_code(frame) for frame in video]


# --------------------------------------------------------------------------- no Ray


def test_stable_video_hash_is_sha1_based_and_spread():
    value = stable_video_hash("vid_001")
    assert value == int.from_bytes(hashlib.sha1(b"vid_001").digest()[:8], "big") / 2**64
    values = np.array([stable_video_hash(f"v{i}") for i in range(2000)])
    assert ((values >= 0) & (values < 1)).all()
    assert 0.45 < (values < 0.5).mean() < 0.55  # a fraction of videos, not all or none


def test_window_positions_train_eval_short_and_dense():
    cfg = DataConfig(root="x", num_frames=4, frame_stride=3, clips_per_segment=3, label="none")
    rng = np.random.default_rng(0)
    train = window_positions(30, None, cfg, train=True, rng=rng)
    assert train.shape == (3, 4) and (np.diff(train, axis=1) == 3).all() and train.max() < 30
    assert len(set(train[:, 0].tolist())) == 3  # drawn without replacement
    starts = {tuple(window_positions(30, None, cfg, train=True, rng=np.random.default_rng(s))[:, 0]) for s in range(5)}
    assert len(starts) > 1  # random starts
    # Eval: centres of 3 equal bins of the 21 possible starts, the same every time.
    assert window_positions(30, None, cfg, train=False, rng=None)[:, 0].tolist() == [3, 10, 17]
    # Shorter than the span (10): one window from the start, the last frame repeated.
    assert window_positions(7, None, cfg, train=False, rng=None).tolist() == [[0, 3, 6, 6]]
    assert window_positions(7, None, dataclasses.replace(cfg, min_frames=8), train=False, rng=None).shape == (0, 4)
    # Dense: a window centred on every frame, clamped at the edges.
    dense = window_positions(12, None, dataclasses.replace(cfg, clips_per_segment=0), train=False, rng=None)
    assert dense[:, 2].tolist() == list(range(12)) and dense[0].tolist() == [0, 0, 0, 3]
    # Centre labels: only windows whose centre frame is labelled.
    labels = np.full(30, -1)
    labels[[13, 20]] = 1
    kept = window_positions(
        30, labels, dataclasses.replace(cfg, label="center", clips_per_segment=5), train=False, rng=None
    )
    assert sorted(kept[:, 2].tolist()) == [13, 20]


def test_config_mistakes_are_reported(corpus):
    with pytest.raises(LoaderError, match="data.label"):
        build_dataset(DataConfig(root=corpus, mode="frame", label="frames"), train=True)
    with pytest.raises(LoaderError, match="val_fraction"):
        build_dataset(DataConfig(root=corpus), train=False, holdout=True)
    with pytest.raises(LoaderError, match="no shards"):
        build_dataset(DataConfig(root=corpus + "/nothing"), train=False)


def test_to_model_input_layout_and_normalisation():
    cfg = DataConfig(root="x", num_frames=2)
    video = torch.randint(0, 256, (3, 2, 5, 6, 3), dtype=torch.uint8)
    x = to_model_input({"video": video}, cfg, "cpu", torch.float32)
    assert x.shape == (3, 3, 2, 5, 6) and x.dtype == torch.float32 and x.is_contiguous()
    for c in range(3):
        expected = (video[..., c].float() / 255 - cfg.mean[c]) / cfg.std[c]
        torch.testing.assert_close(x[:, c], expected)
    image = torch.full((4, 7, 7, 3), 255, dtype=torch.uint8)
    y = to_model_input({"image": image}, dataclasses.replace(cfg, mode="frame"), "cpu", torch.bfloat16)
    assert y.shape == (4, 3, 7, 7) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y[:, 0].float(), torch.full((4, 7, 7), (1 - 0.485) / 0.229), atol=2e-2, rtol=0)


def test_class_counts_and_sample_counts_from_label_columns(corpus):
    frames = all_frames()
    expected = np.bincount([lab for lab in frames.values() if lab >= 0], minlength=8)
    np.testing.assert_array_equal(class_counts(DataConfig(root=corpus, label="center")), expected)
    clip = class_counts(DataConfig(root=corpus, label="clip"), num_classes=6)
    assert clip.tolist() == [0, 2, 2, 0, 0, 2]  # two segments per labelled video; video 1 has none
    frame_cfg = DataConfig(root=corpus, mode="frame", label="center")
    assert count_samples(frame_cfg) == sum(lab >= 0 for lab in frames.values())
    assert count_samples(dataclasses.replace(frame_cfg, skip_unlabelled=False)) == len(frames)


# --------------------------------------------------------------------------- on Ray


def check_clips(samples: list[dict], cfg: DataConfig) -> None:
    """Every clip: one video, one segment, frames at the stride, centre label and index right."""
    T = cfg.num_frames
    for row in samples:
        codes = decode_clip(row["video"])
        videos = {v for v, _, _ in codes}
        assert len(videos) == 1 and video_id(videos.pop()) == row["video_id"]
        v = int(row["video_id"].rsplit("_", 1)[1])
        found = [f for _, f, _ in codes]
        segment = next(seg for seg in segment_frames(v) if found[0] in seg)
        assert set(found) <= set(segment), f"clip {found} leaves its segment"
        steps = np.diff(found)
        # At the stride, or 0 where a short segment repeats its last frame.
        assert all(s == cfg.frame_stride or (s == 0 and f == segment[-1]) for s, f in zip(steps, found[1:]))
        assert row["frame_index"] == found[T // 2]
        if cfg.label == "center":
            assert row["label"] == frame_label(v, found[T // 2]) >= 0


def test_clip_windows_stay_in_their_segment(ray_session, corpus):
    cfg = DataConfig(root=corpus, clips_per_segment=3, **BASE)
    # Full-frame crops without flips, so training clips can be read back too.
    no_aug = dataclasses.replace(cfg, hflip=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for train in (False, True):
        samples = rows(build_dataset(no_aug, train=train))
        check_clips(samples, cfg)
        assert len(samples) == count_samples(cfg, train=train)
        # The 7-frame segment (shorter than the 10-frame span) appears, padded.
        assert any(r["video_id"] == video_id(1) and r["frame_index"] >= 33 + GAP for r in samples)
        if not train:
            first = sorted((r["video_id"], r["frame_index"]) for r in samples)
    # Evaluation windows are deterministic: a new pass takes the same ones.
    assert first == sorted((r["video_id"], r["frame_index"]) for r in rows(build_dataset(cfg, train=False)))


def test_clips_from_s3_shards(ray_session, corpus, s3_bucket):
    root = write_corpus(f"{s3_bucket}/corpus")
    cfg = DataConfig(root=root, **BASE)
    samples = rows(build_dataset(cfg, train=False))
    check_clips(samples, cfg)
    assert {r["video_id"] for r in samples} == {video_id(v) for v in range(4)}
    assert len(samples) == count_samples(cfg) == 8  # one clip per segment
    np.testing.assert_array_equal(class_counts(cfg), class_counts(dataclasses.replace(cfg, root=corpus)))


def test_label_kinds_per_frame_vectors_and_clip_labels(ray_session, corpus):
    cfg = DataConfig(root=corpus, label="frames", clips_per_segment=2, **BASE)
    samples = rows(build_dataset(cfg, train=False))
    assert samples and all(r["labels"].shape == (4,) for r in samples)
    for r in samples:
        v = int(r["video_id"].rsplit("_", 1)[1])
        frames = [f for _, f, _ in decode_clip(r["video"])]
        assert r["labels"].tolist() == [frame_label(v, f) for f in frames]
    clip = rows(build_dataset(dataclasses.replace(cfg, label="clip"), train=False))
    assert {r["video_id"] for r in clip} == {video_id(v) for v in (0, 2, 3)}  # video 1 has no clip label
    assert all(r["label"] == CLIP_LABELS[int(r["video_id"][-1])] for r in clip)


def test_frame_mode_yields_each_labelled_frame_once(ray_session, corpus):
    cfg = DataConfig(root=corpus, mode="frame", **BASE)
    samples = rows(build_dataset(cfg, train=False))
    seen = [(r["video_id"], r["frame_index"]) for r in samples]
    labelled = {k: lab for k, lab in all_frames().items() if lab >= 0}
    assert len(seen) == len(set(seen)) and set(seen) == set(labelled)
    for r in samples:
        v, f, _ = read_code(r["image"])
        assert (video_id(v), f) == (r["video_id"], r["frame_index"]) and r["label"] == labelled[(r["video_id"], f)]
    everything = rows(build_dataset(dataclasses.replace(cfg, skip_unlabelled=False), train=True))
    assert sorted((r["video_id"], r["frame_index"]) for r in everything) == sorted(all_frames())
    assert any(r["label"] == -1 for r in everything)


def test_holdout_and_training_videos_partition_the_corpus(ray_session, corpus):
    cfg = DataConfig(root=corpus, mode="frame", label="none", val_fraction=0.5, **BASE)
    held_ids = {video_id(v) for v in range(4) if stable_video_hash(video_id(v)) < 0.5}
    assert 0 < len(held_ids) < 4, "the test corpus must have videos on both sides"
    held = [(r["video_id"], r["frame_index"]) for r in rows(build_dataset(cfg, train=False, holdout=True))]
    rest = [(r["video_id"], r["frame_index"]) for r in rows(build_dataset(cfg, train=True))]
    assert {v for v, _ in held} == held_ids
    assert not {v for v, _ in held} & {v for v, _ in rest}
    assert sorted(held + rest) == sorted(all_frames())


def test_split_filter(ray_session, corpus):
    cfg = DataConfig(root=corpus, mode="frame", split="test", **BASE)
    samples = rows(build_dataset(cfg, train=False))
    assert {r["video_id"] for r in samples} == {video_id(3)}
    assert len(samples) == sum(lab >= 0 for lab in all_frames([3]).values()) == count_samples(cfg)
    assert class_counts(cfg).sum() == len(samples)


def test_augmentation_is_per_clip_reproducible_and_changes_each_epoch(ray_session, corpus):
    # Full-frame crops and no jitter: only the flip changes pixels, so it can be read back.
    flip_cfg = DataConfig(root=corpus, label="none", clips_per_segment=4, scale=(1.0, 1.0), ratio=(1.0, 1.0), **BASE)
    states = [{flipped for _, _, flipped in decode_clip(r["video"])} for r in rows(build_dataset(flip_cfg, train=True))]
    assert all(len(s) == 1 for s in states), "a clip mixes flipped and unflipped frames"
    assert {True, False} == {s.pop() for s in states}

    cfg = DataConfig(root=corpus, label="none", **{**BASE, "color_jitter": 0.3})

    def fingerprints(ds) -> dict[tuple[str, int], str]:
        return {(r["video_id"], r["frame_index"]): hashlib.sha1(r["video"].tobytes()).hexdigest() for r in rows(ds)}

    ds = build_dataset(cfg, train=True)
    epoch0, epoch1 = fingerprints(ds), fingerprints(ds)
    assert len(epoch0) == count_samples(cfg, train=True) == 8  # one clip per segment
    assert epoch0 != epoch1
    assert fingerprints(build_dataset(cfg, train=True)) == epoch0  # same seed, same first pass
    assert fingerprints(build_dataset(dataclasses.replace(cfg, seed=1), train=True)) != epoch0


def test_worker_augmentation_leaves_the_data_tasks_decode_and_resize(ray_session, corpus):
    """augment_on worker: training rows are the evaluation rows; the batch iterator crops and flips them."""
    strong = {**BASE, "color_jitter": 0.3, "scale": (0.3, 0.5)}
    cfg = DataConfig(root=corpus, mode="frame", augment_on="worker", **strong)

    def images(ds) -> dict[tuple[str, int], bytes]:
        return {(r["video_id"], r["frame_index"]): r["image"].tobytes() for r in rows(ds)}

    assert images(build_dataset(cfg, train=True)) == images(build_dataset(cfg, train=False))
    mirrored = dataclasses.replace(cfg, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0, color_jitter=0.0)
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    codes = []
    for inputs, targets in iter_train_batches(build_dataset(mirrored, train=True), mirrored, 8, epoch=0, device="cpu"):
        assert inputs.shape == (8, 3, SIZE, SIZE) and inputs.dtype == torch.float32
        pixels = ((inputs * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        codes += [(*read_code(image), int(y)) for image, y in zip(pixels, targets)]
    assert codes and all(flipped for _, _, flipped, _ in codes)
    assert all(frame_label(v, f) == y for v, f, _, y in codes)  # pixels and labels stay together


def test_caches_replay_the_first_pass(ray_session, corpus):
    """data.cache replays training's decoded faces (blocks reordered); a validation cache, its batches."""
    cfg = DataConfig(root=corpus, mode="frame", augment_on="worker", cache=True, **BASE)
    cached = build_dataset(cfg, train=True)  # the first pass runs here
    first, second = rows(cached), rows(cached)
    key = lambda r: (r["video_id"], r["frame_index"])  # noqa: E731
    evaluation = rows(build_dataset(cfg, train=False))
    assert sorted(map(key, first)) == sorted(map(key, second)) == sorted(map(key, evaluation))
    assert {key(r): r["image"].tobytes() for r in first} == {key(r): r["image"].tobytes() for r in second}
    for wrong in (dict(augment_on="data"), dict(mode="clip")):
        with pytest.raises(LoaderError, match="data.cache"):
            build_dataset(dataclasses.replace(cfg, **wrong), train=True)

    cache: list = []
    once = list(iter_eval_batches(build_dataset(cfg, train=False), cfg, batch_size=16, device="cpu", cache=cache))
    assert len(cache) == len(once) > 1
    again = list(iter_eval_batches(None, cfg, batch_size=16, device="cpu", cache=cache))  # no dataset: memory only
    assert len(again) == len(once)
    for (x1, y1, m1), (x2, y2, m2) in zip(once, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and m1["video_id"] == m2["video_id"]


def test_streaming_split_and_batch_iterators(ray_session, corpus):
    import ray.data

    cfg = DataConfig(root=corpus, mode="frame", **BASE)
    # The tiny corpus would fit one 128 MiB block, which one rank would take whole;
    # real shards give many blocks, as this smaller block size does here.
    context = ray.data.DataContext.get_current()
    previous, context.target_max_block_size = context.target_max_block_size, 32 * 1024
    try:
        left, right = build_dataset(cfg, train=False).streaming_split(2)
    finally:
        context.target_max_block_size = previous
    seen: dict[int, list] = {}

    def consume(rank, iterator):
        seen[rank] = []
        for inputs, targets, meta in iter_eval_batches(iterator, cfg, batch_size=16, device="cpu"):
            assert inputs.shape[1:] == (3, SIZE, SIZE) and inputs.dtype == torch.float32
            assert len(targets) == len(meta["video_id"]) == len(inputs)
            seen[rank] += zip(meta["video_id"], meta["frame_index"].tolist(), targets.tolist())

    threads = [threading.Thread(target=consume, args=(rank, it)) for rank, it in enumerate((left, right))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert seen[0] and seen[1], "both ranks must get data"
    together = seen[0] + seen[1]
    labelled = {k: lab for k, lab in all_frames().items() if lab >= 0}
    assert len(together) == len(labelled) and {(v, f): y for v, f, y in together} == labelled

    clip_cfg = DataConfig(root=corpus, label="center", clips_per_segment=2, **BASE)
    total = count_samples(clip_cfg, train=True)
    batches = list(
        iter_train_batches(build_dataset(clip_cfg, train=True), clip_cfg, batch_size=4, epoch=0, device="cpu")
    )
    assert len(batches) == total // 4  # the incomplete last batch is dropped
    inputs, targets = batches[0]
    assert inputs.shape == (4, 3, 4, SIZE, SIZE) and targets.dtype == torch.int64 and (targets >= 0).all()


def test_shards_are_checked_against_the_manifest_before_they_are_read(tmp_path):
    """A shard whose bytes differ from what ingest recorded is refused by name; hand-made roots pass."""
    root = write_corpus(str(tmp_path / "corpus"))
    cfg = DataConfig(root=root, **BASE)
    assert len(loaders._shard_paths(cfg)[1]) == 4  # no manifest: written by hand, not checked

    record = []
    for uri in shards.list_shards(root):
        data = open(uri, "rb").read()
        name = f"{shards.SHARDS_DIR}/{uri.rsplit('/', 1)[-1]}"
        record.append({"file": name, "rows": 2, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    (tmp_path / "corpus" / shards.MANIFEST_NAME).write_text(json.dumps({"shards": record}))
    assert len(loaders._shard_paths(dataclasses.replace(cfg, verify="sha256"))[1]) == 4

    victim = tmp_path / "corpus" / "shards" / "video2.parquet"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF  # same size, one byte flipped: only the checksum sees it
    victim.write_bytes(bytes(data))
    assert len(loaders._shard_paths(cfg)[1]) == 4
    with pytest.raises(shards.ShardIntegrityError, match="video2.parquet.*sha256"):
        loaders._shard_paths(dataclasses.replace(cfg, verify="sha256"))

    victim.write_bytes(bytes(data[:-10]))  # truncated
    with pytest.raises(shards.ShardIntegrityError, match="video2.parquet.*bytes"):
        loaders._shard_paths(cfg)

    (tmp_path / "corpus" / "shards" / "stray.parquet").write_bytes(b"x")
    victim.write_bytes(bytes(data[:-10]) + bytes(10))
    with pytest.raises(shards.ShardIntegrityError, match="stray.parquet.*not in"):
        loaders._shard_paths(cfg)
