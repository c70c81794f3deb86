"""Weights load strictly, or say how many of how many tensors loaded (issue 14 item 5).

Every loading path (fine-tuning's ``init``, a family's ``weights_path``, a pretraining
checkpoint's encoder) refuses missing, unexpected and mis-shaped keys by name, unless
opted out (``init_strict: false``, ``weights_strict: false``); a file of which nothing
fits (another project's key layout) is refused either way. No Ray, tiny models.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from safetensors.torch import save_file

from affectray import checkpoints as ckpt
from affectray.config import load_config
from affectray.errors import AffectrayError
from affectray.models.backbones import (
    WeightsMismatchError,
    compare_state_dict,
    create_backbone,
    load_weights,
)
from affectray.models.registry import ModelConfig, ModelError, create_model
from affectray.models.video_classifier import build_pretrain_model, load_encoder_from_pretrain
from affectray.train.finetune import ClassifierTask, FinetuneConfig, initialise, model_description

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, one intra-op thread


def frame_model(num_classes: int = 8, **kwargs):
    return create_model("frame", backbone="test_resnet", num_classes=num_classes, **kwargs)


@pytest.fixture
def source():
    torch.manual_seed(0)
    return frame_model()


def save(state: dict[str, torch.Tensor], path) -> str:
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return str(path)


def same(a: torch.nn.Module, b: torch.nn.Module, keys=None) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in keys or sa)


# --------------------------------------------------------------------------- the comparison


def test_compare_names_missing_unexpected_and_mis_shaped_keys(source):
    state = dict(source.state_dict())
    del state["head.bias"]
    state["extra.weight"] = torch.zeros(3)
    state["head.weight"] = torch.zeros(7, source.num_features)
    fit = compare_state_dict(frame_model(), state)
    assert fit.missing == ["head.bias"] and fit.unexpected == ["extra.weight"]
    assert fit.mismatched == [("head.weight", (7, source.num_features), (8, source.num_features))]
    assert len(fit.loaded) == fit.total - 2 and not fit.exact
    assert compare_state_dict(frame_model(), source.state_dict()).exact


# --------------------------------------------------------------------------- init from a file


@pytest.mark.parametrize(
    "edit, named",
    [
        ("missing", [r"1 of the model's \d+ tensors missing: head\.bias"]),
        ("extra", [r"1 unexpected \(not in the model\): extra\.weight"]),
        ("shape", [r"1 with another shape: head\.weight \(7, 96\) vs model's \(8, 96\)"]),
    ],
)
def test_init_refuses_a_file_that_does_not_fit_and_loads_what_fits_when_told(source, tmp_path, edit, named):
    state = dict(source.state_dict())
    if edit == "missing":
        del state["head.bias"]
    elif edit == "extra":
        state["extra.weight"] = torch.zeros(3)
    else:
        state["head.weight"] = torch.zeros(7, 96)
    path = save(state, tmp_path / "w.safetensors")
    with pytest.raises(WeightsMismatchError) as error:
        initialise(frame_model(), path)
    message = str(error.value)
    assert isinstance(error.value, AffectrayError)  # a user error: one line, exit status 2
    assert message.startswith(f"{path} does not fit FrameClassifier (strict loading): ")
    for pattern in named:
        assert re.search(pattern, message), message
    assert "init_strict: false" in message

    torch.manual_seed(1)
    model = frame_model()
    report = initialise(model, path, strict=False)
    total = len(model.state_dict())
    loaded = total if edit == "extra" else total - 1
    assert report == {"uri": path, "kind": "file", "loaded": loaded, "of": total, "strict": False}
    assert same(model, source, [k for k in source.state_dict() if not k.startswith("head.")])


def test_init_loads_an_exact_file_and_counts_every_tensor(source, tmp_path):
    path = save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")  # DDP's
    model = frame_model()
    report = initialise(model, path)
    assert report["loaded"] == report["of"] == len(model.state_dict()) and report["strict"] is True
    assert same(model, source)


def test_another_projects_key_layout_is_refused_even_when_not_strict(source, tmp_path):
    # The same tensors under another project's names (as MAE-DFER's files name theirs).
    path = save({f"mae_dfer.{k}": v for k, v in source.state_dict().items()}, tmp_path / "other.safetensors")
    for strict in (True, False):
        with pytest.raises(WeightsMismatchError, match=r"none of its \d+ keys fits .*mae_dfer\.backbone"):
            initialise(frame_model(), path, strict=strict)


def test_many_missing_keys_are_counted_and_the_first_few_named(source, tmp_path):
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("backbone.layer")}
    path = save(state, tmp_path / "w.safetensors")
    with pytest.raises(WeightsMismatchError) as error:
        initialise(frame_model(), path)
    missing = sorted(k for k in source.state_dict() if k.startswith("backbone.layer"))
    assert f"{len(missing)} of the model's {len(source.state_dict())} tensors missing: " in str(error.value)
    assert ", ".join(missing[:5]) + f" (+{len(missing) - 5} more)" in str(error.value)


# --------------------------------------------------------------------------- init from a checkpoint


def test_init_from_a_classifier_checkpoint_with_another_head(source, tmp_path):
    ckpt.save_checkpoint(tmp_path / "ck", source, {"kind": "classifier"})
    uri = str(tmp_path / "ck")
    with pytest.raises(WeightsMismatchError, match=r"2 with another shape: head\.bias \(8,\) vs model's \(5,\)"):
        initialise(frame_model(5), uri)
    model = frame_model(5)
    report = initialise(model, uri, strict=False)
    assert report == {"uri": uri, "kind": "checkpoint", "loaded": report["of"] - 2, "of": report["of"], "strict": False}
    assert same(model, source, [k for k in source.state_dict() if k.startswith("backbone.")])


def test_init_strict_is_a_config_setting_the_task_obeys(source, tmp_path):
    state = dict(source.state_dict(), **{"head.weight": torch.zeros(5, 96), "head.bias": torch.zeros(5)})
    path = save(state, tmp_path / "w.safetensors")
    settings = ["data.root=unused", f"init={path}", "model.backbone=test_resnet", "class_view=abaw8"]
    config = load_config(FinetuneConfig, None, settings)
    assert config.init_strict is True
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, image_size=32))
    with pytest.raises(WeightsMismatchError, match="set init_strict: false"):
        ClassifierTask(config, model_description(config), None).build_model()
    loose = load_config(FinetuneConfig, None, [*settings, "init_strict=false"])
    assert loose.init_strict is False
    model = ClassifierTask(loose, model_description(loose), None).build_model()
    assert same(model, source, [k for k in source.state_dict() if k.startswith("backbone.")])


# --------------------------------------------------------------------------- a pretraining checkpoint's encoder


def test_pretrain_transfer_reports_its_counts_and_refuses_a_foreign_encoder(tmp_path):
    pretrained = build_pretrain_model("mae_dfer", "tiny", img_size=32, num_frames=4)
    ckpt.save_checkpoint(tmp_path / "pre", pretrained, {"kind": "pretrain"})
    classifier = create_model("video_encoder_classifier", backbone="mae_dfer", size="tiny", img_size=32, window=4)
    report = initialise(classifier, str(tmp_path / "pre"), strict=True)
    encoder_tensors = len(pretrained.encoder.state_dict())
    assert report["kind"] == "pretrain" and report["loaded"] == encoder_tensors
    assert report["of"] == len(classifier.state_dict()) == encoder_tensors + 2  # the head starts fresh

    # A pretraining checkpoint whose keys are no encoder's: refused, whatever init_strict says.
    ckpt.save_checkpoint(tmp_path / "foreign", frame_model(), {"kind": "pretrain"})
    for strict in (True, False):
        with pytest.raises(ModelError, match=r"does not fit LGIFormerEncoder: none of its \d+ keys fits"):
            initialise(classifier, str(tmp_path / "foreign"), strict=strict)
    with pytest.raises(ModelError, match=r"does not fit LGIFormerEncoder \(strict loading\): 1 unexpected"):
        load_encoder_from_pretrain(classifier, dict(pretrained.state_dict(), **{"encoder.extra": torch.zeros(1)}))


# --------------------------------------------------------------------------- weights_path families


def test_weights_path_is_strict_unless_weights_strict_is_false(tmp_path):
    torch.manual_seed(0)
    backbone, _ = create_backbone("test_resnet")
    state = dict(backbone.state_dict())
    del state["conv1.0.weight"]
    path = save(state, tmp_path / "backbone.safetensors")
    with pytest.raises(WeightsMismatchError, match=r"missing: conv1\.0\.weight\. .*set weights_strict: false"):
        frame_model(weights_path=path)
    model = frame_model(weights_path=path, weights_strict=False)
    assert same(model.backbone, backbone, list(state))
    assert model.describe()["kwargs"]["weights_path"] is None and model.describe()["kwargs"]["weights_strict"]
    with pytest.raises(WeightsMismatchError, match=r"conv1\.0\.weight"):
        create_model("esr", backbone="test_resnet", num_branches=1, shared_stages=1, weights_path=path)
    esr = create_model(
        "esr", backbone="test_resnet", num_branches=1, shared_stages=1, weights_path=path, weights_strict=False
    )
    assert torch.equal(esr.base[0][3].weight, backbone.conv1[3].weight)  # the stem's second conv
    with pytest.raises(WeightsMismatchError, match=r"conv1\.0\.weight"):
        create_model("cnn_gru", backbone="test_resnet", window=3, hidden_size=8, num_layers=1, weights_path=path)


def test_a_pooled_backbone_ignores_the_classifier_head_of_an_imagenet_file(tmp_path):
    torch.manual_seed(0)
    backbone, d = create_backbone("test_resnet")
    path = save(dict(backbone.state_dict(), **{"fc.weight": torch.zeros(1000, d)}), tmp_path / "imagenet.safetensors")
    missing, unexpected = load_weights(create_backbone("test_resnet")[0], path)  # strict, and it fits
    assert missing == [] and unexpected == ["fc.weight"]
    model = ModelConfig(name="frame", backbone="test_resnet", extra={"weights_path": path})
    assert same(create_model(model.name, **model.to_kwargs()).backbone, backbone)
