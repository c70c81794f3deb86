"""POSTER V2's published expression models as affectray classifier checkpoints.

POSTER V2 (Mao et al. 2023; zczcwh/POSTER_V2) publishes what its training script
(``main.py``; ``main_8.py`` for 8 classes) saves with ``torch.save``: a dict with
the ``nn.DataParallel`` model's ``state_dict`` (every key under ``module.``),
``best_acc`` (a tensor: the validation accuracy in %), ``epoch``, sometimes
``optimizer`` (SAM's state dict), and ``recorder`` / ``recorder1``, objects of the
script's own ``RecorderMeter`` classes (pickled as ``__main__.RecorderMeter``)::

    raf-db-model_best.pth        RAF-DB, 7 classes        92.21 %
    affectnet-7-model_best.pth   AffectNet, 7 classes     67.49 %
    affectnet-8-model_best.pth   AffectNet, 8 classes     63.77 %
    caer-s-model_best.pth        CAER-S, 7 classes        93.00 %

Class order: the script reads each dataset with torchvision's ``ImageFolder``,
whose class k is the k-th of the class folders' names, sorted as strings. The
folders are the datasets' own labels: RAF-DB's numbers 1-7 (Surprise, Fear,
Disgust, Happiness, Sadness, Anger, Neutral), AffectNet's 0-6 or 0-7 (Neutral,
Happiness, Sadness, Surprise, Fear, Disgust, Anger, Contempt) and CAER-S's class
names (Anger, Disgust, Fear, Happy, Neutral, Sad, Surprise: alphabetical). An
8-output file is AffectNet-8's; three datasets have 7 outputs in three orders,
so the file's name must say which (``raf``, ``affectnet``, ``caer``), as the
published names do, or ``--classes`` names them. Classes are stored under their
ABAW names (Contempt: Other, ``labels.canonical_class_name``).

Input as published: RGB, resized to 224 x 224 (the model itself resizes to 112),
ImageNet mean/std. RAF-DB's faces are five-point aligned, so the checkpoint asks
for aligned crops; ``--box-margin`` asks for the detector's box instead (AffectNet's
images are crops of its face boxes).

The file is read by :func:`affectray.importers.pickles.read_pickle`: nothing in it
runs and the training script is never imported. The model is the platform's
``poster_v2`` family (``affectray.models.poster_v2``), whose module names and
tensors are the published model's: the state dict, ``module.`` stripped, loads
strictly (every tensor placed, none left over, shapes equal).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from affectray import checkpoints as ckpt
from affectray.importers.output import write_imported
from affectray.importers.pickles import ForeignCheckpointError, describe, read_pickle
from affectray.labels import DATASET_CLASS_NAMES, LabelSet, canonical_class_name

__all__ = ["DATASETS", "PosterV2Error", "convert", "image_folder_classes", "import_checkpoint"]

FORMAT = "poster-v2"
ARCHITECTURE = "poster_v2"
IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_WEIGHT = "VIT.head.linear.weight"  # [classes, 768]: the class count


class PosterV2Error(ForeignCheckpointError):
    """A file that is not one of POSTER V2's training checkpoints, or not all of one."""


def image_folder_classes(folders: Mapping[str, str]) -> tuple[str, ...]:
    """Class names in the order torchvision's ImageFolder numbers them: by class folder name, sorted.

    ``folders``: class folder name -> class name.
    """
    return tuple(folders[name] for name in sorted(folders))


def _numbered(dataset: str) -> dict[str, str]:
    return {str(k): v for k, v in DATASET_CLASS_NAMES[dataset].items()}


_CAER_S_FOLDERS = ("Anger", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise")

# label set name -> (the dataset, a pattern its published file name matches, classes in output order)
DATASETS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "rafdb": ("RAF-DB", r"raf[-_]?db", image_folder_classes(_numbered("rafdb"))),
    "affectnet7": ("AffectNet-7", r"affectnet", image_folder_classes(_numbered("affectnet7"))),
    "affectnet8": ("AffectNet-8", r"affectnet", image_folder_classes(_numbered("affectnet8"))),
    "caers": ("CAER-S", r"caer", image_folder_classes({name: name for name in _CAER_S_FOLDERS})),
}


