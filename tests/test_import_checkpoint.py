"""`affectray import-checkpoint`: foreign pickles read without running them, HSEmotion models loaded strictly.

The files are made here in HSEmotion's own layout: a timm ``tf_efficientnet_b0`` /
``_b2`` built with ``pretrained=False``, weights and batch-norm statistics randomised
(so a wrong mapping or wrong padding shows), its ``classifier`` replaced by an
``nn.Linear``, saved whole with ``torch.save(model, path)``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from affectray.checkpoints import CheckpointError, load_weights, read_meta
from affectray.cli import build_parser
from affectray.cli import main as cli_main
from affectray.importers import hsemotion
from affectray.importers.pickles import (
    ForeignCheckpointError,
    Placeholder,
    UnsafePickleError,
    module_state_dict,
    read_pickle,
)
from affectray.labels import ABAW8, LabelSet, remap
from affectray.models.inference import load_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, one intra-op thread

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def hsemotion_like(arch: str, outputs: int, *, sequential: bool = False, seed: int = 0) -> nn.Module:
    """A timm EfficientNet as HSEmotion publishes it, with weights and BN statistics that are not the defaults."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False)
    linear = nn.Linear(model.classifier.in_features, outputs)
    model.classifier = nn.Sequential(linear) if sequential else linear
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def import_args(*argv: str) -> argparse.Namespace:
    return build_parser("import-checkpoint").parse_args(["import-checkpoint", *map(str, argv)])


def run_import(*argv: str) -> dict:
    args = import_args(*argv)
    return args._module.main(args)


@pytest.fixture(scope="module")
def b0(tmp_path_factory):
    """(model, path): an 8-class HSEmotion-style EfficientNet-B0 pickled whole."""
    model = hsemotion_like("tf_efficientnet_b0", 8)
    path = tmp_path_factory.mktemp("hsemotion") / "enet_b0_8_best_afew.pt"
    torch.save(model, path)
    return model, path


# ---------------------------------------------------------------------------
# HSEmotion import
# ---------------------------------------------------------------------------


