"""MA-Net: global multi-scale and local attention features (Zhao, Liu and Wang, IEEE TIP 2021).

Zhao, Liu and Wang, "Learning Deep Global Multi-Scale and Local Attention
Features for Facial Expression Recognition in the Wild", IEEE TIP 30:6544-6556,
official code at zengqunzhao/MA-Net (``model/manet.py``, ``model/attention.py``,
``main.py``). Faces in the wild are occluded and turned away, so one global
descriptor is fragile; MA-Net shares a ResNet-18 stem and its first two stages,
then splits into two branches:

- *global multi-scale*: ResNet-18's stages 3 and 4 with every basic block
  replaced by a multi-scale block (:class:`MulScaleBlock`): the block's channels
  are cut into four groups, chained through 3x3 convolutions in both directions
  (group 1 -> 4 and 4 -> 1), so each output group sees several receptive fields;
- *local attention*: the stage-2 feature map is cut into its four quadrants
  (the 28x28 map of a 224 px face into four 14x14 patches); each patch has its
  own stages 3 and 4 (stage 4 at stride 1) of attention blocks, basic blocks with
  CBAM channel and spatial attention (:class:`CBAM`), so each region learns where
  to look on its own. The four outputs are tiled back into one map and pooled.

Each branch has a linear head; the prediction is ``beta * local + (1 - beta) * global``
logits and the loss ``beta * CE(local) + (1 - beta) * CE(global)`` (official
``--beta 0.6``), as :meth:`MANet.loss` computes.

Beyond the official code: the quadrant cut is at half the feature map rather
than at fixed rows 14 and 28, so any input of at least 9 px works (identical at
224 px; the sample corpus's 32 px faces give a 4x4 stage-2 map). Module and
parameter names are the official ones, so an official state dict fits key for key
and shape for shape (checked in ``tests/test_ma_net.py`` against the official
structure; the published checkpoint itself was not loaded here). The official
checkpoint is a DataParallel dict (``{"state_dict": {"module.conv1.weight": ...}}``)
and the MS-Celeb pretraining's heads have 12666 identity classes:
``affectray finetune`` with ``init: <file>.pth.tar`` and ``init_strict: false``
unwraps and strips ``module.`` and loads every tensor but ``fc_1`` / ``fc_2``
(as the official ``main.py`` replaces them). A file that pickles more than tensors
(the official training checkpoints also store a ``RecorderMeter``) is refused by
torch's weights-only loader: re-save its ``state_dict`` alone first. The official
input is 224 px RGB in [0, 1] without mean/std normalisation (``transforms.ToTensor()``
only): set ``data.mean: [0, 0, 0]`` and ``data.std: [1, 1, 1]`` to feed official weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from affectray.models.heads import ClassifierMixin, cross_entropy, match_targets
from affectray.models.registry import ModelError, config_from_kwargs, describe_config, register_model

__all__ = ["CBAM", "AttentionBlock", "BasicBlock", "MANet", "MANetConfig", "MulScaleBlock"]


@dataclass
class MANetConfig:
    num_classes: int = 8  # official: 7 (RAF-DB, AffectNet-7, ...) or 8 (AffectNet-8)
    layers: tuple[int, ...] = (2, 2, 2, 2)  # blocks per ResNet stage (official: ResNet-18's [2, 2, 2, 2])
    beta: float = 0.6  # weight of the local branch in the fused logits and the loss (official --beta)

    def __post_init__(self) -> None:
        self.layers = tuple(int(n) for n in self.layers)  # lists from JSON / YAML
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ModelError(f"ma_net layers must be 4 block counts of at least 1, got {list(self.layers)}")
        if not 0.0 <= self.beta <= 1.0:
            raise ModelError(f"ma_net beta must be in [0, 1], got {self.beta}")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


# ---------------------------------------------------------------------------
# CBAM: channel then spatial attention (Woo et al., ECCV 2018), as MA-Net uses it
# ---------------------------------------------------------------------------


class ChannelAttention(nn.Module):
    """Scale each channel by sigmoid(MLP(avg pool) + MLP(max pool)), one shared MLP."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        # Flatten first, so the linear layers sit at mlp.1 and mlp.3 as in the official state dict.
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels, channels // reduction),
            nn.ReLU(),
            nn.Linear(channels // reduction, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))  # [B, C]
        return x * torch.sigmoid(pooled)[:, :, None, None]


class ConvBN(nn.Module):
    """Convolution + batch norm (momentum 0.01, the official CBAM's), no activation."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SpatialAttention(nn.Module):
    """Scale each position by sigmoid(7x7 conv of [max over channels, mean over channels])."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.spatial = ConvBN(2, 1, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)  # [B, 2, H, W]
        return x * torch.sigmoid(self.spatial(pooled))  # [B, C, H, W] * [B, 1, H, W]


class CBAM(nn.Module):
    """Channel attention, then spatial attention."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        # Capitalised attribute names: the official state dict's keys (cbam.ChannelGate.mlp.1.weight, ...).
        self.ChannelGate = ChannelAttention(channels, reduction)
        self.SpatialGate = SpatialAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.SpatialGate(self.ChannelGate(x))


# ---------------------------------------------------------------------------
# Residual blocks: relu(residual(x) + shortcut(x)); the three kinds differ in residual()
# ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet-18's block: residual = bn2(conv2(relu(bn1(conv1(x)))))."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample  # conv1x1 + BN where the shape changes, else the identity

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.residual(x) + shortcut)


class AttentionBlock(BasicBlock):
    """The local branch's block: a basic block whose residual passes through CBAM (reduction 16)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__(inplanes, planes, stride, downsample)
        self.cbam = CBAM(planes, 16)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.cbam(super().residual(x))


class MulScaleBlock(nn.Module):
    """The global branch's block: conv1 then four channel groups chained both ways through 3x3 convolutions.

    With g_1..g_4 the groups of relu(bn1(conv1(x))) and f_k(.) = bn(conv3x3(.)) (each its own),
    forward chain: y_1 = f_1(g_1), y_k = f_k(g_k + relu(y_{k-1}));
    backward chain: z_4 = f'_4(g_4), z_k = f'_k(g_k + relu(z_{k+1}));
    residual = [y_1..y_4] + [z_1..z_4] (channel concatenations).
    """

    groups = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.width = planes // self.groups
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        # Official names: conv1_2_k / bn1_2_k for the forward chain, conv2_2_k / bn2_2_k for the backward one.
        for chain in (1, 2):
            for k in range(1, self.groups + 1):
                self.add_module(f"conv{chain}_2_{k}", conv3x3(self.width, self.width))
                self.add_module(f"bn{chain}_2_{k}", nn.BatchNorm2d(self.width))
        self.downsample = downsample

    def _step(self, chain: int, k: int, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"bn{chain}_2_{k}")(getattr(self, f"conv{chain}_2_{k}")(x))

    def _chain(self, chain: int, groups: tuple[torch.Tensor, ...], order: range) -> torch.Tensor:
        outs: dict[int, torch.Tensor] = {}
        previous = None
        for k in order:  # 1-based group index
            g = groups[k - 1] if previous is None else groups[k - 1] + F.relu(previous)
            previous = outs[k] = self._step(chain, k, g)
        return torch.cat([outs[k] for k in range(1, self.groups + 1)], dim=1)  # [B, planes, H, W]

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        groups = torch.split(F.relu(self.bn1(self.conv1(x))), self.width, dim=1)  # 4 x [B, planes/4, H, W]
        forward = self._chain(1, groups, range(1, self.groups + 1))
        backward = self._chain(2, groups, range(self.groups, 0, -1))
        return forward + backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.residual(x) + shortcut)


