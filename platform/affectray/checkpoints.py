"""Self-describing checkpoints: weights + everything needed to use them.

A checkpoint directory holds

    model.safetensors    the model's weights (no pickle: safe to load from anywhere)
    meta.json            model spec (registry name + kwargs), label set, preprocessing (Preprocessing),
                         task, step/epoch, metrics, provenance (config, data manifest, git)
    train_state.pt       optimizer, scheduler and counters for resuming; tensors and plain
                         values only, loaded with torch.load(weights_only=True)

Ray Train copies the directory into the run's storage path (local or s3://);
any consumer (finetune init, evaluate, label) takes the URI as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from affectray import storage
from affectray.errors import AffectrayError

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
STATE_FILE = "train_state.pt"


class CheckpointError(AffectrayError):
    """A checkpoint that is missing, incomplete or not one of ours."""


@dataclass(frozen=True)
class Preprocessing:
    """What a model's input looks like, as training fed it: written once into meta.json, read back whole."""

    mode: str = "frame"  # "frame": one image per sample; "clip": a window of frames
    image_size: int = 224
    num_frames: int = 1
    frame_stride: int = 1
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # per channel, on a 0..1 scale
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    channels: int = 3  # 3: RGB; 1: grayscale (RGB faces are converted as cv2's RGB2GRAY does)
    crop: str = "aligned"  # "aligned": 5-point-aligned faces; "box": the detector's box grown by box_margin
    box_margin: float = 0.0  # "box" crops: the square box's side times (1 + box_margin) (faces.align.square_boxes)
    # Test-time flip: predictions average each face's and its mirror image's (FER2013 recipes
    # score this way). Inference and evaluation both honour it, so the label job sees what
    # the validation score measured.
    test_flip: bool = False
    # Test-time crops: five crops of this side (a fraction of the input's), at the corners and the
    # centre, each resampled to the input size and averaged with the full view (and, with
    # test_flip, all twelve with their mirror images): the ten-crop testing of FER2013 papers.
    test_crops: float | None = None

    def __post_init__(self) -> None:
        if self.test_crops is not None and not 0.0 < self.test_crops < 1.0:
            raise CheckpointError(f"preprocessing.test_crops is a side fraction in (0, 1), got {self.test_crops}")
        if self.channels not in (1, 3):
            raise CheckpointError(f"preprocessing.channels must be 1 or 3, got {self.channels}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, self.channels):
                raise CheckpointError(
                    f"preprocessing.{name} has {len(getattr(self, name))} values for {self.channels} channel(s)"
                )
        if self.crop not in ("aligned", "box"):
            raise CheckpointError(f"preprocessing.crop must be 'aligned' or 'box', got {self.crop!r}")

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Preprocessing:
        p = dict(meta.get("preprocessing") or {})
        mode = p.get("mode", "clip" if int(p.get("num_frames", 1)) > 1 else "frame")
        return cls(
            mode=mode,
            image_size=int(p.get("image_size", 224)),
            num_frames=int(p.get("num_frames", 1)) if mode == "clip" else 1,
            frame_stride=int(p.get("frame_stride", 1)),
            mean=tuple(float(v) for v in p.get("mean", cls.mean)),
            std=tuple(float(v) for v in p.get("std", cls.std)),
            channels=int(p.get("channels", 3)),
            crop=str(p.get("crop", "aligned")),
            box_margin=float(p.get("box_margin", 0.0)),
            test_flip=bool(p.get("test_flip", False)),
            test_crops=None if p.get("test_crops") is None else float(p["test_crops"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @property
    def input_layout(self) -> str:
        """The model's input tensor, e.g. "B,1,64,64" or "B,16,3,224,224"."""
        frames = f"{self.num_frames}," if self.mode == "clip" else ""
        return f"B,{frames}{self.channels},{self.image_size},{self.image_size}"


def unwrap(model):
    """The bare module under DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_checkpoint(
    directory: str | os.PathLike,
    model,
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint into a local directory (Ray Train uploads it)."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Contiguous CPU copies: safetensors refuses shared or strided storage.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    if train_state is not None:
        torch.save(train_state, directory / STATE_FILE)
    meta = {**meta, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


@contextmanager
def open_checkpoint(uri: str) -> Iterator[Path]:
    """A local directory holding the checkpoint at ``uri`` (downloaded if it is remote)."""
    if not storage.is_remote(uri):
        path = Path(uri.removeprefix("file://"))
        if not (path / META_FILE).exists():
            raise CheckpointError(f"{uri!r} is not an affectray checkpoint: no {META_FILE}")
        verify_checkpoint(str(path))
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="affectray-ckpt-") as tmp:
        names = [WEIGHTS_FILE, META_FILE, STATE_FILE]
        present = {u.rsplit("/", 1)[-1] for u in storage.list_files(uri)}
        if META_FILE not in present or WEIGHTS_FILE not in present:
            raise CheckpointError(f"{uri!r} is not an affectray checkpoint: found {sorted(present)}")
        verify_checkpoint(uri)  # headers only: a damaged file is named by its URI, before the download
        for name in names:
            if name in present:
                Path(tmp, name).write_bytes(storage.read_bytes(storage.join(uri, name)))
        yield Path(tmp)


def publish(directory: str | os.PathLike, uri: str) -> None:
    """Copy a checkpoint's weights and meta (not its optimizer state) to ``uri``, replacing what is there.

    A reader never sees new weights under an old meta: locally the directory is
    swapped in by a rename; on S3 the old meta goes first and the new one is
    written last, so a reader in between fails loudly (no meta.json) instead.
    """
    import shutil

    directory = Path(directory)
    if not storage.is_remote(uri):
        target = Path(uri.removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        for name in (WEIGHTS_FILE, META_FILE):
            shutil.copy2(directory / name, staging / name)
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return
    storage.remove(storage.join(uri, META_FILE))
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), (directory / WEIGHTS_FILE).read_bytes())
    storage.write_bytes(storage.join(uri, META_FILE), (directory / META_FILE).read_bytes())


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a local file, read in 1 MB blocks: weights hashes, source-file provenance."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory, META_FILE)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{os.fspath(directory)!r} is not an affectray checkpoint: no {META_FILE}") from None
    return _parse_meta(text, str(path))


def load_weights(directory: str | os.PathLike) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory, WEIGHTS_FILE)
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{os.fspath(directory)!r} is not an affectray checkpoint: no {WEIGHTS_FILE}") from None
    except SafetensorError as error:
        raise CheckpointError(f"{path} is not a whole safetensors file ({error})") from None


def verify_checkpoint(uri: str, train_state: bool = False) -> dict[str, Any]:
    """The meta.json of the checkpoint at ``uri`` (a local folder or s3://), once its files are known whole.

    Whole: meta.json is a JSON object, the weights a safetensors file that ends where its
    header says, and (``train_state``) train_state.pt a zip with its central directory (as
    torch.save writes it last). Only headers and tails are read, never the tensors, so a
    truncated upload or a file that is not ours is a CheckpointError naming the file, in a
    second, instead of a SafetensorError or a JSONDecodeError deep inside a job.
    """
    meta_uri = storage.join(uri, META_FILE)
    meta = _parse_meta(_read_checkpoint_file(meta_uri).decode("utf-8", errors="replace"), meta_uri)
    _check_safetensors(storage.join(uri, WEIGHTS_FILE))
    if train_state:
        _check_zip(storage.join(uri, STATE_FILE))
    return meta


def _parse_meta(text: str, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{where} is not JSON ({error}): the checkpoint is damaged or not ours") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} holds a JSON {type(meta).__name__}, not an object: not a checkpoint's meta")
    return meta


def _read_checkpoint_file(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except storage.StorageError as error:
        raise CheckpointError(f"incomplete checkpoint: {error}") from None


# The safetensors format: an 8-byte little-endian header length, a JSON header giving every
# tensor's [begin, end) in the data that follows, then the data. The library refuses larger headers.
_SAFETENSORS_MAX_HEADER = 100_000_000


def _check_safetensors(uri: str) -> None:
    try:
        with storage.open_input(uri) as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(0)
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < length <= min(size - 8, _SAFETENSORS_MAX_HEADER):
                raise CheckpointError(f"{uri} is not a safetensors file ({size} bytes, no valid header)")
            header = json.loads(f.read(length))
    except storage.StorageError as error:
        raise CheckpointError(f"incomplete checkpoint: {error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{uri} is not a safetensors file (its header is not JSON)") from None
    try:
        data = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise CheckpointError(f"{uri} is not a safetensors file (its header lists no tensor offsets)") from None
    expected = 8 + length + data
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise CheckpointError(f"{uri} is {state}: {size} bytes, its header says {expected}")


def _check_zip(uri: str) -> None:
    import zipfile

    try:
        with storage.open_input(uri) as f, zipfile.ZipFile(f):
            pass  # opening reads the central directory, written at the very end
    except storage.StorageError as error:
        raise CheckpointError(f"incomplete checkpoint: {error}") from None
    except zipfile.BadZipFile as error:
        raise CheckpointError(f"{uri} is not a whole torch.save file ({error})") from None


def load_train_state(directory: str | os.PathLike) -> dict[str, Any] | None:
    import torch

    path = Path(directory, STATE_FILE)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def git_revision() -> str | None:
    """The repo's commit, if the code runs from a git checkout (provenance, best effort)."""
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
