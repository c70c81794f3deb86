"""HSEmotion's published expression models as affectray classifier checkpoints.

HSEmotion (A. Savchenko; av-savchenko/face-emotion-recognition, the ``hsemotion``
package, EmotiEffLib) publishes whole pickled timm models, written with
``torch.save(model, path)``: a ``tf_efficientnet_b0_ns`` / ``tf_efficientnet_b2_ns``
trained on AffectNet, whose timm ``classifier`` was replaced by a plain
``nn.Linear`` (some files wrap it in a one-layer ``nn.Sequential``)::

    enet_b0_8_best_afew.pt, enet_b0_8_best_vgaf.pt   EfficientNet-B0, 224 px, 8 classes
    enet_b2_8.pt                                      EfficientNet-B2, 260 px, 8 classes
    enet_b2_7.pt                                      EfficientNet-B2, 260 px, 7 classes (no Contempt)
    enet_b0_8_va_mtl.pt                               10 outputs: 8 classes + valence + arousal (refused)

Outputs in the order Anger, Contempt, Disgust, Fear, Happiness, Neutral, Sadness,
Surprise (the 7-class model: without Contempt). Input as the ``hsemotion`` package
feeds it: RGB, resized to 224 (B0) or 260 (B2), ImageNet mean/std.

The file is read by :func:`affectray.importers.pickles.read_pickle`, so nothing in it
runs. The model is rebuilt as the platform's "frame" family (a timm backbone built
with ``pretrained=False`` and ``num_classes=0``, then a linear head): timm's keys go
to ``backbone.*`` and the classifier to ``head.*``, loaded strictly (every tensor
placed, none left over, shapes equal). B0 or B2 is told from the tensors' shapes
(the last convolution and the block count), TensorFlow-style padding from the
pickled layers (``Conv2dSame`` and batch-norm epsilon 1e-3, as ``tf_`` models have);
then every convolution's stride, padding, dilation and groups and every batch norm's
epsilon are compared with the rebuilt model's, so the two compute the same function.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from affectray import checkpoints as ckpt
from affectray.importers.output import write_imported
from affectray.importers.pickles import (
    ForeignCheckpointError,
    Placeholder,
    describe,
    is_module,
    module_state_dict,
    named_modules,
    read_pickle,
)
from affectray.labels import LabelSet, canonical_class_name

__all__ = [
    "CLASSES_7",
    "CLASSES_8",
    "DEFAULT_BOX_MARGIN",
    "HSEmotionError",
    "VARIANTS",
    "Variant",
    "convert",
    "import_checkpoint",
]

FORMAT = "hsemotion"

# The hsemotion package's idx_to_class, in the models' output order.
CLASSES_8 = ("Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise")
CLASSES_7 = ("Anger", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise")
LABEL_SET_NAMES = {8: "affectnet8", 7: "affectnet7"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# HSEmotion's own examples (the hsemotion package's README and demos) cut the face
# detector's box as it is (MTCNN's box, or the extent of MediaPipe's face mesh):
# no margin, not squared, stretched to the square input by Resize((size, size)).
# The platform's "box" crop is the square around the box's centre on its longer side
# times (1 + margin): a margin of 0 keeps the published scale (a little more context
# beside a tall box, and no stretching).
DEFAULT_BOX_MARGIN = 0.0


class HSEmotionError(ForeignCheckpointError):
    """A file that is not one of HSEmotion's pickled EfficientNets, or not all of one."""


@dataclass(frozen=True)
class Variant:
    """An EfficientNet size HSEmotion publishes, told apart by its tensors."""

    name: str  # "b0"
    conv_head: tuple[int, int]  # the last 1x1 convolution's (out, in) channels
    blocks: int  # inverted-residual blocks
    image_size: int  # the input side HSEmotion feeds it


VARIANTS = (Variant("b0", (1280, 320), 16, 224), Variant("b2", (1408, 352), 23, 260))


def _root_module(obj: Any, source: str) -> Placeholder:
    """The pickled EfficientNet (under a DataParallel wrapper, if one was saved)."""
    if is_module(obj) and obj.name in ("DataParallel", "DistributedDataParallel"):
        obj = obj.get("_modules", {}).get("module")
    if not is_module(obj) or obj.name != "EfficientNet":
        raise HSEmotionError(
            f"{source}: expected a pickled timm EfficientNet (HSEmotion saves the whole model with "
            f"torch.save(model, path)), found {describe(obj)}"
        )
    return obj


