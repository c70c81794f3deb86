"""What the label job writes: one Parquet per video, videos.parquet, a timeline per video, an HTML summary.

Layout under OUT::

    OUT/labels/<video key>.parquet   one row per (frame, face); written whole or not at all
    OUT/timelines/<video key>.png    class probabilities and the smoothed label over time
    OUT/_done/<video key>.json       the video's outcome, written last: it marks the video finished
                                     (unless its reason is retryable: ``storage unavailable``)
    OUT/_job.json                    the checkpoint and settings OUT was labelled with; created
                                     exclusively, so the first run claims OUT for its model
    OUT/videos.parquet               per video: status, error, frames, fps, duration, faces, seconds
    OUT/report.html                  counts, label distribution, failures, throughput, timelines

A frame with no face has one row with ``face_count`` 0 and nulls in every face
column, so every decoded frame is accounted for. Keys come from
:func:`affectray.label.inputs.video_key`: stable across runs, safe in file
names and S3 keys, with a hash suffix, so a re-run finds finished videos and
two videos of the same name in different folders never share a file.
"""

from __future__ import annotations

import html
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from affectray import storage

SCHEMA_VERSION = 1
LABELS_DIR = "labels"
TIMELINES_DIR = "timelines"
DONE_DIR = "_done"
JOB_FILE = "_job.json"
VIDEOS_FILE = "videos.parquet"
REPORT_FILE = "report.html"
# Reasons that say nothing about the video: a plain re-run tries it again (others need --retry-failed).
RETRYABLE_REASONS = frozenset({storage.STORAGE_UNAVAILABLE})

# Colours of the ABAW8 classes in timelines and the report (tab10, Neutral grey).
_COLOURS = ["#7f7f7f", "#d62728", "#8c564b", "#9467bd", "#2ca02c", "#1f77b4", "#ff7f0e", "#17becf"]


def label_uri(out: str, key: str) -> str:
    return storage.join(out, LABELS_DIR, f"{key}.parquet")


def timeline_uri(out: str, key: str) -> str:
    return storage.join(out, TIMELINES_DIR, f"{key}.png")


def done_uri(out: str, key: str) -> str:
    return storage.join(out, DONE_DIR, f"{key}.json")


def retryable(outcome: dict[str, Any]) -> bool:
    """True for a video that did not finish for a passing reason (the store was unavailable)."""
    return outcome.get("status") != "ok" and outcome.get("reason") in RETRYABLE_REASONS


def prob_column(name: str) -> str:
    """The probability column of a class: ``prob_<class>``."""
    return f"prob_{name}"


def label_schema(classes: Sequence[str], va: bool = False) -> pa.Schema:
    """The schema of a per-video label file for a classifier with these classes (and a VA head: ``va``)."""
    fields = [
        pa.field("video_uri", pa.string(), nullable=False),
        pa.field("video_key", pa.string(), nullable=False),
        pa.field("frame_index", pa.int32(), nullable=False),
        pa.field("pts_seconds", pa.float64(), nullable=False),
        pa.field("face_count", pa.int16(), nullable=False),
        pa.field("track_id", pa.int32()),
        pa.field("bbox_x1", pa.float32()),
        pa.field("bbox_y1", pa.float32()),
        pa.field("bbox_x2", pa.float32()),
        pa.field("bbox_y2", pa.float32()),
        pa.field("det_score", pa.float32()),
        pa.field("landmarks", pa.list_(pa.float32())),  # x0, y0, ..., x4, y4 in MTCNN's order
        *[pa.field(prob_column(c), pa.float32()) for c in classes],
        pa.field("label", pa.string()),
        pa.field("label_smoothed", pa.string()),
        *([pa.field("valence", pa.float32()), pa.field("arousal", pa.float32())] if va else []),
        pa.field("model_id", pa.string(), nullable=False),
    ]
    return pa.schema(fields, metadata={"affectray.schema_version": str(SCHEMA_VERSION)})


@dataclass
class VideoLabels:
    """Every decoded frame of one video and every face found in it, classified and tracked.

    Frames: ``frame_index``, ``pts_seconds``, ``face_count`` [N]. Faces, in frame
    order: ``face_frame`` [F] (the frame index each face is in), ``boxes`` [F, 4] and
    ``landmarks`` [F, 5, 2] in the video's pixel coordinates (NaN where there was no
    detection, i.e. pre-aligned input), ``scores`` [F], ``probs`` [F, C],
    ``track_id``, ``label`` and ``label_smoothed`` [F] (class indices); ``va`` [F, 2]
    (valence, arousal) for a model with a VA head, else None.
    """

    frame_index: np.ndarray
    pts_seconds: np.ndarray
    face_count: np.ndarray
    face_frame: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray
    probs: np.ndarray
    track_id: np.ndarray
    label: np.ndarray
    label_smoothed: np.ndarray
    va: np.ndarray | None = None

    @property
    def num_frames(self) -> int:
        return len(self.frame_index)

    @property
    def num_faces(self) -> int:
        return len(self.face_frame)


