"""Models: shapes, gradients, the CFC cascade's fused distribution, self-describing rebuilds,
smoothing, ESR diversity, the weighted ensemble, each family's own loss and probabilities
(what training and inference call), and a loss that falls.

Tiny timm backbones (test_resnet, test_vit, test_efficientnet: 0.1-0.4 M parameters) at 32 px, on CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from affectray.labels import ABAW8, CFC_COARSE, CFC_NEGATIVE, to_coarse, to_negative
from affectray.models import registry
from affectray.models.backbones import BackboneError, create_backbone, load_weights, split_backbone
from affectray.models.cascade import CascadeClassifier, cascade_loss, smooth_predictions
from affectray.models.ensembles import diversity_loss, esr_loss
from affectray.models.registry import ModelConfig, ModelError, build_model, create_model, create_model_from_description

B, T, S = 2, 5, 32  # batch, window length, image side

TINY_RESNET = {"backbone": "test_resnet"}
TINY: dict[str, dict] = {
    "frame": {**TINY_RESNET, "num_classes": 8, "drop_rate": 0.1},
    "cfc_sp": {**TINY_RESNET, "num_classes": 8, "window": 3, "pooling": "attention", "fusion": "gate"},
    "cnn_gru": {**TINY_RESNET, "window": 3, "hidden_size": 32, "bidirectional": True},
    "cnn_transformer": {
        "backbone": "test_vit",
        "img_size": S,
        "window": 5,
        "embed_dim": 32,
        "num_heads": 2,
        "depth": 1,
    },
    "esr": {**TINY_RESNET, "num_branches": 2, "shared_stages": 3},
    "cfc_cascade": {
        "coarse": {"name": "frame", "kwargs": {**TINY_RESNET, "num_classes": 5}},
        "negative": {"name": "cfc_sp", "kwargs": {**TINY_RESNET, "num_classes": 4, "window": 3}},
    },
    "weighted_ensemble": {
        "members": [
            {"name": "frame", "kwargs": {"backbone": "test_efficientnet", "num_classes": 8}},
            {"name": "cnn_gru", "kwargs": {**TINY_RESNET, "window": 3, "hidden_size": 16, "num_layers": 1}},
        ],
        "weights": [1.0, 3.0],
    },
}
MANY_TO_MANY = {"cnn_gru", "cnn_transformer"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, one intra-op thread


def tiny(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **TINY[name])


def model_input(model: torch.nn.Module, batch: int = B, seed: int = 1, frames: int = T) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if model.input_kind == "window":
        return torch.randn(batch, frames, 3, S, S, generator=g)
    return torch.randn(batch, 3, S, S, generator=g)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_builtin_model_has_a_tiny_config():
    # A family registered here later must get a tiny config and so every test below.
    # video_encoder_classifier (the video MAE's) is tested with the MAE; fer_minixception (grey
    # 64 px input, published weights) in test_minixception; the seed networks whose layout is
    # the published one, so never tiny (POSTER V2's 58 M, MA-Net's ResNet-18 trunk), in
    # test_poster_v2 and test_ma_net.
    tested_elsewhere = {"video_encoder_classifier", "fer_minixception", "poster_v2", "ma_net"}
    assert set(registry._PROVIDERS) - tested_elsewhere == set(TINY)


# ---------------------------------------------------------------------------
# Forward + backward
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_backward_shapes_and_gradients(name):
    model = tiny(name).train()
    assert n_params(model) < 1_000_000
    x = model_input(model)
    out = model(x)
    c = model.num_classes
    expected = (B, T, c) if name in MANY_TO_MANY else (B, c)
    assert out["logits"].shape == expected
    assert torch.isfinite(out["logits"]).all()
    if name == "esr":
        assert out["branch_logits"].shape == (2, B, c)
        assert torch.allclose(out["logits"], out["branch_logits"].mean(0))
    if name in MANY_TO_MANY:
        model.eval()
        assert torch.equal(model.predict_center(x), model(x)["logits"][:, T // 2])

    targets = torch.randint(0, c, expected[:-1])
    F.cross_entropy(out["logits"].reshape(-1, c), targets.reshape(-1)).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # Inner convs of timm's residual blocks get exactly 0 at step 0 (their last BN starts at
    # gamma=0, zero_init_last), so "gradient arrives" is checked per top-level part.
    for part, module in model.named_children():
        for sub in module.children() if isinstance(module, torch.nn.ModuleList) else [module]:
            grads = [p.grad.abs().sum() for p in sub.parameters()]
            assert not grads or sum(grads) > 0, part


@pytest.mark.parametrize("pooling", ["mean", "attention"])
@pytest.mark.parametrize("fusion", ["concat", "gate"])
def test_smooth_predicting_variants_and_centre_frame(pooling, fusion):
    torch.manual_seed(0)
    kwargs = {"num_classes": 3, "window": 5, "pooling": pooling, "fusion": fusion}
    model = create_model("cfc_sp", backbone="test_resnet", **kwargs).eval()
    x = torch.randn(B, 5, 3, S, S)
    out = model(x)
    assert out["logits"].shape == (B, 3)
    assert out["features"].shape == (B, model.num_features * (2 if fusion == "concat" else 1))
    # The target is the centre frame: changing it changes the prediction more than any other frame does.
    with torch.no_grad():
        base = model(x)["features"]
        moved = []
        for t in range(5):
            y = x.clone()
            y[:, t] = torch.randn(B, 3, S, S)
            moved.append((model(y)["features"] - base).norm().item())
    assert int(np.argmax(moved)) == 2
    # A single frame is a window of one.
    assert model(x[:, 2])["logits"].shape == (B, 3)


def test_smooth_predicting_rejects_even_window():
    with pytest.raises(ModelError, match="odd"):
        create_model("cfc_sp", backbone="test_resnet", window=4)


# ---------------------------------------------------------------------------
# CFC cascade
# ---------------------------------------------------------------------------


def test_cascade_probabilities_are_the_hand_fused_distribution():
    model = tiny("cfc_cascade").eval()
    x = model_input(model, batch=4)
    with torch.no_grad():
        out = model(x)
    probs = out["probs"]
    assert probs.shape == (4, len(ABAW8))
    assert (probs >= 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-6)

    p_c = out["coarse_logits"].softmax(-1)  # [4, 5]
    p_n = out["negative_logits"].softmax(-1)  # [4, 4]
    expected = torch.empty(4, 8)
    for k, name in enumerate(ABAW8.classes):
        if name in CFC_NEGATIVE.classes:
            expected[:, k] = p_c[:, CFC_COARSE.index("Negative")] * p_n[:, CFC_NEGATIVE.index(name)]
        else:
            expected[:, k] = p_c[:, CFC_COARSE.index(name)]
    assert torch.allclose(probs, expected, atol=1e-7)
    # logits = log(probs): the cascade is one 8-class model downstream.
    assert torch.allclose(out["logits"].softmax(-1), probs, atol=1e-6)
    # The stages saw their own inputs: the frame coarse model the centre frame.
    assert torch.allclose(out["coarse_logits"], model.coarse(x[:, T // 2])["logits"], atol=1e-6)
    assert torch.allclose(out["negative_logits"], model.negative(x[:, 1:4])["logits"], atol=1e-6)


def test_cascade_loss_uses_coarse_and_negative_views():
    model = tiny("cfc_cascade")
    x = model_input(model, batch=6)
    y = torch.tensor([ABAW8.index(n) for n in ("Neutral", "Anger", "Happiness", "Sadness", "Other", "Fear")])
    out = model(x)
    coarse_t = torch.as_tensor(to_coarse(y.numpy()))
    negative_t = torch.as_tensor(to_negative(y.numpy()))
    assert coarse_t.tolist() == [0, 4, 1, 4, 3, 4] and negative_t.tolist() == [-1, 0, -1, 3, -1, 2]
    expected = F.cross_entropy(out["coarse_logits"], coarse_t) + F.cross_entropy(
        out["negative_logits"][negative_t >= 0], negative_t[negative_t >= 0]
    )
    assert torch.allclose(cascade_loss(out, y), expected)
    # No negative frame in the batch: only the coarse term, never NaN.
    pos = torch.tensor([0, 4, 6, 7, 0, -1])
    coarse_only = F.cross_entropy(out["coarse_logits"], torch.as_tensor(to_coarse(pos.numpy())), ignore_index=-1)
    assert torch.allclose(cascade_loss(out, pos), coarse_only)


def test_cascade_rejects_stages_with_wrong_class_counts():
    a = create_model("frame", backbone="test_resnet", num_classes=8)
    b = create_model("frame", backbone="test_resnet", num_classes=4)
    with pytest.raises(ModelError, match="coarse model must have 5 classes"):
        CascadeClassifier(a, b)


# ---------------------------------------------------------------------------
# Self-describing rebuild
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TINY))
def test_rebuild_from_describe_and_safetensors_is_bit_identical(name, tmp_path):
    model = tiny(name, seed=0)
    x = model_input(model)
    with torch.no_grad():
        model.train()(x)  # move BatchNorm running stats off their init, so buffers matter
        model.eval()
        before = model(x)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    description = json.loads(json.dumps(model.describe()))  # what a checkpoint stores
    assert description["name"] == name

    torch.manual_seed(123)  # a different init: only the loaded weights can make outputs match
    rebuilt = create_model_from_description(description).eval()
    with torch.no_grad():
        assert not torch.equal(rebuilt(x)["logits"], before["logits"])
    rebuilt.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    with torch.no_grad():
        after = rebuilt(x)
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), key


# ---------------------------------------------------------------------------
# Smoothing along a track
# ---------------------------------------------------------------------------


def _track(labels: list[int], c: int = 4, p: float = 0.85) -> np.ndarray:
    probs = np.full((len(labels), c), (1 - p) / (c - 1), dtype=np.float32)
    probs[np.arange(len(labels)), labels] = p
    return probs


@pytest.mark.parametrize("method", ["mean", "majority"])
def test_smooth_predictions_shape_constant_and_spike(method):
    const = _track([2] * 12)
    out = smooth_predictions(const, 5, method=method)
    assert isinstance(out, np.ndarray) and out.shape == const.shape and out.dtype == const.dtype
    assert np.allclose(out.sum(1), 1.0, atol=1e-6)
    if method == "mean":
        assert np.allclose(out, const, atol=1e-6)
    assert (out.argmax(1) == 2).all()

    labels = [2] * 12
    labels[6] = 0  # a one-frame spike
    spiky = _track(labels)
    assert spiky.argmax(1)[6] == 0
    smoothed = smooth_predictions(torch.from_numpy(spiky), 5, method=method)
    assert isinstance(smoothed, torch.Tensor) and smoothed.shape == (12, 4)
    assert (smoothed.argmax(1) == 2).all()
    assert torch.equal(smooth_predictions(torch.from_numpy(spiky), 1, method=method), torch.from_numpy(spiky))


def test_smooth_predictions_keeps_tracks_apart():
    probs = np.concatenate([_track([0] * 6), _track([3] * 6)])
    groups = np.array([7] * 6 + [9] * 6)
    assert np.allclose(smooth_predictions(probs, 5, groups=groups), probs, atol=1e-6)
    mixed = smooth_predictions(probs, 5)  # as one track, the boundary frames blend
    assert not np.allclose(mixed[5], probs[5], atol=1e-3)
    with pytest.raises(ValueError, match="odd"):
        smooth_predictions(probs, 4)


# ---------------------------------------------------------------------------
# ESR
# ---------------------------------------------------------------------------


def test_diversity_loss_values():
    a = torch.randn(1, 4, 16)
    assert torch.allclose(diversity_loss(a.expand(3, 4, 16)), torch.tensor(1.0))
    eye = torch.eye(3).unsqueeze(1).expand(3, 4, 3)  # branches output orthogonal vectors
    assert torch.allclose(diversity_loss(eye), torch.tensor(0.0))
    assert diversity_loss(a) == 0


def test_esr_diversity_lower_for_different_branches_and_gradients_reach_every_branch():
    torch.manual_seed(0)
    model = create_model("esr", backbone="test_resnet", num_branches=3, shared_stages=3, diversity_weight=0.5)
    x = torch.randn(4, 3, S, S)
    y = torch.tensor([0, 1, 2, 3])
    out = model(x)
    differing = diversity_loss(out["branch_features"])

    identical = create_model("esr", backbone="test_resnet", num_branches=3, shared_stages=3)
    identical.load_state_dict(model.state_dict())
    for branch in identical.branches[1:]:
        branch.load_state_dict(identical.branches[0].state_dict())
    same = diversity_loss(identical(x)["branch_features"])
    assert torch.allclose(same, torch.tensor(1.0), atol=1e-5)
    assert differing < same - 0.01

    loss, _ = model.loss(out, y)  # what fine-tuning calls (ClassifierTask.loss)
    ce = sum(F.cross_entropy(out["branch_logits"][i], y) for i in range(3))
    assert torch.allclose(loss, ce + 0.5 * differing, atol=1e-5)
    assert torch.allclose(esr_loss(out, y, 0.0), ce, atol=1e-5)
    loss.backward()
    for part in [model.base, *model.branches]:
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0

    # The diversity term alone also trains every branch (and the base).
    model.zero_grad()
    diversity_loss(model(x)["branch_features"]).backward()
    for part in [model.base, *model.branches]:
        assert sum(p.grad.abs().sum() for p in part.parameters() if p.grad is not None) > 0


# ---------------------------------------------------------------------------
# Weighted ensemble
# ---------------------------------------------------------------------------


def test_weighted_ensemble_equals_hand_computation():
    model = tiny("weighted_ensemble").eval()
    frame, gru = model.members
    x = model_input(model, batch=3)
    with torch.no_grad():
        out = model(x)
        p_frame = frame(x[:, T // 2])["logits"].softmax(-1)  # frame member: the centre frame
        p_gru = gru(x[:, 1:4])["logits"][:, 1].softmax(-1)  # 3-frame member: centred sub-window, its centre
    expected = (1.0 * p_frame + 3.0 * p_gru) / 4.0
    assert torch.allclose(model.weights, torch.tensor([0.25, 0.75]))
    assert torch.allclose(out["probs"], expected, atol=1e-6)
    assert torch.allclose(out["probs"].sum(-1), torch.ones(3), atol=1e-6)
    assert model.input_kind == "window" and model.window == 3
    with pytest.raises(ValueError, match="takes windows"):
        model(x[:, 0])


def test_weighted_ensemble_rejects_bad_weights():
    m = create_model("frame", backbone="test_resnet")
    with pytest.raises(ModelError, match="non-negative"):
        create_model("weighted_ensemble", members=[m.describe()], weights=[-1.0])


# ---------------------------------------------------------------------------
# The classifier protocol (models/heads.py): each family's own loss and probabilities
# ---------------------------------------------------------------------------


def _hand_loss(name: str, model, out: dict, y: torch.Tensor, weights, smoothing: float) -> torch.Tensor:
    """Each family's training loss written out, for one target per sample [B] (-1 = unlabelled)."""
    ce = {"weight": weights, "ignore_index": -1, "label_smoothing": smoothing}
    if name == "cfc_cascade":  # stage-wise: coarse on every frame, negative on negative frames only
        coarse_t = torch.where(y >= 0, torch.as_tensor(to_coarse(y.clamp(min=0).numpy())), -1)
        negative_t = torch.where(y >= 0, torch.as_tensor(to_negative(y.clamp(min=0).numpy())), -1)
        keep = negative_t >= 0
        return F.cross_entropy(out["coarse_logits"], coarse_t, **ce) + F.cross_entropy(
            out["negative_logits"][keep], negative_t[keep], label_smoothing=smoothing
        )
    if name == "esr":  # every branch on its own, plus the diversity term at the config's weight
        branches = sum(F.cross_entropy(logits, y, **ce) for logits in out["branch_logits"])
        return branches + model.cfg.diversity_weight * diversity_loss(out["branch_features"])
    logits = out["logits"]
    if name in MANY_TO_MANY:  # one target per window: its centre frame
        logits = logits[:, logits.shape[1] // 2]
    return F.cross_entropy(logits, y, **ce)


@pytest.mark.parametrize("name", sorted(TINY))
def test_each_familys_loss_is_its_training_formula(name):
    model = tiny(name).eval()
    x = model_input(model, batch=6)
    with torch.no_grad():
        out = model(x)
    c = model.num_classes
    y = torch.tensor([0, 1, 2, 3, 7, -1])  # ABAW8: Neutral, three negative classes, Other, unlabelled
    # The cascade balances classes by its coarse/negative split and refuses class weights.
    weights = torch.linspace(0.5, 1.5, c) if model.class_weighted else None
    loss, extras = model.loss(out, y, class_weights=weights, label_smoothing=0.1)
    assert isinstance(extras, dict)
    assert torch.allclose(loss, _hand_loss(name, model, out, y, weights, 0.1), atol=1e-5), name
    if not model.class_weighted:
        with pytest.raises(ValueError, match="class weights"):
            model.loss(out, y, class_weights=torch.ones(c))

    # Per-frame targets [B, T]: many-to-many models score every frame, the others the centre frame.
    frames = x.shape[1] if x.dim() == 5 else T
    y_frames = torch.randint(0, c, (6, frames), generator=torch.Generator().manual_seed(7))
    by_frame, _ = model.loss(out, y_frames)
    if name in MANY_TO_MANY:
        expected = F.cross_entropy(out["logits"].reshape(-1, c), y_frames.reshape(-1))
    else:
        expected, _ = model.loss(out, y_frames[:, frames // 2])
    assert torch.allclose(by_frame, expected, atol=1e-6)

    # No labelled frame at all: no NaN, and a graph to step on (ESR keeps its diversity term).
    empty, _ = model.loss(model(x), torch.full((6,), -1))
    assert torch.isfinite(empty) and empty.requires_grad
    if name != "esr":
        assert empty.item() == 0.0


@pytest.mark.parametrize("name", sorted(TINY))
def test_each_familys_probabilities(name):
    model = tiny(name).eval()
    x = model_input(model, batch=3)
    with torch.no_grad():
        out = model(x)
    probs = model.probabilities(out)
    assert probs.shape == (3, model.num_classes) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5)
    if "probs" in out:  # the cascade and the ensemble mix probabilities themselves
        expected = out["probs"]
    elif name in MANY_TO_MANY:
        expected = out["logits"][:, T // 2].softmax(-1)
    else:
        expected = out["logits"].softmax(-1)
    assert torch.allclose(probs, expected, atol=1e-6)


# ---------------------------------------------------------------------------
# Training signal: a tiny fixed batch is learnable by every family
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["frame", "cfc_sp", "cnn_gru", "cnn_transformer", "esr", "cfc_cascade"])
def test_twenty_steps_overfit_a_tiny_batch(name):
    model = tiny(name).train()
    x = model_input(model, batch=4, seed=3, frames=3)
    g = torch.Generator().manual_seed(4)
    shape = (4, 3) if name in MANY_TO_MANY else (4,)
    y = torch.randint(0, model.num_classes, shape, generator=g)

    def loss_fn(out):
        return model.loss(out, y)[0]  # each family's own training loss, as fine-tuning calls it

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = loss_fn(model(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------
# Registry and backbones
# ---------------------------------------------------------------------------


def test_registry_errors_and_model_config():
    with pytest.raises(ValueError, match="unknown model 'resnet'; known: .*cfc_sp.*cnn_gru.*esr.*frame"):
        create_model("resnet")
    with pytest.raises(ModelError, match=r"'frame' takes no argument\(s\) \['window'\]"):
        create_model("frame", backbone="test_resnet", window=9)
    cfg = ModelConfig(name="cnn_gru", backbone="test_resnet", num_classes=5, window=3, extra={"hidden_size": 8})
    model = build_model(cfg)
    assert model.num_classes == 5 and model.window == 3 and model.gru.hidden_size == 8
    assert model.describe()["kwargs"]["hidden_size"] == 8
    with pytest.raises(ModelError, match="both as fields and in 'extra'"):
        build_model(ModelConfig(name="frame", num_classes=5, extra={"num_classes": 3}))


def test_create_backbone_img_size_and_features():
    vit, d = create_backbone("test_vit", img_size=S)
    assert vit(torch.randn(2, 3, S, S)).shape == (2, d)
    cnn, d = create_backbone("test_resnet", img_size=S)  # a CNN ignores img_size
    assert cnn(torch.randn(2, 3, 48, 48)).shape == (2, d) == (2, 96)
    with pytest.raises(BackboneError, match="unknown timm model 'resnet_tiny_typo'"):
        create_backbone("resnet_tiny_typo")


def test_load_weights_non_strict_with_prefix_and_extra_head(tmp_path):
    torch.manual_seed(0)
    src, _ = create_backbone("test_resnet")
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(7, 96)  # a classifier head the pooled backbone lacks
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth"):
        torch.manual_seed(1)
        dst, _ = create_backbone("test_resnet")
        missing, unexpected = load_weights(dst, path)
        assert missing == [] and unexpected == ["fc.weight"]
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), k

    other, _ = create_backbone("test_efficientnet")
    save_file(other.state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(BackboneError, match="none of its .* keys fits|another shape"):
        load_weights(dst, tmp_path / "other.safetensors")
    with pytest.raises(BackboneError, match="not found"):
        create_backbone("test_resnet", weights_path=tmp_path / "missing.safetensors")


def test_split_backbone_matches_whole_model_and_refuses_vit():
    for name in ("test_resnet", "test_convnext", "test_efficientnet"):
        cnn, _ = create_backbone(name)
        base, tail = split_backbone(cnn, 2)
        cnn.eval()
        x = torch.randn(2, 3, 48, 48)
        with torch.no_grad():
            assert torch.allclose(tail(base(x)), cnn(x), atol=1e-5)
    vit, _ = create_backbone("test_vit", img_size=S)
    with pytest.raises(BackboneError):
        split_backbone(vit, 2, check_size=S)
