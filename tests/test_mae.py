"""VideoMAE and MAE-DFER (LGI-Former): tokens, tube masking, targets, losses, fine-tuning helpers.

Tiny models (32 px, 4 frames, 32 tokens) on the CPU; base sizes are only
counted, on the meta device, never run.
"""

from __future__ import annotations

import pytest
import torch

from affectray.models.lgi_former import MAEDFER, LGIFormerEncoder, region_merge, region_partition
from affectray.models.mae import VideoMAE, VideoViTEncoder, patchify, unpatchify
from affectray.models.registry import ModelError, create_model, create_model_from_description
from affectray.models.video_classifier import build_pretrain_model, build_video_encoder, load_encoder_from_pretrain
from affectray.train.optim import param_groups_lrd

FAMILIES = ["videomae", "mae_dfer"]


def random_clips(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed))  # [B, C, T, H, W]


def ramp_clips(batch: int = 8, frames: int = 4, size: int = 32) -> torch.Tensor:
    """Per clip and channel a linear intensity ramp in a random direction, drifting in brightness over time.

    Learnable in a few steps: every patch of a clip shows the same normalised
    pattern, so the visible tubes tell the masked ones.
    """
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    direction = torch.randn(batch, 3, 2, 1, 1, generator=g)
    drift = torch.randn(batch, 3, 1, 1, generator=g)
    frames_ = [direction[:, :, 0] * yy + direction[:, :, 1] * xx + 0.1 * t * drift for t in range(frames)]
    return torch.stack(frames_, dim=2)  # [B, 3, T, H, W]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box two OpenMP threads per op thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=FAMILIES)
def tiny(request) -> VideoMAE:
    torch.manual_seed(0)
    return build_pretrain_model(request.param, "tiny")


# ---------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------


def test_patchify_unpatchify_round_trip_is_exact_and_tokens_are_tubes():
    videos = random_clips(batch=2)  # [2, 3, 4, 32, 32]
    tokens = patchify(videos, tubelet_size=2, patch_size=8)
    assert tokens.shape == (2, 2 * 4 * 4, 2 * 8 * 8 * 3)
    assert torch.equal(unpatchify(tokens, (2, 4, 4), tubelet_size=2, patch_size=8), videos)
    # Token (t=1, h=2, w=3) holds frames 2-3, rows 16-23, columns 24-31, pixels in (dt, dy, dx, c) order.
    token = tokens[1, 1 * 16 + 2 * 4 + 3].view(2, 8, 8, 3)
    assert torch.equal(token, videos[1, :, 2:4, 16:24, 24:32].permute(1, 2, 3, 0))


# ---------------------------------------------------------------------------
# Tube masking
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.9, 0.75, 0.5])
def test_tube_masking_exact_count_same_positions_in_time_fresh_per_clip(tiny, ratio):
    batch, (t, h, w) = 16, tiny.grid_size
    ids_keep, mask, ids_restore = tiny.tube_masking(batch, ratio, generator=torch.Generator().manual_seed(0))
    num_masked = tiny.num_masked(ratio)
    assert num_masked == t * int(h * w * ratio)  # a tube mask hides whole tubes
    if ratio == 0.9:  # the tiny grid makes this int(L * ratio) as well: 2 * 14 = int(32 * 0.9)
        assert num_masked == int(t * h * w * ratio) == 28
    assert mask.shape == (batch, t * h * w) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.sum(dim=1) == num_masked).all()
    per_time = mask.view(batch, t, h * w)
    assert (per_time == per_time[:, :1]).all(), "a tube must be masked in every time step"
    assert len({tuple(row.tolist()) for row in per_time[:, 0]}) > batch // 2, "clips must get different masks"
    # ids_keep names exactly the visible tokens; ids_restore undoes [visible, masked].
    assert ids_keep.shape == (batch, t * h * w - num_masked)
    assert (torch.gather(mask, 1, ids_keep) == 0).all()
    ids_masked = torch.nonzero(mask)[:, 1].view(batch, -1)
    shuffled = torch.cat([ids_keep, ids_masked], dim=1)
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), torch.arange(t * h * w).expand(batch, -1))


def test_mae_dfer_masking_keeps_the_same_number_of_tokens_in_every_region():
    model = build_pretrain_model("mae_dfer", "tiny", region_size=(1, 2, 2))  # grid 2x4x4 -> 8 regions of 4 tokens
    ids_keep, mask, _ = model.tube_masking(32, 0.5)
    per_region = region_partition(mask.unsqueeze(-1), model.grid_size, (1, 2, 2)).squeeze(-1)  # [B, R, S]
    assert (per_region.sum(dim=-1) == 2).all()
    # Visible tokens come region by region, which is what the LGI-Former reshapes on.
    regions = model.encoder.region_of_token[ids_keep]  # [B, L_vis]
    assert torch.equal(regions, torch.arange(8).repeat_interleave(2).expand(32, -1))


