"""VideoMAE: masked autoencoding of face clips with tube masking (Tong et al., NeurIPS 2022).

A clip [B, C, T, H, W] is cut into tubes of ``tubelet_size`` frames x ``patch_size``^2
pixels (one token each, L = T' * H' * W' tokens). Tube masking hides the same
spatial positions in every frame, so a masked patch cannot be copied from its
neighbour in time, and at a 90 % ratio the encoder sees only 10 % of the tokens.
The decoder gets the encoded visible tokens plus a shared mask token at every
hidden position and regresses the pixels of the hidden tubes, each normalised
over its own pixels (``norm_pix_loss``, VideoMAE's ``normlize_target``).

Steps, named as in facebookresearch/mae ``models_mae.py``::

    tube_masking -> forward_encoder -> forward_decoder -> forward_loss

The encoder (:class:`VideoViTEncoder`) runs unmasked for fine-tuning:
``forward_features(videos) -> [B, L, D]``; ``affectray.models.video_classifier`` builds the
families by name and mean-pools an encoder into expression logits. MAE-DFER's LGI-Former
encoder and its appearance + motion objective live in ``affectray.models.lgi_former`` and
reuse everything here: the config fields, tube embedding, decoder and the helpers made
public for it. This module imports no other family.

Choices: positions are VideoMAE's fixed 1D sine-cosine table over all L tokens
(not learnable, so they are no checkpoint state); qkv biases are timm's (q, k, v)
rather than VideoMAE's (q, v) only, which changes nothing (a key bias adds the
same logit to every key of a query, and softmax ignores it); the decoder
predicts every token and the loss keeps the masked ones (MAE), where VideoMAE
runs its head on the masked tokens only. Targets are normalised per tube and
channel on the model's input as given (VideoMAE first undoes the ImageNet
normalisation; a per-channel affine map cancels in this normalisation up to its eps).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from affectray.models.registry import ModelError

__all__ = [
    "VIDEO_MAE_SIZES",
    "TubeEmbed",
    "VideoMAE",
    "VideoMAEConfig",
    "VideoViTEncoder",
    "gather_tokens",
    "init_weights",
    "masking_from_keep",
    "norm_layer",
    "patchify",
    "sinusoid_position_table",
    "unpatchify",
]


@dataclass
class VideoMAEConfig:
    img_size: int = 224
    num_frames: int = 16
    tubelet_size: int = 2
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 384
    decoder_depth: int = 4
    decoder_num_heads: int = 6
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.9
    norm_pix_loss: bool = True  # regress each tube's pixels normalised over the tube (per channel)
    drop_path_rate: float = 0.0
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ModelError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_frames % self.tubelet_size:
            raise ModelError(f"num_frames {self.num_frames} is not a multiple of tubelet_size {self.tubelet_size}")
        if self.embed_dim % self.num_heads or self.decoder_embed_dim % self.decoder_num_heads:
            raise ModelError("embed_dim / decoder_embed_dim must be multiples of their num_heads")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ModelError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Token grid (T', H', W')."""
        side = self.img_size // self.patch_size
        return self.num_frames // self.tubelet_size, side, side

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_size
        return t * h * w

    @property
    def patch_dim(self) -> int:
        """Pixels per token: tubelet * p * p * C."""
        return self.tubelet_size * self.patch_size**2 * self.in_chans


VIDEO_MAE_SIZES: dict[str, VideoMAEConfig] = {
    # Runs a training step on a CPU in milliseconds: 32 px, 4 frames -> 2 x 4 x 4 = 32 tokens.
    "tiny": VideoMAEConfig(
        img_size=32,
        num_frames=4,
        tubelet_size=2,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
    ),
    # ViT-S/16 on 16 x 224 x 224 (VideoMAE's small).
    "small": VideoMAEConfig(embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=192, decoder_num_heads=3),
    # ViT-B/16 on 16 x 224 x 224 (VideoMAE's base), 1568 tokens.
    "base": VideoMAEConfig(),
}


# ---------------------------------------------------------------------------
# Tokens: tube embedding, positions, patchify / unpatchify
# ---------------------------------------------------------------------------


