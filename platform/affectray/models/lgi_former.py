"""MAE-DFER: LGI-Former encoder + joint appearance/motion masked autoencoding (Sun et al., ACM MM 2023).

LGI-Former (Local-Global Interaction Transformer) replaces the video ViT's
joint space-time attention, quadratic in all L tokens, with three cheaper steps
per block. The token grid [T', H', W'] is cut into R non-overlapping regions of
``region_size`` = (rt, rh, rw) tokens, and each region gets one *region token*
(MAE-DFER's "messenger" token)::

    (i)   local:       the tokens of a region and its region token attend to one another
    (ii)  global:      the R region tokens attend to one another (information across the clip)
    (iii) propagation: every local token cross-attends to the R updated region tokens
    then one MLP over all tokens

Masking keeps regions rectangular: the tube mask hides the same number of
spatial positions inside every (rh, rw) window (and the same positions in every
frame), so every region holds exactly rt * (rh*rw - int(rh*rw*ratio)) visible
tokens and the visible set reshapes to [B, R, S_vis, D] (MAE-DFER's
``part_window`` mask with window = region). Fine-tuning runs the same blocks on
all tokens of each region.

The decoder is VideoMAE's (``affectray.models.mae``); only its target changes.
Per masked tube of u frames (normalised per tube and channel as in VideoMAE), it
predicts the *appearance*, the tube's first frame, and the *motion*, the u-1
differences between consecutive frames inside the tube, with one head whose
output splits into the two (same width as VideoMAE's head)::

    loss = appearance_loss + motion_weight * motion_loss

Versus MAE-DFER's code (``modeling_pretrain.py``, ``engine_for_pretraining.py``):
- (i) self-attention and (iii) locals-to-all-region-tokens cross-attention are
  theirs (pretraining defaults ``lg_first_attn_type='self'``, ``lg_third_attn_type='cross'``).
- Region tokens: theirs are one learned vector per region; ours start as the mean
  of the region's (visible) tokens plus that learned vector (``region_token_init
  = "mean"``; ``"embed"`` gives theirs). The mean carries the region's content
  and position into the global step from the first block.
- Motion target: theirs is frame1 - frame0 inside 2-frame tubes with a plain MSE
  over [appearance | motion]; with tubelet 2 that is our target, and their loss is
  ours with motion_weight 1 divided by 2 (AdamW is invariant to that factor).
  Tubes longer than 2 frames use consecutive differences here.
- Their rearrange of the visible tokens requires windows as wide as the frame;
  ours gathers by index, so any region size that divides the grid works.
- Layer-wise lr decay puts the region embeddings with the patch embedding
  (layer 0); theirs falls through to the last layer by name.
- Attention weights: theirs keep q and k/v (or q, k, v) as separate bias-free linears
  plus a q bias and a v bias (no k bias); ours are timm's fused ``qkv`` with one bias.
  The two compute the same function (:mod:`affectray.importers.mae_dfer` fuses theirs
  with a zero k bias), and a k bias changes no attention weight anyway.
- Their decoder adds the visible positions in (t, h, w) order to the encoder's
  region-major outputs, so with 2-frame regions and several windows per frame a visible
  token meets another token's position there; ours gives each its own
  (``decoder_positions="own"``; ``"sorted"`` is theirs, for their decoder weights).
- Fine-tuning: their classifier mean-pools the region tokens (DFEW's
  ``lg_classify_token_type='region'``) or the clip's tokens, then a LayerNorm
  (``fc_norm``, the encoder's last norm is an identity); ``VideoEncoderClassifier``'s
  ``pool`` and ``fc_norm`` settings give theirs, :meth:`LGIFormerEncoder.forward_regions`
  the region tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models.vision_transformer import Attention

from affectray.models.mae import (
    VideoMAE,
    VideoMAEConfig,
    VideoViTEncoder,
    gather_tokens,
    masking_from_keep,
    norm_layer,
)
from affectray.models.registry import ModelError

__all__ = [
    "MAEDFER",
    "MAEDFERConfig",
    "MAE_DFER_SIZES",
    "CrossAttention",
    "LGIBlock",
    "LGIFormerEncoder",
    "region_merge",
    "region_partition",
    "sorted_restore",
]


@dataclass
class MAEDFERConfig(VideoMAEConfig):
    # MAE-DFER's pretraining run: 16 x 160 x 160 clips, dim 512, depth 16 (85 M encoder parameters).
    img_size: int = 160
    embed_dim: int = 512
    depth: int = 16
    num_heads: int = 8
    region_size: tuple[int, int, int] = (2, 5, 10)  # (rt, rh, rw) tokens per region
    motion_weight: float = 1.0
    region_token_init: str = "mean"  # "mean": region mean + learned embedding; "embed": learned only (MAE-DFER)
    # Positions the decoder adds to the visible tokens: "own" (each token's); "sorted" (MAE-DFER's code: the
    # visible positions in (t, h, w) order, given to the encoder's region-major outputs one by one).
    decoder_positions: str = "own"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.region_size = tuple(int(v) for v in self.region_size)
        if len(self.region_size) != 3 or any(
            v < 1 or g % v for v, g in zip(self.region_size, self.grid_size, strict=True)
        ):
            raise ModelError(f"region_size {self.region_size} must divide the token grid {self.grid_size}")
        if self.tubelet_size < 2:
            raise ModelError("MAE-DFER's motion target needs tubelet_size >= 2 (frame differences inside a tube)")
        if self.region_token_init not in ("mean", "embed"):
            raise ModelError(f"region_token_init must be 'mean' or 'embed', got {self.region_token_init!r}")
        if self.decoder_positions not in ("own", "sorted"):
            raise ModelError(f"decoder_positions must be 'own' or 'sorted', got {self.decoder_positions!r}")

    @property
    def num_regions(self) -> int:
        return self.num_patches // (self.region_size[0] * self.region_size[1] * self.region_size[2])


MAE_DFER_SIZES: dict[str, MAEDFERConfig] = {
    # 32 px, 4 frames: grid 2 x 4 x 4, four regions of 1 x 2 x 4 tokens (full-width windows, as MAE-DFER's).
    "tiny": MAEDFERConfig(
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
        region_size=(1, 2, 4),
    ),
    "small": MAEDFERConfig(embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=192, decoder_num_heads=3),
    # The paper's model: grid 8 x 10 x 10, eight regions of 2 x 5 x 10 tokens.
    "base": MAEDFERConfig(),
}


# ---------------------------------------------------------------------------
# Regions
# ---------------------------------------------------------------------------


Grid = tuple[int, int, int]


def region_partition(x: torch.Tensor, grid_size: Grid, region_size: Grid) -> torch.Tensor:
    """[B, L, D] in (t, h, w) order -> [B, R, S, D]: regions in (nt, nh, nw) order, S = rt*rh*rw tokens each."""
    (t, h, w), (rt, rh, rw) = grid_size, region_size
    b, d = x.shape[0], x.shape[-1]
    x = x.reshape(b, t // rt, rt, h // rh, rh, w // rw, rw, d)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)  # [B, nt, nh, nw, rt, rh, rw, D]
    return x.reshape(b, -1, rt * rh * rw, d)


def region_merge(x: torch.Tensor, grid_size: Grid, region_size: Grid) -> torch.Tensor:
    """[B, R, S, D] -> [B, L, D] in (t, h, w) order; the inverse of :func:`region_partition`."""
    (t, h, w), (rt, rh, rw) = grid_size, region_size
    b, d = x.shape[0], x.shape[-1]
    x = x.reshape(b, t // rt, h // rh, w // rw, rt, rh, rw, d)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7)  # [B, nt, rt, nh, rh, nw, rw, D]
    return x.reshape(b, t * h * w, d)


# ---------------------------------------------------------------------------
# LGI-Former
# ---------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """Queries from x [B, N, D], keys and values from context [B, M, D] (timm's Attention is self-attention only)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)  # [B, h, N, d/h]
        k, v = self.kv(context).view(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2 x [B, h, M, d/h]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, d/h]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class LGIBlock(nn.Module):
    """One LGI-Former block on [B, R, 1+S, D] (index 0 of each region = its region token)."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.local_norm = norm_layer(dim)
        self.local_attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.global_norm = norm_layer(dim)
        self.global_attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.propagate_norm = norm_layer(dim)
        self.propagate_norm_ctx = norm_layer(dim)
        self.propagate_attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, r, s1, d = x.shape
        # (i) local: within each region, its tokens and its region token
        x = x + self.drop_path(self.local_attn(self.local_norm(x.flatten(0, 1)))).view(b, r, s1, d)
        region, local = x[:, :, 0], x[:, :, 1:].reshape(b, r * (s1 - 1), d)  # [B, R, D], [B, R*S, D]
        # (ii) global: region tokens exchange information across the clip
        region = region + self.drop_path(self.global_attn(self.global_norm(region)))
        # (iii) propagation: local tokens read the updated region tokens
        local = local + self.drop_path(self.propagate_attn(self.propagate_norm(local), self.propagate_norm_ctx(region)))
        x = torch.cat([region.unsqueeze(2), local.view(b, r, s1 - 1, d)], dim=2)  # [B, R, 1+S, D]
        return x + self.drop_path(self.mlp(self.norm2(x)))


class LGIFormerEncoder(VideoViTEncoder):
    """LGI-Former: [B, C, T, H, W] -> [B, L, D] (fine-tuning) or the visible tokens [B, L_vis, D] (pretraining)."""

    def __init__(self, cfg: MAEDFERConfig) -> None:
        super().__init__(cfg)
        self.region_size = cfg.region_size
        self.num_regions = cfg.num_regions
        self.region_embed = nn.Parameter(torch.zeros(cfg.num_regions, cfg.embed_dim))  # [R, D]
        trunc_normal_(self.region_embed, std=0.02)
        tokens = torch.arange(cfg.num_patches).view(1, -1, 1)
        order = region_partition(tokens, cfg.grid_size, cfg.region_size).flatten()  # [L]: token ids, region-major
        self.register_buffer("region_order", order, persistent=False)
        self.register_buffer("region_restore", order.argsort(), persistent=False)  # [L]: back to (t, h, w)
        region_of_token = torch.empty_like(order)
        region_of_token[order] = torch.arange(cfg.num_regions).repeat_interleave(cfg.num_patches // cfg.num_regions)
        self.register_buffer("region_of_token", region_of_token, persistent=False)  # [L]

    def make_block(self, drop_path: float) -> nn.Module:
        c = self.cfg
        return LGIBlock(c.embed_dim, c.num_heads, c.mlp_ratio, qkv_bias=c.qkv_bias, drop_path=drop_path)

    def forward_regions(self, videos: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, R, 1+S, D] after the last block, before the final norm; index 0 = region token.

        Regions in (nt, nh, nw) order, the S tokens of each in (rt, rh, rw) order, or the
        visible ones in the order of ``ids_keep`` [B, L_vis], which must be region-major
        with the same count per region, as :meth:`MAEDFER.tube_masking` gives.
        """
        x = self.embed(videos)  # [B, L, D]
        b, _, d = x.shape
        ids = self.region_order.expand(b, -1) if ids_keep is None else ids_keep
        if ids_keep is not None:
            self._check_region_major(ids_keep)
        x = gather_tokens(x, ids).view(b, self.num_regions, -1, d)  # [B, R, S, D]
        region = self.region_embed.to(x.dtype).expand(b, -1, -1)  # [B, R, D]
        if self.cfg.region_token_init == "mean":
            region = region + x.mean(dim=2)
        x = torch.cat([region.unsqueeze(2), x], dim=2)  # [B, R, 1+S, D]
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward_blocks(self, videos: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens before the final norm, region tokens dropped: [B, L, D] in (t, h, w) order, or [B, L_vis, D]."""
        x = self.forward_regions(videos, ids_keep)
        x = x[:, :, 1:].flatten(1, 2)  # [B, R*S, D], region-major
        return x if ids_keep is not None else x[:, self.region_restore]  # [B, L, D] in (t, h, w) order

    def _check_region_major(self, ids_keep: torch.Tensor) -> None:
        b, n = ids_keep.shape
        expected = torch.arange(self.num_regions, device=ids_keep.device).repeat_interleave(n // self.num_regions)
        if n % self.num_regions or not torch.equal(self.region_of_token[ids_keep], expected.expand(b, -1)):
            raise ModelError(
                "LGI-Former needs visible tokens grouped region by region, the same number per region "
                "(use MAEDFER.tube_masking, not a plain tube mask)"
            )

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"region_embed"}


# ---------------------------------------------------------------------------
# Pretraining model
# ---------------------------------------------------------------------------


def sorted_restore(ids_restore: torch.Tensor, len_keep: int) -> torch.Tensor:
    """ids_restore [B, L] that sends the i-th visible token to the i-th smallest visible position (MAE-DFER's decoder).

    The hidden tokens are all the mask token, so only the visible ones move: their
    outputs get the positions of the visible set in (t, h, w) order, not their own.
    """
    ids_shuffle = ids_restore.argsort(dim=1)  # [B, L]: visible (region-major), then hidden
    visible = ids_shuffle[:, :len_keep].sort(dim=1).values
    return torch.cat([visible, ids_shuffle[:, len_keep:]], dim=1).argsort(dim=1)


class MAEDFER(VideoMAE):
    """MAE-DFER pretraining: LGI-Former encoder, VideoMAE decoder, appearance + motion targets.

    ``forward(videos) -> (loss, pred, mask)``; ``pred`` [B, L, u*p*p*C] is
    [appearance (p*p*C) | motion ((u-1)*p*p*C)] per token, the layout of :meth:`targets`.
    """

    encoder_class = LGIFormerEncoder

    def num_masked(self, mask_ratio: float | None = None) -> int:
        """Tokens hidden per clip: T' * windows * int(rh*rw * ratio), windows = (H'/rh) * (W'/rw)."""
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        (t, h, w), (_, rh, rw) = self.grid_size, self.cfg.region_size
        return t * (h // rh) * (w // rw) * int(rh * rw * ratio)

    def tube_masking(
        self, batch: int, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tube masking with the same number of hidden positions in every (rh, rw) window.

        Returns (ids_keep [B, L_vis] region-major, mask [B, L] with 1 = masked, ids_restore [B, L]).
        """
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        (t, h, w), (_, rh, rw) = self.grid_size, self.cfg.region_size
        nh, nw = h // rh, w // rw
        noise = torch.rand(batch, nh, nw, rh * rw, device=self.mask_token.device, generator=generator)
        keep = noise.argsort(dim=-1).argsort(dim=-1) >= int(rh * rw * ratio)  # [B, nh, nw, rh*rw]
        keep = keep.view(batch, nh, nw, rh, rw).permute(0, 1, 3, 2, 4).reshape(batch, 1, h * w)  # [B, 1, H'W']
        keep = keep.expand(batch, t, h * w).reshape(batch, t * h * w)  # [B, L]: tubes
        return masking_from_keep(keep, self.cfg.num_patches - self.num_masked(ratio), self.encoder.region_order)

    def forward_encoder(
        self, videos: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, C, T, H, W] -> (latent [B, L_vis, D] region-major, mask [B, L], ids_restore [B, L] for the decoder)."""
        latent, mask, ids_restore = super().forward_encoder(videos, mask_ratio, generator)
        if self.cfg.decoder_positions == "sorted":
            ids_restore = sorted_restore(ids_restore, latent.shape[1])
        return latent, mask, ids_restore

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, u*p*p*C] -> (appearance [B, L, p*p*C], motion [B, L, (u-1)*p*p*C])."""
        frame = self.cfg.patch_size**2 * self.cfg.in_chans
        return x[..., :frame], x[..., frame:]

    def targets(self, videos: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, L, u*p*p*C] = [first frame of each tube | differences of consecutive frames]."""
        tubes = super().targets(videos)  # [B, L, u*p*p*C], normalised per tube if norm_pix_loss
        frames = tubes.unflatten(-1, (self.cfg.tubelet_size, -1))  # [B, L, u, p*p*C]
        motion = frames[:, :, 1:] - frames[:, :, :-1]  # [B, L, u-1, p*p*C]
        return torch.cat([frames[:, :, 0], motion.flatten(2)], dim=-1)

    def pred_to_patches(self, pred: torch.Tensor) -> torch.Tensor:
        """[appearance | motion] [B, L, P] -> tube pixels [B, L, u*p*p*C]: first frame + running sum of differences."""
        appearance, motion = self.split(pred)
        steps = motion.unflatten(-1, (self.cfg.tubelet_size - 1, -1)).cumsum(dim=2)  # [B, L, u-1, p*p*C]
        return torch.cat([appearance.unsqueeze(2), appearance.unsqueeze(2) + steps], dim=2).flatten(2)

    def loss_terms(self, videos: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Masked-token MSE of the appearance and of the motion part: {"appearance", "motion"} scalars."""
        err_app, err_motion = self.split((pred.float() - self.targets(videos)).pow(2))  # [B, L, *] each
        masked_mean = lambda err: (err.mean(dim=-1) * mask).sum() / mask.sum()  # noqa: E731
        return {"appearance": masked_mean(err_app), "motion": masked_mean(err_motion)}

    def forward_loss(self, videos: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """appearance_loss + motion_weight * motion_loss, over the masked tubes only."""
        terms = self.loss_terms(videos, pred, mask)
        return terms["appearance"] + self.cfg.motion_weight * terms["motion"]
