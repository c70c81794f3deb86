"""POSTER V2: the model family against the published model's layout, and `import-checkpoint --format poster-v2`.

The published files are made here in POSTER V2's own layout (``main.py``'s
``save_checkpoint``): a dict with the nn.DataParallel model's ``state_dict`` (keys
under ``module.``), ``best_acc``, ``epoch``, a real optimizer state and recorder
objects of a class pickled as ``__main__.RecorderMeter``, as the training script
leaves them. The weights come from this family with every tensor (batch-norm
statistics too) moved off its initialisation, so a wrong mapping shows.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest
import torch

import affectray
from affectray.checkpoints import CheckpointError, load_weights, read_meta
from affectray.cli import build_parser
from affectray.importers import poster_v2 as importer
from affectray.importers.pickles import UnsafePickleError, read_pickle
from affectray.labels import ABAW8, LabelSet, remap
from affectray.models.poster_v2 import PosterV2, relative_position_index
from affectray.models.registry import ModelError, create_model, create_model_from_description

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread on a shared CPU

SMALL = {"face_size": 32, "ir_units": (1, 1, 1), "vit_depth": 1}  # for tests only: tiny maps, 13 tokens
RAF_DB = ["Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"]  # RAF-DB's folders 1..7
AFFECTNET_8 = ["Neutral", "Happiness", "Sadness", "Surprise", "Fear", "Disgust", "Anger", "Other"]  # 0..7


# ---------------------------------------------------------------------------
# The published model's tensors, written from its code (zczcwh/POSTER_V2)
# ---------------------------------------------------------------------------


def official_shapes(num_classes: int = 7) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``pyramid_trans_expr2(img_size=224, num_classes)`` and its shape.

    From the published modules: ``ir50.Backbone(50, 0.0, 'ir')``, ``mobilefacenet.MobileFaceNet([112, 112],
    136)``, ``vit_model.VisionTransformer(depth=2, embed_dim=768)`` (in_c=147) and the layers
    ``PosterV2_7cls.py`` adds (window sizes 28, 14, 7; heads 2, 4, 8; dims 64, 128, 256).
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(p: str, out: int, inp: int, k: int, bias: bool = True, groups: int = 1) -> None:
        shapes[f"{p}.weight"] = (out, inp // groups, k, k)
        if bias:
            shapes[f"{p}.bias"] = (out,)

    def linear(p: str, out: int, inp: int, bias: bool = True) -> None:
        shapes[f"{p}.weight"] = (out, inp)
        if bias:
            shapes[f"{p}.bias"] = (out,)

    def bn(p: str, c: int) -> None:
        shapes.update({f"{p}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{p}.num_batches_tracked"] = ()

    def ln(p: str, c: int) -> None:
        shapes.update({f"{p}.weight": (c,), f"{p}.bias": (c,)})

    # ir50.Backbone: input_layer, the unused output_layer, body1..3 of bottleneck_IR units.
    conv("ir_back.input_layer.0", 64, 3, 3, bias=False)
    bn("ir_back.input_layer.1", 64)
    shapes["ir_back.input_layer.2.weight"] = (64,)
    bn("ir_back.output_layer.0", 512)
    linear("ir_back.output_layer.3", 512, 512 * 7 * 7)
    bn("ir_back.output_layer.4", 512)
    for body, (first_in, depth, units) in enumerate(((64, 64, 3), (64, 128, 4), (128, 256, 14)), start=1):
        for i in range(units):
            p, cin = f"ir_back.body{body}.{i}", first_in if i == 0 else depth
            if cin != depth:  # else a MaxPool2d(1, stride) shortcut: no tensors
                conv(f"{p}.shortcut_layer.0", depth, cin, 1, bias=False)
                bn(f"{p}.shortcut_layer.1", depth)
            bn(f"{p}.res_layer.0", cin)
            conv(f"{p}.res_layer.1", depth, cin, 3, bias=False)
            shapes[f"{p}.res_layer.2.weight"] = (depth,)  # PReLU
            conv(f"{p}.res_layer.3", depth, depth, 3, bias=False)
            bn(f"{p}.res_layer.4", depth)

    # mobilefacenet.MobileFaceNet: Conv_block (conv, bn, prelu), Linear_block (conv, bn), Depth_Wise, Residual, GDC.
    def block(p: str, cin: int, cout: int, k: int = 1, groups: int = 1, prelu: bool = True) -> None:
        conv(f"{p}.conv", cout, cin, k, bias=False, groups=groups)
        bn(f"{p}.bn", cout)
        if prelu:
            shapes[f"{p}.prelu.weight"] = (cout,)

    def depth_wise(p: str, cin: int, cout: int, groups: int) -> None:
        block(f"{p}.conv", cin, groups)
        block(f"{p}.conv_dw", groups, groups, 3, groups=groups)
        block(f"{p}.project", groups, cout, prelu=False)

    m = "face_landback"
    block(f"{m}.conv1", 3, 64, 3)
    block(f"{m}.conv2_dw", 64, 64, 3, groups=64)
    depth_wise(f"{m}.conv_23", 64, 64, 128)
    for i in range(4):
        depth_wise(f"{m}.conv_3.model.{i}", 64, 64, 128)
    depth_wise(f"{m}.conv_34", 64, 128, 256)
    for i in range(6):
        depth_wise(f"{m}.conv_4.model.{i}", 128, 128, 256)
    depth_wise(f"{m}.conv_45", 128, 128, 512)
    for i in range(2):
        depth_wise(f"{m}.conv_5.model.{i}", 128, 128, 256)
    block(f"{m}.conv_6_sep", 128, 512)
    block(f"{m}.output_layer.conv_6_dw", 512, 512, 7, groups=512, prelu=False)
    linear(f"{m}.output_layer.linear", 136, 512, bias=False)
    bn(f"{m}.output_layer.bn", 136)

    # vit_model.VisionTransformer: 147 tokens + the class token, and the layers its forward never uses.
    v = "VIT"
    shapes.update({f"{v}.cls_token": (1, 1, 768), f"{v}.pos_embed": (1, 148, 768)})
    linear(f"{v}.se_block.linear1", 768, 768)
    linear(f"{v}.se_block.linear2", 768, 768)
    conv(f"{v}.patch_embed.proj", 768, 256, 1)
    linear(f"{v}.head.linear", num_classes, 768)
    shapes[f"{v}.eca_block.conv.weight"] = (1, 1, 5)  # eca_block(channel=196): kernel 5, no bias
    conv(f"{v}.CON1", 768, 256, 1, bias=False)
    linear(f"{v}.IRLinear1", 768, 1024)
    linear(f"{v}.IRLinear2", 512, 768)
    for b in range(2):
        p = f"{v}.blocks.{b}"
        ln(f"{p}.norm1", 768)
        shapes.update({f"{p}.conv.weight": (148, 148, 1), f"{p}.conv.bias": (148,)})
        linear(f"{p}.attn.qkv", 3 * 768, 768)
        linear(f"{p}.attn.proj", 768, 768)
        ln(f"{p}.norm2", 768)
        linear(f"{p}.mlp.fc1", 4 * 768, 768)
        linear(f"{p}.mlp.fc2", 768, 4 * 768)
    ln(f"{v}.norm", 768)

    # pyramid_trans_expr2's own layers.
    for i, (win, heads, dim) in enumerate(((28, 2, 64), (14, 4, 128), (7, 8, 256)), start=1):
        shapes[f"attn{i}.relative_position_bias_table"] = ((2 * win - 1) ** 2, heads)
        shapes[f"attn{i}.relative_position_index"] = (win * win, win * win)
        linear(f"attn{i}.qkv", 2 * dim, dim)
        linear(f"attn{i}.proj", dim, dim)
        ln(f"window{i}.norm", dim)
        conv(f"conv{i}", dim, dim, 3)
        shapes.update({f"ffn{i}.gamma1": (dim,), f"ffn{i}.gamma2": (dim,)})
        linear(f"ffn{i}.mlp.fc1", 4 * dim, dim)
        linear(f"ffn{i}.mlp.fc2", dim, 4 * dim)
        ln(f"ffn{i}.norm", dim)
    conv("last_face_conv", 256, 512, 3)
    conv("embed_q.0", 768, 64, 3)
    conv("embed_q.1", 768, 768, 3)
    conv("embed_k.0", 768, 128, 3)
    conv("embed_v.proj", 768, 256, 1)
    return shapes


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with every float tensor moved off its initialisation (BN statistics too), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            else:
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def published():
    """A default-size poster_v2 (7 classes) with randomised weights: the published model's layout."""
    return randomised(create_model("poster_v2", num_classes=7))


