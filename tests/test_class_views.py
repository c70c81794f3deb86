"""Heads sized by the data's label set, and starting weights whose classes come in another order.

A 7-class corpus (FER2013, RAF-DB, DFEW, AffectNet-7) trains a 7-way head (``basic7``),
AffectNet-8 an 8-way head whose eighth class is Contempt, Aff-Wild2 the ABAW8 head: the
manifest's ``dataset_label_set`` decides under ``class_view: auto``. A classifier checkpoint
used as ``init`` has its output rows put in the run's class order by name (the built-in
FER2013 model lists Neutral last; basic7 first).
"""

from __future__ import annotations

import dataclasses
import io
import tarfile

import numpy as np
import pytest
import torch

from affectray import checkpoints as ckpt
from affectray.config import ConfigError
from affectray.ingest.archives import unpacked_source
from affectray.labels import ABAW8, AFFECTNET8, BASIC7, LabelSet
from affectray.models.registry import ModelConfig, create_model
from affectray.storage import StorageError
from affectray.train.evaluation import CLASS_VIEWS, view_targets
from affectray.train.finetune import (
    ClassifierTask,
    FinetuneConfig,
    dataset_class_view,
    initialise,
    model_description,
    with_class_view,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FER_ORDER = LabelSet("fer2013", ("Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Neutral"))


def test_views_map_the_stored_abaw8_labels_by_name():
    stored = np.arange(8)  # Neutral, Anger, ..., Surprise, Other
    assert view_targets(stored, "basic7").tolist() == [0, 1, 2, 3, 4, 5, 6, -1]  # Other: not a basic class
    assert view_targets(stored, "affectnet8").tolist() == list(range(8))  # Other is stored Contempt
    assert CLASS_VIEWS["affectnet8"].classes[-1] == "Contempt" and len(CLASS_VIEWS["basic7"]) == 7
    as_tensor = view_targets(torch.tensor([7, 3, -1]), "basic7")
    assert as_tensor.tolist() == [-1, 3, -1]


def test_auto_takes_the_manifests_label_set():
    config = FinetuneConfig(data=dataclasses.replace(FinetuneConfig().data, root="unused"))
    assert config.class_view == "auto"
    for name, classes in (("basic7", BASIC7), ("affectnet8", AFFECTNET8), ("abaw8", ABAW8)):
        resolved = with_class_view(config, {"dataset_label_set": name})
        assert resolved.class_view == name
        assert model_description(resolved)["kwargs"]["num_classes"] == len(classes)
    assert dataset_class_view({}) == "abaw8"  # manifests written before the field: Aff-Wild2 style
    with pytest.raises(ConfigError, match="emotions9"):
        dataset_class_view({"dataset_label_set": "emotions9"})
    explicit = dataclasses.replace(config, class_view="coarse")
    assert with_class_view(explicit, {"dataset_label_set": "basic7"}).class_view == "coarse"
    with pytest.raises(ConfigError, match="resolve it against the data"):
        ClassifierTask(config, model_description(config), None)
    assert "num_classes" not in model_description(config)["kwargs"]  # auto: the count waits for the data


def fer_ordered_checkpoint(tmp_path, name="fer_minixception", **kwargs):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, **kwargs).eval()
    meta = {"kind": "classifier", "model": model.describe(), "label_set": FER_ORDER.to_dict()}
    ckpt.save_checkpoint(tmp_path / "fer", model, meta)
    return model, str(tmp_path / "fer")


@pytest.mark.parametrize("family", ["fer_minixception", "frame"])
def test_init_puts_a_classifiers_rows_in_the_runs_class_order(tmp_path, family):
    kwargs = {"backbone": "test_resnet", "in_chans": 1} if family == "frame" else {}
    source, uri = fer_ordered_checkpoint(tmp_path, family, **kwargs)
    model = create_model(family, num_classes=7, **kwargs).eval()
    summary = initialise(model, uri, strict=True, classes=BASIC7)
    assert summary["loaded"] == summary["of"]
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        theirs, ours = source(x)["logits"], model(x)["logits"]
    order = [FER_ORDER.classes.index(c) for c in BASIC7.classes]  # basic7's Neutral is their last
    assert torch.allclose(ours, theirs[:, order], atol=1e-6)


def test_init_with_classes_it_lacks_is_refused_or_gets_a_fresh_head(tmp_path):
    _, uri = fer_ordered_checkpoint(tmp_path)
    model = create_model("fer_minixception", num_classes=8)
    with pytest.raises(ConfigError, match=r"init_strict: false.*fresh head"):
        initialise(model, uri, strict=True, classes=ABAW8)  # Other is not among FER2013's classes
    fresh = model.head.weight.detach().clone()
    summary = initialise(model, uri, strict=False, classes=ABAW8)
    assert summary["loaded"] == summary["of"] - 2  # all but the head's weight and bias
    assert torch.equal(model.head.weight, fresh)


def test_a_fine_tuning_config_for_grey_faces_builds(tmp_path):
    config = FinetuneConfig(
        data=dataclasses.replace(FinetuneConfig().data, root="unused", channels=1, mean=(0.5,), std=(0.5,)),
        model=ModelConfig(name="fer_minixception"),
        class_view="basic7",
    )
    assert model_description(config) == {"name": "fer_minixception", "kwargs": {"num_classes": 7}}


def tar_with(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_tar_sources_unpack_inside_their_folder_only(tmp_path):
    good = tmp_path / "faces.tar"
    good.write_bytes(tar_with({"train/happy/1.jpg": b"x", "train/sad/2.jpg": b"y"}))
    with unpacked_source(str(good)) as folder:
        assert sorted(p.name for p in __import__("pathlib").Path(folder, "train").iterdir()) == ["happy", "sad"]
    assert not __import__("pathlib").Path(folder).exists()  # removed afterwards
    with unpacked_source(str(tmp_path)) as same:
        assert same == str(tmp_path)  # a folder is read where it is
    evil = tmp_path / "evil.tar"
    evil.write_bytes(tar_with({"../escaped.txt": b"z"}))
    with pytest.raises(StorageError, match="evil.tar"), unpacked_source(str(evil)):
        pass
    assert not (tmp_path.parent / "escaped.txt").exists()
