"""Classifier checkpoints as predictors: rebuild, normalise, resize, centred windows, model ids, refusals, S3."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from affectray import storage
from affectray.checkpoints import CheckpointError, save_checkpoint
from affectray.data.loaders import centred_windows
from affectray.labels import ABAW8
from affectray.models.inference import five_crops, load_classifier
from affectray.models.memory_format import to_channels_last
from affectray.models.registry import create_model

S = 32
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, one intra-op thread


def save_classifier(directory, model, *, mode="frame", num_frames=1, frame_stride=1, size=S, classes=ABAW8.classes):
    meta = {
        "kind": "classifier",
        "model": model.describe(),
        "label_set": {"name": "abaw8", "classes": list(classes)},
        "preprocessing": {
            "mode": mode, "image_size": size, "num_frames": num_frames, "frame_stride": frame_stride,
            "mean": list(MEAN), "std": list(STD),
        },
    }  # fmt: skip
    save_checkpoint(directory, model, meta)
    return str(directory)


def faces(n: int, size: int = S, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def normalise(x: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] → the float [..., 3, H, W] fine-tuning fed the model."""
    t = torch.from_numpy(x).movedim(-1, -3).float() / 255.0
    return (t - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def frame_model(seed: int = 0, num_classes: int = 8):
    torch.manual_seed(seed)
    return create_model("frame", backbone="test_resnet", num_classes=num_classes).eval()


def test_frame_checkpoint_predicts_what_the_model_says(tmp_path):
    model = frame_model()
    classifier = load_classifier(save_classifier(tmp_path / "ckpt", model))
    assert classifier.classes == list(ABAW8.classes) and classifier.num_classes == 8
    assert classifier.preprocessing.mode == "frame" and classifier.preprocessing.image_size == S
    assert len(classifier.model_id) == 16 and int(classifier.model_id, 16) >= 0

    x = faces(5)
    probs = classifier.predict_track(x, batch_size=2)  # batches of 2 give the same as one pass
    with torch.no_grad():
        expected = model(normalise(x))["logits"].softmax(-1).numpy()
    assert probs.shape == (5, 8) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert classifier.predict_track(x[:0]).shape == (0, 8)


def test_a_checkpoint_trained_channels_last_loads_so_and_predicts_as_the_model_does(tmp_path):
    # train.channels_last records memory_format: evaluation and labeling then run validation's kernels.
    model = frame_model()
    directory = save_classifier(tmp_path / "ckpt", model)
    meta_file = tmp_path / "ckpt" / "meta.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "memory_format": "channels_last"}))
    classifier = load_classifier(directory)
    convolutions = [p for p in classifier.model.parameters() if p.dim() == 4]
    assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    assert not all(p.is_contiguous() for p in convolutions)  # NHWC, not merely 1x1 kernels
    x = faces(4)
    with torch.no_grad():
        expected = model(normalise(x))["logits"].softmax(-1).numpy()
    np.testing.assert_allclose(classifier.predict_track(x), expected, atol=1e-5)
    # Without the record the layout stays torch's default.
    plain = load_classifier(save_classifier(tmp_path / "plain", model))
    assert all(p.is_contiguous() for p in plain.model.parameters())


def test_channels_last_leaves_a_video_models_5d_weights_as_they_are():
    # Module.to(memory_format=channels_last) refuses 5-D weights; per-frame 2-D convolutions still convert.
    model = to_channels_last(torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3), torch.nn.Conv2d(4, 4, 3)))
    assert model[0].weight.is_contiguous() and model[0].weight.dim() == 5
    assert model[1].weight.is_contiguous(memory_format=torch.channels_last) and not model[1].weight.is_contiguous()