def labels_table(video: VideoLabels, *, video_uri: str, key: str, classes: Sequence[str], model_id: str) -> pa.Table:
    """One row per (frame, face), a null-face row per frame without a face; sorted by frame, then track."""
    no_face = video.face_count == 0
    n_empty, n_faces = int(no_face.sum()), video.num_faces
    row_frame = np.concatenate([video.frame_index[no_face], video.face_frame]).astype(np.int64)  # [R]
    row_face = np.concatenate([np.full(n_empty, -1), np.arange(n_faces)])  # [R], -1: no face
    row_track = np.concatenate([np.full(n_empty, -1), video.track_id])
    order = np.lexsort((row_track, row_frame))
    row_frame, row_face = row_frame[order], row_face[order]
    has_face = row_face >= 0
    face = np.where(has_face, row_face, 0)  # index into the face arrays; masked where no face
    # Frame-level values (pts, face count) for every row, by the row's frame.
    position = np.searchsorted(video.frame_index, row_frame)

    def take(values: np.ndarray) -> np.ndarray:  # the face arrays' values for every row (0s where no face)
        return values[face] if n_faces else np.zeros((len(face), *values.shape[1:]), values.dtype)

    def face_column(values: np.ndarray, dtype) -> pa.Array:
        taken = take(values)
        missing = ~has_face
        if np.issubdtype(taken.dtype, np.floating):
            missing = missing | np.isnan(taken)
        return pa.array(taken.astype(dtype), mask=missing)

    landmarks = take(video.landmarks.reshape(n_faces, 10).astype(np.float32))  # [R, 10]
    lm_missing = ~has_face | np.isnan(landmarks).any(axis=1)
    lm_rows = [None if lm_missing[r] else landmarks[r].tolist() for r in range(len(face))]
    names = np.asarray(classes, dtype=object)
    columns: dict[str, Any] = {
        "video_uri": pa.array([video_uri] * len(face), pa.string()),
        "video_key": pa.array([key] * len(face), pa.string()),
        "frame_index": pa.array(row_frame.astype(np.int32)),
        "pts_seconds": pa.array(video.pts_seconds[position].astype(np.float64)),
        "face_count": pa.array(video.face_count[position].astype(np.int16)),
        "track_id": face_column(video.track_id, np.int32),
        "bbox_x1": face_column(video.boxes[:, 0], np.float32),
        "bbox_y1": face_column(video.boxes[:, 1], np.float32),
        "bbox_x2": face_column(video.boxes[:, 2], np.float32),
        "bbox_y2": face_column(video.boxes[:, 3], np.float32),
        "det_score": face_column(video.scores, np.float32),
        "landmarks": pa.array(lm_rows, pa.list_(pa.float32())),
    }
    for c, name in enumerate(classes):
        columns[prob_column(name)] = face_column(video.probs[:, c], np.float32)
    for column, values in (("label", video.label), ("label_smoothed", video.label_smoothed)):
        columns[column] = pa.array(names[take(values)].tolist(), pa.string(), mask=~has_face)
    if video.va is not None:
        columns["valence"] = face_column(video.va[:, 0], np.float32)
        columns["arousal"] = face_column(video.va[:, 1], np.float32)
    columns["model_id"] = pa.array([model_id] * len(face), pa.string())
    schema = label_schema(classes, va=video.va is not None)
    meta = {**schema.metadata, b"affectray.video_uri": video_uri.encode(), b"affectray.model_id": model_id.encode()}
    return pa.table(columns, schema=schema.with_metadata(meta))


