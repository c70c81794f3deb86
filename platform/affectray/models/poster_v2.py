"""POSTER V2 (POSTER++): landmark queries over windows of image features (Mao et al., 2023).

Mao, Xu, Yin, Chang, Nie and Huang, "POSTER V2: A simpler and stronger facial
expression recognition network" (arXiv:2301.12149), code at zczcwh/POSTER_V2
(``models/PosterV2_7cls.py``, ``ir50.py``, ``mobilefacenet.py``, ``vit_model.py``).
92.21 % on RAF-DB, 67.49 % on AffectNet-7, 63.77 % on AffectNet-8.

The steps of ``forward``, for a face [B, 3, H, W] (published: 224 px, ImageNet mean/std)::

    resize             the face to S x S (S = 112, nearest), the side both backbones read
    image_features     IR-50's first three stages: [B, 64, S/2], [B, 128, S/4], [B, 256, S/8] (side);
                       a 3x3 stride-2 convolution per scale halves each: S/4, S/8, S/16
    landmark_features  MobileFaceNet (a facial-landmark network, frozen):
                       [B, 64, S/4], [B, 128, S/8], [B, 512 -> 256, S/16]
    cross_attention    per scale, the image map (layer-normed) is cut into windows of the landmark
                       grid's size (28, 14, 7: one window per face); the window's tokens give keys
                       and values, the landmark features the queries (2, 4, 8 heads, relative
                       position bias); a layer-scaled residual onto the normed map, then an MLP
    tokens             scale 1 through two stride-2 convolutions, scale 2 through one, scale 3
                       through a 1x1: (S/16)^2 tokens of 768 each per scale, 147 in all
    fuse               class token + learned positions, two ViT blocks, LayerNorm; the class
                       token, gated by a squeeze-excitation MLP, goes to a linear head

Module names and every tensor are the published model's (``face_landback``, ``ir_back``,
``VIT``, ``attn1``..``3``, ``window1``..``3``, ``conv1``..``3``, ``ffn1``..``3``,
``last_face_conv``, ``embed_q``/``_k``/``_v``), so a published checkpoint's
``state_dict`` loads strictly once ``module.`` is stripped
(``affectray import-checkpoint --format poster-v2``). That includes tensors its
forward never reads, which the files carry: IR-50's ArcFace embedding layer
(``ir_back.output_layer``), MobileFaceNet's landmark regressor
(``face_landback.output_layer``), and in ``VIT`` a ``patch_embed``, ``CON1``,
``IRLinear1``/``2``, an ``eca_block`` and a ``conv`` in each block. They never get a
gradient in the published training; here they are frozen (``requires_grad`` False),
which changes nothing and lets DDP run without ``find_unused_parameters``.

Versus the published code:
- Nothing is read at construction (theirs loads ``ir50.pth`` and
  ``mobilefacenet_model_best.pth.tar``): the weights come from a checkpoint. Built
  fresh, both backbones are randomly initialised, and the frozen landmark network
  then gives untrained features (``freeze_landmarks=False`` trains it).
- Their MobileFaceNet computes its 136 landmark coordinates and the model drops
  them; here they are not computed. The logits are the same; that head's batch-norm
  statistics (never used) no longer move in training, and a training batch of one
  no longer fails in its BatchNorm1d.
- The face is resized once for both backbones (theirs resizes it twice, alike).
- ``face_size``, ``ir_units`` and ``vit_depth`` may be made smaller, for tests; the
  defaults are the published model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models.vision_transformer import Block

from affectray.models.heads import ClassifierMixin
from affectray.models.registry import ModelError, config_from_kwargs, describe_config, register_model

__all__ = [
    "IR50",
    "MobileFaceNet",
    "PosterV2",
    "PosterV2Config",
    "WindowCrossAttention",
    "relative_position_index",
    "window_partition",
    "window_reverse",
]

DIMS = (64, 128, 256)  # channels of the three scales
HEADS = (2, 4, 8)  # cross-attention heads per scale (32 channels each)
EMBED_DIM = 768  # the fusion ViT's width
VIT_HEADS = 8
LANDMARKS = 136  # MobileFaceNet's regressor: 68 (x, y) points
FFN_DROP_PATH = (0.0, 0.125, 0.25)  # torch.linspace(0, 0.5, 5)[:3], as published
LAYER_SCALE = 1e-5


@dataclass
class PosterV2Config:
    num_classes: int = 7  # published: 7 (RAF-DB, AffectNet-7, CAER-S) or 8 (AffectNet-8)
    face_size: int = 112  # the side both backbones read; any input is resized to it (nearest), as published
    ir_units: tuple[int, int, int] = (3, 4, 14)  # IR-50's units in its first three stages
    vit_depth: int = 2  # fusion ViT blocks
    freeze_landmarks: bool = True  # as published: MobileFaceNet is not trained

    def __post_init__(self) -> None:
        self.ir_units = tuple(int(u) for u in self.ir_units)  # lists from JSON
        if self.num_classes < 1:
            raise ModelError(f"poster_v2 num_classes must be at least 1, got {self.num_classes}")
        if self.face_size < 16 or self.face_size % 16:
            raise ModelError(f"poster_v2 face_size must be a multiple of 16 (published: 112), got {self.face_size}")
        if len(self.ir_units) != 3 or min(self.ir_units) < 1:
            raise ModelError(
                f"poster_v2 ir_units must be three positive counts (published: 3, 4, 14), got {self.ir_units}"
            )
        if self.vit_depth < 1:
            raise ModelError(f"poster_v2 vit_depth must be at least 1, got {self.vit_depth}")

    @property
    def windows(self) -> tuple[int, int, int]:
        """The landmark grids' sides, which are the attention windows': 28, 14, 7 at 112 px."""
        return self.face_size // 4, self.face_size // 8, self.face_size // 16

    @property
    def tokens(self) -> int:
        """Tokens the fusion ViT reads besides its class token: (S/16)^2 per scale."""
        return 3 * (self.face_size // 16) ** 2


def _freeze(*modules: nn.Module) -> None:
    for module in modules:
        module.requires_grad_(False)


def _holder(**children: nn.Module) -> nn.Module:
    """A module that only holds ``children``: published tensors under their published names, never run."""
    holder = nn.Module()
    for name, child in children.items():
        holder.add_module(name, child)
    return holder


# ---------------------------------------------------------------------------
# Image backbone: IR-50 (ArcFace's improved-residual ResNet), first three stages
# ---------------------------------------------------------------------------


class BottleneckIR(nn.Module):
    """BN - 3x3 conv - PReLU - 3x3 conv (stride) - BN, plus the input (subsampled, or 1x1 conv + BN to a new width)."""

    def __init__(self, in_channels: int, depth: int, stride: int) -> None:
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, 1, stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def ir_stage(in_channels: int, depth: int, units: int) -> nn.Sequential:
    """A stride-2 unit, then units - 1 more at its width."""
    rest = (BottleneckIR(depth, depth, 1) for _ in range(units - 1))
    return nn.Sequential(BottleneckIR(in_channels, depth, 2), *rest)


class IR50(nn.Module):
    """IR-50's stem and first three stages; returns each stage's features."""

    def __init__(self, units: tuple[int, int, int] = (3, 4, 14)) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        # ArcFace's 512-d embedding after a fourth stage POSTER V2 drops: in the files, never run.
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512), nn.Dropout(0.0), nn.Flatten(), nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512)
        )
        self.body1 = ir_stage(64, 64, units[0])
        self.body2 = ir_stage(64, 128, units[1])
        self.body3 = ir_stage(128, 256, units[2])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x1 = self.body1(self.input_layer(x))  # [B, 64, S/2, S/2]
        x2 = self.body2(x1)  # [B, 128, S/4, S/4]
        x3 = self.body3(x2)  # [B, 256, S/8, S/8]
        return x1, x2, x3


# ---------------------------------------------------------------------------
# Landmark backbone: MobileFaceNet
# ---------------------------------------------------------------------------


class LinearBlock(nn.Module):
    """Convolution (no bias) and batch norm."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ConvBlock(LinearBlock):
    """Convolution, batch norm and PReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1
    ) -> None:
        super().__init__(in_channels, out_channels, kernel, stride, padding, groups)
        self.prelu = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(self.bn(self.conv(x)))


class DepthWise(nn.Module):
    """Inverted residual: 1x1 to ``groups`` channels, depthwise 3x3 (stride), 1x1 projection; optionally + input."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, stride: int = 1, residual: bool = False):
        super().__init__()
        self.conv = ConvBlock(in_channels, groups)
        self.conv_dw = ConvBlock(groups, groups, 3, stride, 1, groups=groups)
        self.project = LinearBlock(groups, out_channels)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.conv_dw(self.conv(x)))
        return x + y if self.residual else y


