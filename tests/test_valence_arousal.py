"""Valence/arousal (ABAW VA): the CCC loss, the frame family's VA head, VA targets from shards,
and a fine-tuning run whose checkpoint labels frames with valence and arousal.

The corpus is drawn faces (the sample corpus's generator) whose expression sets both the
label and a valence/arousal pair, written straight into shards: some frames carry VA
alone, some a label alone, one neither, as Aff-Wild2's separate EXPR and VA files do.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch
from tests.conftest import REPO_ROOT

from affectray import storage
from affectray.config import ConfigError, load_config
from affectray.data import shards
from affectray.data.loaders import DataConfig, build_dataset, count_samples, iter_eval_batches, iter_train_batches
from affectray.faces.jpeg import decode_jpeg
from affectray.label import outputs
from affectray.label.job import LabelConfig, run_label
from affectray.labels import ABAW8
from affectray.metrics import valence_arousal_ccc, valence_arousal_metrics
from affectray.models.heads import va_loss
from affectray.models.inference import load_classifier
from affectray.models.registry import ModelConfig, ModelError, create_model
from affectray.sample.synth import draw_face
from affectray.train.finetune import ClassifierTask, FinetuneConfig, model_description, run_finetune

SIZE = 32
SMOKE = REPO_ROOT / "jobs" / "configs" / "finetune-smoke.yaml"
# A valence/arousal pair per ABAW8 class (Neutral, Anger, Disgust, Fear, Happiness, Sadness, Surprise, Other).
CLASS_VA = np.array(
    [[0.0, -0.1], [-0.6, 0.7], [-0.6, 0.2], [-0.5, 0.8], [0.8, 0.4], [-0.7, -0.5], [0.3, 0.8], [0.1, -0.6]],
    dtype=np.float32,
)
FRAMES = 20  # per video
VA_ONLY, LABEL_ONLY, NEITHER = (0, 1), (2, 3), 4  # frame positions of each video


def ccc_pair(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    return valence_arousal_ccc(pred[:, 0], true[:, 0]), valence_arousal_ccc(pred[:, 1], true[:, 1])


def drawn(label: int, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A drawn face showing ``label``, RGB uint8 [size, size, 3]."""
    face = cv2.cvtColor(draw_face(label, rng, 64), cv2.COLOR_BGR2RGB)
    return cv2.resize(face, (size, size), interpolation=cv2.INTER_AREA)


# --------------------------------------------------------------------------- the loss


def test_ccc_loss_is_two_minus_the_cccs_of_the_metric():
    rng = np.random.default_rng(0)
    true = rng.uniform(-1, 1, (64, 2)).astype(np.float32)
    pred = (0.6 * true + 0.3 * rng.normal(size=(64, 2)) + 0.1).astype(np.float32)
    ccc_v, ccc_a = ccc_pair(pred, true)
    loss = va_loss(torch.from_numpy(pred), torch.from_numpy(true))
    assert float(loss) == pytest.approx(2 - ccc_v - ccc_a, abs=1e-5)
    metrics = valence_arousal_metrics(pred, true)
    assert metrics["ccc_mean"] == pytest.approx((ccc_v + ccc_a) / 2) and metrics["va_count"] == 64
    assert float(va_loss(torch.from_numpy(true), torch.from_numpy(true))) == pytest.approx(0.0, abs=1e-6)


def test_unannotated_rows_are_ignored_per_column():
    rng = np.random.default_rng(1)
    true = rng.uniform(-1, 1, (32, 2)).astype(np.float32)
    pred = torch.tensor(rng.uniform(-1, 1, (32, 2)), dtype=torch.float32, requires_grad=True)
    true[:8] = np.nan  # rows without any annotation
    true[8:12, 1] = np.nan  # valence only
    loss = va_loss(pred, torch.from_numpy(true))
    v, a = np.isfinite(true[:, 0]), np.isfinite(true[:, 1])
    p = pred.detach().numpy()
    expected = 2 - valence_arousal_ccc(p[v, 0], true[v, 0]) - valence_arousal_ccc(p[a, 1], true[a, 1])
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-5)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert (pred.grad[:8] == 0).all() and (pred.grad[8:12, 1] == 0).all() and (pred.grad[8:12, 0] != 0).all()
    metrics = valence_arousal_metrics(p, true)
    assert metrics["va_count"] == 24
    assert 2 - metrics["ccc_valence"] - metrics["ccc_arousal"] == pytest.approx(float(loss.detach()), abs=1e-5)
    # A batch without any annotation gives 0 with a graph, not NaN.
    empty = va_loss(pred, torch.full((32, 2), float("nan")))
    assert float(empty.detach()) == 0.0 and empty.requires_grad


# --------------------------------------------------------------------------- the model


