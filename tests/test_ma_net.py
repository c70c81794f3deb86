"""MA-Net (models/ma_net.py): shapes at small and odd sizes, the beta-weighted logits and loss,
a batch it fits, self-describing rebuilds, and the official model's state-dict layout.

The full-width network (50 M parameters) at 32 px, on CPU with one thread.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from affectray.models.ma_net import MANet
from affectray.models.registry import ModelError, create_model, create_model_from_description

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread

S = 32  # the smoke config's image side: a 4x4 stage-2 map, 2x2 patches


@pytest.fixture(scope="module")
def model() -> MANet:
    torch.manual_seed(0)
    return create_model("ma_net", num_classes=8)


@pytest.mark.parametrize("size", [S, 40, 17])  # 40 px: a 5x5 stage-2 map, unequal quadrants
def test_output_shapes(model, size):
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "logits": (2, 8),
        "local_logits": (2, 8),
        "global_logits": (2, 8),
        "features": (2, 1024),
    }
    probs = model.probabilities(out)
    assert probs.shape == (2, 8) and torch.allclose(probs.sum(-1), torch.ones(2))
    assert (model.input_kind, model.window, model.num_classes) == ("frame", 1, 8)


def test_too_small_an_image_is_a_model_error(model):
    with pytest.raises(ModelError, match="at least 9x9"):
        model(torch.rand(1, 3, 8, 8))


def test_fused_logits_and_loss_weight_the_branches_by_beta():
    torch.manual_seed(0)
    net = create_model("ma_net", num_classes=3, layers=[1, 1, 1, 1], beta=0.25).eval()
    with torch.no_grad():
        out = net(torch.rand(4, 3, S, S))
    local, glob = out["local_logits"], out["global_logits"]
    torch.testing.assert_close(out["logits"], 0.25 * local + 0.75 * glob)
    targets = torch.tensor([0, 2, -1, 1])  # -1: unlabelled, left out of both terms
    loss, extras = net.loss(out, targets)
    want_local = F.cross_entropy(local[[0, 1, 3]], targets[[0, 1, 3]])
    want_global = F.cross_entropy(glob[[0, 1, 3]], targets[[0, 1, 3]])
    torch.testing.assert_close(loss, 0.25 * want_local + 0.75 * want_global)
    assert extras == pytest.approx({"loss_local": want_local.item(), "loss_global": want_global.item()})
    # Per-frame targets [B, T]: scored against the centre frame's, like every frame model.
    frames = torch.stack([torch.full_like(targets, -1), targets, torch.full_like(targets, -1)], dim=1)
    torch.testing.assert_close(net.loss(out, frames)[0], loss)


def test_it_fits_a_fixed_batch():
    # One block per stage (22 M parameters, every block kind still in it): the full depth
    # fits as well, in twice the time.
    torch.manual_seed(0)
    model = create_model("ma_net", num_classes=8, layers=[1, 1, 1, 1]).train()
    x, y = torch.rand(8, 3, S, S), torch.arange(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss, _ = model.loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses
    with torch.no_grad():
        assert (model(x)["logits"].argmax(-1) == y).all()  # train mode: the batch's own statistics


def test_describe_rebuilds_the_same_model():
    torch.manual_seed(0)
    net = create_model("ma_net", num_classes=5, layers=[1, 2, 1, 1], beta=0.5).eval()
    description = json.loads(json.dumps(net.describe()))  # as a checkpoint stores it
    assert description == {"name": "ma_net", "kwargs": {"num_classes": 5, "layers": [1, 2, 1, 1], "beta": 0.5}}
    rebuilt = create_model_from_description(description).eval()
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    x = torch.rand(2, 3, S, S)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)["logits"], net(x)["logits"])
    assert rebuilt.describe() == net.describe()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone": "test_resnet"}, "takes no argument"),  # the trunk is the paper's ResNet-18
        ({"layers": [2, 2, 2]}, "4 block counts"),
        ({"beta": 1.5}, "beta must be in"),
    ],
)
def test_wrong_arguments_are_model_errors(kwargs, match):
    with pytest.raises(ModelError, match=match):
        create_model("ma_net", **kwargs)


# The official model (zengqunzhao/MA-Net @ 923fa6c, model/manet.py: manet(), then main.py's
# fc_1 / fc_2 = nn.Linear(512, C)), counted by building it: 692 state-dict entries, and
# 50_547_214 parameters at C = 7 (RAF-DB), 50_548_240 at C = 8, 63_535_348 at its MS-Celeb
# default C = 12666. Each class adds 2 x 513 (two heads with biases).
OFFICIAL_PARAMS_C8 = 50_548_240
OFFICIAL_STATE_ENTRIES = 692
OFFICIAL_SHAPES = {  # one key of each kind of tensor, as the official state dict names it
    "conv1.weight": (64, 3, 7, 7),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer3_1_p1.0.conv1.weight": (256, 128, 3, 3),
    "layer3_1_p4.1.cbam.ChannelGate.mlp.1.weight": (16, 256),
    "layer4_1_p2.0.cbam.ChannelGate.mlp.3.bias": (512,),
    "layer4_1_p3.0.downsample.0.weight": (512, 256, 1, 1),  # stride 1, but 256 -> 512 channels
    "layer4_1_p3.1.cbam.SpatialGate.spatial.conv.weight": (1, 2, 7, 7),
    "layer4_1_p3.1.cbam.SpatialGate.spatial.bn.running_var": (1,),
    "layer3_2.0.conv1_2_1.weight": (64, 64, 3, 3),
    "layer4_2.1.bn2_2_4.num_batches_tracked": (),
    "layer4_2.0.downsample.1.weight": (512,),
    "fc_1.weight": (8, 512),
    "fc_2.bias": (8,),
}


def test_state_dict_has_the_official_layout(model):
    state = model.state_dict()
    assert len(state) == OFFICIAL_STATE_ENTRIES
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS_C8
    assert {k: tuple(state[k].shape) for k in OFFICIAL_SHAPES} == OFFICIAL_SHAPES
    # Official names only: four local stages per depth, one global, no conv2 in a multi-scale block.
    assert {k.split(".")[0] for k in state} == {
        "conv1", "bn1", "layer1", "layer2", "layer3_2", "layer4_2", "fc_1", "fc_2",
        *(f"layer{d}_1_p{p}" for d in (3, 4) for p in range(1, 5)),
    }  # fmt: skip
    assert not any(k.startswith("layer3_2.0.conv2.") for k in state)
    # The official CBAM's spatial batch norm keeps momentum 0.01; the residual blocks' torch's default.
    bn = model.layer4_1_p1[0].cbam.SpatialGate.spatial.bn
    assert (bn.momentum, model.layer1[0].bn1.momentum) == (0.01, 0.1)
