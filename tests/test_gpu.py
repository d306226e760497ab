"""The quantized layers on CUDA (bitsandbytes' GPU kernels). Skipped on machines without CUDA."""

import pytest
import torch

from qrelora.config import QuantConfig, ReLoRAConfig
from qrelora.quant import EightBitCodec, FourBitCodec, FrozenWeight
from qrelora.relora import ReLoRALinear, add_adapters, merge_and_reinit
from qrelora.models import enable_activation_checkpointing

from test_relora import randomize_adapters, tiny_model, tokens, train_two_steps_checking_adapter_grads

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
CODECS = {"nf4": lambda: FourBitCodec("nf4", 64, True), "fp4": lambda: FourBitCodec("fp4", 64, False),
          "int8": lambda: EightBitCodec(256)}


@pytest.mark.parametrize("name", CODECS)
def test_cuda_kernels_agree_with_reference_and_cpu(name):
    w = torch.randn(512, 96 * 4, generator=torch.Generator().manual_seed(0)) * 0.02
    codec = CODECS[name]()
    packed = codec.quantize(w.to(CUDA))
    fast = codec.dequantize(packed, w.shape, torch.float32)
    reference = codec.dequantize_reference(packed, w.shape, torch.float32)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-7)
    # CPU and CUDA kernels may round a rare tie differently; the results must be the same format error.
    cpu = codec.dequantize(codec.quantize(w), w.shape, torch.float32)
    assert ((fast.cpu() - cpu).norm() / w.norm()).item() < 1e-2


@pytest.mark.parametrize("name", CODECS)
def test_exact_merge_on_cuda_keeps_master_on_host(name):
    w = torch.randn(256, 512, device=CUDA) * 0.02
    frozen = FrozenWeight(w, CODECS[name](), "exact")
    assert frozen.host.tensor.device.type == "cpu" and frozen.device.type == "cuda"
    delta = torch.randn_like(w) * 1e-3
    frozen.merge(delta.clone())
    expected = frozen.codec.quantize(w + delta)
    torch.testing.assert_close(frozen.full_precision(), (w + delta).cpu(), rtol=0, atol=1e-7)
    for key, t in expected.items():
        assert torch.equal(frozen.stored()[key], t), key


def test_exact_merge_of_a_1b3_layer_needs_one_layer_of_workspace():
    w = torch.randn(5461, 2048, device=CUDA) * 0.02
    frozen = FrozenWeight(w, FourBitCodec("nf4", 64, True), "exact")
    del w
    layer_fp32 = 5461 * 2048 * 4
    delta = torch.randn(5461, 2048, device=CUDA) * 1e-4
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    frozen.merge(delta)  # the only reference is handed over... except this test's `delta`
    del delta
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # The fp32 master copy (1.0) plus bitsandbytes' quantization buffers: 1.38 measured on an H200.
    assert extra <= 1.5 * layer_fp32, extra / layer_fp32


@pytest.mark.parametrize("bits,bound", [(4, 0.53), (8, 1.07)])
def test_bytes_per_parameter_on_cuda(bits, bound):
    lin = torch.nn.Linear(2048, 5632, bias=False, device=CUDA)
    layer = ReLoRALinear(lin, rank=8, alpha=8, dropout=0.0,
                         codec=FourBitCodec("nf4", 64, True) if bits == 4 else EightBitCodec(256), merge="naive")
    assert all(t.is_cuda for t in layer.base.stored().values())
    assert layer.base.packed_bytes() / layer.base.numel() <= bound


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_training_step_and_merge_on_cuda(bits):
    model = tiny_model()
    add_adapters(model, ReLoRAConfig(enabled=True, rank=8, alpha=16, dropout=0.0), QuantConfig(bits=bits),
                 training_dtype="bf16", device=CUDA)
    model.to(CUDA)
    enable_activation_checkpointing(model)
    train_two_steps_checking_adapter_grads(model, CUDA)
    x = tokens().to(CUDA)
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        before = model(input_ids=x).logits.float()
        merge_and_reinit(model)  # inside the autocast region: the merge must clear autocast's cast cache
        after = model(input_ids=x).logits.float()
    # bf16 compute: the merge moves the stored weight by at most one rounding of its format
    assert ((after - before).norm() / before.norm()).item() < {4: 0.1, 8: 0.02, 16: 0.01}[bits]