# ---------------------------------------------------------------------------
# The model family
# ---------------------------------------------------------------------------


def test_default_model_has_the_published_tensors(published):
    expected = official_shapes(7)
    own = {k: tuple(v.shape) for k, v in published.state_dict().items()}
    assert len(expected) == 747  # what pyramid_trans_expr2(num_classes=7).state_dict() holds
    assert sorted(own) == sorted(expected)
    assert own == expected
    for key in ("ir_back.body3.13.res_layer.3.weight", "face_landback.conv_4.model.5.conv_dw.conv.weight",
                "VIT.blocks.1.conv.weight", "attn1.relative_position_index", "embed_v.proj.weight"):  # fmt: skip
        assert own[key] == expected[key], key
    assert published.describe() == {
        "name": "poster_v2",
        "kwargs": {
            "num_classes": 7,
            "face_size": 112,
            "ir_units": (3, 4, 14),
            "vit_depth": 2,
            "freeze_landmarks": True,
        },
    }
    eight = official_shapes(8)
    assert eight["VIT.head.linear.weight"] == (8, 768) and len(eight) == 747


def test_relative_position_index_is_the_published_table():
    window = 7
    index = relative_position_index(window)
    cells = [(i, j) for i in range(window) for j in range(window)]
    expected = [
        [(a[0] - b[0] + window - 1) * (2 * window - 1) + (a[1] - b[1] + window - 1) for b in cells] for a in cells
    ]
    assert index.dtype == torch.int64
    assert torch.equal(index, torch.tensor(expected))