def test_import_places_every_tensor_and_predicts_as_the_original(b0, tmp_path):
    model, path = b0
    out = tmp_path / "ckpt"
    summary = run_import(path, out, "--format", "hsemotion")

    original = model.state_dict()
    assert summary["job"] == "import-checkpoint"
    assert summary["checkpoint"] == str(out.resolve())
    assert summary["format"] == "hsemotion"
    assert summary["model"]["name"] == "frame"
    assert summary["model"]["kwargs"]["backbone"] == "tf_efficientnet_b0"
    assert summary["tensors"] == len(original) == 360

    # Strict and complete: every tensor of the file is in the checkpoint, under the family's names, unchanged.
    weights = load_weights(out)
    expected = {f"backbone.{k}": v for k, v in original.items() if not k.startswith("classifier.")}
    expected.update({"head.weight": original["classifier.weight"], "head.bias": original["classifier.bias"]})
    assert set(weights) == set(expected)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)

    meta = read_meta(out)
    assert meta["kind"] == "classifier"
    assert meta["preprocessing"]["image_size"] == 224
    assert meta["preprocessing"]["crop"] == "box"
    assert meta["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert meta["preprocessing"]["std"] == [0.229, 0.224, 0.225]
    assert meta["source"]["format"] == "hsemotion"
    assert meta["source"]["file"] == "enet_b0_8_best_afew.pt"
    assert len(meta["source"]["sha256"]) == 64
    assert meta["source"]["classes"] == list(hsemotion.CLASSES_8)

    # The same probabilities as the original timm model on the same faces, through the checkpoint's own normalisation.
    faces = np.random.default_rng(0).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    got = load_classifier(str(out)).predict_track(faces)
    x = (torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    with torch.no_grad():
        want = model(x).softmax(-1).numpy()
    assert got.shape == (2, 8)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_classes_map_by_name_onto_abaw(b0, tmp_path):
    _, path = b0
    run_import(path, tmp_path / "ckpt", "--format", "hsemotion")
    label_set = read_meta(tmp_path / "ckpt")["label_set"]
    assert label_set == {
        "name": "affectnet8",
        "classes": ["Anger", "Other", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise"],
    }
    # Output k of the model is ABAW8 class remap[k]: Contempt (output 1) is ABAW's Other.
    abaw = remap(np.arange(8), LabelSet.from_dict(label_set), ABAW8)
    assert [ABAW8.classes[i] for i in abaw] == label_set["classes"]
    assert ABAW8.classes[abaw[hsemotion.CLASSES_8.index("Happiness")]] == "Happiness"


def test_classes_option_renames_outputs(b0, tmp_path):
    _, path = b0
    names = "neutral,happy,sad,surprise,fear,disgust,angry,contempt"
    summary = run_import(path, tmp_path / "ckpt", "--format", "hsemotion", "--classes", names)
    assert summary["classes"] == ["Neutral", "Happiness", "Sadness", "Surprise", "Fear", "Disgust", "Anger", "Other"]
    with pytest.raises(CheckpointError, match="names 2 classes, the model has 8"):
        run_import(path, tmp_path / "other", "--format", "hsemotion", "--classes", "Anger", "Fear")


def test_classifier_in_a_sequential_imports_the_same(b0, tmp_path):
    model, _ = b0
    wrapped = copy.deepcopy(model)
    wrapped.classifier = nn.Sequential(nn.Dropout(0.2), copy.deepcopy(model.classifier)).eval()
    path = tmp_path / "enet_b0_8_best_vgaf.pt"
    torch.save(wrapped, path)
    summary = run_import(path, tmp_path / "ckpt", "--format", "hsemotion")
    assert summary["tensors"] == 360
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x).softmax(-1)
    torch.testing.assert_close(load_classifier(str(tmp_path / "ckpt")).predict(x), want, atol=2e-5, rtol=1e-4)


def test_an_extra_tensor_is_refused_by_name(b0, tmp_path):
    model, _ = b0
    extra = copy.deepcopy(model)
    extra.bn2.register_buffer("calibration", torch.zeros(3))
    path = tmp_path / "extra.pt"
    torch.save(extra, path)
    with pytest.raises(CheckpointError, match=r"unexpected.*backbone\.bn2\.calibration"):
        run_import(path, tmp_path / "ckpt", "--format", "hsemotion")
    assert not (tmp_path / "ckpt").exists()


def test_a_missing_tensor_is_refused_by_name(b0, tmp_path):
    model, _ = b0
    missing = copy.deepcopy(model)
    missing.blocks[0][0].se.conv_reduce.bias = None
    path = tmp_path / "missing.pt"
    torch.save(missing, path)
    with pytest.raises(CheckpointError, match=r"missing: backbone\.blocks\.0\.0\.se\.conv_reduce\.bias"):
        run_import(path, tmp_path / "ckpt", "--format", "hsemotion")
    assert not (tmp_path / "ckpt").exists()


def test_b2_is_told_from_its_shapes_not_its_file_name(tmp_path):
    model = hsemotion_like("tf_efficientnet_b2", 7, seed=1)
    path = tmp_path / "enet_b0_8_best_afew.pt"  # the name says B0 and 8 classes; the tensors say B2 and 7
    torch.save(model, path)
    summary = run_import(path, tmp_path / "ckpt", "--format", "hsemotion")
    assert summary["model"]["kwargs"]["backbone"] == "tf_efficientnet_b2"
    assert summary["image_size"] == 260
    assert summary["label_set"] == "affectnet7"
    assert summary["classes"] == ["Anger", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x).softmax(-1)
    torch.testing.assert_close(load_classifier(str(tmp_path / "ckpt")).predict(x), want, atol=2e-5, rtol=1e-4)


def test_the_multitask_valence_arousal_model_is_refused(b0, tmp_path):
    model, _ = b0
    mtl = copy.deepcopy(model)
    mtl.classifier = nn.Linear(1280, 10)
    path = tmp_path / "enet_b0_8_va_mtl.pt"
    torch.save(mtl, path)
    with pytest.raises(CheckpointError, match="valence"):
        run_import(path, tmp_path / "ckpt", "--format", "hsemotion")
    with pytest.raises(CheckpointError, match="valence"):  # naming ten classes does not make arousal one
        run_import(path, tmp_path / "ckpt", "--format", "hsemotion", "--classes", *[f"c{i}" for i in range(10)])
    assert not (tmp_path / "ckpt").exists()


def test_layers_that_pad_differently_are_refused(tmp_path):
    """A plain (PyTorch-padded) EfficientNet is rebuilt as efficientnet_b0, never as the tf_ variant."""
    model = hsemotion_like("efficientnet_b0", 8)
    path = tmp_path / "plain.pt"
    torch.save(model, path)
    assert run_import(path, tmp_path / "ckpt", "--format", "hsemotion")["architecture"] == "efficientnet_b0"
    # Same tensors, TensorFlow 'same' padding in one layer only: the comparison of layers catches it.
    odd = copy.deepcopy(model)
    odd.conv_stem.padding = (0, 0)
    torch.save(odd, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"conv_stem\.padding"):
        run_import(tmp_path / "odd.pt", tmp_path / "ckpt2", "--format", "hsemotion")


def test_not_an_efficientnet_is_refused(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save(nn.Sequential(nn.Linear(4, 8)), path)
    with pytest.raises(CheckpointError, match="expected a pickled timm EfficientNet.*torch.nn.modules.container"):
        run_import(path, tmp_path / "ckpt", "--format", "hsemotion")


# ---------------------------------------------------------------------------
# Reading pickles without running them
# ---------------------------------------------------------------------------


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _Eval(_Exec):
    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


class _Popen(_Exec):
    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.marker)],))