def test_frame_model_with_a_va_head_learns_valence_and_arousal(one_torch_thread):
    rng = np.random.default_rng(2)
    labels = np.arange(48) % 7
    faces = np.stack([drawn(int(k), rng) for k in labels])
    x = (torch.from_numpy(faces).movedim(-1, -3).float() / 255 - 0.5) / 0.25  # [48, 3, 32, 32]
    va = torch.from_numpy(CLASS_VA[labels] + rng.normal(0, 0.05, (48, 2)).astype(np.float32))
    va[:6] = float("nan")  # unannotated rows: ignored by the loss
    torch.manual_seed(0)
    model = create_model("frame", backbone="test_resnet", num_classes=8, va_head=True)
    assert model.predicts_va and not create_model("frame", backbone="test_resnet").predicts_va

    def ccc_mean() -> float:
        model.eval()
        with torch.no_grad():
            out = model(x)
        model.train()
        assert out["va"].shape == (48, 2) and out["va"].abs().max() <= 1  # tanh
        return valence_arousal_metrics(out["va"].numpy(), va.numpy())["ccc_mean"]

    before = ccc_mean()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    targets = torch.full((48,), -1)  # VA alone: no expression label
    for _ in range(40):
        loss, extras = model.loss(model(x), targets, va_targets=va, expression_weight=0.0, va_weight=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = ccc_mean()
    print(f"CCC mean {before:.3f} -> {after:.3f}, last VA loss {extras['loss_va']:.3f}")
    assert after > 0.6 and after > before + 0.4


def test_families_without_a_va_head_are_refused(tmp_path):
    with pytest.raises(ModelError, match="valence/arousal"):
        create_model("cfc_sp", backbone="test_resnet", va_head=True)

    def config(*overrides: str) -> FinetuneConfig:
        return load_config(FinetuneConfig, SMOKE, [f"data.root={tmp_path}", f"run.storage={tmp_path}", *overrides])

    va = config("loss.va_weight=1.0")
    assert va.data.va and model_description(va)["kwargs"]["va_head"] is True
    esr = config("loss.va_weight=1.0", "model.name=esr")
    with pytest.raises(ConfigError, match="model.name='esr'"):
        model_description(esr)
    with pytest.raises(ConfigError, match="loss.va_weight"):
        config("eval.metric=ccc_mean")
    with pytest.raises(ConfigError, match="ccc_mean"):
        config("loss.va_weight=1.0", "loss.expression_weight=0.0")
    with pytest.raises(ConfigError, match="va_weight"):
        model_description(config("model.extra={va_head: true}"))
    assert model_description(config())["kwargs"].get("va_head") is None  # VA off: nothing changes
    assert not config().data.va


def test_the_task_hands_va_targets_to_the_model_and_records_the_head(tmp_path):
    def task(*overrides: str) -> ClassifierTask:
        config = load_config(FinetuneConfig, SMOKE, [f"data.root={tmp_path}", f"run.storage={tmp_path}", *overrides])
        return ClassifierTask(config, model_description(config), None)

    x, targets = torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, -1, 4, 5])
    va_task = task("loss.va_weight=0.5", "loss.expression_weight=0.0", "eval.metric=ccc_mean")
    torch.manual_seed(0)
    model = va_task.build_model()
    loss, extras = va_task.loss(model, (x, targets, torch.tensor([[0.1, 0.2], [0.3, 0.1], [-0.5, 0.4], [0.0, -0.3]])))
    assert float(loss.detach()) == pytest.approx(0.5 * extras["loss_va"]) and extras["loss_expression"] > 0
    assert va_task.checkpoint_meta()["outputs"] == ["expression", "va"]
    plain = task()
    plain_model = plain.build_model()
    assert plain.loss(plain_model, (x, targets))[1] == {} and plain.checkpoint_meta()["outputs"] == ["expression"]


# --------------------------------------------------------------------------- shards with VA


