"""Optimizers and the partial reset of adapter moments."""

import pytest
import torch
from torch import nn

from qrelora.config import OptimConfig
from qrelora.optim import _decoded, build_optimizer, prune_adapter_moments

OPTIMIZERS = ["adamw", "adamw8bit", "paged_adamw8bit"]


def trained(name, steps=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.Linear(64, 8))  # 16384 values: 8-bit states are quantized
    opt = build_optimizer(OptimConfig(name=name), model, 1e-3, "cpu")
    for _ in range(steps):
        model(torch.randn(16, 256)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def moments(opt, p):
    state = opt.state[p]
    keys = ("exp_avg", "exp_avg_sq") if "exp_avg" in state else ("state1", "state2")
    return _decoded(state, keys[0]), _decoded(state, keys[1])


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("mode,ratio,expected", [("magnitude", 0.99, 0.99), ("magnitude", 0.9, 0.9),
                                                 ("random", 0.9, 0.9), ("zero", 0.5, 1.0), ("none", 0.9, 0.0)])
def test_reset_fraction_is_what_was_asked_and_really_zero(name, mode, ratio, expected):
    model, opt = trained(name)
    target, other = model[0].weight, model[1].weight
    m1_before, m2_before = moments(opt, target)
    other_before = [m.clone() for m in moments(opt, other)]
    step_before = opt.state[target]["step"]
    reported = prune_adapter_moments(opt, [target], mode, ratio, torch.Generator().manual_seed(0))
    m1, m2 = moments(opt, target)
    measured = ((m1 == 0) & (m2 == 0)).float().mean().item()
    assert reported == pytest.approx(measured)
    assert measured == pytest.approx(expected, abs=0.01)
    # one mask: no entry keeps a first moment while its second moment was zeroed, or the reverse
    assert not ((m1 != 0) & (m2 == 0)).any() and not ((m1 == 0) & (m2 != 0)).any()
    # kept entries are untouched (8-bit codes are not requantized)
    kept = m1 != 0
    assert torch.equal(m1[kept], m1_before[kept]) and torch.equal(m2[kept], m2_before[kept])
    if mode == "magnitude" and 0 < measured < 1:
        assert m1_before[kept].abs().min() >= m1_before[~kept].abs().max()
    # other parameters and the step count are left alone
    assert all(torch.equal(a, b) for a, b in zip(other_before, moments(opt, other)))
    assert opt.state[target]["step"] == step_before


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_keeps_training_after_a_reset(name):
    model, opt = trained(name)
    prune_adapter_moments(opt, [model[0].weight, model[0].bias], "magnitude", 0.99)
    x = torch.randn(16, 256)
    losses = []
    for _ in range(5):
        loss = model(x).square().mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_parameters_are_grouped_by_role_with_their_rate_multiple():
    """Adapters (ours and peft's names), the block matrices, the embeddings with the LM head (one parameter when
    tied) and the norms each get a group: the adapters' rate is jagged, the embeddings' and norms' is
    training.embedding_lr_ratio times the run's; norms and biases are never decayed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qrelora.optim import is_adapter, param_groups

    model = nn.ModuleDict({"embed": nn.Embedding(10, 4), "norm": nn.LayerNorm(4)})
    model.lora_A = nn.Parameter(torch.zeros(2, 4))
    model.proj = nn.Linear(4, 4)
    model.proj.weight.requires_grad = False
    model.block = nn.Linear(4, 4, bias=False)
    groups = param_groups(model, 0.1, embedding_lr_ratio=8.0)
    assert [(g["role"], g["lr_scale"], g["weight_decay"], len(g["params"])) for g in groups] == [
        ("blocks", 1.0, 0.1, 1), ("adapters", 1.0, 0.1, 1), ("embeddings", 8.0, 0.1, 1), ("norms", 8.0, 0.0, 3)]
    assert is_adapter("layers.0.q_proj.lora_B.default.weight") and not is_adapter("lm_head.weight")
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, tie_word_embeddings=True))
    roles = {g["role"]: len(g["params"]) for g in param_groups(tied, 0.0, 4.0)}
    assert roles == {"blocks": 7, "embeddings": 1, "norms": 3}  # q k v o gate up down; the tied table once


@pytest.mark.parametrize("shape", [(8, 1000), (64, 256)], ids=["short last block", "whole blocks"])
def test_8bit_moments_decode_as_bitsandbytes_stores_them(shape):
    """A rank-8 adapter on a 1,000-wide input has 8,000 values in 32 blocks of 256: the last block holds 64.
    Guessing the block size as ceil(8000 / 32) = 250 shifted every block after the first, so the magnitude
    reset zeroed the wrong entries."""
    from qrelora.quant import bnb_functional

    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(shape))
    opt = build_optimizer(OptimConfig(name="adamw8bit"), nn.ParameterList([p]), 1e-3, "cpu")
    for _ in range(3):
        (p * torch.randn(shape)).sum().backward()
        opt.step()
        opt.zero_grad()
    state, F = opt.state[p], bnb_functional()
    for key in ("state1", "state2"):
        suffix = key[-1]
        reference = F.dequantize_blockwise(state[key], absmax=state["absmax" + suffix], code=state["qmap" + suffix],
                                           blocksize=256)
        assert torch.equal(_decoded(state, key), reference.float()), key