def _classifier(
    root: Placeholder, state: dict[str, torch.Tensor], source: str
) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(prefix, weight [C, D], bias [C]) of the one nn.Linear under timm's ``classifier``."""
    modules = dict(named_modules(root))
    if "classifier" not in modules:
        raise HSEmotionError(f"{source}: the EfficientNet has no 'classifier' module")
    linears = [
        n for n, m in modules.items() if (n == "classifier" or n.startswith("classifier.")) and m.name == "Linear"
    ]
    if len(linears) != 1:
        raise HSEmotionError(
            f"{source}: expected one nn.Linear as the classifier (HSEmotion's head), found {len(linears)} "
            f"under 'classifier' ({modules['classifier'].global_name})"
        )
    prefix = linears[0]
    tensors = sorted(k for k in state if k.startswith("classifier."))
    expected = [f"{prefix}.bias", f"{prefix}.weight"]
    if tensors != expected:
        raise HSEmotionError(f"{source}: the classifier holds {tensors}, expected exactly {expected}")
    weight, bias = state[f"{prefix}.weight"], state[f"{prefix}.bias"]
    if weight.dim() != 2 or bias.shape != weight.shape[:1]:
        raise HSEmotionError(
            f"{source}: classifier weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not fit"
        )
    return prefix, weight, bias


def _variant(state: dict[str, torch.Tensor], source: str) -> Variant:
    head = state.get("conv_head.weight")
    blocks = len({".".join(k.split(".")[:3]) for k in state if k.startswith("blocks.")})
    shape = tuple(head.shape[:2]) if head is not None else None
    for variant in VARIANTS:
        if shape == variant.conv_head and blocks == variant.blocks:
            return variant
    known = ", ".join(f"{v.name}: conv_head {v.conv_head}, {v.blocks} blocks" for v in VARIANTS)
    raise HSEmotionError(
        f"{source}: not an EfficientNet size HSEmotion publishes: conv_head {shape}, {blocks} blocks (known: {known})"
    )


def _tf_padding(root: Placeholder) -> bool:
    """Whether the pickled layers are TensorFlow-ported ones (timm's ``tf_`` models): Conv2dSame, BN eps 1e-3."""
    for _, module in named_modules(root):
        if module.name == "Conv2dSame":
            return True
        eps = module.get("eps")
        if isinstance(eps, float) and "running_var" in (module.get("_buffers") or {}) and math.isclose(eps, 1e-3):
            return True
    return False


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _check_layers(root: Placeholder, backbone: torch.nn.Module, source: str, architecture: str) -> int:
    """Compare every pickled convolution and batch norm with the rebuilt backbone's; returns how many were compared."""
    built = dict(backbone.named_modules())
    differences = []
    compared = 0
    for name, module in named_modules(root):
        if name == "classifier" or name.startswith("classifier."):
            continue
        attrs = module.attributes
        mine = built.get(name)
        if "kernel_size" in attrs and "groups" in attrs:  # a convolution
            if mine is None or not isinstance(mine, torch.nn.Conv2d):
                differences.append(f"{name}: {module.global_name} has no convolution in {architecture}")
                continue
            compared += 1
            if module.name == "Conv2dSame" and type(mine).__name__ != "Conv2dSame":
                differences.append(
                    f"{name}: pickled Conv2dSame (TensorFlow 'same' padding), rebuilt {type(mine).__name__}"
                )
            for field in ("stride", "padding", "dilation", "groups"):
                if _norm(attrs.get(field)) != _norm(getattr(mine, field)):
                    differences.append(
                        f"{name}.{field}: pickled {attrs.get(field)!r}, rebuilt {getattr(mine, field)!r}"
                    )
        elif "running_var" in (attrs.get("_buffers") or {}) and "eps" in attrs:  # a batch norm
            if mine is None or not isinstance(mine, torch.nn.modules.batchnorm._BatchNorm):
                differences.append(f"{name}: {module.global_name} has no batch norm in {architecture}")
                continue
            compared += 1
            if not math.isclose(float(attrs["eps"]), float(mine.eps)):
                differences.append(f"{name}.eps: pickled {attrs['eps']!r}, rebuilt {mine.eps!r}")
    if differences:
        shown = "; ".join(differences[:5]) + (f" (+{len(differences) - 5} more)" if len(differences) > 5 else "")
        raise HSEmotionError(f"{source}: its layers do not compute what {architecture}'s do: {shown}")
    return compared


