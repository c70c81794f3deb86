"""Ray Data pipelines from segment shards to training batches (clips or frames).

The CPU side runs as Ray Data tasks and ships uint8 pixels; the float
conversion and normalisation happen on the training worker (on its GPU when
there is one), so the object store and the network carry 4x fewer bytes::

    ds = build_dataset(cfg, train=True)                  # driver: read → select → sample/decode/augment
    trainer = TorchTrainer(loop, datasets={"train": ds}, ...)

    # inside train_loop_per_worker, once per epoch:
    shard = ray.train.get_dataset_shard("train")
    for inputs, targets in iter_train_batches(shard, cfg, batch_size, epoch, device):
        ...                                              # inputs [B, C, T, H, W] or [B, C, H, W]

With ``cfg.va`` every batch tuple gains a last element, the valence/arousal targets
of the frame the expression target comes from (the centre frame): float32 [B, 2],
NaN where that frame has no annotation. Without it the tuples are as above.

Pipeline (each step is one module-level function, fused by Ray into one task
per Parquet file): ``read_parquet`` (needed columns only, file order shuffled
for training) → :func:`select_segments` (split and held-out videos) →
:func:`sample_clips` or :func:`sample_frames` (windows inside a segment, JPEG
decode, one augmentation per clip). With ``augment_on: worker`` the tasks only
decode and resize, and :func:`iter_train_batches` augments each batch on the
worker instead (:mod:`affectray.data.augment`).

Windows never leave their segment, so a clip never mixes videos or tracks.
Held-out videos are chosen by :func:`stable_video_hash`, so every frame of a
video lands on the same side and the partition is the same in every process,
run and seed.

Randomness and what is reproducible: every segment gets its own numpy
Generator seeded from ``(cfg.seed, epoch salt, sha1(video_id, track_id, first
frame index))``. The epoch salt is Ray Data's execution index of the Dataset
(the counter ``FileShuffleConfig(reseed_after_execution=True)`` uses for the
file order): 0 on its first pass, then 1, 2, … for each later pass of the same
Dataset object. Hence, for a given seed and config, the windows and
augmentations of pass k are the same for every segment whatever the batching,
task placement or number of workers, and passes differ from each other. What
is *not* reproducible is the order in which samples arrive: tasks finish in
parallel, and the local shuffle buffer (seeded with ``cfg.seed + epoch``) mixes
whatever has arrived. Evaluation (train=False) has no randomness at all.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from affectray import storage
from affectray.checkpoints import Preprocessing
from affectray.config import location
from affectray.data import shards
from affectray.data.pixels import normalise_pixels
from affectray.errors import AffectrayError
from affectray.faces.jpeg import decode_jpeg

if TYPE_CHECKING:
    import ray.data
    import torch

__all__ = [
    "DataConfig",
    "LoaderError",
    "build_dataset",
    "class_counts",
    "count_samples",
    "iter_eval_batches",
    "iter_train_batches",
    "sample_clips",
    "sample_frames",
    "select_segments",
    "stable_video_hash",
    "to_model_input",
    "window_positions",
]


class LoaderError(AffectrayError, ValueError):
    """A data config or shard root that cannot give a dataset."""


@dataclass
class DataConfig:
    """What the training pipeline reads and how it turns segments into samples."""

    root: str = location("")  # shard root (local dir or s3:// prefix); required in practice
    mode: Literal["clip", "frame"] = "clip"  # clip = T-frame windows, frame = single frames
    num_frames: int = 16  # T (clip mode)
    frame_stride: int = 4  # temporal stride between sampled frames (clip mode)
    image_size: int = 224  # output side after crop/resize
    # Target kind: none (pretraining), the centre frame's label, the segment's clip_label,
    # or every frame's label ([T], -1 where unlabelled: use it as the loss's ignore_index).
    label: Literal["none", "center", "clip", "frames"] = "center"
    split: str | None = None  # keep only rows whose `split` column equals this
    val_fraction: float = 0.0  # hold out whole videos by a stable hash of video_id (no leakage)
    # Windows per segment per pass: random starts for training, evenly spaced for eval.
    # 0 = dense: one window centred on every frame (edges repeat the first/last frame), so
    # a window model's evaluation predicts every labelled frame exactly once.
    clips_per_segment: int = 1
    # Segments shorter than the window span are padded by repeating their last frame;
    # segments with fewer than min_frames frames are skipped.
    min_frames: int = 1
    skip_unlabelled: bool = True  # drop samples whose target is -1 (when label != none)
    # Also yield the valence/arousal of the target frame (the window's centre) as a last batch
    # element, [B, 2] float32, NaN = unannotated. With skip_unlabelled, a sample is kept when it
    # has an expression label or a valence/arousal value (VA-only corpora train too).
    va: bool = False
    scale: tuple[float, float] = (0.6, 1.0)  # random resized crop area range (train)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random resized crop aspect range (train)
    hflip: float = 0.5
    color_jitter: float = 0.3  # brightness/contrast/saturation strength, 0 = off
    # Where training samples are cropped, flipped and jittered: "data" (OpenCV, per sample, in the
    # Ray Data tasks) or "worker" (tensor ops on the batch, on the training worker's device: see
    # affectray.data.augment). "worker" leaves the data tasks decode and resize only, which frees
    # cores on a small CPU machine; the draws follow the same rules either way.
    augment_on: Literal["data", "worker"] = "data"
    # Training: decode the first pass into Ray's object store and replay it, blocks reordered, every
    # later pass (no read or decode after the first; costs N x S x S x 3 bytes of object store). Only
    # where every pass has the same samples: frame mode, augmented on the worker.
    cache: bool = False
    # Model input channels: 3 (RGB) or 1 (grey, ITU-R 601 luma as cv2 computes it, e.g. FER2013 models);
    # mean and std have one value per channel, in [0, 1] units.
    channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    # How the shards' faces were cut, written into checkpoints so label and predict cut video
    # faces the same way: "aligned" (5-point alignment, what video ingest stores) or "box"
    # (the detector's square box grown by box_margin: FER2013's and AffectNet's crops).
    crop: Literal["aligned", "box"] = "aligned"
    box_margin: float = 0.0
    seed: int = 0
    segments_per_batch: int = 8  # segments per Ray Data task call (a frame-mode segment gives many rows)
    shuffle_buffer: int = 0  # rows in each worker's local shuffle buffer; 0 = 4 x batch size
    # Shards are checked against the manifest's record before they are read: "size" compares
    # every shard's size (from the listing, free); "sha256" also hashes each one on the driver
    # (reads the corpus once more: for audits and suspect storage).
    verify: Literal["size", "sha256"] = "size"

    @property
    def span(self) -> int:
        """Frames of a segment one clip covers, first to last sampled frame."""
        return (self.num_frames - 1) * self.frame_stride + 1 if self.mode == "clip" else 1


def preprocessing_of(cfg: DataConfig) -> Preprocessing:
    """What a model trained on ``cfg``'s samples expects: the checkpoint's ``preprocessing``."""
    return Preprocessing(
        mode=cfg.mode, image_size=cfg.image_size, num_frames=cfg.num_frames if cfg.mode == "clip" else 1,
        frame_stride=cfg.frame_stride, mean=tuple(cfg.mean), std=tuple(cfg.std), channels=cfg.channels,
        crop=cfg.crop, box_margin=cfg.box_margin,
    )  # fmt: skip


def data_config_for(pre: Preprocessing, root: str) -> DataConfig:
    """A data config that feeds ``root``'s samples to a model as its checkpoint's preprocessing says."""
    return DataConfig(
        root=root, mode="clip" if pre.mode == "clip" else "frame", num_frames=pre.num_frames,
        frame_stride=pre.frame_stride, image_size=pre.image_size, channels=pre.channels, mean=pre.mean,
        std=pre.std, crop=pre.crop, box_margin=pre.box_margin, label="center",
    )  # fmt: skip


def validate(cfg: DataConfig) -> None:
    """Raise LoaderError naming the first setting that cannot work."""

    def bad(key: str, why: str) -> LoaderError:
        return LoaderError(f"data.{key}={getattr(cfg, key)!r}: {why}")

    if not cfg.root:
        raise bad("root", "a shard root (local directory or s3:// prefix) is required")
    if cfg.mode not in ("clip", "frame"):
        raise bad("mode", "use 'clip' or 'frame'")
    if cfg.label not in ("none", "center", "clip", "frames"):
        raise bad("label", "use 'none', 'center', 'clip' or 'frames'")
    if cfg.va and cfg.label not in ("center", "frames"):
        raise bad("label", "valence/arousal targets (data.va) are per frame: use label 'center' (or 'frames')")
    if cfg.mode == "frame" and cfg.label == "frames":
        raise bad("label", "per-frame label vectors need mode='clip'; frame mode labels each frame with 'center'")
    for key in ("num_frames", "frame_stride", "image_size", "min_frames", "segments_per_batch"):
        if getattr(cfg, key) < 1:
            raise bad(key, "must be at least 1")
    if cfg.clips_per_segment < 0:
        raise bad("clips_per_segment", "must be >= 0 (0 = a window centred on every frame)")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise bad("val_fraction", "must be in [0, 1)")
    if not 0.0 < cfg.scale[0] <= cfg.scale[1] <= 1.0:
        raise bad("scale", "need 0 < min <= max <= 1 (fractions of the face crop's area)")
    if not 0.0 < cfg.ratio[0] <= cfg.ratio[1]:
        raise bad("ratio", "need 0 < min <= max")
    if not 0.0 <= cfg.hflip <= 1.0:
        raise bad("hflip", "is a probability in [0, 1]")
    if not 0.0 <= cfg.color_jitter < 1.0:
        raise bad("color_jitter", "must be in [0, 1)")
    if cfg.augment_on not in ("data", "worker"):
        raise bad("augment_on", "use 'data' (in the Ray Data tasks) or 'worker' (on the training batch)")
    if cfg.cache and (cfg.mode != "frame" or cfg.augment_on != "worker"):
        raise bad("cache", "replays the first pass: needs mode 'frame' and augment_on 'worker' (else every epoch "
                  "would repeat the first one's windows and augmentation)")  # fmt: skip
    if cfg.shuffle_buffer < 0:
        raise bad("shuffle_buffer", "must be >= 0")
    if cfg.channels not in (1, 3):
        raise bad("channels", "use 3 (RGB) or 1 (grey)")
    if len(cfg.mean) != cfg.channels or len(cfg.std) != cfg.channels:
        raise LoaderError(
            f"data.mean and data.std need one value per channel ({cfg.channels}), got {cfg.mean} and {cfg.std}"
        )


# --------------------------------------------------------------------------- selection


def stable_video_hash(video_id: str) -> float:
    """A number in [0, 1) fixed by the video id alone: sha1, unlike hash(), is the same in every process."""
    digest = hashlib.sha1(video_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def select_segments(batch: pa.Table, *, split: str | None, val_fraction: float, holdout: bool) -> pa.Table:
    """Rows of the wanted split, from held-out videos (holdout) or from the others.

    A video is held out when ``stable_video_hash(video_id) < val_fraction``; with
    val_fraction 0 nothing is held out and ``holdout=False`` keeps every video.
    """
    keep = np.ones(batch.num_rows, dtype=bool)
    if split is not None:
        keep &= np.asarray(pc.equal(batch.column("split"), split).fill_null(False))
    if val_fraction > 0.0 or holdout:
        ids = batch.column("video_id").to_pylist()
        held = np.array([stable_video_hash(v) < val_fraction for v in ids], dtype=bool)
        keep &= held if holdout else ~held
    return batch.filter(pa.array(keep)) if not keep.all() else batch


# --------------------------------------------------------------------------- windows


def centred_windows(length: int, num_frames: int, frame_stride: int) -> np.ndarray:
    """The window centred on every frame of a sequence: [length, num_frames] int64 positions.

    Offsets run ``frame_stride`` apart around the centre (position num_frames // 2) and
    clamp at the sequence's ends (the first / last frame repeats). Dense evaluation over a
    segment and labelling along a face track both take their windows from here.
    """
    offsets = np.arange(num_frames, dtype=np.int64) * frame_stride
    offsets -= offsets[num_frames // 2]
    return np.clip(np.arange(length, dtype=np.int64)[:, None] + offsets, 0, max(length - 1, 0))


def window_positions(
    length: int,
    labels: np.ndarray | None,
    cfg: DataConfig,
    *,
    train: bool,
    rng: np.random.Generator | None,
    annotated: np.ndarray | None = None,
) -> np.ndarray:
    """Positions (row-local frame offsets) of the windows to take from one segment: [K, T] int64.

    Clip mode: windows of ``num_frames`` frames ``frame_stride`` apart, wholly inside the
    segment; a segment shorter than the span gives one window from its start, padded by
    repeating its last frame (as VideoMAE's loader clamps indices). Frame mode: [K, 1].

    ``labels`` (the segment's per-frame labels) restricts the candidates to windows with
    a target when ``skip_unlabelled``; None means no restriction (clip labels, pretraining).
    ``annotated`` ([length] bool: frames with a valence/arousal value) counts as a target
    too, at the window's centre.
    Training draws ``clips_per_segment`` candidates without replacement; evaluation takes
    the centres of ``clips_per_segment`` equal bins of the candidates (the middle window for
    one), so it is deterministic.
    """
    if length < cfg.min_frames or length == 0:
        return np.zeros((0, cfg.num_frames if cfg.mode == "clip" else 1), dtype=np.int64)
    offsets = np.arange(cfg.num_frames, dtype=np.int64) * cfg.frame_stride
    if cfg.mode == "frame":
        windows = np.arange(length, dtype=np.int64)[:, None]
    elif cfg.clips_per_segment == 0:  # dense: every frame is a centre; edges clamp to the segment
        windows = centred_windows(length, cfg.num_frames, cfg.frame_stride)
    else:
        starts = np.arange(max(length - cfg.span, 0) + 1, dtype=np.int64)
        windows = np.minimum(starts[:, None] + offsets, length - 1)

    if labels is not None and cfg.skip_unlabelled:
        window_labels = labels[windows]  # [K, T]
        centre = windows.shape[1] // 2
        if cfg.label == "frames":
            keep = (window_labels >= 0).any(axis=1)
        else:
            keep = window_labels[:, centre] >= 0
        if annotated is not None:
            keep |= annotated[windows[:, centre]]
        windows = windows[keep]

    count = len(windows)
    if cfg.mode == "frame" or cfg.clips_per_segment == 0 or count <= cfg.clips_per_segment and not train:
        return windows
    k = min(cfg.clips_per_segment, count)
    if train:
        assert rng is not None, "training windows need a generator"
        return windows[np.sort(rng.choice(count, size=k, replace=False))]
    return windows[((np.arange(k) + 0.5) * count / k).astype(np.int64)]


# --------------------------------------------------------------------------- pixels


def _crop_box(h: int, w: int, cfg: DataConfig, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (y, x, height, width), with a centre-crop fallback."""
    area = h * w
    log_ratio = (math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(cfg.scale[0], cfg.scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def _centre_box(h: int, w: int) -> tuple[int, int, int, int]:
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def _crop_resize(frames: list[np.ndarray], box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The same box cut from every frame and resized to size x size: [T, size, size, 3] uint8."""
    y, x, ch, cw = box
    out = np.empty((len(frames), size, size, 3), dtype=np.uint8)
    # INTER_AREA only from 2x reductions on, where INTER_LINEAR starts to alias; below
    # that INTER_LINEAR looks the same and costs a quarter as much.
    interpolation = cv2.INTER_AREA if min(ch, cw) >= 2 * size else cv2.INTER_LINEAR
    for i, frame in enumerate(frames):
        crop = frame[y : y + ch, x : x + cw]
        if crop.shape[0] == size and crop.shape[1] == size:
            out[i] = crop
        else:
            cv2.resize(crop, (size, size), dst=out[i], interpolation=interpolation)
    return out


def _jitter(clip: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation with one set of factors for the whole clip [T, H, W, 3].

    torchvision's rules (contrast blends towards the frame's mean grey, saturation towards
    each pixel's grey, ITU-R 601 luma), in a fixed order, as saturating uint8 OpenCV ops:
    a quarter of the cost of the same arithmetic in float32 numpy.
    """
    b, c, s = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    out = np.empty_like(clip)
    for i, frame in enumerate(clip):
        mean_grey = float(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).mean())
        # Brightness then contrast is one affine map: (b * x - b * m) * c + b * m.
        cv2.addWeighted(frame, b * c, frame, 0.0, b * mean_grey * (1.0 - c), dst=out[i])
        grey = cv2.cvtColor(cv2.cvtColor(out[i], cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        cv2.addWeighted(out[i], s, grey, 1.0 - s, 0.0, dst=out[i])
    return out


def transform_clip(
    frames: list[np.ndarray], cfg: DataConfig, *, train: bool, rng: np.random.Generator | None
) -> np.ndarray:
    """Frames of one sample → [T, S, S, 3] uint8 with one crop, flip and jitter for all of them.

    Drawing the augmentation once per clip keeps motion intact (VideoMAE's consistent
    spatial augmentation); per-frame draws would add flicker the model must ignore.
    """
    h, w = frames[0].shape[:2]
    if not train:
        return _crop_resize(frames, _centre_box(h, w), cfg.image_size)
    assert rng is not None
    clip = _crop_resize(frames, _crop_box(h, w, cfg, rng), cfg.image_size)
    if rng.random() < cfg.hflip:
        clip = np.ascontiguousarray(clip[:, :, ::-1])
    if cfg.color_jitter > 0:
        clip = _jitter(clip, cfg.color_jitter, rng)
    return clip


# --------------------------------------------------------------------------- Ray Data steps


def _epoch_salt() -> int:
    """Ray Data's execution index for the running Dataset: 0, 1, 2, … for its successive passes.

    The same counter Ray uses to reseed FileShuffleConfig and random() per execution; it
    is private, so a Ray without it gives 0 (augmentation then repeats across epochs,
    which tests/test_loaders.py would catch).
    """
    from ray.data.context import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0))


def _segment_rng(seed: int, salt: int, video_id: str, track_id: int, first_frame: int) -> np.random.Generator:
    # Keyed by segment identity, not batch position, so Ray's block sizes cannot change a sample.
    digest = hashlib.sha1(f"{video_id}\x00{track_id}\x00{first_frame}".encode()).digest()
    words = np.frombuffer(digest[:16], dtype=np.uint32).tolist()
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, salt & 0xFFFFFFFF, *words]))


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, Any]:
    """A list column's offsets and child values (absolute: ``values`` ignores a slice's offset)."""
    column = table.column(name).combine_chunks()
    return column.offsets.to_numpy(), column.values


class _Rows:
    """Per-row access to a segment table without turning the image column into Python bytes."""

    def __init__(self, batch: pa.Table):
        self.n = batch.num_rows
        self.video_id = batch.column("video_id").to_pylist()
        names = batch.column_names
        self.track_id = batch.column("track_id").to_numpy() if "track_id" in names else np.zeros(self.n, np.int64)
        self.offsets, values = _list_column(batch, "frame_index")
        self.frame_index = values.to_numpy()
        self.lengths = np.diff(self.offsets)
        self.labels = self.clip_label = self.images = self.va = None
        if "labels" in names:
            self.label_offsets, values = _list_column(batch, "labels")
            self.labels = values.to_numpy(zero_copy_only=False).astype(np.int64)
            if not np.array_equal(np.diff(self.label_offsets), self.lengths):
                raise LoaderError("a segment row has different numbers of labels and frame indices")
        if "clip_label" in names:
            self.clip_label = batch.column("clip_label").to_numpy().astype(np.int64)
        if "valence" in names and "arousal" in names:
            self.va = np.stack([self._frame_values(batch, "valence"), self._frame_values(batch, "arousal")], 1)
        if "images" in names:
            self.image_offsets, self.images = _list_column(batch, "images")  # BinaryArray of every JPEG
            if not np.array_equal(np.diff(self.image_offsets), self.lengths):
                raise LoaderError("a segment row has different numbers of images and frame indices")

    def _frame_values(self, batch: pa.Table, name: str) -> np.ndarray:
        """A nullable per-frame float list column, flattened along frame_index: [frames] float32, NaN = none."""
        column = batch.column(name).combine_chunks()
        out = np.full(len(self.frame_index), np.nan, dtype=np.float32)  # indexed by frame_index's offsets
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy(zero_copy_only=False).astype(np.float32)
        for i in np.nonzero(np.asarray(column.is_valid()))[0]:
            lo, hi = offsets[i], offsets[i + 1]
            if hi - lo != self.lengths[i]:
                raise LoaderError(f"a segment row has {hi - lo} {name} values for {self.lengths[i]} frames")
            out[self.offsets[i] : self.offsets[i + 1]] = values[lo:hi]
        return out

    def frames(self, i: int) -> np.ndarray:
        return self.frame_index[self.offsets[i] : self.offsets[i + 1]].astype(np.int64)

    def frame_va(self, i: int) -> np.ndarray:
        """The segment's per-frame [valence, arousal]: [L, 2] float32, NaN where unannotated."""
        return self.va[self.offsets[i] : self.offsets[i + 1]]

    def frame_labels(self, i: int) -> np.ndarray | None:
        if self.labels is None:
            return None
        return self.labels[self.label_offsets[i] : self.label_offsets[i + 1]]

    def decode(self, i: int, positions: np.ndarray) -> dict[int, np.ndarray]:
        """Decoded RGB frames at the given row-local positions (each decoded once)."""
        start = int(self.image_offsets[i])
        # as_buffer() is a zero-copy view of the JPEG bytes inside the Arrow column.
        return {int(p): decode_jpeg(self.images[start + int(p)].as_buffer()) for p in np.unique(positions)}


def _segment_labels(rows: _Rows, i: int, cfg: DataConfig) -> np.ndarray | None:
    """Per-frame labels that decide which windows have a target (None: no per-frame filter)."""
    if cfg.label in ("center", "frames"):
        return rows.frame_labels(i)
    return None


def _segment_annotated(rows: _Rows, i: int, cfg: DataConfig) -> np.ndarray | None:
    """Frames with a valence or arousal value, which are targets too (None: VA not asked for)."""
    if not cfg.va:
        return None
    return np.isfinite(rows.frame_va(i)).any(axis=1)


def _skip_segment(rows: _Rows, i: int, cfg: DataConfig) -> bool:
    return cfg.label == "clip" and cfg.skip_unlabelled and int(rows.clip_label[i]) < 0


def sample_clips(batch: pa.Table, *, cfg: DataConfig, train: bool) -> dict[str, np.ndarray]:
    """Segments → clips: windows, JPEG decode and one augmentation per clip (uint8 out).

    Output columns: ``video`` [N, T, S, S, 3] uint8, ``video_id`` str, ``frame_index``
    int64 (the centre frame, position T // 2 of the window), and ``label`` int64 (centre
    or clip label) or ``labels`` int64 [N, T] (label == frames); no label for 'none';
    ``va`` float32 [N, 2] (the centre frame's valence, arousal) with ``cfg.va``.
    """
    rows = _Rows(batch)
    salt = _epoch_salt() if train else 0
    augment = train and cfg.augment_on == "data"  # else decode and resize only, as for evaluation
    T, S = cfg.num_frames, cfg.image_size
    clips, ids, centres, targets, va = [], [], [], [], []
    for i in range(rows.n):
        if _skip_segment(rows, i, cfg):
            continue
        frames = rows.frames(i)
        rng = _segment_rng(cfg.seed, salt, rows.video_id[i], int(rows.track_id[i]), int(frames[0])) if train else None
        windows = window_positions(
            len(frames), _segment_labels(rows, i, cfg), cfg, train=train, rng=rng,
            annotated=_segment_annotated(rows, i, cfg),
        )  # fmt: skip
        if len(windows) == 0:
            continue
        decoded = rows.decode(i, windows)
        labels = rows.frame_labels(i)
        for window in windows:
            clips.append(transform_clip([decoded[int(p)] for p in window], cfg, train=augment, rng=rng))
            ids.append(rows.video_id[i])
            centres.append(frames[window[T // 2]])
            if cfg.va:
                va.append(rows.frame_va(i)[window[T // 2]])
            if cfg.label == "center":
                targets.append(labels[window[T // 2]])
            elif cfg.label == "frames":
                targets.append(labels[window])
            elif cfg.label == "clip":
                targets.append(rows.clip_label[i])
    out = {
        "video": np.stack(clips) if clips else np.zeros((0, T, S, S, 3), dtype=np.uint8),
        "video_id": np.array(ids, dtype=np.str_),
        "frame_index": np.array(centres, dtype=np.int64),
    }
    if cfg.label == "frames":
        out["labels"] = np.stack(targets).astype(np.int64) if targets else np.zeros((0, T), dtype=np.int64)
    elif cfg.label != "none":
        out["label"] = np.array(targets, dtype=np.int64)
    if cfg.va:
        out["va"] = np.stack(va).astype(np.float32) if va else np.zeros((0, 2), dtype=np.float32)
    return out


def sample_frames(batch: pa.Table, *, cfg: DataConfig, train: bool) -> dict[str, np.ndarray]:
    """Segments → single frames, each kept frame once per pass (uint8 out).

    Output columns: ``image`` [N, S, S, 3] uint8, ``video_id`` str, ``frame_index``
    int64 and ``label`` int64 (the frame's own label, or its segment's clip_label);
    ``va`` float32 [N, 2] (the frame's valence, arousal) with ``cfg.va``.
    """
    rows = _Rows(batch)
    salt = _epoch_salt() if train else 0
    augment = train and cfg.augment_on == "data"  # else decode and resize only, as for evaluation
    S = cfg.image_size
    images, ids, indices, targets, va = [], [], [], [], []
    for i in range(rows.n):
        if _skip_segment(rows, i, cfg):
            continue
        frames = rows.frames(i)
        rng = _segment_rng(cfg.seed, salt, rows.video_id[i], int(rows.track_id[i]), int(frames[0])) if train else None
        positions = window_positions(
            len(frames), _segment_labels(rows, i, cfg), cfg, train=train, rng=rng,
            annotated=_segment_annotated(rows, i, cfg),
        )[:, 0]  # fmt: skip
        if len(positions) == 0:
            continue
        decoded = rows.decode(i, positions)
        labels = rows.frame_labels(i)
        for p in positions:
            images.append(transform_clip([decoded[int(p)]], cfg, train=augment, rng=rng)[0])
            ids.append(rows.video_id[i])
            indices.append(frames[p])
            if cfg.va:
                va.append(rows.frame_va(i)[p])
            if cfg.label == "center":
                targets.append(labels[p])
            elif cfg.label == "clip":
                targets.append(rows.clip_label[i])
    out = {
        "image": np.stack(images) if images else np.zeros((0, S, S, 3), dtype=np.uint8),
        "video_id": np.array(ids, dtype=np.str_),
        "frame_index": np.array(indices, dtype=np.int64),
    }
    if cfg.label != "none":
        out["label"] = np.array(targets, dtype=np.int64)
    if cfg.va:
        out["va"] = np.stack(va).astype(np.float32) if va else np.zeros((0, 2), dtype=np.float32)
    return out


def _columns(cfg: DataConfig, *, pixels: bool = True) -> list[str]:
    columns = ["video_id", "track_id", "frame_index"]
    if cfg.split is not None:
        columns.append("split")
    if cfg.label in ("center", "frames"):
        columns.append("labels")
    if cfg.label == "clip":
        columns.append("clip_label")
    if cfg.va:
        columns += ["valence", "arousal"]
    if pixels:
        columns.append("images")
    return columns


def _shard_paths(cfg: DataConfig) -> tuple[Any, list[str]]:
    """The pyarrow filesystem of the shard root and its shard files (verified) as paths inside it."""
    root = cfg.root
    uris = shards.list_shards(root, verify="sha256" if cfg.verify == "sha256" else True)
    if not uris:
        raise LoaderError(f"no shards under {storage.join(root, shards.SHARDS_DIR)!r}: run `affectray ingest` first")
    shards_uri = storage.join(root, shards.SHARDS_DIR)
    fs, base = storage.pyarrow_filesystem(shards_uri)
    paths = [posixpath.join(base, uri[len(shards_uri) :].replace("\\", "/").lstrip("/")) for uri in uris]
    return fs, paths


def build_dataset(cfg: DataConfig, *, train: bool, holdout: bool = False) -> ray.data.Dataset:
    """A Ray Dataset of uint8 samples (clips or frames) from the shards under ``cfg.root``.

    ``train`` shuffles the file order (reseeded per pass), draws random windows and
    augments; otherwise windows are deterministic and frames are only resized.
    ``holdout`` gives the videos that ``val_fraction`` holds out instead of the rest.
    """
    import ray.data

    validate(cfg)
    if holdout and cfg.val_fraction <= 0.0:
        raise LoaderError("data.val_fraction=0.0: there are no held-out videos to read (set it above 0)")
    fs, paths = _shard_paths(cfg)
    # Ray 2.60's Parquet reader V2 starts a pool of FooterReader actors (new processes) for
    # every execution of the dataset and kills them after: 9-14 s per pass on 2 cores, against
    # 0.3-0.5 s with the V1 reader (measured on 8 small shards), paid by every training epoch
    # and every validation. The flag is read when read_parquet builds the plan.
    context = ray.data.DataContext.get_current()
    use_v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(
            paths,
            filesystem=fs,
            # Epochs see files in a different, reproducible order (seed + execution index).
            shuffle=ray.data.FileShuffleConfig(seed=cfg.seed) if train else None,
        ).select_columns(_columns(cfg))  # pushed down into the Parquet reader: other columns are never read
    finally:
        context.use_datasource_v2 = use_v2
    if cfg.split is not None or cfg.val_fraction > 0.0:
        ds = ds.map_batches(
            select_segments,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"split": cfg.split, "val_fraction": cfg.val_fraction, "holdout": holdout},
        )
    ds = ds.map_batches(
        sample_clips if cfg.mode == "clip" else sample_frames,
        batch_format="pyarrow",
        batch_size=cfg.segments_per_batch,
        fn_kwargs={"cfg": cfg, "train": train},
    )
    if train and cfg.cache:
        # Runs the first pass here, on the driver; later passes only reorder its blocks.
        ds = ds.materialize().randomize_block_order()
    return ds


# --------------------------------------------------------------------------- counting


def _scan(cfg: DataConfig, holdout: bool) -> pa.Table:
    """Label and index columns (no pixels) of the selected segments, read on the driver."""
    import pyarrow.dataset as pads

    validate(cfg)
    fs, paths = _shard_paths(cfg)
    columns = sorted(set(_columns(cfg, pixels=False)) | {"labels", "clip_label"})
    table = pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=columns)
    return select_segments(table, split=cfg.split, val_fraction=cfg.val_fraction, holdout=holdout)


def count_samples(source: DataConfig | ray.data.Dataset, *, train: bool = False, holdout: bool = False) -> int:
    """Samples in one pass, e.g. for steps per epoch or a progress bar.

    Given a DataConfig, counts from the label and index columns alone (no image is read
    or decoded); the count is exact for training too, since a pass takes
    min(clips_per_segment, candidates) windows from every segment. Given a Dataset,
    runs it (``Dataset.count()``), decoding everything.
    """
    if not isinstance(source, DataConfig):
        return int(source.count())
    cfg = source
    rows = _Rows(_scan(cfg, holdout))
    rng = np.random.default_rng(0)  # any generator: training draws a fixed number of windows
    total = 0
    for i in range(rows.n):
        if not _skip_segment(rows, i, cfg):
            labels, annotated = _segment_labels(rows, i, cfg), _segment_annotated(rows, i, cfg)
            total += len(window_positions(int(rows.lengths[i]), labels, cfg, train=train, rng=rng, annotated=annotated))
    return total


def class_counts(cfg: DataConfig, num_classes: int | None = None, *, holdout: bool = False) -> np.ndarray:
    """Samples per class among the selected segments, for class-weighted losses: [num_classes] int64.

    Frame and centre labels count every labelled frame (what a dense pass sees); clip
    labels count segments. Reads only the label columns. ``num_classes`` defaults to the
    manifest's label set, else the largest label + 1.
    """
    if cfg.label == "none":
        raise LoaderError("data.label='none' has no classes to count")
    table = _scan(cfg, holdout)
    if cfg.label == "clip":
        values = table.column("clip_label").to_numpy().astype(np.int64)
    else:
        values = pc.list_flatten(table.column("labels")).to_numpy(zero_copy_only=False).astype(np.int64)
    values = values[values >= 0]
    if num_classes is None:
        num_classes = _manifest_classes(cfg.root) or (int(values.max()) + 1 if len(values) else 0)
    if len(values) and values.max() >= num_classes:
        raise LoaderError(f"label {int(values.max())} in {cfg.root!r} does not fit {num_classes} classes")
    return np.bincount(values, minlength=num_classes).astype(np.int64)


def _manifest_classes(root: str) -> int | None:
    uri = storage.join(root, shards.MANIFEST_NAME)
    if not storage.exists(uri):
        return None
    classes = storage.read_json(uri).get("label_set", {}).get("classes")
    return len(classes) if classes else None


# --------------------------------------------------------------------------- worker side


def _collate_fn(keep_ids: bool):
    """A collate class for iter_torch_batches: uint8 pixels, float32 VA, int64 else, video ids as a list.

    The default collate cannot take string columns, and ``dtypes`` cannot be combined with
    a collate_fn, so this one sets the dtypes itself. Without ids its output is a dict of
    tensors, which Ray pins and moves to the device on its prefetch thread.
    """
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    class FerCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            # Arrays from the object store are read-only; nothing writes to these tensors
            # (to_model_input makes new ones), so skip torch's warning as Ray's own collate does.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                for name, value in batch.items():
                    if name == "video_id":
                        if keep_ids:
                            out[name] = [str(v) for v in value]
                    elif name in ("video", "image"):
                        out[name] = torch.as_tensor(np.ascontiguousarray(value, dtype=np.uint8))
                    elif name == "va":
                        out[name] = torch.as_tensor(np.ascontiguousarray(value, dtype=np.float32))
                    else:
                        out[name] = torch.as_tensor(np.ascontiguousarray(value, dtype=np.int64))
            return out

    return FerCollate()


def _resolve_device(device: Any) -> torch.device:
    import torch

    if device is not None:
        return torch.device(device)
    try:
        from ray.train.torch import get_device

        return get_device()
    except Exception:  # noqa: BLE001 - outside a Ray Train worker there is no assigned device
        return torch.device("cpu")


ClipLayout = Literal["BCTHW", "BTCHW"]


def to_model_input(
    batch: dict[str, Any],
    cfg: DataConfig,
    device: Any = None,
    dtype: torch.dtype | None = None,
    *,
    clip_layout: ClipLayout = "BCTHW",
) -> torch.Tensor:
    """uint8 samples → normalised float input on ``device``.

    Clip mode: ``video`` [B, T, H, W, 3] → [B, C, T, H, W] (``clip_layout`` "BCTHW": the
    video MAEs' layout) or [B, T, C, H, W] ("BTCHW": windows of frames, as the classifiers
    take them); frame mode: ``image`` [B, H, W, 3] → [B, C, H, W]. The conversion runs where
    the tensor lives after the move, i.e. on the GPU when there is one. ``dtype`` defaults to float32.
    """
    device = _resolve_device(device)
    x = normalise_pixels(batch[_pixel_key(cfg)].to(device, non_blocking=True), cfg.mean, cfg.std, cfg.channels)
    return _layout(x, cfg, dtype, clip_layout)


def _pixel_key(cfg: DataConfig) -> str:
    return "video" if cfg.mode == "clip" else "image"


def _layout(x: torch.Tensor, cfg: DataConfig, dtype: torch.dtype | None, clip_layout: ClipLayout) -> torch.Tensor:
    """Normalised [B, T, C, H, W] clips or [B, C, H, W] frames → the model's layout and dtype."""
    import torch

    if cfg.mode == "clip" and clip_layout == "BCTHW":
        x = x.transpose(1, 2)  # [B, T, C, H, W] -> [B, C, T, H, W]
    return x.to(dtype or torch.float32).contiguous()


def _world_rank() -> int:
    try:
        import ray.train

        return int(ray.train.get_context().get_world_rank())
    except Exception:  # noqa: BLE001 - outside a Ray Train worker: one process, rank 0
        return 0


def _targets(batch: dict[str, Any], cfg: DataConfig, device: torch.device) -> torch.Tensor | None:
    if cfg.label == "none":
        return None
    return batch["labels" if cfg.label == "frames" else "label"].to(device, non_blocking=True)


def _va_targets(batch: dict[str, Any], cfg: DataConfig, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The batch tuple's last element with ``cfg.va`` (valence, arousal [B, 2]); nothing otherwise."""
    return (batch["va"].to(device, non_blocking=True),) if cfg.va else ()


def iter_train_batches(
    shard: Any,
    cfg: DataConfig,
    batch_size: int,
    epoch: int,
    device: Any = None,
    dtype: torch.dtype | None = None,
    *,
    clip_layout: ClipLayout = "BCTHW",
) -> Iterator[tuple[torch.Tensor, ...]]:
    """One training epoch over a dataset shard: (inputs, targets or None) per full batch.

    With ``cfg.va``: (inputs, targets, va), va [B, 2] float32, NaN where unannotated.

    Inputs are laid out as :func:`to_model_input` makes them (``clip_layout`` for clips).

    ``shard`` is what ``ray.train.get_dataset_shard("train")`` returns (or a Dataset).
    Rows are mixed by a local shuffle buffer seeded with ``cfg.seed + epoch``; the last
    incomplete batch is dropped so every DDP rank runs the same number of steps. With
    ``cfg.augment_on`` "worker" each batch is augmented here (:mod:`affectray.data.augment`),
    with draws seeded by ``(cfg.seed, epoch, rank)``.
    """
    import torch

    from affectray.data.augment import augment_batch

    device = _resolve_device(device)
    seed = np.random.SeedSequence([cfg.seed, epoch, _world_rank()]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(seed))
    buffer = cfg.shuffle_buffer or 4 * batch_size
    batches = shard.iter_torch_batches(
        batch_size=batch_size,
        local_shuffle_buffer_size=max(buffer, batch_size),
        local_shuffle_seed=cfg.seed + epoch,
        drop_last=True,
        collate_fn=_collate_fn(keep_ids=False),
        device=device,
        pin_memory=device.type == "cuda",
        prefetch_batches=2,
    )
    for batch in batches:
        if cfg.augment_on == "worker":
            inputs = _layout(augment_batch(batch[_pixel_key(cfg)], cfg, generator), cfg, dtype, clip_layout)
        else:
            inputs = to_model_input(batch, cfg, device, dtype, clip_layout=clip_layout)
        yield inputs, _targets(batch, cfg, device), *_va_targets(batch, cfg, device)


def _recorded(batches: Iterator[dict[str, Any]], cache: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``batches`` passed through, added to ``cache`` only once all of them came (never half a pass)."""
    seen = []
    for batch in batches:
        seen.append(batch)
        yield batch
    cache.extend(seen)


def iter_eval_batches(
    ds: Any,
    cfg: DataConfig,
    batch_size: int,
    device: Any = None,
    dtype: torch.dtype | None = None,
    *,
    clip_layout: ClipLayout = "BCTHW",
    cache: list[dict[str, Any]] | None = None,
) -> Iterator[tuple[Any, ...]]:
    """Every evaluation sample once, in arrival order: (inputs, targets or None, meta).

    ``meta`` holds ``video_id`` (list of str) and ``frame_index`` (int64 tensor, the
    centre frame) for per-video metrics and temporal smoothing. With ``cfg.va``:
    (inputs, targets, meta, va), va [B, 2] float32, NaN where unannotated.

    ``cache``, a list kept between calls (validation after every epoch): an empty one is
    filled with the decoded uint8 batches once a pass over ``ds`` completes; a filled one is
    read instead of ``ds`` (which may then be None). It holds N x S x S x 3 bytes.
    """
    device = _resolve_device(device)
    if cache:
        batches: Iterator[dict[str, Any]] = iter(cache)
    else:
        batches = ds.iter_torch_batches(
            batch_size=batch_size,
            drop_last=False,
            collate_fn=_collate_fn(keep_ids=True),
            device="cpu",  # the output holds a list of ids, so Ray leaves the move to us
            prefetch_batches=2,
        )
        if cache is not None:
            batches = _recorded(batches, cache)
    for batch in batches:
        meta = {"video_id": batch["video_id"], "frame_index": batch["frame_index"]}
        inputs = to_model_input(batch, cfg, device, dtype, clip_layout=clip_layout)
        yield inputs, _targets(batch, cfg, device), meta, *_va_targets(batch, cfg, device)
