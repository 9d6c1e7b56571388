"""model=vit: the small vision transformer's shape, its norms on tokens (TokenNorm), pre- and post-norm, AdamW,
fused training exact against separate runs in float64 for every fusable norm and position, and its refusals."""

from __future__ import annotations

import pytest
import torch
from test_fused import assert_fused_equals_separate, member_configs
from test_models import VIT

from bnlab.core.models import Block, Embedding, TokenNorm, build_model
from bnlab.core.norms import NORMS
from bnlab.core.validate import validate
from bnlab.schema.config import NORM_POSITIONS, ConfigError

FUSABLE = sorted(name for name, n in NORMS.items() if n.fuse is not None and name != "custom")


def test_the_mnist_vit_has_16_patches_a_class_token_64_channels_4_heads_and_6_blocks(tiny_config):
    net = build_model(tiny_config("model=vit"), (1, 28, 28), 10)
    (embedding,) = [m for m in net.modules() if isinstance(m, Embedding)]
    assert embedding.pos.shape == (64, 17) and embedding.cls.shape == (64,)
    blocks = [m for m in net.modules() if isinstance(m, Block)]
    assert len(blocks) == 6 and blocks[0].attn.head_dim == 16 and blocks[0].mlp[0].out_features == 128
    assert isinstance(net[-3], TokenNorm)  # pre-norm ends with a final norm before the head
    assert net(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    post = build_model(tiny_config("model=vit", "model.norm_position=post"), (1, 28, 28), 10)
    assert not isinstance(post[-3], TokenNorm) and len(list(post.modules())) < len(list(net.modules()))


def test_layer_norm_normalizes_each_token_and_batch_norm_each_channel_over_batch_and_tokens(tiny_config):
    x = torch.randn(6, 5, 8) * 3 + 2  # (B, T, C)
    layer = TokenNorm(8, tiny_config("norm=layer").norm)(x)
    torch.testing.assert_close(layer.mean(2), torch.zeros(6, 5), atol=1e-5, rtol=0)  # over each token's channels
    batch_norm = TokenNorm(8, tiny_config("norm=batch").norm)
    out = batch_norm(x)
    torch.testing.assert_close(out.mean((0, 1)), torch.zeros(8), atol=1e-5, rtol=0)  # per channel over (B, T)
    torch.testing.assert_close(out.var((0, 1), unbiased=False), torch.ones(8), atol=1e-3, rtol=0)
    running = batch_norm.norm.running_mean
    torch.testing.assert_close(running, 0.1 * x.mean((0, 1)))  # its running statistics, one per channel
    batch_norm.eval()
    assert not torch.equal(batch_norm(x), out)  # eval mode: the running statistics


@pytest.mark.parametrize("position", NORM_POSITIONS)
def test_pre_and_post_norm_put_the_norms_before_the_branches_or_after_the_sums(tiny_config, position):
    block = Block(8, tiny_config(*VIT, f"model.norm_position={position}", "norm=layer").model, tiny_config().norm)
    calls = []
    for name in ("norm1", "attn", "norm2", "mlp"):
        getattr(block, name).register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    block(torch.randn(2, 3, 8))
    assert calls == (["norm1", "attn", "norm2", "mlp"] if position == "pre" else ["attn", "norm1", "mlp", "norm2"])


@pytest.mark.parametrize("position", NORM_POSITIONS)
@pytest.mark.parametrize("norm", FUSABLE)
def test_fused_vit_members_follow_their_separate_runs(norm, position, tmp_path):
    """With SGD, for 5 steps: the stacked layers (batched matmuls) round differently from one member's, by 1e-14
    after a step, and some of these tiny transformers amplify that several times a step (instance norm over 5
    tokens with pre-norm: 1e-13 after 3 steps, 3e-10 after 10). Adam would be worse: it scales a gradient that
    is rounding noise (a bias whose shift a batch norm removes downstream) up to a full step."""
    cfgs = member_configs(*VIT, f"norm={norm}", f"model.norm_position={position}", "trainer.max_steps=5")
    assert_fused_equals_separate(cfgs, tmp_path)


@pytest.mark.parametrize("position", NORM_POSITIONS)
def test_a_fused_vit_follows_its_separate_runs_through_an_interrupt_and_resume(position, tmp_path, monkeypatch):
    cfgs = member_configs(*VIT, "norm=batch", f"model.norm_position={position}", "optim.warmup_steps=5")
    assert_fused_equals_separate(cfgs, tmp_path, monkeypatch)


def test_a_custom_per_channel_norm_fuses_in_the_vit(tmp_path):
    cfgs = member_configs(*VIT, "norm=custom", "norm.target=my_norm.MeanOnlyBatchNorm", "model.norm_position=post")
    assert_fused_equals_separate(cfgs, tmp_path)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_adamw_fuses_exactly_with_each_members_weight_decay(model, tmp_path):
    from test_fused import SMALL

    members = [(0, 0.01, 0.0), (1, 0.005, 0.1), (2, 0.02, 0.5)]
    cfgs = member_configs(f"model={model}", SMALL[model], "optim=adamw", "optim.schedule=cosine", members=members)
    assert_fused_equals_separate(cfgs, tmp_path)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["model.widths=[8,8]"], "model.widths=[8, 8] is not accepted; accepted values: one width with model=vit"),
        (["model.heads=3"], "accepted values: a multiple of model.heads=3"),
        (["norm.placement=after_act"], "norm.placement='after_act' is not accepted; accepted values: before_act"),
        (["model.patch=3"], "model.patch=3 is not accepted; accepted values: a divisor of the images' 8 x 8 pixels"),
        (["model.dropout=0.1"], "model.dropout=0.1 is not accepted; accepted values: 0 with model=vit"),
        (["model.depth=0"], "model.depth=0 is not accepted; accepted values: an integer >= 1"),
        (["model.norm_position=middle"], "model.norm_position='middle' is not accepted; accepted values: pre, post"),
    ],
)
def test_bad_vit_settings_are_refused_by_name(tiny_config, overrides, says):
    with pytest.raises(ConfigError) as refused:
        validate(tiny_config(*VIT, *overrides))
    assert says in str(refused.value)


def test_norm_position_is_refused_for_the_models_without_residual_blocks(tiny_config):
    with pytest.raises(ConfigError, match="model.norm_position='post' is not accepted; accepted values: pre"):
        validate(tiny_config("model=mlp", "model.norm_position=post"))