def _state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The saved model's state dict, ``module.`` (nn.DataParallel's prefix) stripped."""
    if not isinstance(obj, dict) or "state_dict" not in obj:
        keys = f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else ""
        raise PosterV2Error(
            f"{source}: expected the dict POSTER V2's main.py saves (state_dict, best_acc, epoch, ...), "
            f"found {describe(obj)}{keys}"
        )
    saved = obj["state_dict"]
    if not isinstance(saved, Mapping) or not saved:
        raise PosterV2Error(f"{source}: 'state_dict' is {describe(saved)}, not a dict of tensors")
    state: dict[str, torch.Tensor] = {}
    for key, value in saved.items():
        if not isinstance(value, torch.Tensor):
            raise PosterV2Error(f"{source}: state_dict[{key!r}] is {describe(value)}, not a tensor")
        name = str(key).removeprefix("module.")
        if name in state:
            raise PosterV2Error(f"{source}: state_dict holds {name!r} both with and without 'module.'")
        state[name] = value.detach()
    return state


def _class_names(count: int, classes: list[str] | None, source: str) -> tuple[tuple[str, ...], str, str | None]:
    """(the published names in output order, the label set's name, the dataset or None)."""
    if classes:
        if len(classes) != count:
            raise PosterV2Error(f"{source}: --classes names {len(classes)} classes, the model has {count} outputs")
        return tuple(classes), "custom", None
    name = Path(source).name.lower()
    candidates = [key for key, (_, _, names) in DATASETS.items() if len(names) == count]
    if not candidates:
        raise PosterV2Error(
            f"{source}: {count} outputs; POSTER V2's published models have 7 or 8: name them with --classes"
        )
    fits = [key for key in candidates if re.search(DATASETS[key][1], name)] if len(candidates) > 1 else candidates
    if len(fits) != 1:
        options = "; ".join(f"{DATASETS[k][0]}: --classes {' '.join(DATASETS[k][2])}" for k in candidates)
        raise PosterV2Error(
            f"{source}: {count} outputs, and the file's name does not say which published model it is "
            f"(raf-db-, affectnet-7-, caer-s-model_best.pth): name its classes in output order ({options})"
        )
    dataset, _, names = DATASETS[fits[0]]
    return names, fits[0], dataset


def _number(value: Any) -> float | int | None:
    """best_acc / epoch as a plain number (a one-element tensor, or an int or float), else None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def convert(
    path: str | os.PathLike, *, classes: list[str] | None = None, box_margin: float | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The POSTER V2 model in ``path`` as a "poster_v2" classifier with all its weights, and the checkpoint's meta."""
    from affectray.models.backbones import WeightsMismatchError, apply_state_dict
    from affectray.models.registry import create_model

    if box_margin is not None and not 0.0 <= float(box_margin) < 10.0:
        raise PosterV2Error(f"box margin must be in [0, 10), got {box_margin}")
    path = Path(path)
    source = str(path)
    saved = read_pickle(path)
    state = _state_dict(saved, source)
    head = state.get(HEAD_WEIGHT)
    if head is None or head.dim() != 2:
        raise PosterV2Error(
            f"{source}: no {HEAD_WEIGHT} [classes, 768] in its state_dict: not a POSTER V2 model "
            f"(it has e.g. {sorted(state)[:3]})"
        )
    published, label_set_name, dataset = _class_names(head.shape[0], classes, source)
    names = tuple(canonical_class_name(c) for c in published)  # by name: Contempt is ABAW's Other (labels.py)

    model = create_model(ARCHITECTURE, num_classes=len(names))
    try:
        fit = apply_state_dict(model, state, source=source, strict=True)
    except WeightsMismatchError as error:
        raise PosterV2Error(f"{error} (the file's state_dict, 'module.' stripped)") from None
    model.eval()

    crop = "aligned" if box_margin is None else "box"
    meta = {
        "kind": "classifier",
        "model": model.describe(),
        "label_set": LabelSet(label_set_name, names).to_dict(),
        "preprocessing": ckpt.Preprocessing(
            mode="frame",
            image_size=IMAGE_SIZE,
            channels=3,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            crop=crop,
            box_margin=0.0 if box_margin is None else float(box_margin),
        ).to_dict(),
        "source": {
            "format": FORMAT,
            "file": path.name,
            "sha256": ckpt.file_sha256(path),
            "classes": list(published),  # the publisher's names, in output order
            "dataset": dataset,
            "best_acc": _number(saved.get("best_acc")),  # the training script's validation accuracy, %
            "epoch": _number(saved.get("epoch")),
            "architecture": ARCHITECTURE,
            "tensors": len(fit.loaded),
            "converted_by": "affectray.importers.poster_v2",
        },
    }
    return model, meta


def import_checkpoint(
    path: str | os.PathLike, out: str, *, classes: list[str] | None = None, box_margin: float | None = None
) -> dict[str, Any]:
    """Convert the POSTER V2 file ``path`` into a classifier checkpoint at ``out`` (a path or s3:// URI).

    Written whole and swapped in (:func:`~affectray.importers.output.write_imported`);
    returns what the job summary records.
    """
    model, meta = convert(path, classes=classes, box_margin=box_margin)
    return write_imported(model, meta, out, format=FORMAT)