# ---------------------------------------------------------------------------
# Targets and losses
# ---------------------------------------------------------------------------


def test_loss_counts_masked_tubes_only(tiny):
    videos = random_clips()
    with torch.no_grad():
        latent, mask, ids_restore = tiny.forward_encoder(videos)
        pred = tiny.forward_decoder(latent, ids_restore)  # [B, L, P]
        loss = tiny.forward_loss(videos, pred, mask)
        noise = torch.randn_like(pred) * 3.0
        visible_changed = videos + tiny.unpatchify(noise * (1 - mask).unsqueeze(-1))
        masked_changed = videos + tiny.unpatchify(noise * mask.unsqueeze(-1))
        assert not torch.equal(visible_changed, videos)
        torch.testing.assert_close(tiny.forward_loss(visible_changed, pred, mask), loss, rtol=0, atol=0)
        assert abs(tiny.forward_loss(masked_changed, pred, mask).item() - loss.item()) > 1e-3


def test_norm_pix_target_is_standardised_per_tube_and_channel():
    model = build_pretrain_model("videomae", "tiny")
    target = model.targets(random_clips() * 5 + 2).unflatten(-1, (-1, 3))  # [B, L, u*p*p, C]
    torch.testing.assert_close(target.mean(dim=2), torch.zeros(4, 32, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.std(dim=2), torch.ones(4, 32, 3), atol=1e-4, rtol=0)


def test_motion_target_is_the_frame_difference_inside_each_tube():
    model: MAEDFER = build_pretrain_model("mae_dfer", "tiny")
    frame_pixels = 8 * 8 * 3
    # Frames constant in time: no motion at all, appearance is the normalised frame.
    still = random_clips()[:, :, :1].expand(-1, -1, 4, -1, -1)
    appearance, motion = model.split(model.targets(still))
    assert appearance.shape == (4, 32, frame_pixels) and motion.shape == (4, 32, frame_pixels)
    assert torch.equal(motion, torch.zeros_like(motion))
    assert appearance.abs().amax() > 0.5
    # Raw pixels: appearance = first frame of the tube, motion = second minus first.
    raw = build_pretrain_model("mae_dfer", "tiny", norm_pix_loss=False)
    videos = random_clips()
    appearance, motion = raw.split(raw.targets(videos))
    frames = patchify(videos, 2, 8).unflatten(-1, (2, frame_pixels))  # [B, L, 2, p*p*C]
    torch.testing.assert_close(appearance, frames[:, :, 0])
    torch.testing.assert_close(motion, frames[:, :, 1] - frames[:, :, 0])
    # [appearance | motion] turns back into the tube.
    torch.testing.assert_close(raw.pred_to_patches(raw.targets(videos)), patchify(videos, 2, 8))


def test_mae_dfer_loss_is_appearance_plus_weighted_motion():
    videos = random_clips()
    torch.manual_seed(0)
    model = build_pretrain_model("mae_dfer", "tiny", motion_weight=0.5)
    with torch.no_grad():
        loss, pred, mask = model(videos)
        terms = model.loss_terms(videos, pred, mask)
    torch.testing.assert_close(loss, terms["appearance"] + 0.5 * terms["motion"])


@pytest.mark.parametrize("name", FAMILIES)
def test_thirty_adamw_steps_make_the_loss_fall(name):
    torch.manual_seed(0)
    model = build_pretrain_model(name, "tiny")
    videos = ramp_clips()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    losses = []
    for _ in range(30):
        loss, _, _ = model(videos)  # a fresh mask every step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < 0.75 * first, f"{name}: loss {first:.3f} -> {last:.3f}"


# ---------------------------------------------------------------------------
# Encoders for fine-tuning
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_encoder_alone_gives_all_tokens_and_loads_the_pretrained_encoder(name):
    torch.manual_seed(0)
    pretrained = build_pretrain_model(name, "tiny")
    encoder = build_video_encoder(name, "tiny")
    assert isinstance(encoder, LGIFormerEncoder if name == "mae_dfer" else VideoViTEncoder)
    assert encoder.num_layers == 2 and encoder.num_features == 64
    assert encoder.forward_features(random_clips(batch=3)).shape == (3, 32, 64)

    # From a whole pretraining checkpoint (keys "encoder.*", decoder keys skipped) ...
    load_encoder_from_pretrain(encoder, pretrained.state_dict())
    for key, value in pretrained.encoder_state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key
    # ... or into a classifier holding the encoder, from encoder_state_dict().
    classifier = create_model("video_encoder_classifier", backbone=name, size="tiny", num_classes=8)
    load_encoder_from_pretrain(classifier, pretrained.encoder_state_dict())
    for key, value in pretrained.encoder_state_dict().items():
        assert torch.equal(classifier.encoder.state_dict()[key], value), key
    pretrained.eval(), classifier.eval()
    clips = random_clips(batch=2)
    torch.testing.assert_close(classifier.encoder.forward_features(clips), pretrained.encoder.forward_features(clips))
    out = classifier(clips.transpose(1, 2))  # the classifier takes windows [B, T, C, H, W]
    assert out["logits"].shape == (2, 8) and out["features"].shape == (2, 64)
    rebuilt = create_model_from_description(classifier.describe())
    assert type(rebuilt) is type(classifier) and rebuilt.window == 4


def test_loading_the_wrong_family_is_an_error():
    with pytest.raises(ModelError, match="does not fit"):
        load_encoder_from_pretrain(
            build_video_encoder("mae_dfer", "tiny"), build_pretrain_model("videomae", "tiny").state_dict()
        )


def test_lgi_former_region_partition_merge_round_trip_is_exact():
    grid, region = (2, 4, 4), (1, 2, 2)
    tokens = torch.arange(32).view(1, 32, 1)  # token id = t*16 + h*4 + w
    parts = region_partition(tokens, grid, region)
    assert parts.shape == (1, 8, 4, 1)
    assert parts[0, 0, :, 0].tolist() == [0, 1, 4, 5]  # region (0, 0, 0): t=0, rows 0-1, columns 0-1
    assert parts[0, 3, :, 0].tolist() == [10, 11, 14, 15]  # region (0, 1, 1)
    x = torch.randn(3, 32, 5)
    assert torch.equal(region_merge(region_partition(x, grid, region), grid, region), x)


def test_lgi_former_masked_path_agrees_with_the_full_path():
    torch.manual_seed(0)
    encoder = build_video_encoder("mae_dfer", "tiny").eval()
    videos = random_clips(batch=2)
    everything = encoder.region_order.expand(2, -1)  # keep every token, region-major
    region_major = encoder.forward_features(videos, everything)
    torch.testing.assert_close(region_major[:, encoder.region_restore], encoder.forward_features(videos))
    with pytest.raises(ModelError, match="region by region"):
        encoder.forward_features(videos, everything.flip(1))


def test_layer_decay_groups_cover_every_parameter_once_with_the_right_scales():
    classifier = create_model("video_encoder_classifier", backbone="mae_dfer", size="tiny", num_classes=8)
    groups = param_groups_lrd(classifier, weight_decay=0.05, layer_decay=0.5)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(classifier.parameters()))
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(classifier.named_parameters())
    # depth 2: embeddings 0.5^3, block i 0.5^(2 - i), head and final norm 1.
    assert scale_of[id(params["encoder.patch_embed.proj.weight"])] == 0.125
    assert scale_of[id(params["encoder.region_embed"])] == 0.125
    assert scale_of[id(params["encoder.blocks.0.local_attn.qkv.weight"])] == 0.25
    assert scale_of[id(params["encoder.blocks.1.mlp.fc2.weight"])] == 0.5
    assert scale_of[id(params["encoder.norm.weight"])] == 1.0
    assert scale_of[id(params["head.weight"])] == 1.0
    assert decay_of[id(params["head.weight"])] == 0.05
    assert decay_of[id(params["head.bias"])] == 0.0
    assert decay_of[id(params["encoder.blocks.0.local_norm.weight"])] == 0.0
    assert decay_of[id(params["encoder.region_embed"])] == 0.0


