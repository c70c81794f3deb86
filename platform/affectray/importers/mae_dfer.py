"""MAE-DFER's published checkpoints (L. Sun et al., ACM MM 2023; sunlicai/MAE-DFER) as affectray checkpoints.

MAE-DFER saves what its training scripts' ``utils.save_model`` writes: a dict with
``model`` (the state dict), ``optimizer``, ``epoch``, ``scaler`` and ``args`` (the
run's pickled ``argparse.Namespace``). Two kinds are published:

    checkpoint-49.pth   VoxCeleb2 pretraining (run_mae_pretraining.py): ``encoder.*`` (the
                        LGI-Former), ``decoder.*``, ``encoder_to_decoder``, ``mask_token``
    DFEW fold 1-5, FERV39k fine-tuned models (run_class_finetuning.py): the LGI-Former's
                        keys at the top level, ``fc_norm``, ``head``

Both run 16 x 160 x 160 clips (16 frames ``sampling_rate`` 4 apart, RGB on a 0..1
scale, ImageNet mean/std), 16 x 16 x 2 tubes, dim 512, depth 16, 8 heads, regions of
2 x 5 x 10 tokens. DFEW's seven outputs are its labels 1-7 less one: Happiness,
Sadness, Neutral, Anger, Surprise, Disgust, Fear (``labels.DATASET_CLASS_NAMES``);
FERV39k's are in the same order (its ``preprocess/ferv39k.py``).

The file is read by :func:`affectray.importers.pickles.read_pickle`, so nothing in it
runs; ``args`` becomes a placeholder whose state is read as data. The model is rebuilt
with the platform's MAE-DFER family (:mod:`affectray.models.lgi_former`) at the
geometry ``args`` and the tensors' shapes give, its region tokens learned embeddings
(``region_token_init="embed"``), and :func:`convert_state_dict` (a pure function of the
file's tensors) renames every tensor: their separate ``q`` / ``kv`` linears and
``q_bias`` / ``v_bias`` become timm's fused ``qkv`` with a zero key bias, so the two
models compute the same function. Every tensor of the file is placed and every tensor
of the model comes from the file, else nothing is written.

- A fine-tuned file becomes a clip classifier (``video_encoder_classifier``) whose
  pooling is theirs: the region tokens (DFEW's ``lg_classify_token_type='region'``) or
  the clip's tokens averaged, then ``fc_norm`` (their ``fc_norm`` is the encoder's
  ``norm`` here). Its logits equal the original's on the same clip.
- A pretraining file becomes a pretraining checkpoint (``kind: "pretrain"``) of the
  whole MAE-DFER model, encoder and decoder; ``finetune`` takes it as ``init`` and
  loads its encoder strictly into a ``video_encoder_classifier`` built with the
  ``finetune_model`` the summary and meta.json give.

Their test-time sampling (every 4th frame from the start, two temporal segments
averaged) is not copied: the platform predicts each frame from the window of 16
frames 4 apart centred on it (``models.inference``). The faces DFEW ships are boxes
cut by its authors' detector, so the checkpoint asks for the detector's box
(``crop="box"``, margin 0 unless ``--box-margin`` says otherwise).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from affectray import checkpoints as ckpt
from affectray.importers.output import write_imported
from affectray.importers.pickles import ForeignCheckpointError, Placeholder, describe, read_pickle
from affectray.labels import DATASET_CLASS_NAMES, LabelSet, canonical_class_name

__all__ = [
    "DATASET_CLASSES",
    "DEFAULT_BOX_MARGIN",
    "MAEDFERError",
    "convert",
    "convert_state_dict",
    "import_checkpoint",
    "read_checkpoint",
]

FORMAT = "mae-dfer"

# args.data_set -> the outputs' class names, in output order.
DATASET_CLASSES: dict[str, tuple[str, ...]] = {
    "DFEW": tuple(name for _, name in sorted(DATASET_CLASS_NAMES["dfew"].items())),
    "FERV39k": ("Happy", "Sad", "Neutral", "Angry", "Surprise", "Disgust", "Fear"),  # its label2idx
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # VideoClsDatasetFrame's Normalize, pretraining's GroupNormalize
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_BOX_MARGIN = 0.0

# The model names their code registers -> (encoder heads, decoder heads). Every one has 64
# channels per head; a file naming another model is read with that rule (and says so).
MODEL_HEADS: dict[str, tuple[int, int | None]] = {
    "vit_base_patch16_160": (12, None),
    "vit_base_dim512_no_depth_patch16_160": (8, None),
    "pretrain_videomae_base_patch16_160": (12, 6),
    "pretrain_videomae_base_dim512_no_depth_patch16_160": (8, 6),
}
HEAD_DIM = 64

# LGI-Former settings the platform's blocks compute; another value is refused by name.
LGI_SETTINGS = {
    "attn_type": "local_global",
    "lg_first_attn_type": "self",
    "lg_third_attn_type": "cross",
    "lg_attn_param_sharing_first_third": False,
    "lg_attn_param_sharing_all": False,
    "lg_no_second": False,
    "lg_no_third": False,
}
POOLS = {"region": "regions", "org": "tokens", "all": "all"}  # lg_classify_token_type -> pool

# LGBlock's norms and MLP -> LGIBlock's; the attentions are fused in _attention.
BLOCK_RENAMES = {
    "first_attn_norm0": "local_norm",
    "second_attn_norm0": "global_norm",
    "third_attn_norm0": "propagate_norm",
    "third_attn_norm1": "propagate_norm_ctx",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


class MAEDFERError(ForeignCheckpointError):
    """A file that is not one of MAE-DFER's checkpoints, or not all of one."""


