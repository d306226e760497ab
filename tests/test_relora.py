"""The adapter layer and whole-model merges."""


from pathlib import Path

import pytest
import torch
from torch import nn

from qrelora.config import ModelConfig, QuantConfig, ReLoRAConfig
from qrelora.models import build_model
from qrelora.quant import DenseCodec, FourBitCodec, FrozenWeight, make_codec
from qrelora.models import enable_activation_checkpointing
from qrelora.relora import ReLoRALinear, adapter_layers, add_adapters, frozen_bytes, merge_and_reinit

VOCAB, SEQ = 256, 32
ROOT = Path(__file__).resolve().parents[1]


def tiny_model(seed=0):
    return build_model(ModelConfig(preset="custom", hidden_size=64, num_layers=2, num_heads=4, mlp_size=96),
                       VOCAB, SEQ, seed=seed)


def relora_model(bits, merge="exact", dtype="fp32", seed=0, rank=8):
    model = tiny_model(seed)
    add_adapters(model, ReLoRAConfig(enabled=True, rank=rank, alpha=16, dropout=0.0),
                 QuantConfig(bits=bits, merge=merge), training_dtype=dtype, seed=seed)
    return model


def randomize_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)


def tokens(seed=0, batch=2):
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def test_adapter_layer_equals_linear_with_merged_weight():
    lin = nn.Linear(96, 64, bias=True)
    layer = ReLoRALinear(lin, rank=8, alpha=16, dropout=0.0, codec=DenseCodec(torch.float32))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    ref = nn.Linear(96, 64)
    with torch.no_grad():
        ref.weight.copy_(lin.weight + layer.scale * layer.lora_B @ layer.lora_A)
        ref.bias.copy_(lin.bias)
    x = torch.randn(5, 96)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("keep_weight", [False, True])
def test_adapter_layer_output_and_gradients_are_those_of_its_formula(bits, dropout, keep_weight):
    """The layer's own autograd function against autograd through y = x W^T + s B A dropout(x) + bias, with W
    the dequantized frozen weight and the same dropout mask: output, and the gradients of x, A, B and bias."""
    layer = ReLoRALinear(nn.Linear(96, 64), rank=8, alpha=16, dropout=dropout,
                         codec=make_codec(QuantConfig(bits=bits), torch.float32))
    layer.keep_weight = keep_weight
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    w = layer.base.dequantize()
    A, B, bias = (p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.bias))
    x = torch.randn(2, 5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    y_ref = x_ref @ w.t() + layer.scale * nn.functional.dropout(x_ref, dropout) @ A.t() @ B.t() + bias
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for got, want in ((x.grad, x_ref.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad),
                      (layer.bias.grad, bias.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fresh_adapter_leaves_the_layer_unchanged_and_a_is_not_zero():
    lin = nn.Linear(64, 64, bias=False)
    layer = ReLoRALinear(lin, rank=4, alpha=8, dropout=0.0, codec=DenseCodec(torch.float32))
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), lin(x))
    assert layer.lora_A.abs().sum() > 0 and layer.lora_B.abs().sum() == 0


def test_adapter_init_is_seeded_by_layer_and_merge_not_by_the_global_stream():
    """Data-parallel ranks (whose global random streams part as soon as one draws a number the others do not)
    and a resumed run must re-initialise A identically after every merge."""
    def layer_after_merges(merges, global_draws):
        torch.manual_seed(global_draws)
        torch.rand(global_draws)  # each "rank" has drawn a different amount from the global stream
        layer = ReLoRALinear(nn.Linear(64, 32), rank=8, alpha=16, dropout=0.0, codec=DenseCodec(torch.float32),
                             seed=7)
        starts = [layer.lora_A.detach().clone()]
        for _ in range(merges):
            torch.rand(global_draws)
            with torch.no_grad():
                layer.lora_B.normal_()
            layer.merge_and_reinit()
            starts.append(layer.lora_A.detach().clone())
        return starts

    one, other = layer_after_merges(3, 1), layer_after_merges(3, 5)
    assert all(torch.equal(a, b) for a, b in zip(one, other))
    assert not torch.equal(one[0], one[1]) and not torch.equal(one[1], one[2])  # a fresh A at every merge
    bound = 1 / 64 ** 0.5  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert one[2].abs().max() <= bound and one[2].abs().max() > 0.9 * bound


def test_merge_leaves_16bit_model_function_unchanged():
    model = relora_model(16, dtype="fp32")
    randomize_adapters(model)
    x = tokens()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=x).logits
        report = merge_and_reinit(model)
        after = model(input_ids=x).logits
    assert report.layers == 14 and report.update_ratio > 0
    assert ((after - before).norm() / before.norm()).item() < 1e-5
    assert all(l.lora_B.abs().sum() == 0 for l in adapter_layers(model))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_merge_equals_model_built_from_quantized_master(bits):
    model = relora_model(bits, merge="exact")
    randomize_adapters(model)
    x = tokens()
    model.eval()
    with torch.no_grad():
        merge_and_reinit(model)
        merged = model(input_ids=x).logits
    # An independent model: plain LLaMA whose linears hold dequantize(quantize(master)).
    reference = tiny_model()
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if k in reference.state_dict()},
                              strict=False)
    layers = dict(model.named_modules())
    codec = adapter_layers(model)[0].base.codec
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(layers.get(name), ReLoRALinear):
                master = layers[name].base.full_precision()
                module.weight.copy_(codec.dequantize(codec.quantize(master), master.shape, torch.float32))
        expected = reference.eval()(input_ids=x).logits
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_adapters_get_gradients_through_activation_checkpointing(bits):
    model = relora_model(bits, dtype="bf16")
    for name, p in model.named_parameters():
        assert p.requires_grad
    enable_activation_checkpointing(model)
    model.train()
    train_two_steps_checking_adapter_grads(model, "cpu", vary_batch=True)