class Residual(nn.Module):
    """``blocks`` residual DepthWise units at one width."""

    def __init__(self, channels: int, blocks: int, groups: int) -> None:
        super().__init__()
        self.model = nn.Sequential(*(DepthWise(channels, channels, groups, residual=True) for _ in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class GDC(nn.Module):
    """MobileFaceNet's global depthwise head: [B, 512, 7, 7] -> 136 landmark coordinates (not used by POSTER V2)."""

    def __init__(self, outputs: int = LANDMARKS) -> None:
        super().__init__()
        self.conv_6_dw = LinearBlock(512, 512, 7, groups=512)
        self.linear = nn.Linear(512, outputs, bias=False)
        self.bn = nn.BatchNorm1d(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(self.conv_6_dw(x).flatten(1)))


class MobileFaceNet(nn.Module):
    """MobileFaceNet as the landmark network; returns its features at 1/4, 1/8 and 1/16 of the input side."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvBlock(3, 64, 3, 2, 1)
        self.conv2_dw = ConvBlock(64, 64, 3, 1, 1, groups=64)
        self.conv_23 = DepthWise(64, 64, 128, stride=2)
        self.conv_3 = Residual(64, 4, 128)
        self.conv_34 = DepthWise(64, 128, 256, stride=2)
        self.conv_4 = Residual(128, 6, 256)
        self.conv_45 = DepthWise(128, 128, 512, stride=2)
        self.conv_5 = Residual(128, 2, 256)
        self.conv_6_sep = ConvBlock(128, 512)
        self.output_layer = GDC(LANDMARKS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f1 = self.conv_3(self.conv_23(self.conv2_dw(self.conv1(x))))  # [B, 64, S/4, S/4]
        f2 = self.conv_4(self.conv_34(f1))  # [B, 128, S/8, S/8]
        f3 = self.conv_6_sep(self.conv_5(self.conv_45(f2)))  # [B, 512, S/16, S/16]
        return f1, f2, f3


# ---------------------------------------------------------------------------
# Window-based cross-attention: landmark queries, image keys and values
# ---------------------------------------------------------------------------


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * H/w * W/w, w*w, C]: windows in row-major order, each image's together."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """[B * H/w * W/w, w*w, C] -> [B, H, W, C], undoing :func:`window_partition`."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, height, width, c)


def relative_position_index(window: int) -> torch.Tensor:
    """[w*w, w*w]: each (query, key) pair's row in a (2w-1)^2 table of relative offsets (Swin's layout)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    offsets = coords[:, :, None] - coords[:, None, :] + (window - 1)  # [2, N, N], each in 0 .. 2w-2
    return offsets[0] * (2 * window - 1) + offsets[1]


def landmark_queries(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, C, h, w] landmark features -> [B, heads, h*w, C/heads] queries."""
    b, c = x.shape[:2]
    return x.flatten(2).transpose(1, 2).reshape(b, -1, heads, c // heads).transpose(1, 2)


class WindowNorm(nn.Module):
    """LayerNorm over channels, then windows; the normed map is also the residual (published ``window``)."""

    def __init__(self, window: int, dim: int) -> None:
        super().__init__()
        self.window = window
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm(x.permute(0, 2, 3, 1))  # [B, H, W, C]
        return window_partition(x, self.window), x  # [B*nW, w*w, C], [B, H, W, C]


class WindowCrossAttention(nn.Module):
    """Multi-head attention of a face's landmark queries over each of its image windows (GC ViT's global query)."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 2 * dim)  # keys and values only; the published name
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """x: [B*nW, N, C] image windows; q: [B, heads, N, C/heads] landmark queries -> [B*nW, N, C]."""
        bw, n, c = x.shape
        kv = self.qkv(x).reshape(bw, n, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]  # [B*nW, heads, N, C/heads]
        q = q.repeat_interleave(bw // q.shape[0], dim=0) * self.scale  # every window of a face: its queries
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # [N*N, heads]
        attn = q @ k.transpose(-2, -1) + bias.view(n, n, -1).permute(2, 0, 1)  # [B*nW, heads, N, N]
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(x)


class WindowFeedForward(nn.Module):
    """Windows back to a map, layer-scaled onto the residual, then a layer-scaled MLP (published ``feedforward``)."""

    def __init__(self, dim: int, window: int, drop_path: float) -> None:
        super().__init__()
        self.window = window
        self.gamma1 = nn.Parameter(LAYER_SCALE * torch.ones(dim))
        self.gamma2 = nn.Parameter(LAYER_SCALE * torch.ones(dim))
        self.mlp = Mlp(dim, 4 * dim)
        self.norm = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, windows: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        _, height, width, _ = shortcut.shape
        x = shortcut + self.drop_path(self.gamma1 * window_reverse(windows, self.window, height, width))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm(x)))  # [B, H, W, C]


# ---------------------------------------------------------------------------
# Multi-scale fusion: a small ViT over the three scales' tokens
# ---------------------------------------------------------------------------


class TokenEmbed(nn.Module):
    """1x1 convolution to tokens: [B, C, h, w] -> [B, h*w, D] (published ``PatchEmbed``)."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class FusionBlock(Block):
    """timm's pre-norm ViT block, plus the published block's token-mixing Conv1d, which its forward never uses."""

    def __init__(self, tokens: int, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.conv = nn.Conv1d(tokens, tokens, 1)


class SEGate(nn.Module):
    """x * sigmoid(W2 relu(W1 x)): squeeze-excitation on a feature vector."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.linear2(F.relu(self.linear1(x))))


class ClassificationHead(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class FusionViT(nn.Module):
    """Class token + learned positions, ViT blocks, LayerNorm; the class token, SE-gated, to the head."""

    def __init__(self, tokens: int, num_classes: int, depth: int, dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.se_block = SEGate(dim)
        self.patch_embed = _holder(proj=nn.Conv2d(256, dim, 1))
        self.head = ClassificationHead(dim, num_classes)
        self.eca_block = _holder(conv=nn.Conv1d(1, 1, 5, padding=2, bias=False))
        self.CON1 = nn.Conv2d(256, dim, 1, bias=False)
        self.IRLinear1 = nn.Linear(1024, dim)
        self.IRLinear2 = nn.Linear(dim, 512)
        self.blocks = nn.Sequential(*(FusionBlock(tokens + 1, dim, VIT_HEADS) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(_init_vit_weights)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        _freeze(self.patch_embed, self.eca_block, self.CON1, self.IRLinear1, self.IRLinear2)
        _freeze(*(block.conv for block in self.blocks))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, L, D] -> (logits [B, C], features [B, D])."""
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos_embed  # [B, L+1, D]
        x = self.norm(self.blocks(x))[:, 0]  # [B, D]: the class token
        features = self.se_block(x)
        return self.head(features), features


def _init_vit_weights(m: nn.Module) -> None:
    # The published ViT's initialisation (vit_model._init_vit_weights).
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.01)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


class PosterV2(ClassifierMixin, nn.Module):
    """One face image -> expression logits. Input [B, 3, H, W], ImageNet-normalised RGB (published: 224 px)."""

    registry_name = "poster_v2"
    input_kind = "frame"
    window = 1

    def __init__(self, cfg: PosterV2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        (w1, w2, w3), (d1, d2, d3), (h1, h2, h3) = cfg.windows, DIMS, HEADS
        # In the published order (its files list the keys so, a block's unused conv aside).
        self.face_landback = MobileFaceNet()
        self.VIT = FusionViT(cfg.tokens, cfg.num_classes, cfg.vit_depth)
        self.ir_back = IR50(cfg.ir_units)
        self.attn1 = WindowCrossAttention(d1, h1, w1)
        self.attn2 = WindowCrossAttention(d2, h2, w2)
        self.attn3 = WindowCrossAttention(d3, h3, w3)
        self.window1 = WindowNorm(w1, d1)
        self.window2 = WindowNorm(w2, d2)
        self.window3 = WindowNorm(w3, d3)
        self.conv1 = nn.Conv2d(d1, d1, 3, 2, 1)
        self.conv2 = nn.Conv2d(d2, d2, 3, 2, 1)
        self.conv3 = nn.Conv2d(d3, d3, 3, 2, 1)
        self.ffn1 = WindowFeedForward(d1, w1, FFN_DROP_PATH[0])
        self.ffn2 = WindowFeedForward(d2, w2, FFN_DROP_PATH[1])
        self.ffn3 = WindowFeedForward(d3, w3, FFN_DROP_PATH[2])
        self.last_face_conv = nn.Conv2d(512, d3, 3, padding=1)
        self.embed_q = nn.Sequential(nn.Conv2d(d1, EMBED_DIM, 3, 2, 1), nn.Conv2d(EMBED_DIM, EMBED_DIM, 3, 2, 1))
        self.embed_k = nn.Sequential(nn.Conv2d(d2, EMBED_DIM, 3, 2, 1))
        self.embed_v = TokenEmbed(d3, EMBED_DIM)
        _freeze(self.face_landback if cfg.freeze_landmarks else self.face_landback.output_layer)
        _freeze(self.ir_back.output_layer)

    def cross_attention(self, image: list[torch.Tensor], landmark: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per scale, landmark queries over windows of image features: [B, C, h, w] each (h = the landmark grid's)."""
        scales = zip(
            image,
            landmark,
            (self.conv1, self.conv2, self.conv3),
            (self.window1, self.window2, self.window3),
            (self.attn1, self.attn2, self.attn3),
            (self.ffn1, self.ffn2, self.ffn3),
        )
        fused = []
        for x, lm, conv, window, attn, ffn in scales:
            windows, shortcut = window(conv(x))  # [B*nW, w*w, C], [B, h, w, C]
            out = ffn(attn(windows, landmark_queries(lm, attn.num_heads)), shortcut)  # [B, h, w, C]
            fused.append(out.permute(0, 3, 1, 2))
        return fused

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.interpolate(x, size=self.cfg.face_size, mode="nearest")  # [B, 3, S, S]
        l1, l2, l3 = self.face_landback(x)
        landmark = [l1, l2, self.last_face_conv(l3)]  # [B, 64, S/4], [B, 128, S/8], [B, 256, S/16]
        o1, o2, o3 = self.cross_attention(list(self.ir_back(x)), landmark)
        t1 = self.embed_q(o1).flatten(2).transpose(1, 2)  # [B, (S/16)^2, 768]
        t2 = self.embed_k(o2).flatten(2).transpose(1, 2)  # [B, (S/16)^2, 768]
        tokens = torch.cat([t1, t2, self.embed_v(o3)], dim=1)  # [B, 3 * (S/16)^2, 768]
        logits, features = self.VIT(tokens)
        return {"logits": logits, "features": features}  # [B, C], [B, 768]

    def describe(self) -> dict[str, Any]:
        return describe_config(self.registry_name, self.cfg)


@register_model("poster_v2")
def poster_v2(**kwargs: Any) -> PosterV2:
    return PosterV2(config_from_kwargs(PosterV2Config, "poster_v2", kwargs))