# ---------------------------------------------------------------------------
# Reading the file
# ---------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
    """(the ``model`` state dict, ``args`` as a dict, ``epoch``) of a MAE-DFER checkpoint, read as data."""
    source = str(path)
    root = read_pickle(path)
    if not isinstance(root, Mapping) or not any(k in root for k in ("model", "module")):
        raise MAEDFERError(
            f"{source}: expected MAE-DFER's checkpoint dict (model, optimizer, epoch, scaler, args), "
            f"found {describe(root)}"
            + (f" with keys {sorted(map(str, root))[:8]}" if isinstance(root, Mapping) else "")
        )
    state = root["model"] if "model" in root else root["module"]  # their loader's model_key 'model|module'
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MAEDFERError(f"{source}: its 'model' entry is {describe(state)}, not a state dict of tensors")
    state = {str(k).removeprefix("module."): v.detach() for k, v in state.items()}
    args = root.get("args")
    if isinstance(args, Placeholder) and args.global_name == "argparse.Namespace":
        args = args.attributes
    if not isinstance(args, Mapping):
        raise MAEDFERError(
            f"{source}: no 'args' (the run's argparse.Namespace), found {describe(args)}: the clip geometry "
            "(input_size, num_frames, lg_region_size) and the pooling are not in the tensors"
        )
    return state, dict(args), root.get("epoch")


def _arg(args: Mapping[str, Any], name: str, kind: type, source: str, default: Any = None) -> Any:
    value = args.get(name, default)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if value is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MAEDFERError(f"{source}: args.{name} is {value!r}, expected a {kind.__name__}")
    return value


def _check_lgi(args: Mapping[str, Any], source: str) -> None:
    for name, value in LGI_SETTINGS.items():
        given = args.get(name, value)
        if given != value:
            raise MAEDFERError(
                f"{source}: args.{name} = {given!r}; the platform's LGI-Former computes {name} = {value!r} "
                "(MAE-DFER's published setting) only"
            )


# ---------------------------------------------------------------------------
# Their tensors -> the platform's
# ---------------------------------------------------------------------------