def test_a_training_step_lowers_the_loss_and_trains_only_what_the_published_model_trains():
    torch.manual_seed(0)
    model = create_model("poster_v2", num_classes=7, **SMALL)
    assert isinstance(model, PosterV2) and model.input_kind == "frame" and model.window == 1
    rebuilt = create_model_from_description(model.describe())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}

    x = torch.randn(4, 3, 40, 40)  # any input side: the model resizes to face_size
    targets = torch.tensor([0, 3, 5, 6])
    model.train()
    torch.manual_seed(1)  # the same drop-path masks before and after the step
    out = model(x)
    assert out["logits"].shape == (4, 7) and out["features"].shape == (4, 768)
    loss, _ = model.loss(out, targets)
    loss.backward()
    # Gradients reach exactly the tensors the published training updates: not MobileFaceNet (frozen) and
    # not the layers its forward never runs (IR-50's output layer, the ViT's CON1, IRLinear*, ...).
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(
        n.startswith(("face_landback.", "ir_back.output_layer.", "VIT.CON1", "VIT.IRLinear")) for n in with_grad
    )
    assert {"VIT.head.linear.weight", "attn1.qkv.weight", "ir_back.body1.0.res_layer.1.weight"} <= with_grad
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    optimizer.step()
    with torch.no_grad():
        torch.manual_seed(1)
        after, _ = model.loss(model(x), targets)
    assert after < loss


def test_bad_sizes_are_refused():
    with pytest.raises(ModelError, match="face_size must be a multiple of 16"):
        create_model("poster_v2", face_size=100)
    with pytest.raises(ModelError, match="takes no argument"):
        create_model("poster_v2", img_size=224)


# ---------------------------------------------------------------------------
# import-checkpoint --format poster-v2
# ---------------------------------------------------------------------------


class RecorderMeter:
    """Stands in for main.py's RecorderMeter (whose arrays are numpy's)."""

    __module__ = "__main__"  # as the training script pickles it

    def __init__(self, total_epoch: int) -> None:
        self.total_epoch = total_epoch
        self.current_epoch = 37
        self.epoch_losses = [[0.5, 0.6]] * total_epoch
        self.epoch_accuracy = [[90.0, 91.5]] * total_epoch


class RecorderMeter1(RecorderMeter):
    __module__ = "__main__"