def test_test_flip_averages_each_face_with_its_mirror_image(tmp_path):
    model = frame_model()
    directory = save_classifier(tmp_path / "ckpt", model)
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    meta["preprocessing"]["test_flip"] = True
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps(meta))
    classifier = load_classifier(directory)
    assert classifier.preprocessing.test_flip

    x = faces(4)
    with torch.no_grad():
        plain = model(normalise(x))["logits"].softmax(-1)
        mirrored = model(normalise(x[:, :, ::-1].copy()))["logits"].softmax(-1)
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # the model is not symmetric: the test can fail
    np.testing.assert_allclose(classifier.predict_track(x), ((plain + mirrored) / 2).numpy(), atol=1e-5)


@pytest.mark.parametrize("layout", [(2, 1), (2, 3, 1)])  # frames [B, C, ...] and clips [B, T, C, ...]
def test_five_crops_are_the_centre_and_corners_resampled_to_the_input_size(layout):
    # A linear ramp survives bilinear resampling exactly: every output pixel reads the input
    # position its crop maps it to, so the test sees where each crop lies and how large it is.
    h = w = 20
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    ramp = (100 * rows + cols).expand(*layout, h, w)
    side = 0.6
    centres = {
        "centre": (0, 0),
        "top-left": (-1, -1),
        "top-right": (-1, 1),
        "bottom-left": (1, -1),
        "bottom-right": (1, 1),
    }
    for (name, (cy, cx)), crop in zip(centres.items(), five_crops(ramp, side)):
        assert crop.shape == ramp.shape, name
        # output pixel i of n -> [-1, 1] -> scaled and shifted into the input -> input pixel position
        y = ((side * ((2 * rows + 1) / h - 1) + cy * (1 - side)) + 1) * h / 2 - 0.5
        x = ((side * ((2 * cols + 1) / w - 1) + cx * (1 - side)) + 1) * w / 2 - 0.5
        inside = (y >= 0) & (y <= h - 1) & (x >= 0) & (x <= w - 1)  # the border is clamped, as padding says
        assert inside.float().mean() > 0.8
        torch.testing.assert_close(crop[..., inside], (100 * y + x)[inside].expand_as(crop[..., inside]))
        # Its edges, in input pixels (an output pixel spans `side` of one): a corner crop reaches
        # the image's two edges at its corner, the centre crop is centred, all are side * w wide.
        for pos, shift, n in ((x[0], cx, w), (y[:, 0], cy, h)):
            first, last = float(pos[0]) - side / 2, float(pos[-1]) + side / 2
            assert last - first == pytest.approx(side * n)
            assert {-1: first, 0: (first + last) / 2, 1: last}[shift] == pytest.approx(
                {-1: -0.5, 0: n / 2 - 0.5, 1: n - 0.5}[shift]
            )


def test_test_crops_average_the_full_view_and_five_crops_each_with_its_mirror(tmp_path):
    model = frame_model()
    directory = save_classifier(tmp_path / "ckpt", model)
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    meta["preprocessing"].update(test_flip=True, test_crops=0.8)
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps(meta))
    classifier = load_classifier(directory)
    assert classifier.preprocessing.test_crops == 0.8

    x = normalise(faces(4))
    with torch.no_grad():
        views = [x, *five_crops(x, 0.8)]
        each = [model(v)["logits"].softmax(-1) for view in views for v in (view, view.flip(-1))]
    assert len(each) == 12 and not torch.allclose(each[0], each[2], atol=1e-3)  # a crop changes the prediction
    np.testing.assert_allclose(classifier.predict_track(faces(4)), torch.stack(each).mean(0).numpy(), atol=1e-5)
    meta["preprocessing"]["test_crops"] = 1.5
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="test_crops is a side fraction"):
        load_classifier(directory)


def test_faces_of_another_size_are_resized_to_the_checkpoints(tmp_path):
    classifier = load_classifier(save_classifier(tmp_path / "ckpt", frame_model()))
    big = faces(3, size=80, seed=1)
    small = np.stack([cv2.resize(f, (S, S), interpolation=cv2.INTER_AREA) for f in big])
    np.testing.assert_allclose(classifier.predict_track(big), classifier.predict_track(small), atol=1e-6)


