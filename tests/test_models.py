import pytest
import torch
from torch import nn

from bnlab.core.models import MODELS, Unit, build_model
from bnlab.core.norms import NORMS
from bnlab.run.train import train
from bnlab.schema.config import NORM_POSITIONS, PLACEMENTS

# a ViT of 2 blocks on the 8 x 8 images: 4 patches of 4 x 4 and a class token, 8 channels in 2 heads
VIT = ["model=vit", "model.widths=[8]", "model.heads=2", "model.depth=2", "model.patch=4"]
SMALL = {"mlp": ["model.widths=[16,16]"], "cnn": ["model.widths=[8,16]"], "resnet": ["model.widths=[8,16]"], "vit": VIT}
# model=custom and norm=custom are the user's: tests/test_custom.py
BUILT_IN_MODELS, BUILT_IN_NORMS = sorted(set(MODELS) - {"custom"}), sorted(set(NORMS) - {"custom"})
UNIT_MODELS = [m for m in BUILT_IN_MODELS if m != "vit"]  # built from Units: their norm.placement, their biases
# where the norm sits: by norm.placement in the models built from Units, by model.norm_position in the ViT
PLACES = [(m, f"norm.placement={p}") for m in UNIT_MODELS for p in PLACEMENTS]
PLACES += [("vit", f"model.norm_position={p}") for p in NORM_POSITIONS]


@pytest.mark.parametrize("norm", BUILT_IN_NORMS)
@pytest.mark.parametrize(("model", "placement"), PLACES)
def test_every_model_norm_and_placement_trains(tiny_config, tmp_path, model, norm, placement):
    cfg = tiny_config(f"model={model}", *SMALL[model], f"norm={norm}", placement, "norm.groups=2")
    summary = train(cfg, tmp_path)
    assert summary.status.done  # ran to its last step (a 3-step run on noise may end at chance: stalled)
    assert summary.steps == 3
    assert 0.0 <= summary.final["test_acc"] <= 1.0
    assert torch.isfinite(torch.tensor(summary.final["train_loss"]))


def units(model: nn.Module) -> list[Unit]:
    return [m for m in model.modules() if isinstance(m, Unit)]


@pytest.mark.parametrize("model", UNIT_MODELS)
def test_norm_placement_sets_the_order_of_norm_and_activation(tiny_config, model):
    for placement, before in [("before_act", True), ("after_act", False)]:
        net = build_model(tiny_config(f"model={model}", *SMALL[model], f"norm.placement={placement}"), (1, 8, 8), 10)
        assert units(net) and all(u.norm_before_act is before for u in units(net))


@pytest.mark.parametrize("model", UNIT_MODELS)
def test_auto_bias_is_dropped_only_where_a_norm_follows(tiny_config, model):
    def biases(*overrides):
        net = build_model(tiny_config(f"model={model}", *SMALL[model], *overrides), (1, 8, 8), 10)
        return [u.layer.bias is not None for u in units(net)]

    assert not any(biases("norm=batch", "norm.placement=before_act"))
    assert all(biases("norm=batch", "norm.placement=after_act"))
    assert all(biases("norm=none"))
    assert all(biases("norm=batch", "model.bias=true"))
    assert not any(biases("norm=none", "model.bias=false"))


def test_mlp_has_the_tutorial_shape(tiny_config):
    net = build_model(tiny_config("model.widths=[100,100,100]"), (1, 28, 28), 10)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 100), (100, 100), (100, 100), (100, 10)]
    assert [type(m.act) for m in units(net)] == [nn.ReLU] * 3


@pytest.mark.parametrize("std", [0.05, 5.0])
def test_normal_init_draws_weights_with_the_given_std(tiny_config, std):
    torch.manual_seed(0)
    net = build_model(
        tiny_config("model.widths=[256,256]", "model.init=normal", f"model.init_std={std}", "norm=none"),
        (1, 16, 16),
        10,
    )
    w = net[1].layer.weight
    assert w.mean().abs() < 0.05 * std
    assert w.std().item() == pytest.approx(std, rel=0.02)
    assert torch.count_nonzero(net[1].layer.bias) == 0


@pytest.mark.parametrize("model", ["cnn", "resnet"])
@pytest.mark.parametrize("size", [28, 32])
def test_conv_models_take_mnist_and_cifar_sizes(tiny_config, model, size):
    net = build_model(tiny_config(f"model={model}", *SMALL[model]), (3, size, size), 10)
    assert net(torch.randn(4, 3, size, size)).shape == (4, 10)


def test_dln_is_25_square_linear_layers_with_glorot_weights(tiny_config):
    torch.manual_seed(0)
    net = build_model(tiny_config("model=dln", "data=linear_regression", "norm=none"), (10,), 10)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 10)] * 25
    assert [type(u.act) for u in units(net)] == [nn.Identity] * 24
    assert all(m.bias is None for m in linears[:-1]) and torch.count_nonzero(linears[-1].bias) == 0
    bound = (6 / 20) ** 0.5  # Glorot uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out))
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert weights.abs().max() <= bound and weights.var().item() == pytest.approx(bound**2 / 3, rel=0.1)
    # no nonlinearity: the network is the product of its weight matrices
    product = torch.linalg.multi_dot([m.weight for m in reversed(linears)])
    x = torch.randn(5, 10)
    torch.testing.assert_close(net(x), x @ product.T, rtol=1e-4, atol=1e-5)