def _class_names(count: int, classes: list[str] | None, source: str) -> tuple[tuple[str, ...], str]:
    """(the published names in output order, the label set's name)."""
    if count == 10:  # HSEmotion's only 10-output model; --classes cannot make valence and arousal classes
        raise HSEmotionError(
            f"{source}: 10 outputs: HSEmotion's multi-task model (8 expressions + valence + arousal, "
            "enet_b0_8_va_mtl); the frame family has no valence/arousal head, so it is not imported"
        )
    if classes:
        if len(classes) != count:
            raise HSEmotionError(f"{source}: --classes names {len(classes)} classes, the model has {count} outputs")
        return tuple(classes), "custom"
    if count not in LABEL_SET_NAMES:
        raise HSEmotionError(f"{source}: {count} outputs; HSEmotion's models have 8 or 7: name them with --classes")
    return (CLASSES_8 if count == 8 else CLASSES_7), LABEL_SET_NAMES[count]


def convert(
    path: str | os.PathLike, *, classes: list[str] | None = None, box_margin: float | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The HSEmotion model in ``path`` as a "frame" classifier with all its weights, and the checkpoint's meta."""
    from affectray.models.backbones import WeightsMismatchError, apply_state_dict
    from affectray.models.registry import create_model

    margin = DEFAULT_BOX_MARGIN if box_margin is None else float(box_margin)
    if not 0.0 <= margin < 10.0:
        raise HSEmotionError(f"box margin must be in [0, 10), got {margin}")
    path = Path(path)
    source = str(path)
    root = _root_module(read_pickle(path), source)
    state = module_state_dict(root)
    prefix, weight, bias = _classifier(root, state, source)
    variant = _variant(state, source)
    published, label_set_name = _class_names(weight.shape[0], classes, source)
    names = tuple(canonical_class_name(c) for c in published)  # by name: Contempt is ABAW's Other (labels.py)
    architecture = f"tf_efficientnet_{variant.name}" if _tf_padding(root) else f"efficientnet_{variant.name}"
    drop_rate = root.get("drop_rate")
    drop_rate = float(drop_rate) if isinstance(drop_rate, (int, float)) and 0 <= drop_rate < 1 else 0.0

    model = create_model("frame", backbone=architecture, num_classes=len(names), drop_rate=drop_rate)
    mapped = {f"backbone.{k}": v for k, v in state.items() if not k.startswith("classifier.")}
    mapped.update({"head.weight": weight, "head.bias": bias})
    try:
        fit = apply_state_dict(model, mapped, source=source, strict=True)
    except WeightsMismatchError as error:
        raise HSEmotionError(f"{error} (the file's timm keys under backbone.*, its {prefix} as head.*)") from None
    compared = _check_layers(root, model.backbone, source, architecture)
    model.eval()

    meta = {
        "kind": "classifier",
        "model": model.describe(),
        "label_set": LabelSet(label_set_name, names).to_dict(),
        "preprocessing": ckpt.Preprocessing(
            mode="frame",
            image_size=variant.image_size,
            channels=3,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            crop="box",
            box_margin=margin,
        ).to_dict(),
        "source": {
            "format": FORMAT,
            "file": path.name,
            "sha256": ckpt.file_sha256(path),
            "classes": list(published),  # the publisher's names, in output order
            "pickled_class": root.global_name,
            "architecture": architecture,
            "variant": variant.name,
            "tensors": len(fit.loaded),
            "layers_compared": compared,
            "converted_by": "affectray.importers.hsemotion",
        },
    }
    return model, meta


def import_checkpoint(
    path: str | os.PathLike, out: str, *, classes: list[str] | None = None, box_margin: float | None = None
) -> dict[str, Any]:
    """Convert the HSEmotion file ``path`` into a classifier checkpoint at ``out`` (a path or s3:// URI).

    Written whole and swapped in (:func:`~affectray.importers.output.write_imported`);
    returns what the job summary records.
    """
    model, meta = convert(path, classes=classes, box_margin=box_margin)
    return write_imported(model, meta, out, format=FORMAT)