def sinusoid_position_table(num_positions: int, dim: int) -> torch.Tensor:
    """VideoMAE's fixed 1D sine-cosine table [1, N, D]: sin on even channels, cos on odd ones."""
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]  # [N, 1]
    freq = 10000.0 ** (-2.0 * (torch.arange(dim) // 2).double() / dim)  # [D]
    angle = pos * freq  # [N, D]
    table = torch.where(torch.arange(dim) % 2 == 0, angle.sin(), angle.cos())
    return table.float().unsqueeze(0)


class TubeEmbed(nn.Module):
    """[B, C, T, H, W] -> [B, L, D]: one Conv3d over (tubelet, p, p) tubes, tokens in (t, h, w) order."""

    def __init__(self, cfg: VideoMAEConfig) -> None:
        super().__init__()
        self.tubelet_size, self.patch_size = cfg.tubelet_size, cfg.patch_size
        self.expected = (cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size)
        kernel = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        if tuple(videos.shape[1:]) != self.expected:
            raise ModelError(
                f"expected videos [B, C, T, H, W] with (C, T, H, W) = {self.expected}, got {tuple(videos.shape)}"
            )
        return self.proj(videos).flatten(2).transpose(1, 2)  # [B, L, D]


def patchify(videos: torch.Tensor, tubelet_size: int, patch_size: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, L, tubelet*p*p*C], tokens in (t, h, w) order, pixels in (dt, dy, dx, c) order."""
    b, c, t, h, w = videos.shape
    u, p = tubelet_size, patch_size
    x = videos.reshape(b, c, t // u, u, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, T', H', W', u, p, p, C]
    return x.reshape(b, (t // u) * (h // p) * (w // p), u * p * p * c)


def unpatchify(x: torch.Tensor, grid_size: tuple[int, int, int], tubelet_size: int, patch_size: int) -> torch.Tensor:
    """[B, L, tubelet*p*p*C] -> [B, C, T, H, W]; the inverse of :func:`patchify`."""
    (gt, gh, gw), u, p = grid_size, tubelet_size, patch_size
    b = x.shape[0]
    c = x.shape[-1] // (u * p * p)
    x = x.reshape(b, gt, gh, gw, u, p, p, c)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, T', u, H', p, W', p]
    return x.reshape(b, c, gt * u, gh * p, gw * p)


def normalize_patches(patches: torch.Tensor, in_chans: int) -> torch.Tensor:
    """[B, L, u*p*p*C] -> same, each token standardised over its u*p*p pixels, per channel (VideoMAE)."""
    x = patches.unflatten(-1, (-1, in_chans))  # [B, L, u*p*p, C]
    mean = x.mean(dim=-2, keepdim=True)
    std = x.var(dim=-2, unbiased=True, keepdim=True).sqrt()
    return ((x - mean) / (std + 1e-6)).flatten(-2)


def masking_from_keep(
    keep: torch.Tensor, len_keep: int, order: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean keep [B, L] (len_keep True per row) -> (ids_keep [B, L_vis], mask [B, L] 1 = masked, ids_restore [B, L]).

    ``ids_keep`` lists the kept tokens in the order of ``order`` ([L], a fixed
    permutation of the tokens; default (t, h, w) order): a stable sort keeps it,
    which the LGI-Former relies on to group visible tokens region by region.
    """
    if order is None:
        order = torch.arange(keep.shape[1], device=keep.device)
    ids_shuffle = order[torch.argsort((~keep[:, order]).to(torch.int8), dim=1, stable=True)]  # [B, L]: kept first
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, L]
    return ids_shuffle[:, :len_keep], (~keep).float(), ids_restore


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], ids [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def init_weights(module: nn.Module) -> None:
    # VideoMAE / MAE: xavier-uniform linears (Conv3d as a linear on flattened tubes), zero biases.
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv3d):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


norm_layer = partial(nn.LayerNorm, eps=1e-6)


# ---------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------