def save_published(payload: dict, path) -> None:
    """torch.save as the training script does, its classes found under __main__ while pickling only."""
    with pytest.MonkeyPatch.context() as patch:
        for cls in (RecorderMeter, RecorderMeter1):
            patch.setattr(sys.modules["__main__"], cls.__name__, cls, raising=False)
        torch.save(payload, path)


def training_checkpoint(model: torch.nn.Module, **changes) -> dict:
    """The dict main.py's save_checkpoint writes, for ``model`` wrapped in nn.DataParallel."""
    head = model.VIT.head.linear
    optimizer = torch.optim.Adam([{"params": [head.bias], "rho": 0.05, "adaptive": False}], lr=3.5e-5)  # SAM's groups
    head.bias.grad = torch.zeros_like(head.bias)
    optimizer.step()
    head.bias.grad = None
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state.update(changes)
    return {
        "epoch": 38,
        "state_dict": {k: v for k, v in state.items() if v is not None},
        "best_acc": torch.tensor(92.2099),
        "optimizer": optimizer.state_dict(),
        "recorder1": RecorderMeter1(200),
        "recorder": RecorderMeter(200),
    }


def run_import(*argv) -> dict:
    args: argparse.Namespace = build_parser("import-checkpoint").parse_args(["import-checkpoint", *map(str, argv)])
    return args._module.main(args)


@pytest.fixture(scope="module")
def raf_db_file(published, tmp_path_factory):
    path = tmp_path_factory.mktemp("poster_v2") / "raf-db-model_best.pth"
    save_published(training_checkpoint(published), path)
    return path