class _Tensors:
    """The file's tensors, each handed out once: what is asked for and absent is missing, the rest left over."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = state
        self.taken: set[str] = set()
        self.missing: list[str] = []

    def __call__(self, key: str) -> torch.Tensor | None:
        if key not in self.state:
            self.missing.append(key)
            return None
        self.taken.add(key)
        return self.state[key]

    def left_over(self) -> list[str]:
        return sorted(set(self.state) - self.taken)


def _cat(*tensors: torch.Tensor | None) -> torch.Tensor | None:
    return None if any(t is None for t in tensors) else torch.cat(tensors)


def _attention(take: _Tensors, src: str, dst: str, out: dict, *, bias: bool, fuse: bool) -> None:
    """Their attention (bias-free q, kv linears; q_bias, v_bias) -> timm's fused qkv, or CrossAttention's q, kv."""
    q, kv = take(f"{src}.q.weight"), take(f"{src}.kv.weight")  # [D, D], [2D, D]
    q_bias, v_bias = (take(f"{src}.q_bias"), take(f"{src}.v_bias")) if bias else (None, None)
    k_bias = None if v_bias is None else torch.zeros_like(v_bias)  # theirs has none: a zero bias is the same function
    if fuse:
        out[f"{dst}.qkv.weight"] = _cat(q, kv)  # [3D, D]: q, k, v, as timm's Attention splits it
        if bias:
            out[f"{dst}.qkv.bias"] = _cat(q_bias, k_bias, v_bias)
    else:
        out[f"{dst}.q.weight"], out[f"{dst}.kv.weight"] = q, kv
        if bias:
            out[f"{dst}.q.bias"], out[f"{dst}.kv.bias"] = q_bias, _cat(k_bias, v_bias)
    for name in ("proj.weight", "proj.bias"):
        out[f"{dst}.{name}"] = take(f"{src}.{name}")


def _encoder(take: _Tensors, src: str, dst: str, depth: int, bias: bool, out: dict) -> None:
    """Their LGI-Former (``VisionTransformer`` / ``PretrainVisionTransformerEncoder``) -> ``LGIFormerEncoder``."""
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        out[f"{dst}{name}"] = take(f"{src}{name}")
    out[f"{dst}region_embed"] = take(f"{src}lg_region_tokens")  # [R, D]
    for i in range(depth):
        theirs, ours = f"{src}blocks.{i}.", f"{dst}blocks.{i}."
        for their_name, our_name in BLOCK_RENAMES.items():
            for p in ("weight", "bias"):
                out[f"{ours}{our_name}.{p}"] = take(f"{theirs}{their_name}.{p}")
        _attention(take, f"{theirs}first_attn", f"{ours}local_attn", out, bias=bias, fuse=True)
        _attention(take, f"{theirs}second_attn", f"{ours}global_attn", out, bias=bias, fuse=True)
        _attention(take, f"{theirs}third_attn", f"{ours}propagate_attn", out, bias=bias, fuse=False)


def _decoder(take: _Tensors, depth: int, bias: bool, out: dict) -> None:
    """Their ``PretrainVisionTransformerDecoder`` + ``encoder_to_decoder`` + ``mask_token`` -> ``MAEDFER``'s decoder."""
    out["decoder_embed.weight"] = take("encoder_to_decoder.weight")
    out["mask_token"] = take("mask_token")
    for i in range(depth):
        theirs, ours = f"decoder.blocks.{i}.", f"decoder_blocks.{i}."
        for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2", "attn.proj"):
            for p in ("weight", "bias"):
                out[f"{ours}{name}.{p}"] = take(f"{theirs}{name}.{p}")
        out[f"{ours}attn.qkv.weight"] = take(f"{theirs}attn.qkv.weight")
        if bias:
            q_bias, v_bias = take(f"{theirs}attn.q_bias"), take(f"{theirs}attn.v_bias")
            out[f"{ours}attn.qkv.bias"] = _cat(q_bias, None if v_bias is None else torch.zeros_like(v_bias), v_bias)
    for theirs, ours in (("decoder.norm", "decoder_norm"), ("decoder.head", "decoder_pred")):
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = take(f"{theirs}.{p}")