# ---------------------------------------------------------------------------
# Sizes and the entry points
# ---------------------------------------------------------------------------


def test_base_sizes_have_the_papers_parameter_counts():
    with torch.device("meta"):  # counted, never allocated or run
        videomae = build_video_encoder("videomae", "base")
        mae_dfer = build_video_encoder("mae_dfer", "base")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 86e6 <= count(videomae) <= 90e6  # ViT-B/16 on 16 x 224 x 224
    assert 84e6 <= count(mae_dfer) <= 86e6  # MAE-DFER reports 85 M
    assert videomae.num_patches == 8 * 14 * 14 and mae_dfer.num_regions == 8


def test_entry_points_reject_unknown_names_sizes_and_settings():
    with pytest.raises(ModelError, match="unknown video MAE"):
        build_pretrain_model("mae", "tiny")
    with pytest.raises(ModelError, match="unknown videomae size"):
        build_video_encoder("videomae", "huge")
    with pytest.raises(ModelError, match="takes no setting"):
        build_pretrain_model("videomae", "tiny", region_size=(1, 2, 2))
    with pytest.raises(ModelError, match="must divide"):
        build_pretrain_model("mae_dfer", "tiny", region_size=(1, 3, 4))
    model = build_pretrain_model("mae_dfer", "tiny", mask_ratio=0.75, region_size=[1, 2, 2])
    assert isinstance(model, MAEDFER) and model.cfg.region_size == (1, 2, 2) and model.num_masked() == 24
