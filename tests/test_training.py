"""ReLoRA training dynamics through the real trainer: schedule, merges, resets, warm start."""

import io
import json
import math

import torch
from pathlib import Path

import pytest

from qrelora.recipe import load_recipe
from qrelora.memory import Estimator
from qrelora.monitor import PlainLog
from qrelora.relora import adapter_layers
import qrelora.models
import qrelora.optim
import qrelora.relora
import qrelora.train
from qrelora.train import Trainer

from test_schedule import reference_lr

ROOT = Path(__file__).resolve().parents[1]

SMALL = ["--model.preset=custom", "--model.hidden_size=64", "--model.num_layers=2", "--model.num_heads=4",
         "--model.mlp_size=128", "--data.seq_len=64", "--data.eval_tokens=2048", "--training.micro_batch_size=4",
         "--training.log_every=1", "--training.eval_every=0", "--relora.rank=8", "--relora.alpha=16"]


def run(tmp_path, *overrides):
    recipe = load_recipe(ROOT / "recipes" / "tiny.toml", [f"--run.output_dir={tmp_path}", *SMALL, *overrides])
    out = io.StringIO()
    result = Trainer(recipe, PlainLog(out)).run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return recipe, result, records, out.getvalue()


@pytest.mark.slow
def test_schedule_merges_and_warm_start_in_a_real_run(tmp_path):
    recipe, result, records, log = run(tmp_path, "--training.steps=40", "--training.warmup_steps=4",
                                       "--relora.warm_start_steps=10", "--relora.restart_every=10",
                                       "--relora.restart_warmup=3")
    t = recipe.training
    steps = [r for r in records if "lr" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    for r in steps:  # record "step" counts steps done; the lr is that of 0-based step r["step"] - 1
        expected = reference_lr(r["step"] - 1, t.lr, t.steps, t.warmup_steps, t.min_lr_ratio, 10, 3, 10)
        expected *= recipe.relora.lr_ratio if r["step"] > 10 else 1.0  # the ReLoRA phase's multiple
        assert r["lr"] == pytest.approx(expected, abs=1e-12), r["step"]
    switch = [r for r in records if r.get("event") == "relora_start"]
    assert [r["step"] for r in switch] == [10]  # exactly at the configured step
    merges = [r for r in records if r.get("event") == "merge"]
    assert [r["step"] for r in merges] == [20, 30, 40]
    by_step = {r["step"]: r for r in steps}
    for m in merges:
        assert by_step[m["step"]]["lr"] == 0.0      # the step just before a merge
        assert by_step[m["step"] - 1]["lr"] > 0     # the other side of the restart
        assert m["moments_zeroed"] == pytest.approx(0.99, abs=0.005)
        assert 0 < m["update_ratio"] < 1 and 0 < m["codes_changed"] < 1 and m["merge_s"] >= 0
    assert "switched to ReLoRA at step 10" in log and "merge 3 after step 40" in log
    assert result["last_eval_loss"] < result["first_eval_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("reset", ["magnitude", "random", "zero", "none"])
def test_several_restarts_with_each_reset_mode_do_not_diverge(tmp_path, reset):
    _, result, records, _ = run(tmp_path, f"--relora.reset={reset}", "--training.steps=48",
                                "--training.warmup_steps=4", "--relora.warm_start_steps=12",
                                "--relora.restart_every=6", "--relora.restart_warmup=2", "--training.lr=3e-3")
    losses = [r["loss"] for r in records if "loss" in r]
    assert all(math.isfinite(x) for x in losses)
    merges = [r for r in records if r.get("event") == "merge"]
    assert len(merges) == 6
    expected_zeroed = {"magnitude": 0.99, "random": 0.99, "zero": 1.0, "none": 0.0}[reset]
    assert all(m["moments_zeroed"] == pytest.approx(expected_zeroed, abs=0.01) for m in merges)
    # after the switch the loss keeps falling: the mean over the last cycle is below that at the switch
    after_switch = losses[12:18]
    assert sum(losses[-6:]) / 6 < sum(after_switch) / 6
    assert result["last_eval_loss"] < result["first_eval_loss"] - 0.5


@pytest.mark.slow
@pytest.mark.parametrize("bits,merge,optim", [(8, "error_feedback", "adamw8bit"), (16, "stochastic", "adamw"),
                                              (4, "naive", "paged_adamw8bit")])
def test_other_storage_merge_and_optimizer_combinations_train(tmp_path, bits, merge, optim):
    _, result, records, _ = run(tmp_path, f"--quant.bits={bits}", f"--quant.merge={merge}", f"--optim.name={optim}",
                                "--training.steps=24", "--training.warmup_steps=2", "--relora.warm_start_steps=0",
                                "--relora.restart_every=8", "--relora.restart_warmup=2")
    assert len([r for r in records if r.get("event") == "merge"]) == 3
    assert result["last_eval_loss"] < result["first_eval_loss"]


def test_relora_phase_after_a_warm_start_still_computes_in_bf16(tmp_path):
    """Re-preparing the model at the warm-start switch must not drop mixed precision."""
    recipe = load_recipe(ROOT / "recipes" / "tiny.toml", [f"--run.output_dir={tmp_path}", *SMALL,
                                                          "--training.steps=6", "--training.warmup_steps=1",
                                                          "--relora.warm_start_steps=3", "--relora.restart_every=3",
                                                          "--relora.restart_warmup=1"])
    trainer = Trainer(recipe, PlainLog(io.StringIO()))
    seen = []
    original = trainer.switch_to_relora

    def switch():
        original()
        layer = trainer.unwrapped.model.layers[0].self_attn.q_proj
        layer.register_forward_hook(lambda m, i, o: seen.append((o.dtype, torch.is_autocast_enabled("cpu"))))

    trainer.switch_to_relora = switch
    trainer.run()
    assert seen and all(s == (torch.bfloat16, True) for s in seen)


def _shape_recipe(*overrides):
    return load_recipe(ROOT / "recipes" / "tiny.toml", ["--model.preset=custom", "--model.hidden_size=128",
                                                        "--model.num_layers=3", "--model.num_heads=4",
                                                        "--model.mlp_size=384", "--relora.rank=8", *overrides])


def test_a_model_built_layer_by_layer_from_meta_is_initialised_like_a_fresh_one():
    from qrelora.memory import StorageTracker
    from qrelora.models import build_model, materialize
    from qrelora.relora import add_adapters

    recipe = _shape_recipe("--quant.merge=stochastic")  # no host copy: on CPU it would share the count
    fresh = build_model(recipe.model, vocab_size=300, seq_len=64)
    fp32_bytes = 4 * sum(p.numel() for p in fresh.parameters())
    tracker = StorageTracker()
    with tracker, tracker.in_phase("build"):
        model = build_model(recipe.model, vocab_size=300, seq_len=64, device="meta")
        add_adapters(model, recipe.relora, recipe.quant, device="cpu")
        materialize(model, "cpu")
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    # The finished model (NF4 linears) plus one fp32 layer at a time: far under the fp32 model.
    assert tracker.peak["build"] < 0.55 * fp32_bytes
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for n, m in model.named_modules() if n.endswith("norm"))
    for name in ("model.embed_tokens", "lm_head"):
        assert model.get_submodule(name).weight.std().item() == pytest.approx(0.02, rel=0.05)
    base = model.model.layers[1].mlp.up_proj.base.full_precision()
    assert base.std().item() == pytest.approx(0.02, rel=0.05) and abs(base.mean().item()) < 1e-3
    x = torch.randint(0, 300, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.lora_B.grad.abs().sum() > 0  # B starts at zero, A does not


def test_trainer_builds_layer_by_layer_when_the_fp32_model_would_not_fit(tmp_path, monkeypatch):
    """The path a 7B model takes into a 24 GB card, taken here on CPU: from step 0 the run is ReLoRA and
    the model is built on the meta device, each layer initialised and quantized in turn."""
    monkeypatch.setattr(qrelora.train, "initial_device", lambda *args: torch.device("meta"))
    recipe, result, records, log = run(tmp_path, "--training.steps=8", "--training.warmup_steps=2",
                                       "--relora.warm_start_steps=0", "--relora.restart_every=4",
                                       "--relora.restart_warmup=2")
    assert result["last_eval_loss"] < result["first_eval_loss"]
    assert sum(1 for r in records if r.get("event") == "merge") == 2


def test_where_the_trainer_builds():
    from qrelora.device import build_device_for

    gpu = torch.device("cuda")
    assert build_device_for(5 * 2**30, 24 * 2**30, True, gpu) == gpu
    assert build_device_for(27 * 2**30, 24 * 2**30, True, gpu).type == "meta"
    assert build_device_for(27 * 2**30, 24 * 2**30, False, gpu).type == "cpu"


def test_a_model_too_big_for_host_memory_is_built_layer_by_layer_on_cpu(monkeypatch):
    """On the CPU the same rule as on a GPU: a 7B model (25 GiB in fp32) going straight to ReLoRA is built
    on the meta device instead of whole in host memory (which a 24 GiB machine cannot hold)."""
    cpu = torch.device("cpu")
    seven_b = load_recipe(ROOT / "recipes" / "7b_24gb.toml", ["--training.device=cpu"])
    monkeypatch.setattr(qrelora.train, "free_memory", lambda device: 24 * 2**30)
    assert qrelora.train.initial_device(seven_b, 32000, cpu, True).type == "meta"
    assert qrelora.train.initial_device(seven_b, 32000, cpu, False) == cpu  # a warm start needs it whole
    tiny = load_recipe(ROOT / "recipes" / "tiny.toml")
    assert qrelora.train.initial_device(tiny, 8192, cpu, True) == cpu
    from qrelora.device import free_memory

    assert 0 < free_memory(cpu) < 2**50


def test_relora_phase_can_drop_activation_checkpointing(tmp_path):
    """relora.activation_checkpointing = false: the warm start recomputes activations, the ReLoRA phase does not
    (and so dequantizes each frozen weight again in its backward instead of keeping the recompute's)."""
    recipe = load_recipe(ROOT / "recipes" / "tiny.toml", [
        f"--run.output_dir={tmp_path}", *SMALL, "--training.steps=4", "--relora.warm_start_steps=2",
        "--relora.restart_every=2", "--relora.restart_warmup=1", "--training.activation_checkpointing=true",
        "--relora.activation_checkpointing=false", "--training.eval_every=0"])
    trainer = Trainer(recipe, PlainLog(io.StringIO()))
    try:
        model = trainer.unwrapped
        assert model.is_activation_checkpointing
        while trainer.state.step < 4:
            trainer.step()
        assert trainer.relora.active and not trainer.unwrapped.is_activation_checkpointing
        layers = adapter_layers(trainer.unwrapped)
        assert layers and not any(layer.keep_weight for layer in layers)
    finally:
        trainer.close()


def test_warm_start_switch_frees_the_replaced_linears_paged_optimizer_state(tmp_path, monkeypatch):
    """bitsandbytes keeps every paged 8-bit state in a process-wide list and never frees it, so dropping the
    warm start's optimizer at the switch kept the replaced linears' moments (about 2 GiB in the 1.3B recipe).
    On CPU bitsandbytes does not page; here its CUDA allocation is stood in for: every state buffer is flagged
    paged and registered as get_state_buffer does on CUDA, and the driver's free is recorded."""
    import bitsandbytes.functional as F
    from bitsandbytes.optim.optimizer import Optimizer8bit

    registry = []
    monkeypatch.setattr(F.GlobalPageManager.get_instance(), "paged_tensors", registry)

    def paged_buffer(self, p, dtype=torch.float32):
        buffer = torch.zeros_like(p, dtype=dtype)
        buffer.is_paged = True
        self.page_mng.paged_tensors.append(buffer)
        return buffer

    freed = []
    monkeypatch.setattr(Optimizer8bit, "get_state_buffer", paged_buffer)
    monkeypatch.setattr(Optimizer8bit, "prefetch_state", lambda self, p: None)  # a CUDA prefetch of paged memory
    monkeypatch.setattr(qrelora.optim, "free_paged", freed.append)
    recipe = load_recipe(ROOT / "recipes" / "tiny.toml", [f"--run.output_dir={tmp_path}", *SMALL, "--training.steps=4",
                                                          "--training.warmup_steps=1", "--relora.warm_start_steps=2",
                                                          "--relora.restart_every=2", "--relora.restart_warmup=1",
                                                          "--optim.name=paged_adamw8bit"])
    trainer = Trainer(recipe, PlainLog(io.StringIO()))
    trainer.step(), trainer.step()
    linears = {id(p) for _, m in qrelora.relora.target_linears(trainer.unwrapped) for p in m.parameters()}
    replaced = [t for p, state in trainer.optimizer.state.items() if id(p) in linears
                for t in state.values() if getattr(t, "is_paged", False)]
    assert len(replaced) == 2 * len(linears) and len(registry) > len(replaced)
    every_state = sum(t.numel() * t.element_size() for p, state in trainer.optimizer.state.items()
                      if id(p) in linears for k, t in state.items() if isinstance(t, torch.Tensor) and "qmap" not in k)
    estimate = Estimator(recipe, len(trainer.tokenizer), 2**40).estimate(compare_checkpointing=False)
    shared_code_tables = 2 * 256 * 4  # counted once in the estimate, shared by every 8-bit state
    assert estimate.phases[-1].released_at_switch == every_state + shared_code_tables
    trainer.step()  # the switch, then the first ReLoRA step
    live = [t for state in trainer.optimizer.state.values() for t in state.values() if getattr(t, "is_paged", False)]
    assert {id(t) for t in registry} == {id(t) for t in live}  # nothing but the live optimizer's states
    assert {id(t) for t in freed} == {id(t) for t in replaced}
    switch = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"relora_start"' in line]
    assert switch[0]["paged_freed"] == sum(t.numel() * t.element_size() for t in replaced) > 0
    trainer.close()


def test_embeddings_head_and_norms_train_at_their_multiple_in_every_phase(tmp_path):
    """training.embedding_lr_ratio: the full-rank warm start trains the block matrices at the schedule's rate and
    the embeddings, head and norms at the multiple; the ReLoRA phase (LoRA is the same run without restarts)
    keeps the multiple for them on the smooth envelope, not relora.lr_ratio, while the adapters take the jagged
    rate at relora.lr_ratio."""
    recipe = load_recipe(ROOT / "recipes" / "tiny.toml", [f"--run.output_dir={tmp_path}", *SMALL, "--training.steps=8",
                                                          "--training.warmup_steps=1", "--relora.warm_start_steps=4",
                                                          "--relora.restart_every=4", "--relora.restart_warmup=2",
                                                          "--relora.lr_ratio=3", "--training.embedding_lr_ratio=4"])
    trainer = Trainer(recipe, PlainLog(io.StringIO()))
    seen = []
    while trainer.state.step < 8:
        step = trainer.state.step
        trainer.step()
        rates = {g["role"]: g["lr"] for g in trainer.optimizer.param_groups}
        seen.append(sorted(rates))
        s = trainer.schedule
        if step < 4:
            assert rates["blocks"] == pytest.approx(s(step)) and rates["embeddings"] == pytest.approx(4 * s(step))
        else:
            assert rates["adapters"] == pytest.approx(s(step))
            assert rates["adapters"] == pytest.approx(3 * s.envelope(step) * s.restart_ramp(step))
            assert rates["embeddings"] == pytest.approx(4 * s.envelope(step)) and rates["embeddings"] > 0
        assert rates["norms"] == rates["embeddings"]
    assert seen[0] == ["blocks", "embeddings", "norms"] and seen[-1] == ["adapters", "embeddings", "norms"]
    trainer.close()


def test_the_peers_regular_group_takes_the_same_multiple(tmp_path):
    """GaLore's and APOLLO's parameters they do not project (embeddings, head, norms) train at the same multiple
    as every other method's (tools/bench_methods.py builds their groups)."""
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    from bench_methods import peer_groups

    model = qrelora.models.build_model(load_recipe(ROOT / "recipes" / "tiny.toml", SMALL).model, 64, 16)
    rest, projected = peer_groups(model, rank=4, embedding_lr_ratio=6.0)
    assert rest["lr_scale"] == 6.0 and projected["lr_scale"] == 1.0 and projected["rank"] == 4
    assert len(projected["params"]) == 7 * 2 and {p.ndim for p in projected["params"]} == {2}
    assert sum(p.numel() for g in (rest, projected) for p in g["params"]) == sum(p.numel() for p in model.parameters())
