"""Ensemble weights fitted on validation data (ABAW2021): the grid search on synthetic
probabilities, the members' row alignment, and `affectray ensemble --fit-on` end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from tests.conftest import SAMPLE_SHARDS_SIZE

from affectray import checkpoints as ckpt
from affectray.combine.fit_weights import (
    EnsembleFitError,
    align_members,
    fit_weights,
    grid_steps,
    score,
    simplex_grid,
)
from affectray.train.evaluation import EvalResult

# --------------------------------------------------------------------------- the weight search


def informative_and_noise(n: int = 600, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[2, n, classes] probabilities: member 0 mostly right, member 1 uniform noise; and the targets [n]."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), y] += 1.5  # right about 70% of the time
    informative = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    noise = rng.dirichlet(np.full(classes, 0.3), n)  # confident and random: it drowns the signal at equal weights
    return np.stack([informative, noise]), y


def test_fitted_weight_goes_to_the_informative_member():
    probs, y = informative_and_noise()
    fit = fit_weights(probs, y, "f1_macro")
    assert fit.weights[0] > 0.5 > fit.weights[1] and sum(fit.weights) == pytest.approx(1.0)
    assert fit.score >= max(fit.member_scores) and fit.score >= fit.equal_weights_score
    assert fit.member_scores[0] > fit.equal_weights_score > fit.member_scores[1]  # equal weights would hurt
    assert fit.score == pytest.approx(score(np.tensordot(fit.weights, probs, axes=1), y, "f1_macro"))
    assert fit.samples == len(y) and fit.candidates == 101 and fit.grid_step == pytest.approx(0.01)
    # The same inputs, the same answer; another metric is another search on the same grid.
    assert fit_weights(probs, y, "f1_macro") == fit
    assert fit_weights(probs, y, "uar").metric == "uar"


def test_ties_go_to_equal_weights_and_unlabelled_rows_are_left_out():
    probs, y = informative_and_noise()
    twins = np.stack([probs[0], probs[0]])
    assert fit_weights(twins, y).weights == [0.5, 0.5]  # every point scores the same
    y_missing = y.copy()
    y_missing[:100] = -1
    assert fit_weights(probs, y_missing).samples == len(y) - 100
    with pytest.raises(EnsembleFitError, match="unknown metric"):
        fit_weights(probs, y, "auc")


def test_the_grid_holds_every_member_and_equal_weights():
    for members, steps in ((2, 100), (3, 60), (4, 20), (7, 7)):
        assert grid_steps(members) == steps
        grid = simplex_grid(members, steps)
        np.testing.assert_allclose(grid.sum(axis=1), 1.0)
        assert (grid >= 0).all() and len(np.unique(grid, axis=0)) == len(grid)
        assert np.isclose(grid, 1.0 / members).all(axis=1).any()  # equal weights
        assert all(np.isclose(grid, np.eye(members)[i]).all(axis=1).any() for i in range(members))  # corners
    with pytest.raises(EnsembleFitError, match="at most 7 members"):
        grid_steps(8)


def test_members_must_score_the_same_rows():
    def result(videos: list[str], frames: list[int]) -> EvalResult:
        n = len(videos)
        return EvalResult({}, np.zeros(n, dtype=np.int64), np.full((n, 8), 1 / 8), np.array(videos), np.array(frames))

    a = result(["v1", "v1", "v2"], [0, 1, 0])
    probs, y = align_members([a, result(["v1", "v1", "v2"], [0, 1, 0])], ["a", "b"])
    assert probs.shape == (2, 3, 8) and y.shape == (3,)
    with pytest.raises(EnsembleFitError, match=r"different rows: 'a' 3, 'b' 2 \(first difference at row 1"):
        align_members([a, result(["v1", "v2"], [0, 0])], ["a", "b"])


# --------------------------------------------------------------------------- affectray ensemble --fit-on


def test_ensemble_fit_on_validation_shards_end_to_end(sample_shards, tmp_path, capsys):
    """A frame CNN and a CNN-GRU (random weights: the test is about fitting, not training) that
    validated on the same held-out videos of the sample shards: the weights are fitted there."""
    from affectray.cli import main as cli
    from affectray.config import config_to_dict
    from affectray.data.loaders import data_config_for
    from affectray.labels import ABAW8
    from affectray.models.inference import load_model
    from affectray.models.registry import create_model

    def member(name: str, model, mode: str, num_frames: int, validated: bool = True) -> str:
        pre = {"mode": mode, "image_size": SAMPLE_SHARDS_SIZE, "num_frames": num_frames, "frame_stride": 2,
               "mean": [0.5] * 3, "std": [0.25] * 3}  # fmt: skip
        data = data_config_for(ckpt.Preprocessing.from_meta({"preprocessing": pre}), sample_shards)
        held_out = dataclasses.replace(data, val_fraction=0.3)  # the run validated on 30% of the videos
        validation = {"data": config_to_dict(held_out), "holdout": True} if validated else {}
        meta = {
            "kind": "classifier", "model": model.describe(), "label_set": ABAW8.to_dict(), "class_view": "abaw8",
            "preprocessing": pre, "validation": validation,
        }  # fmt: skip
        ckpt.save_checkpoint(tmp_path / name, model, meta)
        return str(tmp_path / name)

    torch.manual_seed(0)
    cnn = member("cnn", create_model("frame", backbone="test_resnet", num_classes=8), "frame", 1)
    gru = member("gru", create_model("cnn_gru", backbone="test_resnet", window=3, hidden_size=16), "clip", 3)
    out = str(tmp_path / "ensemble")
    assert cli(["ensemble", cnn, gru, "--fit-on", sample_shards, "--metric", "accuracy", "--out", out]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed.strip().splitlines()[-1])
    fit = summary["fit"]
    assert "held-out videos" in printed and "fitted weights" in printed
    assert fit["data"] == sample_shards and fit["selection"] == {"split": None, "holdout": True, "val_fraction": 0.3}
    assert fit["metric"] == "accuracy" and fit["samples"] > 0 and len(fit["member_scores"]) == 2
    assert fit["score"] >= max(fit["member_scores"] + [fit["equal_weights_score"]])
    assert summary["weights"] == pytest.approx(fit["weights"]) and sum(fit["weights"]) == pytest.approx(1.0)

    model, _ = load_model(out)
    assert model.weights.tolist() == pytest.approx(fit["weights"])
    recorded = ckpt.read_meta(out)["ensemble"]
    assert recorded["fit"]["weights"] == fit["weights"] and recorded["fit"]["score"] == fit["score"]
    assert recorded["fit"]["equal_weights_score"] == fit["equal_weights_score"]

    # Typed weights and fitting exclude each other; a split means nothing without --fit-on.
    with pytest.raises(SystemExit):
        cli(["ensemble", cnn, gru, "--weights", "1", "2", "--fit-on", sample_shards, "--out", out])
    assert cli(["ensemble", cnn, gru, "--split", "val", "--out", out]) == 2
    assert cli(["ensemble", cnn, gru, "--fit-on", sample_shards, "--split", "nope", "--out", out]) == 2
    assert "no labelled evaluation samples" in capsys.readouterr().err
    # A member that validated elsewhere reads every row of these shards, the others their held-out videos.
    other = member("other", create_model("frame", backbone="test_resnet", num_classes=8), "frame", 1, validated=False)
    assert cli(["ensemble", cnn, other, "--fit-on", sample_shards, "--out", out]) == 2
    assert "the members select different rows" in capsys.readouterr().err