def train_two_steps_checking_adapter_grads(model, device="cpu", vary_batch=False):
    """Two bf16 AdamW steps; on the second every adapter's A and B must have a non-zero gradient (B starts
    at zero, so A's gradient is zero until B has moved once)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        x = tokens(step if vary_batch else 0).to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if step == 1:
            for layer in adapter_layers(model):
                assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("bits", [4, 8])
def test_checkpointed_backward_reuses_the_recomputed_weight(bits, monkeypatch):
    """Inside a checkpointed block a frozen weight is dequantized twice per micro-batch (forward, recompute)
    instead of three times, with exactly the same gradients; without checkpointing, twice (forward, backward)."""
    real = FrozenWeight.dequantize
    calls, grads = {}, {}
    for case in ("no checkpointing", "checkpointed, dequantize in backward", "checkpointed, reuse"):
        model = tiny_model()
        if case != "no checkpointing":
            enable_activation_checkpointing(model)
        layers = add_adapters(model, ReLoRAConfig(enabled=True, rank=8, alpha=16, dropout=0.0),
                              QuantConfig(bits=bits, merge="exact"), training_dtype="bf16")
        assert all(layer.keep_weight == (case != "no checkpointing") for layer in layers)
        if case == "checkpointed, dequantize in backward":
            for layer in layers:
                layer.keep_weight = False
        randomize_adapters(model)
        count = [0]

        def counting(self, dtype=torch.float32):
            count[0] += 1
            return real(self, dtype)

        monkeypatch.setattr(FrozenWeight, "dequantize", counting)
        model.train()
        x = tokens()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=x, labels=x).loss.backward()
        monkeypatch.undo()
        calls[case] = count[0] / len(layers)
        trainable = [p for p in model.parameters() if p.requires_grad]
        grads[case] = [p.grad for p in trainable if p.grad is not None]
    assert calls == {"no checkpointing": 2, "checkpointed, dequantize in backward": 3, "checkpointed, reuse": 2}
    assert len(grads["checkpointed, reuse"]) == len(trainable)
    for a, b in zip(grads["checkpointed, dequantize in backward"], grads["checkpointed, reuse"]):
        assert torch.equal(a, b)


def test_eval_without_grad_does_not_corrupt_4bit_weights():
    """bitsandbytes' Linear4bit repacks its weight in place on AVX-512-bf16 CPUs during a no-grad eval
    forward, after which training is wrong (bitsandbytes 0.50 on CPUs with AVX-512 bf16). Our layer must be immune."""
    model = relora_model(4)
    layer = adapter_layers(model)[0]
    before = {k: v.clone() for k, v in layer.base.stored().items()}
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=tokens())
    assert all(torch.equal(before[k], v) for k, v in layer.base.stored().items())


def test_frozen_base_and_trainables():
    model = relora_model(4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable)
    assert any("norm" in n for n in trainable)
    assert not any(n.endswith("proj.weight") for n, _ in model.named_parameters())
    packed, n = frozen_bytes(model)
    assert n == 2 * (4 * 64 * 64 + 3 * 64 * 96)


@pytest.mark.parametrize("bits,merge", [(4, "exact"), (4, "error_feedback"), (8, "stochastic"), (16, "exact")])
def test_model_state_dict_round_trip(bits, merge):
    a = relora_model(bits, merge)
    randomize_adapters(a)
    merge_and_reinit(a)
    randomize_adapters(a, seed=5)
    b = relora_model(bits, merge, seed=7)
    b.load_state_dict(a.state_dict())
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(input_ids=x).logits, b.eval()(input_ids=x).logits, rtol=0, atol=0)
        merge_and_reinit(a), merge_and_reinit(b)
        torch.testing.assert_close(a(input_ids=x).logits, b(input_ids=x).logits, rtol=0, atol=0)


def test_4bit_layer_on_bug_shape_matches_dequantized_reference():
    lin = nn.Linear(96, 32, bias=False)  # 96: multiple of 16, not of the blocksize 64
    layer = ReLoRALinear(lin, rank=4, alpha=4, dropout=0.0, codec=FourBitCodec("nf4", 64, True), merge="naive")
    x = torch.randn(3, 96)
    w = layer.base.dequantize()
    assert ((w - lin.weight).norm() / lin.weight.norm()).item() < 0.1
    torch.testing.assert_close(layer(x), x @ w.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 16])
def test_merge_inside_an_autocast_region_after_training(bits):
    """Autocast caches bf16 casts of parameters for as long as its region lasts; a merge there must not
    leave the old adapter values in that cache (which would count the update twice)."""
    model = relora_model(bits, dtype="bf16")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = tokens()
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=x).logits.float()
        merge_and_reinit(model)
        after = model(input_ids=x).logits.float()
    assert ((after - before).norm() / before.norm()).item() < {4: 0.06, 16: 0.01}[bits]


@pytest.mark.parametrize("merge", ["exact", "error_feedback"])
def test_residual_start_computes_the_full_precision_weight_and_merges_exactly(merge):
    """With relora.init = "residual" the stored codes plus s*B@A start near the full-precision weight W, nearer
    than the codes alone, and after k merges the weight is W plus exactly the sum of what the adapter learned in
    each cycle (s*B@A at the merge minus s*B0@A0 at the cycle's start)."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 128)
    w0 = linear.weight.detach().clone()
    layer = ReLoRALinear(linear, rank=16, alpha=16, dropout=0.0, codec=FourBitCodec("nf4", 64, True), merge=merge,
                         init="residual", init_iterations=3)
    zero = ReLoRALinear(nn.Linear(256, 128), rank=16, alpha=16, dropout=0.0, codec=FourBitCodec("nf4", 64, True))
    with torch.no_grad():
        zero.base.store(zero.base.codec.quantize(w0))
    computed = layer.base.dequantize() + layer.delta().detach()
    assert (computed - w0).norm() < 0.9 * (zero.base.dequantize() - w0).norm()  # 0.78 measured
    tolerance = 1e-6 if merge == "exact" else 1e-2  # error feedback keeps W - L in bf16
    torch.testing.assert_close(layer.effective_weight(), w0, rtol=0, atol=tolerance * w0.abs().max().item())

    expected = w0.clone()
    for k in range(3):
        start = layer.delta().detach()
        with torch.no_grad():  # what a cycle of training would do to the adapter
            layer.lora_A.add_(torch.randn_like(layer.lora_A) * 0.01)
            layer.lora_B.add_(torch.randn_like(layer.lora_B) * 0.01)
        expected += layer.delta().detach() - start
        layer.merge_and_reinit()
        assert layer.base.merges_done == k + 1
        torch.testing.assert_close(layer.effective_weight(), expected, rtol=0, atol=tolerance * expected.abs().max().item())
    assert layer.delta().detach().norm() > 0  # every restart starts from the residual again


def test_residual_start_is_refused_where_the_merge_keeps_no_full_precision_weight():
    from qrelora.config import RecipeError
    from qrelora.recipe import load_recipe

    with pytest.raises(RecipeError, match=r'init = .residual.: "residual" splits the low-rank part off'):
        load_recipe(ROOT / "recipes" / "tiny.toml", ["--relora.init=residual", "--quant.merge=naive"])