def test_centred_windows_are_centred_strided_and_clamped():
    np.testing.assert_array_equal(centred_windows(5, 3, 2), [[0, 0, 2], [0, 1, 3], [0, 2, 4], [1, 3, 4], [2, 4, 4]])
    np.testing.assert_array_equal(centred_windows(1, 4, 1), [[0, 0, 0, 0]])
    assert centred_windows(0, 3, 1).shape == (0, 3)


def test_window_model_sees_the_window_centred_on_each_frame(tmp_path):
    torch.manual_seed(0)
    model = create_model("cfc_sp", backbone="test_resnet", num_classes=8, window=3).eval()
    classifier = load_classifier(save_classifier(tmp_path / "ckpt", model, mode="clip", num_frames=3))
    assert classifier.preprocessing.mode == "clip" and classifier.preprocessing.num_frames == 3
    x = faces(6, seed=2)
    probs = classifier.predict_track(x, batch_size=4)
    windows = np.stack([x[[max(i - 1, 0), i, min(i + 1, 5)]] for i in range(6)])  # [6, 3, S, S, 3]
    with torch.no_grad():
        expected = model(normalise(windows))["logits"].softmax(-1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    # A neighbour changes frame 0's prediction; a face outside every window of frame 4 does not.
    y = x.copy()
    y[1] = faces(1, seed=9)[0]
    changed = classifier.predict_track(y)
    assert not np.allclose(changed[0], probs[0], atol=1e-4)
    np.testing.assert_allclose(changed[4], probs[4], atol=1e-6)


def test_cascade_runs_as_one_eight_class_model(tmp_path):
    torch.manual_seed(0)
    model = create_model(
        "cfc_cascade",
        coarse={"name": "frame", "kwargs": {"backbone": "test_resnet", "num_classes": 5}},
        negative={"name": "frame", "kwargs": {"backbone": "test_resnet", "num_classes": 4}},
    )
    classifier = load_classifier(save_classifier(tmp_path / "ckpt", model))
    probs = classifier.predict_track(faces(4, seed=3))
    assert probs.shape == (4, 8)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_model_id_is_the_hash_of_the_weights(tmp_path):
    first = load_classifier(save_classifier(tmp_path / "a", frame_model(seed=0)))
    same = load_classifier(save_classifier(tmp_path / "b", frame_model(seed=0)))
    other = load_classifier(save_classifier(tmp_path / "c", frame_model(seed=1)))
    assert first.model_id == same.model_id != other.model_id


def test_refuses_pretraining_checkpoints_and_weights_of_another_model(tmp_path):
    path = save_classifier(tmp_path / "pre", frame_model())
    meta_file = tmp_path / "pre" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "kind": "pretrain"}))
    with pytest.raises(CheckpointError, match="not a classifier"):
        load_classifier(path)

    path = save_classifier(tmp_path / "mismatch", frame_model())
    meta_file = tmp_path / "mismatch" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["model"]["kwargs"]["num_classes"] = 5  # weights hold an 8-class head
    meta_file.write_text(json.dumps(meta))
    with pytest.raises((CheckpointError, RuntimeError)):
        load_classifier(path)

    with pytest.raises(CheckpointError, match="not an affectray checkpoint"):
        load_classifier(str(tmp_path / "nowhere"))


def test_loads_from_s3(tmp_path, s3_bucket):
    local = save_classifier(tmp_path / "ckpt", frame_model())
    uri = f"{s3_bucket}/runs/ckpt"
    storage.upload_dir(local, uri)
    remote, here = load_classifier(uri), load_classifier(local)
    assert remote.model_id == here.model_id
    np.testing.assert_allclose(remote.predict_track(faces(2)), here.predict_track(faces(2)), atol=1e-6)
