"""The fair no-normalization baselines, each against its paper's rule: SkipInit makes every residual block
the identity at init, Fixup's init has the weight statistics it prescribes, scaled weight standardization
gives each output unit mean 0 and standard deviation gain * gamma / sqrt(fan_in), and adaptive gradient
clipping clips exactly per its formula, per unit and per fused member, never the classifier."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from helpers import ROOT, TINY, bnlab
from torch import nn

from bnlab.core.baselines import Scalar, WSConv2d, WSLinear, gamma, standardize
from bnlab.core.models import ACTIVATIONS, BasicBlock, build_model
from bnlab.core.optim import build_optimizer, clip_gradients, final_layer
from bnlab.core.validate import validate
from bnlab.run.train import train
from bnlab.schema.config import ConfigError

RESNET = ["model=resnet", "model.widths=[8,16,16]", "model.blocks=2"]


def blocks(model: nn.Module) -> list[BasicBlock]:
    return [m for m in model.modules() if isinstance(m, BasicBlock)]


@pytest.mark.parametrize("norm", ["none", "batch", "group", "layer"])
def test_skipinit_makes_every_residual_block_the_identity_at_init(tiny_config, norm):
    torch.manual_seed(0)
    model = build_model(
        tiny_config(*RESNET, "model.residual_init=skipinit", f"norm={norm}", "norm.groups=2"), (1, 8, 8), 10
    )
    seen = []
    hooks = [b.register_forward_hook(lambda m, inputs, out: seen.append((m, inputs[0], out))) for b in blocks(model)]
    model.train()(torch.rand(16, 1, 8, 8))  # a batch, in train mode (batch statistics)
    for h in hooks:
        h.remove()
    assert len(seen) == 6 and all(b.branch.value.item() == 0.0 for b in blocks(model))
    for block, x, out in seen:
        if isinstance(block.shortcut, nn.Identity):
            assert torch.equal(out, x)  # ReLU of a non-negative input plus a zero branch
        else:  # where the shape changes the block starts as its shortcut
            assert torch.equal(out, block.second.act(block.shortcut(x)))
    assert sum(isinstance(b.shortcut, nn.Identity) for b, _, _ in seen) == 4


def test_skipinit_alpha_learns(tiny_config, tmp_path):
    train(tiny_config(*RESNET, "model.residual_init=skipinit", "norm=none", "optim.lr=0.1"), tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    alphas = [v for k, v in state.items() if k.endswith("branch.value")]
    assert len(alphas) == 6 and all(a.abs() > 0 for a in alphas)


def test_fixup_init_follows_the_papers_rule(tiny_config):
    torch.manual_seed(0)
    cfg = tiny_config(
        "model=resnet", "model.widths=[32,64]", "model.blocks=2", "model.residual_init=fixup", "norm=none"
    )
    model = build_model(cfg, (1, 8, 8), 10)
    bs = blocks(model)
    L, m = len(bs), 2  # residual branches, weight layers per branch
    assert L == 4
    for b in bs:
        w = b.first.layer.weight  # He et al.'s N(0, 2 / fan_out), times L^(-1/(2m-2))
        fan_out = w.shape[0] * w.shape[2] * w.shape[3]
        expected = math.sqrt(2 / fan_out) * L ** (-1 / (2 * m - 2))
        assert w.std().item() == pytest.approx(expected, rel=0.05) and abs(w.mean().item()) < 0.05 * expected
        assert torch.count_nonzero(b.second.layer.weight) == 0  # the branch's last layer starts at 0
        assert b.branch.value.item() == 1.0  # the scalar multiplier
        for conv in (c for c in b.shortcut.modules() if isinstance(c, nn.Conv2d)):  # He init, not rescaled
            assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / conv.weight.shape[0]), rel=0.1)
    head = model[-1]
    assert torch.count_nonzero(head.weight) == 0 and torch.count_nonzero(head.bias) == 0
    biases = [s for s in model.modules() if isinstance(s, Scalar) and not s.multiply]
    # one before the layer and one before the activation of every unit (the stem and 2 per block), one before
    # the projection shortcut's conv, one before the classifier
    assert len(biases) == 2 * (1 + 2 * L) + 1 + 1 and all(s.value.item() == 0.0 for s in biases)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(model(x), torch.zeros(4, 10))  # a zero classifier: every class equally likely at init


def test_residual_init_needs_the_resnet(tiny_config):
    with pytest.raises(ConfigError, match="model.residual_init='fixup' is not accepted.*need model=resnet"):
        validate(tiny_config("model=mlp", "model.residual_init=fixup"))


def test_gamma_is_the_nonlinearitys_gain():
    assert gamma(nn.ReLU()) == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), rel=1e-8)  # Brock et al.'s ReLU gain
    z = torch.randn(2_000_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for act in (nn.Sigmoid(), nn.Tanh(), nn.GELU()):
        assert gamma(act) == pytest.approx(1 / act(z).std().item(), rel=2e-3)


@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_weight_standardization_gives_zero_mean_and_the_papers_scale_per_output_unit(tiny_config, model, activation):
    widths = "model.widths=[16,16]" if model == "mlp" else "model.widths=[8,16]"
    cfg = tiny_config(f"model={model}", widths, "model.weight_standardization=true", f"model.activation={activation}")
    net = build_model(cfg, (1, 8, 8), 10)
    layers = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert all(isinstance(m, (WSLinear, WSConv2d)) for m in layers[:-1]) and type(layers[-1]) is nn.Linear
    g = gamma(ACTIVATIONS[activation]())
    for layer in layers[:-1]:
        with torch.no_grad():
            layer.gain.uniform_(0.5, 2.0)
        w = standardize(layer.weight, layer.gain, layer.gamma).flatten(1).double()
        fan_in = w.shape[1]
        torch.testing.assert_close(w.mean(1), torch.zeros(len(w), dtype=torch.float64), atol=1e-7, rtol=0)
        expected = layer.gain.double() * g / math.sqrt(fan_in)
        torch.testing.assert_close(w.std(1, unbiased=False), expected, rtol=1e-5, atol=0)


def test_a_weight_standardized_layer_uses_the_standardized_weight():
    conv = WSConv2d(nn.Conv2d(3, 4, 3, padding=1), gamma=1.5)
    x = torch.randn(2, 3, 5, 5)
    expected = nn.functional.conv2d(x, standardize(conv.weight, conv.gain, 1.5), conv.bias, padding=1)
    torch.testing.assert_close(conv(x), expected)


def test_agc_clips_exactly_per_the_formula_on_a_hand_made_gradient():
    lam = 0.1
    w = nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 1e-4], [1.0, 0.0]], dtype=torch.float64))
    w.grad = torch.tensor([[30.0, 40.0], [1.0, 0.0], [0.001, 0.0]], dtype=torch.float64)
    b = nn.Parameter(torch.tensor([0.6, 0.8], dtype=torch.float64))  # a vector is one unit: ||b|| = 1
    b.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)  # ||G|| = 5 > 0.1 * 1
    clip_gradients([w, b], lam)
    expected = torch.tensor(
        [
            [0.3, 0.4],  # ||G||/||W|| = 50/5 > 0.1: G * 0.1 * 5 / 50
            [1e-4, 0.0],  # ||W|| = 1e-4 counts as 1e-3: G * 0.1 * 1e-3 / 1
            [0.001, 0.0],  # 0.001 / 1 < 0.1: unchanged
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(w.grad, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(b.grad, torch.tensor([0.06, 0.08], dtype=torch.float64), rtol=1e-12, atol=0)


def test_agc_of_fused_members_clips_each_members_vector_on_its_own():
    b = nn.Parameter(torch.tensor([0.6, 0.8, 3.0, 4.0], dtype=torch.float64))  # member 0: [0.6, 0.8], member 1: [3, 4]
    b.grad = torch.tensor([3.0, 4.0, 0.3, 0.4], dtype=torch.float64)
    clip_gradients([b], 0.2, members=2)
    # member 0: ||G|| 5 > 0.2 * 1: scaled by 0.2 / 5; member 1: ||G|| 0.5 <= 0.2 * 5: unchanged
    torch.testing.assert_close(b.grad, torch.tensor([0.12, 0.16, 0.3, 0.4], dtype=torch.float64), rtol=1e-12, atol=0)


def test_agc_leaves_the_final_layer_alone(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config("optim.agc=0.001", "norm=none"), (1, 8, 8), 10)
    optimizer = build_optimizer(model, tiny_config("optim.agc=0.001").optim)
    nn.functional.cross_entropy(model(torch.rand(16, 1, 8, 8)), torch.arange(16) % 10).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    optimizer.step()  # clips, then steps
    head = final_layer(model)
    assert head is model[-1]
    for k, p in model.named_parameters():
        g = p.grad
        if any(p is q for q in head.parameters()):
            assert torch.equal(g, grads[k]), k
        else:
            assert g.norm() < grads[k].norm(), k  # lambda 0.001: every other unit clipped


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.residual_init=skipinit", "norm=none"],
        ["model.residual_init=fixup", "norm=none", "model.bias=false"],
        ["model.weight_standardization=true", "norm=group", "norm.groups=2"],
        ["model.residual_init=fixup", "norm=batch", "optim.agc=0.01"],
    ],
)
def test_each_baseline_trains(tiny_config, tmp_path, overrides):
    summary = train(tiny_config(*RESNET, *overrides, "optim.lr=0.05"), tmp_path)
    assert summary.status.done and summary.steps == 3


@pytest.mark.slow
def test_the_readmes_fair_baselines_commands_run(tmp_path):
    section = (ROOT / "README.md").read_text().split("## Fair baselines", 1)[1].split("\n## ", 1)[0]
    commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()
    assert len(commands) == 3 and all(c.startswith("bnlab train") for c in commands)
    small = [*TINY, "model.widths=[4,8,8]", "model.blocks=1", "seed=0", "optim.lr=0.05"]
    for i, command in enumerate(commands):
        args = command.split("#")[0].split()[2:]
        given = {a.split("=")[0] for a in args}
        out = bnlab(
            "train",
            *args,
            *[o for o in small if o.split("=")[0] not in given],
            f"hydra.sweep.dir=sweep{i}",
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr[-3000:]
    runs = [
        json.loads(p.read_text()) for p in tmp_path.glob("**/summary.json") if "config" in json.loads(p.read_text())
    ]
    assert len(runs) == 1 + 5 * 2 * 2 + 5
    assert all(r["status"] in ("completed", "stalled", "diverged") for r in runs)
    report = bnlab("report", "sweep1", cwd=tmp_path)
    assert (
        report.returncode == 0
        and "## Each norm at its best learning rate" in (tmp_path / "sweep1" / "report.md").read_text()
    )