@pytest.mark.parametrize(
    "payload, names",
    [
        (_System, ("posix.system", "os.system", "nt.system")),
        (_Exec, ("builtins.exec",)),
        (_Eval, ("builtins.eval",)),
        (_Popen, ("subprocess.Popen",)),
    ],
)
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_pickle_that_calls_code_is_refused_and_nothing_runs(payload, names, zip_format, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    # An otherwise valid torch.save file: real tensors, then the payload.
    layer = nn.Linear(2, 2)
    layer.note = payload(marker)  # a pickled module's attribute, as a training script might leave one
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "model": layer}, path, _use_new_zipfile_serialization=zip_format)

    with pytest.raises(UnsafePickleError) as refused:
        read_pickle(path)
    message = str(refused.value)
    assert any(name in message for name in names), message
    assert "nothing in the file was run" in message
    assert isinstance(refused.value, CheckpointError)

    # Through the command line: exit status 2, one line naming the call, no checkpoint written.
    assert cli_main(["import-checkpoint", str(path), str(tmp_path / "ckpt"), "--format", "hsemotion"]) == 2
    assert any(name in capsys.readouterr().err for name in names)
    assert not (tmp_path / "ckpt").exists()
    assert not marker.exists()


def test_unknown_classes_become_placeholders_without_being_imported(tmp_path):
    # A training script's class, pickled under a module name that exists only while saving.
    script = types.ModuleType("no_such_training_script")

    class RecorderMeter:
        def __init__(self):
            self.epoch_losses = [0.9, 0.5]
            self.best = 0.61

    RecorderMeter.__module__ = "no_such_training_script"
    RecorderMeter.__qualname__ = "RecorderMeter"
    script.RecorderMeter = RecorderMeter
    sys.modules["no_such_training_script"] = script
    try:
        path = tmp_path / "train_state.pt"
        torch.save(
            {
                "args": argparse.Namespace(arch="enet_b0", lr=3e-5),
                "recorder": RecorderMeter(),
                "state_dict": {"fc.weight": torch.arange(6.0).view(2, 3)},
                "epoch": 7,
            },
            path,
        )
    finally:
        del sys.modules["no_such_training_script"]

    loaded = read_pickle(path)
    assert "no_such_training_script" not in sys.modules
    assert loaded["epoch"] == 7
    assert torch.equal(loaded["state_dict"]["fc.weight"], torch.arange(6.0).view(2, 3))
    args, recorder = loaded["args"], loaded["recorder"]
    assert isinstance(args, Placeholder) and args.global_name == "argparse.Namespace"
    assert args.attributes == {"arch": "enet_b0", "lr": 3e-5}
    assert isinstance(recorder, Placeholder) and recorder.global_name == "no_such_training_script.RecorderMeter"
    assert recorder.attributes == {"epoch_losses": [0.9, 0.5], "best": 0.61}
    assert not isinstance(recorder, RecorderMeter)