def write_labels(out: str, key: str, table: pa.Table) -> str:
    """Write one video's label file whole (a single object PUT, or a rename locally); returns its URI."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", row_group_size=65536)
    uri = label_uri(out, key)
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def read_labels(out: str) -> pa.Table:
    """Every per-video label file under OUT as one table (for tests and notebooks)."""
    root = storage.join(out, LABELS_DIR)
    files = storage.list_files(root, (".parquet",)) if storage.exists(root) else []
    tables = []
    for uri in files:
        with storage.open_input(uri) as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


# -- videos.parquet --------------------------------------------------------------------

VIDEOS_SCHEMA = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),
        pa.field("video_key", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # ok | partial | failed
        pa.field("reason", pa.string()),  # short, countable: 'empty file', 'truncated', 'corrupt', ...
        pa.field("error", pa.string()),  # the full message
        pa.field("frames", pa.int64()),
        pa.field("fps", pa.float64()),
        pa.field("duration_seconds", pa.float64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("codec", pa.string()),
        pa.field("faces", pa.int64()),  # face rows
        pa.field("frames_with_face", pa.int64()),
        pa.field("tracks", pa.int32()),
        pa.field("seconds", pa.float64()),  # worker time spent on the video, all stages
        pa.field("output", pa.string()),
        pa.field("timeline", pa.string()),
        pa.field("model", pa.string()),  # the checkpoint URI, e.g. builtin:fer-minixception
        pa.field("model_id", pa.string()),
        pa.field("finished_at", pa.string()),
    ],
    metadata={"affectray.schema_version": str(SCHEMA_VERSION)},
)


def videos_table(outcomes: Sequence[dict[str, Any]]) -> pa.Table:
    """videos.parquet from the videos' outcome records (markers), one row each."""
    columns = {name: [o.get(name) for o in outcomes] for name in VIDEOS_SCHEMA.names}
    columns["seconds"] = [float(sum((o.get("seconds") or {}).values())) for o in outcomes]
    return pa.table(columns, schema=VIDEOS_SCHEMA)


def write_parquet(uri: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_bytes(uri, buffer.getvalue())


# -- timeline PNG ----------------------------------------------------------------------


def timeline_png(video: VideoLabels, classes: Sequence[str], title: str) -> bytes:
    """Class probabilities and the smoothed label of the main track over time, as PNG bytes.

    The main track is the one with the most faces; other tracks are named in the
    title. Frames where that track has no face are left blank.
    """
    # The object-oriented API without pyplot: safe to call from the writer threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [4, 1]})
    colours = [_COLOURS[i % len(_COLOURS)] for i in range(len(classes))]
    tracks, counts = np.unique(video.track_id, return_counts=True)
    t_end = float(video.pts_seconds.max()) if video.num_frames else 1.0
    if len(tracks):
        main = int(tracks[np.argmax(counts)])
        rows = np.nonzero(video.track_id == main)[0]
        t = video.pts_seconds[np.searchsorted(video.frame_index, video.face_frame[rows])]
        # Break the lines (NaN) where the track has no face for more than a frame or two.
        gap = np.median(np.diff(video.pts_seconds)) * 2.5 if video.num_frames > 1 else np.inf
        breaks = np.nonzero(np.diff(t) > gap)[0] + 1
        for c, _name in enumerate(classes):
            top.plot(np.insert(t, breaks, np.nan), np.insert(video.probs[rows, c], breaks, np.nan),
                     color=colours[c], linewidth=1.2)  # fmt: skip
        step = np.diff(t, append=t[-1] + (gap / 2.5 if np.isfinite(gap) else 1 / 30))
        bottom.bar(t, np.ones_like(t), width=step, align="edge", color=[colours[k] for k in video.label_smoothed[rows]])
        extra = f"; track {main} of {len(tracks)}" if len(tracks) > 1 else ""
    else:
        top.text(0.5, 0.5, "no face in any frame", ha="center", va="center", transform=top.transAxes)
        extra = ""
    top.set_ylim(0, 1)
    top.set_ylabel("probability")
    top.set_title(f"{title}{extra}", fontsize=9)
    top.grid(alpha=0.3)
    bottom.set_yticks([])
    bottom.set_ylabel("smoothed", fontsize=8)
    bottom.set_xlabel("time (s)")
    bottom.set_xlim(0, max(t_end, 1e-3))
    handles = [Patch(color=colours[c], label=name) for c, name in enumerate(classes)]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.07, right=0.86, top=0.9, bottom=0.14, hspace=0.08)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# -- HTML summary ----------------------------------------------------------------------