def test_16bit_fp32_merge_is_exact_on_cuda():
    model = tiny_model()
    add_adapters(model, ReLoRAConfig(enabled=True, rank=8, alpha=16, dropout=0.0), QuantConfig(bits=16),
                 training_dtype="fp32", device=CUDA)
    model.to(CUDA).eval()
    randomize_adapters(model)
    x = tokens().to(CUDA)
    with torch.no_grad():
        before = model(input_ids=x).logits
        merge_and_reinit(model)
        after = model(input_ids=x).logits
    assert ((after - before).norm() / before.norm()).item() < 1e-5


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit"])
def test_moment_reset_of_8bit_optimizers_on_cuda(name):
    from qrelora.config import OptimConfig
    from qrelora.optim import _decoded, build_optimizer, prune_adapter_moments

    model = torch.nn.Linear(512, 256, device=CUDA)
    opt = build_optimizer(OptimConfig(name=name), model, 1e-3, "cuda")
    for _ in range(3):
        model(torch.randn(8, 512, device=CUDA)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    zeroed = prune_adapter_moments(opt, [model.weight], "magnitude", 0.99)
    state = opt.state[model.weight]
    m1, m2 = _decoded(state, "state1"), _decoded(state, "state2")
    assert zeroed == pytest.approx(0.99, abs=0.002)
    assert ((m1 == 0) == (m2 == 0)).all()
    model(torch.randn(8, 512, device=CUDA)).square().mean().backward()
    opt.step()
    assert torch.isfinite(model.weight).all()


# A model whose tensors are large next to the CUDA allocator's 512-byte rounding.
MEASURED = ["--model.preset=custom", "--model.hidden_size=256", "--model.num_layers=4", "--model.num_heads=4",
            "--model.mlp_size=704", "--data.seq_len=128", "--training.micro_batch_size=8", "--relora.rank=16",
            "--training.device=cuda", "--training.activation_checkpointing=true"]


def test_memory_measure_on_cuda_agrees_with_the_estimate_and_writes_a_snapshot(tmp_path):
    from pathlib import Path

    from qrelora.recipe import load_recipe
    from qrelora.memory import GiB, Estimator, comparison, measure

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "tiny.toml",
                         MEASURED + [f"--run.output_dir={tmp_path}"])
    estimate = Estimator(recipe, 8192, 24 * GiB).estimate()
    measured = measure(recipe, 4)
    assert Path(measured.snapshot).is_file() and Path(measured.snapshot).parent == tmp_path / "memory"
    peak = max(v for moments in measured.peaks.values() for v in moments.values())
    for row in comparison(estimate, measured):
        assert abs(row["estimated"] - row["measured"]) <= 0.10 * peak, row
        assert row["reserved"] >= row["measured"]


def test_out_of_memory_while_measuring_exits_3_with_a_snapshot(tmp_path, capsys):
    from pathlib import Path

    from qrelora.cli import main

    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(64 * 2**20 / total)  # a 64 MiB card
    try:
        code = main(["memory", str(Path(__file__).parents[1] / "recipes" / "tiny.toml"), *MEASURED,
                     "--training.micro_batch_size=64", f"--run.output_dir={tmp_path}", "--measure", "2"])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    err = capsys.readouterr().err
    assert code == 3 and "out of device memory while measuring" in err
    assert (tmp_path / "memory" / "memory_snapshot.pickle").is_file()


def test_layer_by_layer_build_trains_on_cuda(tmp_path, monkeypatch):
    """The 7B path (meta-device build, each layer initialised and quantized on the GPU) on a small model."""
    from pathlib import Path

    from qrelora.recipe import load_recipe
    from qrelora.monitor import PlainLog
    from qrelora.train import Trainer

    monkeypatch.setattr(Trainer, "_build_device", lambda self: torch.device("meta"))
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "tiny.toml",
                         MEASURED + [f"--run.output_dir={tmp_path}", "--training.steps=8", "--training.warmup_steps=2",
                                     "--relora.warm_start_steps=0", "--relora.restart_every=4",
                                     "--relora.restart_warmup=2", "--data.eval_tokens=2048"])
    trainer = Trainer(recipe, PlainLog(enabled=False))
    assert all(t.is_cuda for t in trainer.unwrapped.parameters())
    result = trainer.run()
    assert result["last_eval_loss"] < result["first_eval_loss"]


def test_released_paged_optimizer_state_goes_back_to_the_driver():
    """bitsandbytes never frees a paged state; release_state takes it out of bitsandbytes' registry and hands its
    managed memory back (filled on the device by bitsandbytes, so it was resident there)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from qrelora.optim import release_state

    p = torch.nn.Parameter(torch.randn(4096, 4096, device=CUDA))
    optimizer = bnb.optim.PagedAdamW8bit([p])
    p.grad = torch.randn_like(p)
    optimizer.step()
    states = [optimizer.state[p]["state1"], optimizer.state[p]["state2"]]
    assert all(getattr(t, "is_paged", False) for t in states)
    ids = {id(t) for t in states}
    del states
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    freed = release_state(optimizer, [p])
    free_after = torch.cuda.mem_get_info()[0]
    assert freed == 2 * p.numel() and p not in optimizer.state
    assert not any(id(t) in ids for t in F.GlobalPageManager.get_instance().paged_tensors)
    assert free_after - free_before >= 0.9 * freed, (free_before, free_after, freed)