def write_va_shards(root: Path, videos: int = 8, val: int = 2, seed: int = 3) -> dict[str, np.ndarray]:
    """Drawn-face segments with labels and VA, one shard per video; the last ``val`` videos are split val.

    Returns the written VA per video ([FRAMES, 2], NaN = none).
    """
    rng = np.random.default_rng(seed)
    written = {}
    for v in range(videos):
        video_id = f"va_{v:02d}"
        classes = (v + np.arange(FRAMES) // 4) % 7
        values = CLASS_VA[classes] + rng.normal(0, 0.05, (FRAMES, 2)).astype(np.float32)
        labels = classes.copy()
        labels[list(VA_ONLY)] = -1
        values[list(LABEL_ONLY)] = np.nan
        labels[NEITHER], values[NEITHER] = -1, np.nan
        jpegs = [
            cv2.imencode(".jpg", cv2.cvtColor(drawn(int(k), rng), cv2.COLOR_RGB2BGR))[1].tobytes() for k in classes
        ]
        segment = shards.Segment(
            video_id, 0, list(range(FRAMES)), [i / 25 for i in range(FRAMES)], jpegs, [int(k) for k in labels],
            valence=[float(a) for a in values[:, 0]], arousal=[float(a) for a in values[:, 1]],
        )  # fmt: skip
        split = "val" if v >= videos - val else "train"
        shards.write_shard(
            str(root), video_id, shards.segments_to_table([segment], dataset="va", split=split, source="test")
        )
        written[video_id] = values
    manifest = {"schema_version": shards.SCHEMA_VERSION, "label_set": ABAW8.to_dict(), "dataset_label_set": "abaw8"}
    storage.write_json(storage.join(str(root), shards.MANIFEST_NAME), manifest)
    return written


@pytest.fixture(scope="module")
def va_shards(tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("va_shards")
    return str(root), write_va_shards(root)


def test_loader_yields_the_va_of_each_target_frame(ray_session, va_shards):
    root, written = va_shards
    cfg = DataConfig(root=root, mode="frame", label="center", image_size=SIZE, va=True)
    got: dict[tuple[str, int], tuple[int, np.ndarray]] = {}
    for inputs, targets, meta, va in iter_eval_batches(build_dataset(cfg, train=False), cfg, 32, "cpu"):
        assert va.dtype == torch.float32 and va.shape == (inputs.shape[0], 2)
        for vid, frame, label, pair in zip(
            meta["video_id"], meta["frame_index"].tolist(), targets.tolist(), va.numpy()
        ):
            got[(vid, frame)] = (label, pair)
    # Every frame but the one with neither a label nor VA; VA-only frames too (label -1).
    assert sorted(got) == sorted((vid, i) for vid in written for i in range(FRAMES) if i != NEITHER)
    assert count_samples(cfg) == len(got)
    for (vid, frame), (label, pair) in got.items():
        np.testing.assert_array_equal(pair, written[vid][frame])  # NaN where the frame has no VA
        assert (label == -1) == (frame in VA_ONLY)
    # VA off (batches without a VA element: tests/test_loaders.py): VA-only frames are dropped again.
    plain = DataConfig(root=root, mode="frame", label="center", image_size=SIZE)
    assert count_samples(plain) == len(written) * (FRAMES - len(VA_ONLY) - 1)
    train = next(iter(iter_train_batches(build_dataset(cfg, train=True), cfg, 8, 0, "cpu")))
    assert len(train) == 3 and train[2].shape == (8, 2)


# --------------------------------------------------------------------------- end to end


def test_finetune_with_va_then_label_writes_valence_and_arousal(ray_session, va_shards, tmp_path):
    root, _ = va_shards
    config = load_config(
        FinetuneConfig,
        SMOKE,
        [
            f"data.root={root}", f"run.storage={tmp_path / 'runs'}", f"data.image_size={SIZE}",
            "sample_corpus_if_empty=false", "data.split=train", "eval.split=val", "data.val_fraction=0.0",
            "loss.va_weight=1.0", "eval.metric=ccc_mean", "train.epochs=2", "train.batch_size=16",
            "loss.class_weights=none", "run.name=va",
        ],
    )  # fmt: skip
    assert config.model == ModelConfig(name="frame", backbone="test_resnet")
    summary = run_finetune(config)
    metrics = summary["metrics"]
    assert summary["metric"] == "ccc_mean" and math.isfinite(metrics["ccc_mean"])
    assert metrics["ccc_mean"] == pytest.approx((metrics["ccc_valence"] + metrics["ccc_arousal"]) / 2)
    assert metrics["va_count"] == 2 * (FRAMES - len(LABEL_ONLY) - 1)  # val videos, frames with VA
    assert metrics["count"] == 2 * (FRAMES - len(VA_ONLY) - 1)  # val videos, frames with a label
    classifier = load_classifier(summary["checkpoint"])
    assert classifier.meta["outputs"] == ["expression", "va"] and classifier.predicts_va
    assert classifier.meta["model"]["kwargs"]["va_head"] is True

    # Label two folders of aligned faces with the checkpoint.
    rng = np.random.default_rng(9)
    videos = tmp_path / "aligned"
    for name in ("happy", "sad"):
        (videos / name).mkdir(parents=True)
        for i in range(6):
            cv2.imwrite(str(videos / name / f"{i + 1:05d}.jpg"), draw_face(4 if name == "happy" else 5, rng, 64))
    out = tmp_path / "labels"
    result = run_label(
        LabelConfig(
            str(videos), str(out), summary["checkpoint"], layout="aligned-frames", frames_fps=25, timelines=False
        ),
        progress=False,
    )
    assert result["ok"] == 2
    print(f"finetune {summary['seconds']} s, label {result.get('seconds')} s")
    table = outputs.read_labels(str(out))
    assert table.schema.field("valence").type == pa.float32() and table.schema.field("arousal").type == pa.float32()
    rows = table.to_pandas()
    assert len(rows) == 12 and (rows.face_count == 1).all()
    for column in ("valence", "arousal"):
        assert rows[column].notna().all() and rows[column].abs().max() <= 1
    # The label rows carry what the classifier predicts for the same faces.
    first = rows[rows.video_uri.str.endswith("happy")].sort_values("frame_index")
    faces = np.stack([decode_jpeg(p.read_bytes()) for p in sorted((videos / "happy").iterdir())])
    np.testing.assert_allclose(
        first[["valence", "arousal"]].to_numpy(), classifier.predict_track_outputs(faces)["va"], atol=1e-5
    )