def _blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix) and k[len(prefix)].isdigit()}
    return max(indices) + 1 if indices else 0


def kind_of(state: Mapping[str, torch.Tensor]) -> str:
    """The file's kind: "pretrain" (encoder.* + decoder.* keys), "finetune" (blocks.* + head.*) or "" (neither)."""
    if any(k.startswith("encoder.") for k in state) and any(k.startswith("decoder.") for k in state):
        return "pretrain"
    if any(k.startswith("blocks.") for k in state) and "head.weight" in state:
        return "finetune"
    return ""


def convert_state_dict(state: Mapping[str, torch.Tensor], *, source: str = "state dict") -> dict[str, torch.Tensor]:
    """MAE-DFER's state dict -> the platform model's (``video_encoder_classifier`` or ``MAEDFER``), every tensor placed.

    Raises MAEDFERError naming the tensors a MAE-DFER model of this depth would have and the
    file lacks, and those it holds that no such model has.
    """
    kind = kind_of(state)
    if not kind:
        raise MAEDFERError(
            f"{source}: neither a MAE-DFER fine-tuned model (blocks.*, head.*) nor a pretraining one "
            f"(encoder.*, decoder.*); it has e.g. {sorted(state)[:4]}"
        )
    src = "encoder." if kind == "pretrain" else ""
    bias = f"{src}blocks.0.first_attn.q_bias" in state
    take = _Tensors(state)
    out: dict[str, torch.Tensor | None] = {}
    try:
        _encoder(take, src, "encoder.", _blocks(state, f"{src}blocks."), bias, out)
        if kind == "pretrain":
            for p in ("weight", "bias"):
                out[f"encoder.norm.{p}"] = take(f"encoder.norm.{p}")
            _decoder(take, _blocks(state, "decoder.blocks."), bias, out)
        else:
            for p in ("weight", "bias"):  # use_mean_pooling: their norm is an identity, fc_norm follows the mean
                out[f"encoder.norm.{p}"] = take(f"fc_norm.{p}")
                out[f"head.{p}"] = take(f"head.{p}")
    except RuntimeError as error:  # torch.cat of tensors whose shapes do not fit
        raise MAEDFERError(f"{source}: its attention tensors do not fit together: {error}") from None
    left_over = take.left_over()
    if take.missing or left_over:
        problems = []
        if take.missing:
            problems.append(f"missing: {', '.join(take.missing[:6])}" + (" ..." if len(take.missing) > 6 else ""))
        if left_over:
            problems.append(f"unexpected: {', '.join(left_over[:6])}" + (" ..." if len(left_over) > 6 else ""))
        raise MAEDFERError(
            f"{source}: not all of a MAE-DFER {kind} model ({len(take.missing)} tensors missing, "
            f"{len(left_over)} left over): {'; '.join(problems)}"
        )
    return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------------------
# Geometry: args + shapes -> the platform's config
# ---------------------------------------------------------------------------


def _heads(args: Mapping[str, Any], dim: int, decoder_dim: int | None) -> tuple[int, int | None, str]:
    """(encoder heads, decoder heads, how they were found)."""
    name = str(args.get("model", ""))
    if name in MODEL_HEADS:
        heads, decoder_heads = MODEL_HEADS[name]
        return heads, decoder_heads, f"model {name}"
    return dim // HEAD_DIM, None if decoder_dim is None else decoder_dim // HEAD_DIM, f"{HEAD_DIM} channels per head"


