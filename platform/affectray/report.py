"""Pictures people would rather look at than read: shard contact sheets, loss curves, confusion matrices."""

from __future__ import annotations

from typing import Any

import numpy as np

from affectray import storage
from affectray.data import shards


def shard_contact_sheet(root: str, out_png: str, *, faces: int = 32, columns: int = 8, tile: int = 96) -> str:
    """A grid of aligned faces from a shard root, each captioned with its label.

    Takes evenly spaced frames across all segments, so one look tells whether
    alignment and labels are right. Returns the PNG's URI.
    """
    import cv2
    import pyarrow.parquet as pq

    from affectray.faces.jpeg import decode_jpeg
    from affectray.labels import ABAW8

    picked: list[tuple[bytes, int, str]] = []
    for uri in shards.list_shards(root):
        with storage.open_input(uri) as f:
            table = pq.read_table(f, columns=["video_id", "images", "labels"])
        for video_id, images, labels in zip(*(table.column(c).to_pylist() for c in ("video_id", "images", "labels"))):
            step = max(1, len(images) // 2)
            picked += [(images[i], labels[i], video_id) for i in range(0, len(images), step)]
    if not picked:
        raise storage.StorageError(f"no faces in the shards under {root!r}")
    chosen = [picked[i] for i in np.linspace(0, len(picked) - 1, min(faces, len(picked))).astype(int)]
    rows = -(-len(chosen) // columns)
    sheet = np.full((rows * (tile + 16), columns * tile, 3), 255, np.uint8)
    for k, (jpeg, label, _video_id) in enumerate(chosen):
        r, c = divmod(k, columns)
        face = cv2.resize(decode_jpeg(jpeg), (tile, tile), interpolation=cv2.INTER_AREA)
        y, x = r * (tile + 16), c * tile
        sheet[y : y + tile, x : x + tile] = face
        caption = ABAW8.classes[label] if label >= 0 else "-"
        cv2.putText(sheet, caption[:10], (x + 2, y + tile + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1)
    ok, png = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    storage.write_bytes(out_png, png.tobytes())
    return out_png


def loss_curve(history: list[dict[str, Any]], out_png: str, *, key: str = "loss", title: str = "") -> str:
    """Plot a metric against step from a run's reported metrics; returns the PNG's URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((m["step"], m[key]) for m in history if key in m and "step" in m)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title or key)
    ax.grid(alpha=0.3)
    return _save_png(fig, out_png)


def confusion_matrix_png(confusion: Any, classes: list[str], out_png: str, *, title: str = "") -> str:
    """A confusion matrix (rows = true class) as a heatmap with counts and row-normalised shading."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(confusion, dtype=np.int64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # recall per true class
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.55 * n), dpi=120)
    ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix", fontsize=8)
    return _save_png(fig, out_png)


def trials_plot(trials: list[tuple[str, float, int]], out_png: str, *, metric: str, title: str = "") -> str:
    """A sweep at a glance: each trial's best metric, in trial order, sized by epochs run (ASHA stops some early)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(trials) + 2), 3.2), dpi=120)
    xs = np.arange(len(trials))
    values = [v for _, v, _ in trials]
    epochs = np.array([max(1, e) for _, _, e in trials], dtype=float)
    ax.scatter(xs, values, s=30 + 60 * epochs / epochs.max(), c=values, cmap="viridis", zorder=3)
    best = int(np.nanargmax(values)) if values else 0
    ax.annotate("best", (xs[best], values[best]), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
    ax.set_xticks(xs, [t[:8] for t, _, _ in trials], rotation=45, ha="right", fontsize=6)
    ax.set_xlabel("trial (marker size: epochs run)")
    ax.set_ylabel(metric)
    ax.set_title(title or metric, fontsize=9)
    ax.grid(alpha=0.3)
    return _save_png(fig, out_png)


def _save_png(fig, out_png: str) -> str:
    """Lay out, render and write a matplotlib figure to ``out_png`` (any URI); closes it."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    storage.write_bytes(out_png, buffer.getvalue())
    return out_png
