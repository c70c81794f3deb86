"""Writing an imported model: one checkpoint, published whole, and the summary every format reports."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from affectray import checkpoints as ckpt
from affectray import storage

__all__ = ["write_imported"]


def write_imported(model: torch.nn.Module, meta: dict[str, Any], out: str, *, format: str) -> dict[str, Any]:
    """Write ``model`` and ``meta`` as a checkpoint at ``out`` (a path or s3:// URI); the job summary.

    The checkpoint is written whole beside the target and swapped in
    (``checkpoints.publish``), so a reader never sees half of one.
    """
    target = out if storage.is_remote(out) else str(Path(out.removeprefix("file://")).expanduser().resolve())
    staging = Path(tempfile.mkdtemp(prefix="affectray-import-"))
    try:
        ckpt.save_checkpoint(staging, model, meta)
        ckpt.publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    label_set = meta.get("label_set") or {}  # a pretraining checkpoint has none
    return {
        "checkpoint": target,
        "format": format,
        "model": meta["model"],
        "classes": label_set.get("classes", []),
        "label_set": label_set.get("name"),
        "tensors": meta["source"]["tensors"],
        "architecture": meta["source"]["architecture"],
        "image_size": meta["preprocessing"]["image_size"],
        "sha256": meta["source"]["sha256"],
    }