def encoder_config(
    state: Mapping[str, torch.Tensor], args: Mapping[str, Any], prefix: str, source: str
) -> tuple[dict[str, Any], str]:
    """The MAE-DFER family's config fields for the file's encoder, and how its heads were found."""
    _check_lgi(args, source)
    embed = state.get(f"{prefix}patch_embed.proj.weight")
    fc1 = state.get(f"{prefix}blocks.0.mlp.fc1.weight")
    if embed is None or embed.dim() != 5 or fc1 is None:
        raise MAEDFERError(f"{source}: no tube embedding ({prefix}patch_embed.proj.weight) or no blocks")
    dim, in_chans, tubelet, patch, patch_w = embed.shape
    decoder_pred = state.get("decoder.head.weight")
    heads, decoder_heads, heads_from = _heads(args, dim, None if decoder_pred is None else decoder_pred.shape[1])
    if patch != patch_w or heads < 1 or dim % heads or (decoder_heads is not None and decoder_heads < 1):
        raise MAEDFERError(
            f"{source}: patch {patch}x{patch_w}, dim {dim}, heads {heads} (decoder {decoder_heads}, found by "
            f"{heads_from}) are not a MAE-DFER geometry"
        )
    region = args.get("lg_region_size", (2, 2, 10))
    if not isinstance(region, (list, tuple)) or len(region) != 3:
        raise MAEDFERError(f"{source}: args.lg_region_size is {region!r}, expected (t, h, w)")
    frames = _arg(args, "num_frames", int, source) * int(args.get("num_segments", 1) or 1)  # their all_frames
    size = _arg(args, "input_size", int, source)
    region = tuple(int(v) for v in region)
    grid = (frames // int(tubelet), size // int(patch), size // int(patch))
    regions = state.get(f"{prefix}lg_region_tokens")
    geometry = f"{frames} frames of {size} px (args.num_frames, args.input_size) make a token grid {grid}"
    if any(r < 1 or g % r for g, r in zip(grid, region, strict=True)):
        raise MAEDFERError(f"{source}: {geometry}, which regions of {region} (args.lg_region_size) do not tile")
    count = math.prod(g // r for g, r in zip(grid, region, strict=True))
    if regions is None or regions.dim() != 2 or regions.shape[0] != count:
        held = "no lg_region_tokens" if regions is None else f"{regions.shape[0]} region tokens"
        raise MAEDFERError(f"{source}: {geometry}, {count} regions of {region}; the file holds {held}")
    fields = {
        "img_size": size,
        "num_frames": frames,
        "tubelet_size": int(tubelet),
        "patch_size": int(patch),
        "in_chans": int(in_chans),
        "embed_dim": int(dim),
        "depth": _blocks(state, f"{prefix}blocks."),
        "num_heads": int(heads),
        "mlp_ratio": fc1.shape[0] / dim,
        "qkv_bias": f"{prefix}blocks.0.first_attn.q_bias" in state,
        "region_size": region,
        "region_token_init": "embed",  # theirs: one learned vector per region
    }
    if decoder_pred is not None:
        fields.update(
            decoder_embed_dim=int(decoder_pred.shape[1]),
            decoder_depth=_blocks(state, "decoder.blocks."),
            decoder_num_heads=int(decoder_heads),
        )
    return fields, heads_from


def _build(family_fields: dict[str, Any], build, source: str):
    from affectray.models.registry import ModelError

    try:
        return build()
    except ModelError as error:
        raise MAEDFERError(f"{source}: its geometry {family_fields} does not build: {error}") from None


def _load(model: torch.nn.Module, mapped: dict[str, torch.Tensor], source: str):
    from affectray.models.backbones import WeightsMismatchError, apply_state_dict

    try:
        return apply_state_dict(model, mapped, source=source, strict=True)
    except WeightsMismatchError as error:
        raise MAEDFERError(f"{error} (the file's tensors renamed by affectray.importers.mae_dfer)") from None


def _class_names(
    args: Mapping[str, Any], count: int, classes: list[str] | None, source: str
) -> tuple[tuple[str, ...], str]:
    """(the publisher's names in output order, the label set's name)."""
    if classes:
        if len(classes) != count:
            raise MAEDFERError(f"{source}: --classes names {len(classes)} classes, the model has {count} outputs")
        return tuple(classes), "custom"
    dataset = str(args.get("data_set", ""))
    published = DATASET_CLASSES.get(dataset)
    if published is None:
        raise MAEDFERError(
            f"{source}: fine-tuned on {dataset or 'an unnamed dataset'!r}, whose class order is not known here "
            f"(known: {', '.join(DATASET_CLASSES)}): name the {count} outputs with --classes"
        )
    if len(published) != count:
        raise MAEDFERError(f"{source}: {count} outputs, but {dataset} has {len(published)} classes")
    return published, dataset.lower()


def _preprocessing(args: Mapping[str, Any], fields: dict[str, Any], margin: float, source: str) -> dict[str, Any]:
    return ckpt.Preprocessing(
        mode="clip",
        image_size=fields["img_size"],
        num_frames=fields["num_frames"],
        frame_stride=_arg(args, "sampling_rate", int, source, default=4),
        channels=3,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop="box",
        box_margin=margin,
    ).to_dict()


def _architecture(fields: dict[str, Any]) -> str:
    rt, rh, rw = fields["region_size"]
    return (
        f"lgi_former dim{fields['embed_dim']} depth{fields['depth']} heads{fields['num_heads']} "
        f"{fields['num_frames']}x{fields['img_size']}px regions {rt}x{rh}x{rw}"
    )


# ---------------------------------------------------------------------------
# The two kinds of file
# ---------------------------------------------------------------------------


def _classifier(state, mapped, args, fields, heads_from, classes, margin, source) -> tuple[torch.nn.Module, dict]:
    from affectray.models.registry import create_model

    if args.get("use_mean_pooling", True) is not True:
        raise MAEDFERError(f"{source}: args.use_mean_pooling is False (their --use_cls head); not imported")
    if args.get("head_activation_func") is not None or args.get("keep_temporal_dim"):
        raise MAEDFERError(f"{source}: a regression or frame-level head (head_activation_func / keep_temporal_dim)")
    token_type = args.get("lg_classify_token_type", "org")
    if token_type not in POOLS:
        raise MAEDFERError(f"{source}: args.lg_classify_token_type is {token_type!r}, expected one of {list(POOLS)}")
    count = state["head.weight"].shape[0]
    published, label_set_name = _class_names(args, count, classes, source)
    names = tuple(canonical_class_name(c) for c in published)  # by name onto the project's classes
    encoder_kwargs = {k: v for k, v in fields.items() if k not in ("img_size", "num_frames")}
    drop_path = args.get("drop_path", 0.1)
    kwargs = {
        "backbone": "mae_dfer",
        "size": "base",
        "num_classes": count,
        "img_size": fields["img_size"],
        "window": fields["num_frames"],
        "drop_path_rate": float(drop_path) if isinstance(drop_path, (int, float)) else 0.1,
        "encoder_kwargs": encoder_kwargs,
        "pool": POOLS[token_type],
        "fc_norm": True,
    }
    model = _build(fields, lambda: create_model("video_encoder_classifier", **kwargs), source)
    fit = _load(model, mapped, source)
    meta = {
        "kind": "classifier",
        "model": model.describe(),
        "label_set": LabelSet(label_set_name, names).to_dict(),
        "preprocessing": _preprocessing(args, fields, margin, source),
    }
    extra = {"dataset": args.get("data_set"), "lg_classify_token_type": token_type, "tensors": len(fit.loaded)}
    return model, meta | {"source": {"classes": list(published), "heads_from": heads_from, **extra}}


def _pretrain(state, mapped, args, fields, heads_from, margin, source) -> tuple[torch.nn.Module, dict]:
    from affectray.models.video_classifier import build_pretrain_model

    weight = args.get("target_diff_weight")  # None: one MSE over [appearance | motion], i.e. weight 1
    motion_weight = 1.0 if weight is None else float(weight) / max(1.0 - float(weight), 1e-12)
    overrides = dict(
        fields,
        mask_ratio=float(args.get("mask_ratio", 0.9)),
        norm_pix_loss=bool(args.get("normlize_target", True)),
        motion_weight=motion_weight,
        decoder_positions="sorted",  # their decoder's positions for the visible tokens (lgi_former's docstring)
    )
    model = _build(fields, lambda: build_pretrain_model("mae_dfer", "base", **overrides), source)
    fit = _load(model, mapped, source)
    encoder_kwargs = {k: v for k, v in fields.items() if not k.startswith("decoder_") and k not in ("img_size",)}
    encoder_kwargs.pop("num_frames")
    finetune_model = {  # a FinetuneConfig.model whose encoder takes this init strictly, pooled as theirs
        "name": "video_encoder_classifier",
        "backbone": "mae_dfer",
        "img_size": fields["img_size"],
        "window": fields["num_frames"],
        "extra": {"size": "base", "encoder_kwargs": encoder_kwargs, "pool": "regions", "fc_norm": True},
    }
    meta = {
        "kind": "pretrain",
        "model": {"family": "mae_dfer", "size": "base", "kwargs": overrides},
        "preprocessing": _preprocessing(args, fields, margin, source),
        "finetune_model": finetune_model,
    }
    extra = {
        "use_frame_diff_as_target": bool(args.get("use_frame_diff_as_target", False)),
        "mask_type": args.get("mask_type"),
        "tensors": len(fit.loaded),
    }
    return model, meta | {"source": {"classes": [], "heads_from": heads_from, **extra}}


def convert(
    path: str | os.PathLike, *, classes: list[str] | None = None, box_margin: float | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The MAE-DFER model in ``path`` with all its weights (a clip classifier or a pretraining model), and its meta."""
    margin = DEFAULT_BOX_MARGIN if box_margin is None else float(box_margin)
    if not 0.0 <= margin < 10.0:
        raise MAEDFERError(f"box margin must be in [0, 10), got {margin}")
    path = Path(path)
    source = str(path)
    state, args, epoch = read_checkpoint(path)
    mapped = convert_state_dict(state, source=source)
    pretrain = kind_of(state) == "pretrain"
    if pretrain and classes:
        raise MAEDFERError(f"{source}: a pretraining checkpoint has no classes; --classes is for fine-tuned ones")
    fields, heads_from = encoder_config(state, args, "encoder." if pretrain else "", source)
    if pretrain:
        model, meta = _pretrain(state, mapped, args, fields, heads_from, margin, source)
    else:
        model, meta = _classifier(state, mapped, args, fields, heads_from, classes, margin, source)
    model.eval()
    meta["source"].update(
        format=FORMAT,
        file=path.name,
        sha256=ckpt.file_sha256(path),
        architecture=_architecture(fields),
        published_model=args.get("model"),
        epoch=epoch if isinstance(epoch, int) else None,
        file_tensors=len(state),
        converted_by="affectray.importers.mae_dfer",
    )
    return model, meta


def import_checkpoint(
    path: str | os.PathLike, out: str, *, classes: list[str] | None = None, box_margin: float | None = None
) -> dict[str, Any]:
    """Convert the MAE-DFER file ``path`` into a checkpoint at ``out`` (a path or s3:// URI).

    Written whole and swapped in (:func:`~affectray.importers.output.write_imported`);
    returns what the job summary records.
    """
    model, meta = convert(path, classes=classes, box_margin=box_margin)
    summary = write_imported(model, meta, out, format=FORMAT)
    summary.update(kind=meta["kind"], num_frames=meta["preprocessing"]["num_frames"])
    if "finetune_model" in meta:
        summary["finetune_model"] = meta["finetune_model"]
    return summary
