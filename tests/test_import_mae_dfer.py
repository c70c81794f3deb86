"""`affectray import-checkpoint --format mae-dfer`: MAE-DFER's own checkpoint files, imported strictly.

The files are made here in MAE-DFER's layout (``utils.save_model``: ``model``,
``optimizer``, ``epoch``, ``scaler`` and the run's pickled ``argparse.Namespace``),
with the tensor names its ``modeling_finetune.VisionTransformer`` and
``modeling_pretrain.PretrainVisionTransformer`` give, written out below for a tiny
LGI-Former (4 x 32 x 32 clips, 8 x 8 x 2 tubes, dim 64, 8 heads, regions of 1 x 2 x 4
tokens) and filled with random values. :func:`reference_logits` computes their
fine-tuned model's forward pass from those tensors (their attention with q and v biases
only, their region tokens, their pooling and ``fc_norm``); the imported checkpoint
must give the same logits. (A side-by-side run against their code itself, at the
published 16 x 160 x 160 dim-512 depth-16 size too, was done outside these tests.)
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import affectray
from affectray.checkpoints import CheckpointError, load_weights, read_meta
from affectray.cli import build_parser
from affectray.labels import ABAW8, LabelSet, remap
from affectray.models.inference import load_classifier
from affectray.models.registry import ModelConfig, build_model
from affectray.models.video_classifier import build_pretrain_model
from affectray.train.finetune import initialise

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, one intra-op thread

D, HEADS, DEPTH, PATCH, SIZE, FRAMES = 64, 8, 2, 8, 32, 4  # their "dim512" model name: 8 heads
REGION = (1, 2, 4)  # (t, h, w) tokens; the grid is 2 x 4 x 4 tokens, 4 regions of 8
GRID = (FRAMES // 2, SIZE // PATCH, SIZE // PATCH)
REGIONS = math.prod(g // r for g, r in zip(GRID, REGION, strict=True))
DFEW = ["Happiness", "Sadness", "Neutral", "Anger", "Surprise", "Disgust", "Fear"]  # DFEW labels 1..7
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1, 1)


# ---------------------------------------------------------------------------
# Files in MAE-DFER's layout
# ---------------------------------------------------------------------------


def attention_shapes(prefix: str) -> dict[str, tuple[int, ...]]:
    """Their GeneralAttention: q and kv linears without bias, q_bias and v_bias, proj."""
    return {
        f"{prefix}.q_bias": (D,), f"{prefix}.v_bias": (D,), f"{prefix}.q.weight": (D, D),
        f"{prefix}.kv.weight": (2 * D, D), f"{prefix}.proj.weight": (D, D), f"{prefix}.proj.bias": (D,),
    }  # fmt: skip


def norm_shapes(prefix: str, dim: int = D) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (dim,), f"{prefix}.bias": (dim,)}


def lgi_former_shapes(prefix: str = "") -> dict[str, tuple[int, ...]]:
    """The tensors of their LGI-Former (attn_type='local_global', first 'self', third 'cross')."""
    shapes = {
        f"{prefix}patch_embed.proj.weight": (D, 3, 2, PATCH, PATCH),
        f"{prefix}patch_embed.proj.bias": (D,),
        f"{prefix}lg_region_tokens": (REGIONS, D),
    }
    for i in range(DEPTH):
        b = f"{prefix}blocks.{i}."
        for norm in ("first_attn_norm0", "second_attn_norm0", "third_attn_norm0", "third_attn_norm1", "norm2"):
            shapes |= norm_shapes(b + norm)
        for attn in ("first_attn", "second_attn", "third_attn"):
            shapes |= attention_shapes(b + attn)
        shapes |= {f"{b}mlp.fc1.weight": (4 * D, D), f"{b}mlp.fc1.bias": (4 * D,)}
        shapes |= {f"{b}mlp.fc2.weight": (D, 4 * D), f"{b}mlp.fc2.bias": (D,)}
    return shapes


def finetune_shapes(classes: int = 7) -> dict[str, tuple[int, ...]]:
    """modeling_finetune.VisionTransformer with use_mean_pooling: norm is an identity, fc_norm, head."""
    return lgi_former_shapes() | norm_shapes("fc_norm") | {"head.weight": (classes, D), "head.bias": (classes,)}


def pretrain_shapes(dec: int = 48, dec_depth: int = 1) -> dict[str, tuple[int, ...]]:
    """Their PretrainVisionTransformer: encoder.*, decoder.* (plain Blocks), encoder_to_decoder, mask_token."""
    shapes = lgi_former_shapes("encoder.") | norm_shapes("encoder.norm")
    for i in range(dec_depth):
        b = f"decoder.blocks.{i}."
        shapes |= norm_shapes(b + "norm1", dec) | norm_shapes(b + "norm2", dec)
        shapes |= {f"{b}attn.qkv.weight": (3 * dec, dec), f"{b}attn.q_bias": (dec,), f"{b}attn.v_bias": (dec,)}
        shapes |= {f"{b}attn.proj.weight": (dec, dec), f"{b}attn.proj.bias": (dec,)}
        shapes |= {f"{b}mlp.fc1.weight": (4 * dec, dec), f"{b}mlp.fc1.bias": (4 * dec,)}
        shapes |= {f"{b}mlp.fc2.weight": (dec, 4 * dec), f"{b}mlp.fc2.bias": (dec,)}
    patch_dim = 3 * 2 * PATCH * PATCH
    shapes |= norm_shapes("decoder.norm", dec) | {
        "decoder.head.weight": (patch_dim, dec),
        "decoder.head.bias": (patch_dim,),
    }
    return shapes | {"encoder_to_decoder.weight": (dec, D), "mask_token": (1, 1, dec)}


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        scale = 0.5 if key.startswith("head.") else 0.1 if len(shape) == 1 else 0.05
        offset = 1.0 if len(shape) == 1 and "norm" in key and key.endswith("weight") else 0.0
        state[key] = offset + scale * torch.randn(shape, generator=g)
    return state


def official_args(**overrides) -> argparse.Namespace:
    """run_class_finetuning.py's Namespace as the DFEW script sets it (the fields that matter, and some that do not)."""
    args = dict(
        model="vit_base_dim512_no_depth_patch16_160", depth=DEPTH, input_size=SIZE, short_side_size=SIZE,
        num_frames=FRAMES, num_segments=1, tubelet_size=2, sampling_rate=4, nb_classes=7, data_set="DFEW",
        attn_type="local_global", lg_region_size=list(REGION), lg_first_attn_type="self",
        lg_third_attn_type="cross", lg_attn_param_sharing_first_third=False, lg_attn_param_sharing_all=False,
        lg_classify_token_type="region", lg_no_second=False, lg_no_third=False, use_mean_pooling=True,
        drop_path=0.1, init_scale=0.001, lr=1e-3, opt_betas=[0.9, 0.999], test_num_segment=2,
        test_num_crop=2, window_size=GRID, patch_size=(PATCH, PATCH), finetune="checkpoint-49.pth",
        distributed=True, dist_backend="nccl",
    )  # fmt: skip
    return argparse.Namespace(**(args | overrides))