def make_stage(block: type[nn.Module], inplanes: int, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    """``blocks`` blocks; the first changes the shape (with a conv1x1 + BN shortcut where it does)."""
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
    return nn.Sequential(
        block(inplanes, planes, stride, downsample), *(block(planes, planes) for _ in range(blocks - 1))
    )


# ---------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------

PATCHES = 4  # the stage-2 map's quadrants: p1 top-left, p2 top-right, p3 bottom-left, p4 bottom-right


class MANet(ClassifierMixin, nn.Module):
    """One face image -> expression logits. Input [B, 3, H, W], H and W at least 9 (official: 224).

    ``logits`` [B, C] are the beta-weighted branch logits; extras ``local_logits`` and
    ``global_logits`` [B, C], ``features`` [B, 1024] (pooled local then global features).
    """

    registry_name = "ma_net"
    input_kind = "frame"
    window = 1

    def __init__(self, cfg: MANetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        n1, n2, n3, n4 = cfg.layers
        # Shared stem and stages 1-2: ResNet-18's.
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = make_stage(BasicBlock, 64, 64, n1)
        self.layer2 = make_stage(BasicBlock, 64, 128, n2, stride=2)
        # Local branch: stages 3-4 of attention blocks per quadrant; stage 4 keeps the patch's resolution.
        for p in range(1, PATCHES + 1):
            self.add_module(f"layer3_1_p{p}", make_stage(AttentionBlock, 128, 256, n3, stride=2))
            self.add_module(f"layer4_1_p{p}", make_stage(AttentionBlock, 256, 512, n4, stride=1))
        # Global branch: stages 3-4 of multi-scale blocks over the whole map.
        self.layer3_2 = make_stage(MulScaleBlock, 128, 256, n3, stride=2)
        self.layer4_2 = make_stage(MulScaleBlock, 256, 512, n4, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc_1 = nn.Linear(512, cfg.num_classes)  # local head
        self.fc_2 = nn.Linear(512, cfg.num_classes)  # global head
        self.num_features = 2 * 512
        for m in self.modules():  # the official initialisation (linear layers keep torch's default)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> shared stage-2 map [B, 128, H/8, W/8]."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer2(self.layer1(x))

    def local_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-2 map [B, 128, h, w] -> pooled local attention features [B, 512]."""
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        patches = (x[..., :h, :w], x[..., :h, w:], x[..., h:, :w], x[..., h:, w:])
        outs = [
            getattr(self, f"layer4_1_p{p}")(getattr(self, f"layer3_1_p{p}")(patch))
            for p, patch in enumerate(patches, start=1)
        ]  # 4 x [B, 512, ~h/2, ~w/2]
        # Tile the quadrants back in place before pooling: with an odd map they differ in size.
        tiled = torch.cat([torch.cat(outs[:2], dim=3), torch.cat(outs[2:], dim=3)], dim=2)  # [B, 512, ~h, ~w]
        return self.avgpool(tiled).flatten(1)

    def global_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-2 map [B, 128, h, w] -> pooled global multi-scale features [B, 512]."""
        return self.avgpool(self.layer4_2(self.layer3_2(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.stem(x)  # [B, 128, H/8, W/8]
        if min(shared.shape[-2:]) < 2:
            raise ModelError(f"ma_net needs input images of at least 9x9 px to cut 4 patches, got {tuple(x.shape)}")
        local, glob = self.local_features(shared), self.global_features(shared)  # [B, 512] each
        local_logits, global_logits = self.fc_1(local), self.fc_2(glob)  # [B, C] each
        beta = self.cfg.beta
        return {
            "logits": beta * local_logits + (1 - beta) * global_logits,
            "local_logits": local_logits,
            "global_logits": global_logits,
            "features": torch.cat([local, glob], dim=1),  # [B, 1024]
        }

    def loss(
        self,
        outputs: dict[str, torch.Tensor],
        targets: torch.Tensor,
        *,
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """beta * CE(local) + (1 - beta) * CE(global); extras: each branch's CE.

        Per-frame targets [B, T] are scored at the centre frame, as it predicts.
        """
        _, targets = match_targets(outputs["logits"], targets)
        local = cross_entropy(outputs["local_logits"], targets, class_weights, label_smoothing)
        glob = cross_entropy(outputs["global_logits"], targets, class_weights, label_smoothing)
        beta = self.cfg.beta
        return beta * local + (1 - beta) * glob, {
            "loss_local": float(local.detach()),
            "loss_global": float(glob.detach()),
        }

    def describe(self) -> dict[str, Any]:
        return describe_config(self.registry_name, self.cfg, layers=list(self.cfg.layers))


@register_model("ma_net")
def ma_net(**kwargs: Any) -> MANet:
    """MA-Net; its trunk is the paper's ResNet-18, so it takes no ``backbone`` (set ``model.backbone: null``)."""
    return MANet(config_from_kwargs(MANetConfig, "ma_net", kwargs))
