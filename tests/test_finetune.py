"""Fine-tuning: every model family learns through the real loader, the smoke run beats chance on
held-out identities, evaluate agrees with training, checkpoints reload bit-identically, and the
CFC-SP stages join into one 8-class cascade.

The sample corpus (drawn faces whose expression sets the label, 16 identities) is ingested
once per module; validation holds out whole videos, so scores are on unseen identities.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import REPO_ROOT, SAMPLE_SHARDS_SIZE

from affectray import checkpoints as ckpt
from affectray.combine.cascade import combine_cascade
from affectray.config import ConfigError, load_config
from affectray.data.loaders import build_dataset, iter_train_batches
from affectray.models.ensembles import diversity_loss
from affectray.models.inference import load_classifier
from affectray.models.registry import ModelConfig, create_model, create_model_from_description
from affectray.train import evaluation
from affectray.train.finetune import (
    ClassifierTask,
    FinetuneConfig,
    check_geometry,
    class_weights,
    model_description,
    run_finetune,
    training_data,
)
from affectray.train.loop import TRAINED_WEIGHTS

SMOKE = REPO_ROOT / "jobs" / "configs" / "finetune-smoke.yaml"
SIZE = SAMPLE_SHARDS_SIZE  # the shared sample shards


@pytest.fixture(scope="module")
def shards(sample_shards) -> str:
    return sample_shards


def smoke_config(shards: str, runs: Path, *overrides: str) -> FinetuneConfig:
    return load_config(
        FinetuneConfig,
        SMOKE,
        [f"data.root={shards}", f"run.storage={runs}", f"data.image_size={SIZE}", *overrides],
    )


# --------------------------------------------------------------------------- every family learns


FAMILIES = {
    # name: (model section, data overrides)
    "frame": ({"name": "frame", "backbone": "test_resnet"}, {"mode": "frame"}),
    "esr": ({"name": "esr", "backbone": "test_resnet",
             "extra": {"num_branches": 2, "shared_stages": 3, "diversity_weight": 0.1}},
            {"mode": "frame"}),
    "cfc_sp": ({"name": "cfc_sp", "backbone": "test_resnet", "window": 3},
               {"mode": "clip", "num_frames": 3, "frame_stride": 2}),
    "cnn_gru": ({"name": "cnn_gru", "backbone": "test_resnet", "window": 5, "extra": {"hidden_size": 32}},
                {"mode": "clip", "num_frames": 5, "frame_stride": 1, "label": "frames"}),
    "cnn_transformer": ({"name": "cnn_transformer", "backbone": "test_vit", "img_size": SIZE, "window": 5,
                         "extra": {"embed_dim": 32, "num_heads": 2, "depth": 1}},
                        {"mode": "clip", "num_frames": 5, "frame_stride": 1}),
    "video_encoder_classifier": ({"name": "video_encoder_classifier", "img_size": SIZE, "window": 4,
                                  "extra": {"backbone": "mae_dfer", "size": "tiny"}},
                                 {"mode": "clip", "num_frames": 4, "frame_stride": 2}),
    "cfc_cascade": ({"name": "cfc_cascade", "extra": {
        "coarse": {"name": "frame", "kwargs": {"backbone": "test_resnet", "num_classes": 5}},
        "negative": {"name": "frame", "kwargs": {"backbone": "test_resnet", "num_classes": 4}},
    }}, {"mode": "frame"}),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_learns_a_batch_through_the_task(family, shards, tmp_path):
    """The task's loss on real loader batches: finite, with gradients, and falling when fitted."""
    model_section, data_overrides = FAMILIES[family]
    config = smoke_config(shards, tmp_path)
    config = dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, **data_overrides),
        model=ModelConfig(**model_section),
    )
    description = model_description(config)
    # As run_finetune: the class weights the model takes (none for the cascade).
    task = ClassifierTask(config, description, class_weights(config, create_model_from_description(description)))
    torch.manual_seed(0)
    model = task.build_model()
    check_geometry(model, config.data)
    ds = build_dataset(training_data(config), train=True)
    inputs, targets = next(iter(task_batches(task, ds)))
    assert inputs.shape[0] == config.train.batch_size
    expected = (3, SIZE, SIZE) if config.data.mode == "frame" else (config.data.num_frames, 3, SIZE, SIZE)
    assert tuple(inputs.shape[1:]) == expected
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    # Fitting one batch: the loss must fall by 30%. Dropout and the drawn batch make single steps
    # noisy (12 fixed steps once stalled at 0.73x), so the bound is "within 40 steps".
    while len(losses) < 40 and (len(losses) < 2 or losses[-1] >= 0.7 * losses[0]):
        loss, _ = task.loss(model, (inputs, targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0], f"{family}: {losses}"
    print(f"{family}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps")


def task_batches(task: ClassifierTask, ds):
    """What the loop's ``task.batches`` yields on a worker, read from a Dataset here."""
    data = task.config.data
    for inputs, targets in iter_train_batches(ds, data, task.config.train.batch_size, 0, "cpu", clip_layout="BTCHW"):
        yield inputs, evaluation.view_targets(targets, task.config.class_view)


def test_config_mistakes_name_the_setting(shards, tmp_path):
    with pytest.raises(ConfigError, match="val_fraction"):
        smoke_config(shards, tmp_path, "data.val_fraction=0.0")
    with pytest.raises(ConfigError, match="cfc_cascade"):
        model_description(smoke_config(shards, tmp_path, "model.name=cfc_cascade", "class_view=coarse"))
    config = smoke_config(shards, tmp_path, "model.name=cnn_gru", "model.window=5")
    model = task_model(config)
    with pytest.raises(ConfigError, match="data.mode=clip"):
        check_geometry(model, config.data)
    with pytest.raises(ConfigError, match="num_frames"):
        check_geometry(model, dataclasses.replace(config.data, mode="clip", num_frames=3))
    with pytest.raises(ConfigError, match="num_classes"):
        model_description(smoke_config(shards, tmp_path, "model.num_classes=8", "class_view=negative"))


def unit_config(**model) -> FinetuneConfig:
    """A frame-model config for tests that build the task without data or Ray."""
    data = dataclasses.replace(FinetuneConfig().data, root="unused", image_size=SIZE)
    return FinetuneConfig(data=data, model=ModelConfig(**model), class_view="abaw8")


def test_weighted_ensembles_are_joined_not_fine_tuned():
    config = unit_config(name="weighted_ensemble")
    # Refused before any work (no shards, no Ray), with what to do instead.
    with pytest.raises(ConfigError, match=r"joined from trained checkpoints by `affectray ensemble`"):
        run_finetune(config)


def test_the_task_trains_with_the_models_own_loss():
    """ESR through the fine-tuning task: per-branch weighted, smoothed CE plus loss.diversity_weight's term."""
    config = unit_config(name="esr", backbone="test_resnet", extra={"num_branches": 3, "shared_stages": 3})
    config = dataclasses.replace(
        config, loss=dataclasses.replace(config.loss, label_smoothing=0.1, diversity_weight=0.3)
    )
    description = model_description(config)
    assert description["kwargs"]["diversity_weight"] == 0.3  # the model's argument: checkpoints record it
    weights = [0.5, 1.0, 1.5, 1.0, 0.8, 1.2, 1.0, 1.0]
    task = ClassifierTask(config, description, weights)
    torch.manual_seed(0)
    model = task.build_model().eval()
    inputs = torch.randn(6, 3, SIZE, SIZE)
    targets = torch.tensor([0, 1, 2, 3, 7, -1])
    loss, _ = task.loss(model, (inputs, targets))
    with torch.no_grad():
        out = model(inputs)
    w = torch.tensor(weights)
    ce = sum(
        torch.nn.functional.cross_entropy(b, targets, weight=w, ignore_index=-1, label_smoothing=0.1)
        for b in out["branch_logits"]
    )
    assert torch.allclose(loss, ce + 0.3 * diversity_loss(out["branch_features"]), atol=1e-5)
    assert torch.allclose(loss, model.loss(out, targets, class_weights=w, label_smoothing=0.1)[0], atol=1e-6)


def test_checkpoints_describe_the_built_model_without_weight_files(tmp_path):
    """A driver-local weights_path builds the model once; the checkpoint carries weights, not the path."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = create_model("frame", backbone="test_resnet")
    save_file(source.backbone.state_dict(), tmp_path / "backbone.safetensors")
    config = unit_config(
        name="frame", backbone="test_resnet", extra={"weights_path": str(tmp_path / "backbone.safetensors")}
    )
    task = ClassifierTask(config, model_description(config), None)
    model = task.build_model()
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in source.backbone.state_dict().items())
    meta = task.checkpoint_meta()
    assert meta["model"] == model.describe()
    assert meta["model"]["kwargs"]["weights_path"] is None and meta["model"]["kwargs"]["num_classes"] == 8
    (tmp_path / "backbone.safetensors").unlink()  # as on a label actor's machine: the file is not there
    ckpt.save_checkpoint(tmp_path / "ckpt", model, meta)
    assert load_classifier(str(tmp_path / "ckpt")).model.describe() == model.describe()


def task_model(config: FinetuneConfig):
    return ClassifierTask(config, model_description(config), None).build_model()


def test_class_weights_follow_the_views_label_counts(shards, tmp_path):
    from affectray.data.loaders import class_counts
    from affectray.labels import to_coarse

    config = smoke_config(shards, tmp_path, "loss.class_weights=inverse", "class_view=coarse")
    weights = np.array(class_weights(config))
    counts8 = class_counts(dataclasses.replace(training_data(config), label="center"), 8)
    coarse = np.bincount(to_coarse(np.repeat(np.arange(8), counts8)), minlength=5)
    # Inverse frequency, normalised to mean 1: rarer classes weigh more, in exact proportion.
    np.testing.assert_allclose(weights * coarse, (weights * coarse)[0], rtol=1e-4)
    assert weights.mean() == pytest.approx(1.0, abs=1e-5)
    assert class_weights(smoke_config(shards, tmp_path, "loss.class_weights=none")) is None


def test_init_from_a_pretraining_checkpoint_loads_the_encoder(tmp_path):
    from affectray.models.video_classifier import build_pretrain_model

    pretrained = build_pretrain_model("mae_dfer", "tiny", img_size=SIZE, num_frames=4)
    ckpt.save_checkpoint(tmp_path / "pre", pretrained, {"kind": "pretrain"})
    config = FinetuneConfig(
        data=dataclasses.replace(FinetuneConfig().data, root="unused", mode="clip", num_frames=4, image_size=SIZE),
        model=ModelConfig(
            name="video_encoder_classifier", img_size=SIZE, window=4, extra={"backbone": "mae_dfer", "size": "tiny"}
        ),
        init=str(tmp_path / "pre"),
        layer_decay=0.75,
        class_view="abaw8",
    )  # fmt: skip
    task = ClassifierTask(config, model_description(config), None)
    model = task.build_model()
    source = pretrained.encoder.state_dict()
    loaded = model.encoder.state_dict()
    assert source.keys() == loaded.keys()
    assert all(torch.equal(source[k], loaded[k]) for k in source)
    # Layer-wise decay: the head trains at the full rate, the embedding at decay^(depth + 1).
    groups = task.param_groups(model, 0.05)
    scales = {g["lr_scale"] for g in groups}
    assert max(scales) == 1.0 and min(scales) == pytest.approx(0.75 ** (model.num_layers + 1))


# --------------------------------------------------------------------------- end to end on Ray Train


@pytest.fixture(scope="module")
def smoke_run(shards, tmp_path_factory):
    """The smoke config, shortened: a run with a best checkpoint and its validation record.

    (That the full smoke config learns, on identities it never saw, is checked where the
    README's own finetune command runs: tests/test_readme_commands.py.)
    """
    runs = tmp_path_factory.mktemp("runs")
    return run_finetune(smoke_config(shards, runs, "train.epochs=2")), runs


def test_evaluate_agrees_with_the_runs_validation(smoke_run, shards):
    summary, _ = smoke_run
    args = argparse.Namespace(
        checkpoint=summary["checkpoint"], shards=shards, split=None, all=False, batch_size=17,
        smooth_window=None, address=None, flip=None, crops=None,
    )  # fmt: skip
    evaluated = evaluation.main(args)
    assert evaluated["num_classes"] == 8
    assert evaluated["metrics"]["confusion"] == summary["metrics"]["confusion"]
    assert evaluated["metrics"]["f1_macro"] == pytest.approx(summary["metrics"]["f1_macro"], abs=1e-12)
    # Scoring every row instead (training videos included) is a different, larger selection.
    everything = evaluation.main(argparse.Namespace(**{**vars(args), "all": True}))
    assert everything["metrics"]["count"] > evaluated["metrics"]["count"]
    # --crops: the same rows, each scored as the mean of its full view and five crops.
    cropped = evaluation.main(argparse.Namespace(**{**vars(args), "crops": 0.8}))
    assert cropped["test_crops"] == 0.8 and evaluated["test_crops"] is None
    assert cropped["metrics"]["count"] == evaluated["metrics"]["count"]


def test_evaluate_refuses_a_crop_side_outside_0_to_1(capsys):
    parser = argparse.ArgumentParser()
    evaluation.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["ckpt", "shards", "--crops", "1.5"])
    assert "1.5 is not a side fraction in [0, 1)" in capsys.readouterr().err
    assert parser.parse_args(["ckpt", "shards", "--crops", "0"]).crops == 0.0


def test_best_checkpoint_reloads_bit_identically(smoke_run, tmp_path):
    summary, _ = smoke_run
    classifier = load_classifier(summary["checkpoint"])
    with ckpt.open_checkpoint(summary["checkpoint"]) as directory:
        stored = load_file(str(Path(directory) / ckpt.WEIGHTS_FILE))
    ckpt.save_checkpoint(tmp_path / "again", classifier.model, classifier.meta)
    again = load_file(str(tmp_path / "again" / ckpt.WEIGHTS_FILE))
    assert stored.keys() == again.keys()
    assert all(torch.equal(stored[k], again[k]) for k in stored)
    assert classifier.meta["kind"] == "classifier" and classifier.classes == summary["classes"]
    faces = np.random.default_rng(0).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    probs = classifier.predict_track(faces)
    np.testing.assert_array_equal(probs, load_classifier(summary["checkpoint"]).predict_track(faces))


def test_cfc_stages_join_into_an_8_class_cascade(shards, tmp_path):
    stages = {}
    for view in ("coarse", "negative"):
        config = smoke_config(
            shards, tmp_path / "runs", f"class_view={view}", f"run.name={view}", "train.epochs=1", "train.max_steps=4"
        )
        stages[view] = run_finetune(config)
        assert stages[view]["num_classes"] == {"coarse": 5, "negative": 4}[view]
    out = str(tmp_path / "cfc")
    joined = combine_cascade(stages["coarse"]["checkpoint"], stages["negative"]["checkpoint"], out)
    assert joined["num_classes"] == 8
    cascade = load_classifier(out)
    assert cascade.meta["model"]["name"] == "cfc_cascade" and cascade.classes[1] == "Anger"
    faces = np.random.default_rng(1).integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)
    probs = cascade.predict_track(faces)
    assert probs.shape == (6, 8) and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # Fusion: the four negative classes share the coarse stage's Negative mass.
    coarse = load_classifier(stages["coarse"]["checkpoint"]).predict_track(faces)
    np.testing.assert_allclose(probs[:, [1, 2, 3, 5]].sum(axis=1), coarse[:, 4], atol=1e-5)
    # The joined checkpoint evaluates as one 8-class model on the stages' validation videos.
    evaluated = evaluation.main(
        argparse.Namespace(
            checkpoint=out,
            shards=shards,
            split=None,
            all=False,
            batch_size=64,
            smooth_window=None,
            address=None,
            flip=None,
            crops=None,
        )
    )
    assert evaluated["num_classes"] == 8 and np.array(evaluated["metrics"]["confusion"]).shape == (8, 8)
    with pytest.raises(ckpt.CheckpointError, match="negative-view"):
        combine_cascade(stages["coarse"]["checkpoint"], stages["coarse"]["checkpoint"], str(tmp_path / "bad"))


def test_members_join_into_a_weighted_ensemble_checkpoint(tmp_path):
    """ABAW2021: a frame CNN and a CNN-GRU trained apart, labelled as one model."""
    from affectray.combine.ensemble import combine_ensemble
    from affectray.labels import ABAW8
    from affectray.models.registry import create_model

    def member(name: str, model, mode: str, num_frames: int) -> str:
        meta = {
            "kind": "classifier", "model": model.describe(), "label_set": ABAW8.to_dict(), "class_view": "abaw8",
            "preprocessing": {"mode": mode, "image_size": SIZE, "num_frames": num_frames, "frame_stride": 2,
                              "mean": [0.5] * 3, "std": [0.25] * 3},
        }  # fmt: skip
        ckpt.save_checkpoint(tmp_path / name, model, meta)
        return str(tmp_path / name)

    torch.manual_seed(0)
    cnn = member("cnn", create_model("frame", backbone="test_resnet", num_classes=8), "frame", 1)
    gru = member("gru", create_model("cnn_gru", backbone="test_resnet", window=3, hidden_size=16), "clip", 3)
    summary = combine_ensemble([cnn, gru], str(tmp_path / "ensemble"), weights=[1.0, 3.0])
    assert summary["num_classes"] == 8
    ensemble = load_classifier(str(tmp_path / "ensemble"))
    assert ensemble.preprocessing.mode == "clip" and ensemble.preprocessing.num_frames == 3
    faces = np.random.default_rng(2).integers(0, 256, (7, SIZE, SIZE, 3), dtype=np.uint8)
    expected = 0.25 * load_classifier(cnn).predict_track(faces) + 0.75 * load_classifier(gru).predict_track(faces)
    np.testing.assert_allclose(ensemble.predict_track(faces), expected, atol=1e-5)
    with pytest.raises(ckpt.CheckpointError, match="label sets"):
        coarse = create_model("frame", backbone="test_resnet", num_classes=5)
        ckpt.save_checkpoint(tmp_path / "coarse", coarse, {
            "kind": "classifier", "model": coarse.describe(), "class_view": "coarse",
            "label_set": {"name": "cfc_coarse", "classes": ["Neutral", "Happiness", "Surprise", "Other", "Negative"]},
            "preprocessing": {"mode": "frame", "image_size": SIZE, "num_frames": 1, "frame_stride": 1,
                              "mean": [0.5] * 3, "std": [0.25] * 3},
        })  # fmt: skip
        combine_ensemble([cnn, str(tmp_path / "coarse")], str(tmp_path / "bad"))


def _run_checkpoints(run_dir: Path) -> dict[int, tuple[dict, dict]]:
    """step -> (weights, trained weights) of every checkpoint Ray kept in a run's folder."""
    found = {}
    for folder in sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir()):
        state = ckpt.load_train_state(folder)
        found[int(state["step"])] = (ckpt.load_weights(folder), state[TRAINED_WEIGHTS])
    return found


def _is_moving_average(average, previous, trained, decay) -> bool:
    """average == decay * previous + (1 - decay) * trained, tensor by tensor (float state)."""
    return all(
        torch.allclose(average[k], decay * previous[k] + (1 - decay) * trained[k], atol=1e-6)
        for k in average if average[k].is_floating_point()
    )  # fmt: skip


def test_the_moving_average_is_validated_checkpointed_and_resumed(shards, tmp_path):
    decay = 0.9  # the average lags the trained weights by several steps
    # Two epochs, so the second run (one step more) has an epoch left after the first run's.
    overrides = [f"optim.ema_decay={decay}", "train.checkpoint_every=1", "train.epochs=2", "run.name=ema"]
    summary = run_finetune(smoke_config(shards, tmp_path, *overrides, "train.max_steps=3"))
    kept = _run_checkpoints(tmp_path / "ema")
    assert sorted(kept) == [1, 2, 3]
    (average2, _), (average3, trained3) = kept[2], kept[3]
    # Every step folds the trained weights (batch-norm statistics too) into the average...
    assert _is_moving_average(average3, average2, trained3, decay)
    assert not all(torch.equal(average3[k], trained3[k]) for k in average3)
    # ... and the average is what validation scored and what the best checkpoint holds.
    best = ckpt.load_weights(summary["checkpoint"])
    assert all(torch.equal(best[k], average3[k]) for k in best)

    # Resumed, the average goes on from the saved one (not from a fresh copy of the weights),
    # and training from the trained weights (not from their average).
    run_finetune(smoke_config(shards, tmp_path, *overrides, "train.max_steps=4"))
    average4, trained4 = _run_checkpoints(tmp_path / "ema")[4]
    assert _is_moving_average(average4, average3, trained4, decay)
    distance = lambda a, b: sum(float((a[k] - b[k]).abs().sum()) for k in a if a[k].is_floating_point())  # noqa: E731
    assert distance(trained4, trained3) < distance(trained4, average3)