def save_official(path, state: dict[str, torch.Tensor], args: argparse.Namespace | None) -> None:
    """utils.save_model's dict; the optimizer state as AdamW's state_dict holds it."""
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(D), "exp_avg_sq": torch.zeros(D)}},
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.05, "params": [0]}],
    }
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}
    torch.save({"model": state, "optimizer": optimizer, "epoch": 37, "scaler": scaler, "args": args}, path)


def run_import(*argv) -> dict:
    args = build_parser("import-checkpoint").parse_args(["import-checkpoint", *map(str, argv), "--format", "mae-dfer"])
    return args._module.main(args)


# ---------------------------------------------------------------------------
# Their fine-tuned model's forward pass, from their tensors
# ---------------------------------------------------------------------------


def sinusoid_table(n: int, dim: int) -> torch.Tensor:
    """get_sinusoid_encoding_table: position / 10000^(2 (j // 2) / dim), sin on even j, cos on odd j."""
    angle = np.array([[p / np.power(10000, 2 * (j // 2) / dim) for j in range(dim)] for p in range(n)])
    angle[:, 0::2], angle[:, 1::2] = np.sin(angle[:, 0::2]), np.cos(angle[:, 1::2])
    return torch.tensor(angle, dtype=torch.float32)


def reference_logits(sd: dict[str, torch.Tensor], clip: torch.Tensor, pool: str) -> torch.Tensor:
    """Their VisionTransformer(attn_type='local_global', use_mean_pooling) on clip [B, C, T, H, W], eval mode."""

    def ln(x, name):
        return F.layer_norm(x, (D,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    def attention(x, context, name):  # their GeneralAttention: no k bias
        kv_bias = torch.cat([torch.zeros(D), sd[f"{name}.v_bias"]])
        q = F.linear(x, sd[f"{name}.q.weight"], sd[f"{name}.q_bias"])
        k, v = F.linear(x if context is None else context, sd[f"{name}.kv.weight"], kv_bias).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2) for t in (q, k, v))
        weights = ((q * (D // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).flatten(2)
        return F.linear(out, sd[f"{name}.proj.weight"], sd[f"{name}.proj.bias"])

    b = clip.shape[0]
    (t, h, w), (rt, rh, rw) = GRID, REGION
    x = F.conv3d(clip, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=(2, PATCH, PATCH))
    x = x.flatten(2).transpose(1, 2) + sinusoid_table(t * h * w, D)  # [B, L, D]
    x = x.view(b, t // rt, rt, h // rh, rh, w // rw, rw, D).permute(0, 1, 3, 5, 2, 4, 6, 7)
    x = x.reshape(b * REGIONS, rt * rh * rw, D)  # 'b (nt t nh h nw w) c -> (b nt nh nw) (t h w) c'
    x = torch.cat([sd["lg_region_tokens"].repeat(b, 1).unsqueeze(1), x], dim=1)  # [(B R), 1+S, D]
    for i in range(DEPTH):
        p = f"blocks.{i}."
        x = x + attention(ln(x, p + "first_attn_norm0"), None, p + "first_attn")
        region = x[:, 0].reshape(b, REGIONS, D)
        region = region + attention(ln(region, p + "second_attn_norm0"), None, p + "second_attn")
        local = x[:, 1:].reshape(b, -1, D)
        context = ln(region, p + "third_attn_norm1")
        local = local + attention(ln(local, p + "third_attn_norm0"), context, p + "third_attn")
        x = torch.cat([region.reshape(-1, 1, D), local.reshape(b * REGIONS, -1, D)], dim=1)
        hidden = F.gelu(F.linear(ln(x, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        x = x + F.linear(hidden, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    x = x.view(b, REGIONS, -1, D)
    tokens = {"region": x[:, :, 0], "org": x[:, :, 1:].flatten(1, 2), "all": x.flatten(1, 2)}[pool]
    return F.linear(ln(tokens.mean(dim=1), "fc_norm"), sd["head.weight"], sd["head.bias"])


def clips(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, FRAMES, SIZE, SIZE, 3), dtype=np.uint8)


def their_input(clip: np.ndarray) -> torch.Tensor:
    """VideoClsDatasetFrame's test transform: ClipToTensor (/255) and ImageNet Normalize -> [B, C, T, H, W]."""
    return (torch.from_numpy(clip).permute(0, 4, 1, 2, 3).float() / 255.0 - MEAN) / STD


# ---------------------------------------------------------------------------
# Fine-tuned models
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dfew_file(tmp_path_factory):
    state = random_state(finetune_shapes())
    path = tmp_path_factory.mktemp("mae_dfer") / "dfew_split01_checkpoint-best.pth"
    save_official(path, state, official_args())
    return state, path


def test_dfew_model_imports_strictly_and_gives_their_logits(dfew_file, tmp_path):
    state, path = dfew_file
    out = tmp_path / "ckpt"
    summary = run_import(path, out)

    assert summary["format"] == "mae-dfer" and summary["kind"] == "classifier"
    assert summary["model"]["name"] == "video_encoder_classifier"
    assert summary["model"]["kwargs"]["pool"] == "regions" and summary["model"]["kwargs"]["fc_norm"] is True
    weights = load_weights(out)
    # Every tensor placed: each self-attention's q + kv and q_bias + v_bias fuse, 2 per block, 2 blocks.
    assert summary["tensors"] == len(weights) == len(state) - 4 * DEPTH
    assert read_meta(out)["source"]["file_tensors"] == len(state)
    # Their names and layouts, placed: q and kv fused into timm's qkv with a zero k bias; fc_norm is encoder.norm.
    block = "blocks.1.first_attn"
    assert torch.equal(
        weights["encoder.blocks.1.local_attn.qkv.weight"],
        torch.cat([state[f"{block}.q.weight"], state[f"{block}.kv.weight"]]),
    )
    q_bias, k_bias, v_bias = weights["encoder.blocks.1.local_attn.qkv.bias"].chunk(3)
    assert torch.equal(q_bias, state[f"{block}.q_bias"]) and torch.equal(v_bias, state[f"{block}.v_bias"])
    assert not k_bias.any()
    assert torch.equal(weights["encoder.blocks.0.propagate_attn.kv.bias"][D:], state["blocks.0.third_attn.v_bias"])
    assert torch.equal(weights["encoder.blocks.0.propagate_norm_ctx.weight"], state["blocks.0.third_attn_norm1.weight"])
    assert torch.equal(weights["encoder.region_embed"], state["lg_region_tokens"])
    assert torch.equal(weights["encoder.norm.bias"], state["fc_norm.bias"])

    meta = read_meta(out)
    assert meta["label_set"] == {"name": "dfew", "classes": DFEW}
    assert meta["preprocessing"] == {
        "mode": "clip", "image_size": SIZE, "num_frames": FRAMES, "frame_stride": 4, "channels": 3,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop": "box", "box_margin": 0.0,
        "test_flip": False, "test_crops": None,
    }  # fmt: skip
    assert meta["source"]["format"] == "mae-dfer" and meta["source"]["epoch"] == 37
    assert meta["source"]["heads_from"] == "model vit_base_dim512_no_depth_patch16_160"

    # affectray.load_model: the same logits as their model on the same clip, through the checkpoint's normalisation.
    model, info = affectray.load_model(str(out))
    assert info["classes"] == DFEW and info["input"] == f"B,{FRAMES},3,{SIZE},{SIZE}"
    clip = clips()
    from affectray.data.loaders import normalise_pixels

    pre = info["preprocessing"]
    with torch.no_grad():
        got = model(normalise_pixels(torch.from_numpy(clip), pre["mean"], pre["std"], pre["channels"]))["logits"]
        want = reference_logits(state, their_input(clip), pool="region")
    assert want.abs().max() > 1.0  # logits large enough that a wrong mapping would show
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # The label / predict path: a face track labelled frame by frame from windows of 4 frames 4 apart.
    faces = np.concatenate(list(clips(batch=3, seed=1)))  # [12, 32, 32, 3]
    probs = load_classifier(str(out)).predict_track(faces)
    assert probs.shape == (12, 7) and np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_classes_map_by_name_onto_abaw(dfew_file, tmp_path):
    _, path = dfew_file
    run_import(path, tmp_path / "ckpt")
    label_set = LabelSet.from_dict(read_meta(tmp_path / "ckpt")["label_set"])
    abaw = remap(np.arange(7), label_set, ABAW8)  # output k -> ABAW8 class index
    assert [ABAW8.classes[i] for i in abaw] == DFEW
    assert ABAW8.classes[abaw[0]] == "Happiness" and ABAW8.classes[abaw[2]] == "Neutral"  # DFEW's 1 and 3


@pytest.mark.parametrize("token_type", ["org", "all"])
def test_their_other_poolings_give_their_logits(token_type, tmp_path):
    state = random_state(finetune_shapes(), seed=1)
    path = tmp_path / f"{token_type}.pth"
    save_official(path, state, official_args(lg_classify_token_type=token_type, data_set="FERV39k"))
    summary = run_import(path, tmp_path / "ckpt")
    assert summary["model"]["kwargs"]["pool"] == {"org": "tokens", "all": "all"}[token_type]
    assert summary["label_set"] == "ferv39k" and summary["classes"] == DFEW  # FERV39k: DFEW's order
    model, _ = affectray.load_model(str(tmp_path / "ckpt"))
    x = their_input(clips(seed=2))
    with torch.no_grad():
        got = model(x.transpose(1, 2))["logits"]
    torch.testing.assert_close(got, reference_logits(state, x, pool=token_type), atol=1e-5, rtol=1e-5)


def test_other_datasets_need_classes(tmp_path):
    path = tmp_path / "crema.pth"
    save_official(path, random_state(finetune_shapes(classes=6)), official_args(data_set="CREMA-D", nb_classes=6))
    with pytest.raises(CheckpointError, match=r"'CREMA-D'.*name the 6 outputs with --classes"):
        run_import(path, tmp_path / "ckpt")
    summary = run_import(path, tmp_path / "ckpt", "--classes", "angry,disgust,fear,happy,neutral,sad")
    assert summary["label_set"] == "custom"
    assert summary["classes"] == ["Anger", "Disgust", "Fear", "Happiness", "Neutral", "Sadness"]


# ---------------------------------------------------------------------------
# Pretraining checkpoints
# ---------------------------------------------------------------------------


def test_pretrained_file_becomes_a_finetuning_init(tmp_path):
    state = random_state(pretrain_shapes(), seed=3)
    path = tmp_path / "checkpoint-49.pth"
    args = official_args(
        model="pretrain_videomae_base_dim512_no_depth_patch16_160", encoder_depth=DEPTH, decoder_depth=1,
        mask_type="part_window", mask_ratio=0.9, use_frame_diff_as_target=True,
    )  # fmt: skip
    save_official(path, state, args)
    out = tmp_path / "init"
    summary = run_import(path, out)
    assert summary["kind"] == "pretrain" and summary["classes"] == []
    # Every tensor placed: the encoder's fusions as above, and the decoder block's q_bias + v_bias.
    assert summary["tensors"] == len(load_weights(out)) == len(state) - 4 * DEPTH - 1

    # The whole pretraining model loads strictly: their decoder too, with their visible-token positions.
    meta = read_meta(out)
    assert meta["kind"] == "pretrain" and meta["model"]["family"] == "mae_dfer"
    assert meta["model"]["kwargs"]["decoder_positions"] == "sorted"
    assert meta["model"]["kwargs"]["decoder_num_heads"] == 6  # their pretrain model's decoder heads
    pretrain = build_pretrain_model("mae_dfer", meta["model"]["size"], **meta["model"]["kwargs"])
    pretrain.load_state_dict(load_weights(out), strict=True)
    assert torch.equal(pretrain.decoder_pred.weight, state["decoder.head.weight"])
    assert torch.isfinite(pretrain(torch.randn(1, 3, FRAMES, SIZE, SIZE))[0])

    # finetune's init: every tensor of the encoder the meta's finetune_model builds, from the file.
    model = build_model(ModelConfig(**meta["finetune_model"], num_classes=7))
    init = initialise(model, str(out))
    assert init["kind"] == "pretrain" and init["loaded"] == len(model.encoder.state_dict())
    assert torch.equal(model.encoder.region_embed, state["encoder.lg_region_tokens"])
    assert model.cfg.pool == "regions" and model.cfg.fc_norm

    with pytest.raises(CheckpointError, match="not a classifier"):
        affectray.load_model(str(out))


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("blocks.1.third_attn.v_bias"), r"missing: blocks\.1\.third_attn\.v_bias"),
        (
            lambda s: s.update({"blocks.0.first_attn.k_bias": torch.zeros(D)}),
            r"unexpected: blocks\.0\.first_attn\.k_bias",
        ),
        (lambda s: s.update({"blocks.0.norm2.weight": torch.ones(2 * D)}), r"blocks\.0\.norm2\.weight"),
    ],
    ids=["missing", "extra", "shape"],
)
def test_a_file_that_is_not_all_of_one_model_is_refused(edit, message, tmp_path):
    state = random_state(finetune_shapes())
    edit(state)
    path = tmp_path / "broken.pth"
    save_official(path, state, official_args())
    with pytest.raises(CheckpointError, match=message):
        run_import(path, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (None, r"no 'args'"),
        (official_args(lg_third_attn_type="self"), r"args\.lg_third_attn_type = 'self'"),
        (official_args(lg_attn_param_sharing_all=True), r"args\.lg_attn_param_sharing_all"),
        (official_args(input_size=64), r"token grid \(2, 8, 8\), 16 regions .* the file holds 4 region tokens"),
        (official_args(use_mean_pooling=False), r"use_mean_pooling"),
    ],
    ids=["no-args", "third-self", "sharing", "geometry", "cls-head"],
)
def test_settings_the_platform_does_not_compute_are_refused(args, message, tmp_path):
    path = tmp_path / "other.pth"
    save_official(path, random_state(finetune_shapes()), args)
    with pytest.raises(CheckpointError, match=message):
        run_import(path, tmp_path / "ckpt")


def test_a_file_of_another_project_is_refused(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"MAE-DFER's checkpoint dict"):
        run_import(path, tmp_path / "ckpt")
    torch.save({"model": {"conv.weight": torch.zeros(1)}, "args": official_args()}, path)
    with pytest.raises(CheckpointError, match=r"neither a MAE-DFER fine-tuned model"):
        run_import(path, tmp_path / "ckpt")


# ---------------------------------------------------------------------------
# The imported checkpoint as any other: evaluate on shards
# ---------------------------------------------------------------------------


@pytest.mark.slow  # a local Ray and the sample shards (shared with the other end-to-end tests)
def test_evaluate_scores_the_imported_model_on_shards(dfew_file, sample_shards, tmp_path):
    from affectray.train import evaluation

    _, path = dfew_file
    run_import(path, tmp_path / "ckpt")
    args = argparse.Namespace(
        checkpoint=str(tmp_path / "ckpt"), shards=sample_shards, split=None, all=False, batch_size=16,
        smooth_window=None, address=None, flip=None, crops=None,
    )  # fmt: skip
    evaluated = evaluation.main(args)
    # Scored by name on the classes DFEW shares with the shards' ABAW8 labels (all seven; Other left out).
    assert evaluated["classes"] == DFEW and evaluated["num_classes"] == 7
    assert evaluated["metrics"]["count"] > 0
    assert np.array(evaluated["metrics"]["confusion"]).shape == (7, 7)


@pytest.mark.slow  # the label job on a local Ray
def test_the_imported_checkpoint_labels_a_real_video(dfew_file, ray_session, real_video, tmp_path):
    import pyarrow.parquet as pq

    from affectray.label.job import LabelConfig, run_label

    _, path = dfew_file
    run_import(path, tmp_path / "ckpt")
    summary = run_label(
        LabelConfig(videos=str(real_video), out=str(tmp_path / "labels"), checkpoint=str(tmp_path / "ckpt")),
        progress=False,
    )
    assert summary["ok"] == 1 and summary["faces"] == 72  # every frame's face, each through its 16-frame window
    (parquet,) = (tmp_path / "labels" / "labels").glob("*.parquet")
    rows = pq.read_table(parquet).to_pandas()
    assert set(rows.filter(like="prob_").columns) == {f"prob_{c}" for c in DFEW}
    assert np.allclose(rows.filter(like="prob_").sum(axis=1), 1.0, atol=1e-4)