def test_import_places_every_tensor_and_predicts_as_the_original(published, raf_db_file, tmp_path):
    out = tmp_path / "ckpt"
    summary = run_import(raf_db_file, out, "--format", "poster-v2")
    assert summary["format"] == "poster-v2" and summary["checkpoint"] == str(out.resolve())
    assert summary["model"]["name"] == "poster_v2" and summary["model"]["kwargs"]["num_classes"] == 7
    assert summary["tensors"] == 747

    # Strict and complete: every tensor of the file is in the checkpoint, under its own name, unchanged.
    original = published.state_dict()
    weights = load_weights(out)
    assert set(weights) == set(original)
    assert all(torch.equal(weights[k], original[k]) for k in original)

    meta = read_meta(out)
    assert meta["preprocessing"]["image_size"] == 224 and meta["preprocessing"]["crop"] == "aligned"
    assert meta["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert meta["preprocessing"]["std"] == [0.229, 0.224, 0.225]
    assert meta["source"]["file"] == "raf-db-model_best.pth" and len(meta["source"]["sha256"]) == 64
    assert meta["source"]["dataset"] == "RAF-DB" and meta["source"]["epoch"] == 38
    assert meta["source"]["best_acc"] == pytest.approx(92.2099)

    # RAF-DB's ImageFolder order (folders 1..7), mapped onto ABAW by name.
    assert meta["label_set"] == {"name": "rafdb", "classes": RAF_DB}
    abaw = remap(np.arange(7), LabelSet.from_dict(meta["label_set"]), ABAW8)
    assert [ABAW8.classes[i] for i in abaw] == RAF_DB

    model, info = affectray.load_model(str(out))
    assert info["classes"] == RAF_DB and info["input"] == "B,3,224,224"
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = published(x)["logits"]
        got = model(x)["logits"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_training_script_is_never_imported(raf_db_file):
    assert not hasattr(sys.modules["__main__"], "RecorderMeter")  # nothing to find it by, had anything looked
    saved = read_pickle(raf_db_file)
    assert saved["recorder"].global_name == "__main__.RecorderMeter"
    assert saved["recorder"].get("current_epoch") == 37
    assert saved["optimizer"]["param_groups"][0]["rho"] == 0.05


def test_a_missing_or_extra_tensor_is_refused_by_name(published, tmp_path):
    path = tmp_path / "raf-db-model_best.pth"
    save_published(training_checkpoint(published, **{"module.VIT.head.linear.bias": None}), path)
    with pytest.raises(CheckpointError, match=r"missing: VIT\.head\.linear\.bias"):
        run_import(path, tmp_path / "ckpt", "--format", "poster-v2")
    save_published(training_checkpoint(published, **{"module.VIT.extra.weight": torch.zeros(3)}), path)
    with pytest.raises(CheckpointError, match=r"unexpected.*VIT\.extra\.weight"):
        run_import(path, tmp_path / "ckpt", "--format", "poster-v2")
    assert not (tmp_path / "ckpt").exists()


def test_seven_outputs_need_the_dataset_named(raf_db_file, tmp_path):
    unnamed = tmp_path / "model_best.pth"
    unnamed.symlink_to(raf_db_file)
    with pytest.raises(CheckpointError, match="does not say which published model"):
        importer.convert(unnamed)
    _, meta = importer.convert(unnamed, classes=["neutral", "happy", "sad", "surprise", "fear", "disgust", "angry"])
    assert meta["label_set"]["name"] == "custom" and meta["label_set"]["classes"][1] == "Happiness"
    affectnet = tmp_path / "affectnet-7-model_best.pth"
    affectnet.symlink_to(raf_db_file)
    _, meta = importer.convert(affectnet)
    assert meta["label_set"] == {"name": "affectnet7", "classes": AFFECTNET_8[:7]}
    assert meta["source"]["dataset"] == "AffectNet-7"


def test_eight_outputs_are_affectnet_8_with_contempt_as_other(published, tmp_path):
    head = {"module.VIT.head.linear.weight": torch.randn(8, 768), "module.VIT.head.linear.bias": torch.randn(8)}
    path = tmp_path / "poster.pth"  # the name does not matter: only AffectNet-8 has 8 outputs
    save_published(training_checkpoint(published, **head), path)
    _, meta = importer.convert(path, box_margin=0.25)
    assert meta["label_set"] == {"name": "affectnet8", "classes": AFFECTNET_8}
    assert meta["source"]["classes"][-1] == "Contempt"
    assert meta["model"]["kwargs"]["num_classes"] == 8
    assert (meta["preprocessing"]["crop"], meta["preprocessing"]["box_margin"]) == ("box", 0.25)


def test_not_a_training_checkpoint_is_refused(tmp_path):
    path = tmp_path / "raf-db-model_best.pth"
    torch.save({"model": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="expected the dict POSTER V2's main.py saves"):
        importer.convert(path)


def test_recorders_with_numpy_arrays_are_read_as_data(tmp_path):
    recorder = RecorderMeter(3)
    recorder.epoch_losses = np.zeros((3, 2), dtype=np.float32)  # as main.py's RecorderMeter.reset makes them
    recorder.epoch_accuracy = np.arange(6, dtype=np.float64).reshape(3, 2)
    path = tmp_path / "raf-db-model_best.pth"
    save_published({"state_dict": {"module.w": torch.ones(2)}, "recorder": recorder,
                    "best_acc": np.float64(92.21)}, path)  # fmt: skip
    read = read_pickle(path)
    assert read["recorder"].global_name == "__main__.RecorderMeter"
    assert np.array_equal(read["recorder"].get("epoch_accuracy"), recorder.epoch_accuracy)
    assert read["recorder"].get("epoch_losses").dtype == np.float32 and read["best_acc"] == 92.21
    # An array of objects would be pickled objects in disguise: refused, nothing built.
    save_published({"recorder": np.array([recorder], dtype=object)}, tmp_path / "objects.pth")
    with pytest.raises(UnsafePickleError, match="dtype"):
        read_pickle(tmp_path / "objects.pth")


def test_the_imported_checkpoint_labels_a_real_video(raf_db_file, real_video, tmp_path, capsys):
    """predict (the label job's classifier, without Ray) on three frames of the real face video."""
    from affectray import cli

    run_import(raf_db_file, tmp_path / "ckpt", "--format", "poster-v2")
    code = cli.main(["predict", str(real_video), "--checkpoint", str(tmp_path / "ckpt"), "--every", "24", "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    faces = summary["inputs"][0]["faces"]
    assert code == 0 and len(faces) == 3  # frames 0, 24, 48: one face each
    assert all(face["label"] in RAF_DB_ABAW for face in faces)
    assert all(abs(sum(face["probs"].values()) - 1) < 1e-3 for face in faces)


RAF_DB_ABAW = {"Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"}