class VideoViTEncoder(nn.Module):
    """Video ViT with joint space-time attention over tube tokens: [B, C, T, H, W] -> [B, L, D]."""

    def __init__(self, cfg: VideoMAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.grid_size = cfg.grid_size
        self.num_patches = cfg.num_patches
        self.num_features = self.embed_dim = cfg.embed_dim
        self.num_layers = cfg.depth
        self.patch_embed = TubeEmbed(cfg)
        self.register_buffer("pos_embed", sinusoid_position_table(cfg.num_patches, cfg.embed_dim), persistent=False)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # stochastic depth rule
        self.blocks = nn.ModuleList([self.make_block(d) for d in dpr])
        self.norm = norm_layer(cfg.embed_dim)
        self.apply(init_weights)

    def make_block(self, drop_path: float) -> nn.Module:
        c = self.cfg
        return Block(
            c.embed_dim, c.num_heads, c.mlp_ratio, qkv_bias=c.qkv_bias, drop_path=drop_path, norm_layer=norm_layer
        )

    def embed(self, videos: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> tube tokens with positions [B, L, D]."""
        return self.patch_embed(videos) + self.pos_embed.to(videos.dtype)

    def forward_blocks(self, videos: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens after the last block, before the final norm: [B, L, D] or [B, L_vis, D] (see forward_features)."""
        x = self.embed(videos)  # [B, L, D]
        if ids_keep is not None:
            x = gather_tokens(x, ids_keep)  # [B, L_vis, D]
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward_features(self, videos: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, L, D] (all tokens, (t, h, w) order), or [B, L_vis, D] for the ``ids_keep`` tokens."""
        return self.norm(self.forward_blocks(videos, ids_keep))

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        return self.forward_features(videos)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()


# ---------------------------------------------------------------------------
# Pretraining model
# ---------------------------------------------------------------------------


class VideoMAE(nn.Module):
    """VideoMAE pretraining: ``forward(videos) -> (loss, pred [B, L, u*p*p*C], mask [B, L])``."""

    encoder_class = VideoViTEncoder

    def __init__(self, cfg: VideoMAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = self.encoder_class(cfg)
        self.grid_size = cfg.grid_size
        # Decoder: a narrow ViT over all L tokens (visible + mask tokens).
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.register_buffer(
            "decoder_pos_embed", sinusoid_position_table(cfg.num_patches, cfg.decoder_embed_dim), persistent=False
        )
        self.decoder_blocks = nn.ModuleList(
            [
                Block(
                    cfg.decoder_embed_dim,
                    cfg.decoder_num_heads,
                    cfg.mlp_ratio,
                    qkv_bias=cfg.qkv_bias,
                    norm_layer=norm_layer,
                )
                for _ in range(cfg.decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(cfg.decoder_embed_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, cfg.patch_dim)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_weights)
        trunc_normal_(self.mask_token, std=0.02)

    # -- tokens ------------------------------------------------------------

    def patchify(self, videos: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, L, u*p*p*C]."""
        return patchify(videos, self.cfg.tubelet_size, self.cfg.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, u*p*p*C] -> [B, C, T, H, W]."""
        return unpatchify(x, self.grid_size, self.cfg.tubelet_size, self.cfg.patch_size)

    # -- masking -----------------------------------------------------------

    def num_masked(self, mask_ratio: float | None = None) -> int:
        """Tokens hidden per clip: T' * int(H'W' * ratio) (a tube mask hides whole tubes, so not int(L * ratio))."""
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        t, h, w = self.grid_size
        return t * int(h * w * ratio)

    def tube_masking(
        self, batch: int, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hide the same int(H'W' * ratio) spatial positions in every time step, a fresh draw per clip.

        Returns (ids_keep [B, L_vis], mask [B, L] with 1 = masked, ids_restore [B, L]).
        """
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        t, h, w = self.grid_size
        device = self.mask_token.device
        noise = torch.rand(batch, h * w, device=device, generator=generator)  # [B, H'W']
        rank = noise.argsort(dim=1).argsort(dim=1)  # [B, H'W']: each position's place in the random order
        keep = rank >= int(h * w * ratio)  # [B, H'W']: the lowest-noise positions are masked
        keep = keep.unsqueeze(1).expand(batch, t, h * w).reshape(batch, t * h * w)  # [B, L]: tubes
        return masking_from_keep(keep, self.cfg.num_patches - self.num_masked(ratio))

    # -- the three steps ---------------------------------------------------

    def forward_encoder(
        self, videos: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, C, T, H, W] -> (latent [B, L_vis, D], mask [B, L], ids_restore [B, L])."""
        ids_keep, mask, ids_restore = self.tube_masking(videos.shape[0], mask_ratio, generator)
        latent = self.encoder.forward_features(videos, ids_keep)  # [B, L_vis, D]
        return latent, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, L_vis, D] -> pred [B, L, u*p*p*C] for every token, (t, h, w) order."""
        x = self.decoder_embed(latent)  # [B, L_vis, Dd]
        b, n_vis, dd = x.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(b, ids_restore.shape[1] - n_vis, dd)
        x = torch.cat([x, mask_tokens], dim=1)  # [B, L, Dd], shuffled order: visible first
        x = gather_tokens(x, ids_restore)  # [B, L, Dd], (t, h, w) order
        x = x + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))  # [B, L, u*p*p*C]

    def targets(self, videos: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> regression target [B, L, u*p*p*C] (float32)."""
        target = self.patchify(videos.float())
        return normalize_patches(target, self.cfg.in_chans) if self.cfg.norm_pix_loss else target

    def pred_to_patches(self, pred: torch.Tensor) -> torch.Tensor:
        """Decoder output [B, L, P] -> predicted tube pixels [B, L, u*p*p*C] (in target space), for plots."""
        return pred

    def forward_loss(self, videos: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE over the pixels of the masked tubes only. videos [B, C, T, H, W], pred [B, L, P], mask [B, L]."""
        per_token = (pred.float() - self.targets(videos)).pow(2).mean(dim=-1)  # [B, L]
        return (per_token * mask).sum() / mask.sum()

    def forward(
        self, videos: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent, mask, ids_restore = self.forward_encoder(videos, mask_ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)  # [B, L, P]
        return self.forward_loss(videos, pred, mask), pred, mask

    # -- checkpoints -------------------------------------------------------

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights alone (keys without the ``encoder.`` prefix), for fine-tuning."""
        return self.encoder.state_dict()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