def test_module_state_dict_matches_nn_module_state_dict_in_both_formats(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2, bias=False)))
    model.register_buffer("scratch", torch.ones(2), persistent=False)  # not in state_dict(): not collected
    model[1].register_buffer("maybe", None)
    for zip_format in (True, False):
        path = tmp_path / f"model-{zip_format}.pt"
        torch.save(model, path, _use_new_zipfile_serialization=zip_format)
        state = module_state_dict(read_pickle(path))
        expected = model.state_dict()
        assert list(state) == list(expected)
        assert all(torch.equal(state[k], expected[k]) and state[k].dtype == expected[k].dtype for k in expected)


def test_shared_storages_views_and_dtypes_are_rebuilt(tmp_path):
    base = torch.arange(12, dtype=torch.float64)
    data = {
        "base": base,
        "view": base[3:9].view(2, 3),
        "strided": base.view(3, 4).t(),
        "half": torch.tensor([1.5, -2.0], dtype=torch.float16),
        "flags": torch.tensor([True, False]),
        "empty": torch.zeros(0, 5),
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "set": {1, 2},
        "bytes": b"\x00\xff",
    }
    for zip_format in (True, False):
        path = tmp_path / f"data-{zip_format}.pt"
        torch.save(data, path, _use_new_zipfile_serialization=zip_format)
        loaded = read_pickle(path)
        for key in ("base", "view", "strided", "half", "flags", "empty"):
            assert torch.equal(loaded[key], data[key]) and loaded[key].dtype == data[key].dtype, key
        assert loaded["view"].untyped_storage().data_ptr() == loaded["base"].untyped_storage().data_ptr()
        assert (loaded["size"], loaded["dtype"], loaded["set"], loaded["bytes"]) == (
            torch.Size([2, 3]), torch.bfloat16, {1, 2}, b"\x00\xff",
        )  # fmt: skip


def test_damaged_and_foreign_files_are_refused(tmp_path):
    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.ones(1000)}, truncated, _use_new_zipfile_serialization=False)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(ForeignCheckpointError, match="truncated"):
        read_pickle(truncated)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ForeignCheckpointError, match="not a torch checkpoint"):
        read_pickle(text)
    scripted = tmp_path / "scripted.pt"  # torch.jit.save's layout: code beside the pickles
    with zipfile.ZipFile(scripted, "w") as archive:
        for name in ("data.pkl", "constants.pkl", "code/__torch__.py"):
            archive.writestr(f"scripted/{name}", b"")
    with pytest.raises(ForeignCheckpointError, match="TorchScript"):
        read_pickle(scripted)
    with pytest.raises(ForeignCheckpointError, match="not found"):
        read_pickle(tmp_path / "absent.pt")


def test_the_summary_is_json(b0, tmp_path, capsys):
    _, path = b0
    assert cli_main(["import-checkpoint", str(path), str(tmp_path / "ckpt"), "--format", "hsemotion"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["job"] == "import-checkpoint" and summary["classes"][1] == "Other"


def test_the_imported_checkpoint_labels_a_real_video(b0, real_video, tmp_path, capsys):
    """predict (the label job's classifier, without Ray) on three frames of the real face video."""
    _, path = b0
    run_import(path, tmp_path / "ckpt", "--format", "hsemotion")
    code = cli_main(["predict", str(real_video), "--checkpoint", str(tmp_path / "ckpt"), "--every", "24", "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    faces = summary["inputs"][0]["faces"]
    assert code == 0 and len(faces) == 3  # frames 0, 24, 48: one face each
    assert all(face["label"] in hsemotion.CLASSES_8 or face["label"] == "Other" for face in faces)
    assert all(abs(sum(face["probs"].values()) - 1) < 1e-3 for face in faces)