def summary_html(
    outcomes: Sequence[dict[str, Any]],
    *,
    classes: Sequence[str],
    model_id: str,
    checkpoint: str,
    run: dict[str, Any],
) -> str:
    """A self-contained HTML page: counts, label distribution, failures, throughput, per-video timelines.

    Links are relative to OUT, so the page works from a local folder and from a
    static S3 website alike. Every string from the data is escaped.
    """
    e = html.escape
    status = {s: sum(o["status"] == s for o in outcomes) for s in ("ok", "partial", "failed")}
    labels = {name: 0 for name in classes}
    for o in outcomes:
        for name, n in (o.get("label_counts") or {}).items():
            labels[name] = labels.get(name, 0) + int(n)
    total_faces = max(1, sum(labels.values()))
    frames = sum(int(o.get("frames") or 0) for o in outcomes)
    faces = sum(int(o.get("faces") or 0) for o in outcomes)

    bars = "".join(
        f"<tr><td>{e(name)}</td><td class=num>{n}</td><td><div class=bar style='width:{300 * n / total_faces:.0f}px;"
        f"background:{_COLOURS[i % len(_COLOURS)]}'></div></td><td class=num>{100 * n / total_faces:.1f}%</td></tr>"
        for i, (name, n) in enumerate(labels.items())
    )
    failures = [o for o in outcomes if o["status"] != "ok"]
    failure_rows = (
        "".join(
            f"<tr><td>{e(o['name'])}</td><td>{e(o['status'])}</td><td>{e(o.get('reason') or '')}</td>"
            f"<td>{e(o.get('error') or '')}</td></tr>"
            for o in failures
        )
        or "<tr><td colspan=4>none</td></tr>"
    )
    stage_rows = "".join(
        f"<tr><td>{e(stage)}</td><td class=num>{seconds:.1f}</td>"
        f"<td class=num>{run['frames'] / seconds if seconds else 0:.1f}</td></tr>"
        for stage, seconds in run.get("stage_seconds", {}).items()
    )
    video_rows = "".join(
        f"<tr><td>{e(o['name'])}</td><td>{e(o['status'])}</td><td class=num>{o.get('frames') or 0}</td>"
        f"<td class=num>{o.get('faces') or 0}</td><td class=num>{o.get('tracks') or 0}</td>"
        f"<td>{_top_label(o)}</td><td>{_link(o.get('output_rel'), 'parquet')} "
        f"{_link(o.get('timeline_rel'), 'timeline')}</td></tr>"
        for o in outcomes
    )
    timelines = "".join(
        f"<figure><img src='{e(o['timeline_rel'])}' loading=lazy alt='{e(o['name'])}'>"
        f"<figcaption>{e(o['name'])}</figcaption></figure>"
        for o in outcomes
        if o.get("timeline_rel")
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>affectray labels</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}} .num{{text-align:right}}
.bar{{height:12px}} figure{{display:inline-block;margin:4px}} img{{width:520px}} figcaption{{font-size:80%}}
</style></head><body>
<h1>Labels</h1>
<p>Checkpoint <code>{e(checkpoint)}</code>, model id <code>{e(model_id)}</code>; \
written {e(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))}.</p>
<h2>Counts</h2>
<table><tr><th>videos</th><th>ok</th><th>partial</th><th>failed</th><th>frames</th><th>face rows</th></tr>
<tr><td class=num>{len(outcomes)}</td><td class=num>{status["ok"]}</td><td class=num>{status["partial"]}</td>
<td class=num>{status["failed"]}</td><td class=num>{frames}</td><td class=num>{faces}</td></tr></table>
<h2>Smoothed label distribution (face rows)</h2><table>{bars}</table>
<h2>Failures</h2>
<table><tr><th>video</th><th>status</th><th>reason</th><th>error</th></tr>{failure_rows}</table>
<h2>Throughput (this run)</h2>
<p>{run["videos"]} videos, {run["frames"]} frames in {run["seconds"]:.1f} s: \
<b>{run["frames_per_second"]:.1f} frames/s</b>
({run["skipped"]} videos skipped as already labelled); the first labelled frames came back after
{run.get("startup_seconds", 0):.1f} s (start-up: workers start, actors import torch and load the models).</p>
<table><tr><th>stage</th><th>worker seconds</th><th>frames/s per worker</th></tr>{stage_rows}</table>
<h2>Videos</h2>
<table><tr><th>video</th><th>status</th><th>frames</th><th>faces</th><th>tracks</th>\
<th>top label</th><th>files</th></tr>{video_rows}</table>
<h2>Timelines</h2>{timelines}
</body></html>
"""


def _top_label(outcome: dict[str, Any]) -> str:
    counts = outcome.get("label_counts") or {}
    if not counts:
        return ""
    name, n = max(counts.items(), key=lambda kv: kv[1])
    return f"{html.escape(name)} ({100 * n / max(1, sum(counts.values())):.0f}%)"


def _link(rel: str | None, text: str) -> str:
    return f"<a href='{html.escape(rel)}'>{text}</a>" if rel else ""
