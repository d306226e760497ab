"""The memory tool: exact tensor layouts, the storage tracker, estimate against measurement, the command."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from qrelora.cli import main
from qrelora.config import QuantConfig
from qrelora.recipe import load_recipe
from qrelora.memory import (HOST_CATEGORIES, GiB, Estimator, Simulator, StorageTracker, bytes_by_role, measure,
                            parse_bytes)
from qrelora.optim import OPTIMIZERS, build_optimizer
from qrelora.quant import STORAGE_FORMATS, FourBitCodec
from qrelora.relora import add_adapters

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.toml"
# A few-second model: 2 blocks of width 64, 32-token sequences, the built-in 8192-entry tokenizer.
SMALL = ["--model.preset=custom", "--model.hidden_size=64", "--model.num_layers=2", "--model.num_heads=4",
         "--model.mlp_size=160", "--data.seq_len=32", "--training.micro_batch_size=4", "--relora.rank=8"]
STORAGE_KINDS = {
    "nf4 double quant": ["--quant.bits=4", "--quant.double_quant=true"],
    "fp4 plain scales": ["--quant.bits=4", "--quant.type=fp4", "--quant.double_quant=false", "--quant.blocksize=128"],
    "int8": ["--quant.bits=8"],
    "bf16": ["--quant.bits=16"],
    "nf4 error feedback": ["--quant.bits=4", "--quant.merge=error_feedback"],
}


@pytest.mark.parametrize("codec", [STORAGE_FORMATS[(bits, t)].for_recipe(QuantConfig(bits=bits, type=t or "nf4"),
                                                                    torch.bfloat16) for bits, t in STORAGE_FORMATS]
                         + [FourBitCodec("fp4", 128, False)], ids=lambda c: c.name)
@pytest.mark.parametrize("shape", [(96, 96), (33, 65), (256, 704)])
def test_codec_layout_is_what_quantize_stores(codec, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed = codec.quantize(torch.randn(shape))
    assert {k: (tuple(v.shape), v.dtype) for k, v in packed.items()} == \
        {k: (tuple(s), d) for k, (s, d) in codec.layout(torch.Size(shape)).items()}


@pytest.mark.parametrize("kind", STORAGE_KINDS)
def test_category_bytes_equal_the_real_tensors(kind):
    """The fake model's categories against the same model built for real, converted with the real codec."""
    from qrelora.models import build_model

    recipe = load_recipe(TINY, SMALL + STORAGE_KINDS[kind])
    fake = Simulator(recipe, 8192, relora=True, checkpointing=False)
    real = build_model(recipe.model, vocab_size=8192, seq_len=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        add_adapters(real, recipe.relora, recipe.quant, training_dtype=recipe.training.dtype)
    expected = bytes_by_role(real)
    assert {k: v for k, v in fake.static.items() if k != "gradients"} == expected
    trainable = [p for p in real.parameters() if p.requires_grad]
    assert fake.static["gradients"] == sum(p.numel() * p.element_size() for p in trainable)
    assert expected["frozen weights"] > 0 and expected["adapters"] > 0


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_optimizer_state_bytes_equal_the_real_state(name):
    from qrelora.config import OptimConfig

    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.LayerNorm(200))  # 8-bit and 32-bit states
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = build_optimizer(OptimConfig(name=name), model, 1e-3, "cpu")
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0}
    assert OPTIMIZERS[name].state_bytes(list(model.parameters())) == sum(storages.values())


def test_tracker_counts_new_storage_once_and_releases_it():
    tracker = StorageTracker()
    a = torch.zeros(1000)
    tracker.register(a, "weights")
    with tracker, tracker.in_phase("work"):
        view = a.view(10, 100)   # no new memory
        a.add_(1)                # in place: none either
        b = a * 2                # 4000 new bytes
        c = b[:10].clone()       # 40 more
        del b                    # freed
    assert tracker.peak["work"] == 4000 + 4000 + 40
    assert tracker.total == 4000 + 40
    assert tracker.by_category("work") == {"weights": 4000, "activations": 4040}
    del c, view
    assert tracker.total == 4000


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * GiB
    assert parse_bytes("24 GB") == 24 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5GiB") == int(1.5 * GiB)
    assert parse_bytes("1000") == 1000
    for bad in ("lots", "-1GiB", "0", "24 GiBs"):
        with pytest.raises(ValueError, match="not a memory size"):
            parse_bytes(bad)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["warm start, no checkpointing", "checkpointing, accumulation, int8",
                                     "residual start"])
def test_estimate_within_ten_percent_of_measured_steps(setting, tmp_path):
    """Real CPU steps (a full-rank warm start, then ReLoRA ending in a merge), measured by tracking every
    real tensor, against the estimate made without running anything."""
    extra = {"warm start, no checkpointing": [],
             "checkpointing, accumulation, int8": ["--training.activation_checkpointing=true",
                                                   "--training.grad_accum=2", "--quant.bits=8"],
             "residual start": ["--relora.init=residual", "--relora.init_iterations=2"]}[setting]
    recipe = load_recipe(TINY, SMALL + extra + [f"--run.output_dir={tmp_path}"])
    estimate = Estimator(recipe, 8192, GiB).estimate()
    measured = measure(recipe, 4)
    peak = max(v for moments in measured.peaks.values() for v in moments.values())
    from qrelora.memory import comparison

    rows = comparison(estimate, measured)
    assert {(r["phase"], r["moment"]) for r in rows} >= {("ReLoRA", "backward"), ("ReLoRA", "merge"),
                                                         ("ReLoRA", "optimizer step")}
    for r in rows:
        assert abs(r["estimated"] - r["measured"]) <= 0.10 * peak, r
    assert measured.peaks["ReLoRA"]["backward"] > measured.peaks["ReLoRA"]["merge"]
    merge = next(r for r in rows if r["moment"] == "merge")
    assert abs(merge["estimated"] - merge["measured"]) <= 0.10 * merge["measured"], merge  # its own moment too


def test_largest_micro_batch_is_the_boundary():
    recipe = load_recipe(TINY, SMALL)
    budget = 64 * 2**20
    estimator = Estimator(recipe, 8192, budget)
    largest = estimator.largest_micro_batch(estimator.estimate(compare_checkpointing=False))
    assert largest >= 1
    assert estimator.estimate(largest, compare_checkpointing=False).need <= budget
    assert estimator.estimate(largest + 1, compare_checkpointing=False).need > budget


def test_checkpointing_lowers_the_activations():
    recipe = load_recipe(TINY, SMALL + ["--model.num_layers=4", "--training.activation_checkpointing=true"])
    phase = Estimator(recipe, 8192, GiB).estimate().phases[-1]
    assert phase.activations[True] < phase.activations[False]


def test_disk_estimate_is_what_the_run_writes(tmp_path):
    """The disk line of the memory tool comes from each phase's fake model; a real run's checkpoints are that
    size, and as many exist at once as it says."""
    import io

    from qrelora.monitor import PlainLog
    from qrelora.train import Trainer

    recipe = load_recipe(TINY, SMALL + [f"--run.output_dir={tmp_path}", "--training.steps=4", "--training.warmup_steps=1",
                                        "--relora.warm_start_steps=2", "--relora.restart_every=2",
                                        "--relora.restart_warmup=1", "--checkpoint.every=1", "--checkpoint.keep_last=2"])
    e = Estimator(recipe, 8192, GiB).estimate(compare_checkpointing=False)
    assert e.checkpoints_at_once == 3  # keep_last + the one being written

    written = []
    trainer = Trainer(recipe, PlainLog(io.StringIO()))
    save = trainer.save_checkpoint

    def save_and_measure():
        path = save()
        written.append(sum(f.stat().st_size for f in path.iterdir()))
        return path

    trainer.save_checkpoint = save_and_measure
    trainer.run()
    for phase, size in zip(e.phases, (written[0], written[-1])):  # step 1: warm start; the end: ReLoRA
        assert phase.checkpoint_bytes <= size <= 1.02 * phase.checkpoint_bytes + 200_000, (phase.name, size)
    assert e.disk_need == 3 * max(p.checkpoint_bytes for p in e.phases)  # no memory-mapped master here


def test_memory_command_json_is_one_object(capsys):
    code = main(["memory", str(TINY), *SMALL, "--json"])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)  # the whole of stdout
    assert report["fits"] is True and report["budget"] == 24 * GiB
    assert report["largest_micro_batch"] >= 4
    assert [p["name"].split(" (")[0] for p in report["phases"]] == ["full-rank warm start", "ReLoRA"]
    relora = report["phases"][1]
    assert {"frozen weights", "adapters", "full-rank weights", "optimizer states", "activations",
            "logits and loss"} <= set(relora["device"])
    assert relora["need"] == sum(relora["device"].values())
    assert {"master copy", "rank-probe copies"} <= set(relora["host"])
    assert set(relora["activations"]) == {"checkpointing_on", "checkpointing_off"}
    assert report["disk_need"] >= max(p["checkpoint_bytes"] for p in report["phases"]) > 0


def test_memory_command_exit_codes(tmp_path, capsys):
    assert main(["memory", str(TINY), *SMALL, "--budget", "1MiB"]) == 3
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "even one sequence does not fit" in out
    assert main(["memory", str(TINY), *SMALL, "--budget", "lots"]) == 2
    assert "24GiB" in capsys.readouterr().err
    assert main(["memory", str(TINY), *SMALL, "--measure", "1"]) == 2
    assert "at least 2 steps" in capsys.readouterr().err
    assert main(["memory", str(tmp_path / "absent.toml")]) == 2
    assert main(["memory", str(TINY), "--training.micro_batch_size=0"]) == 2


def test_memory_command_measures_on_cpu(tmp_path, capsys):
    code = main(["memory", str(TINY), *SMALL, f"--run.output_dir={tmp_path}", "--measure", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    moments = {(r["phase"], r["moment"]) for r in report["measured"]["moments"]}
    assert ("ReLoRA", "merge") in moments and ("full-rank", "backward") in moments
    assert report["measured"]["categories"]["ReLoRA"]["categories"]


def test_hub_tokenizer_not_cached_assumes_the_llama_vocabulary(capsys):
    recipe = load_recipe(TINY, SMALL + ["--data.tokenizer=nobody/not-a-tokenizer"])
    from qrelora.memory import vocab_size_of

    size, source = vocab_size_of(recipe)
    assert size == 32000 and "assumed" in source and "--vocab-size" in source


def test_out_of_memory_in_train_prints_the_estimate_and_a_fix(monkeypatch, tmp_path, capsys):
    import qrelora.train

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(qrelora.train, "train", out_of_memory)
    code = main(["train", str(TINY), *SMALL, "--training.micro_batch_size=64", "--training.grad_accum=2",
                 f"--run.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 1
    assert "out of device memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in err
    assert "The estimate for this recipe is" in err and "qrelora memory" in err
    assert "Traceback" not in err


def test_init_from_a_model_directory_is_estimated_from_its_config(tmp_path):
    from qrelora.memory import vocab_size_of
    from qrelora.models import build_model, materialize
    from qrelora.pretrained import fill_from, meta_model

    recipe = load_recipe(TINY, SMALL)
    model = build_model(recipe.model, vocab_size=300, seq_len=32)
    model.save_pretrained(tmp_path / "hf")
    recipe = load_recipe(TINY, SMALL + [f"--model.init_from={tmp_path / 'hf'}"])
    assert vocab_size_of(recipe) == (300, str(tmp_path / "hf"))
    relora = Estimator(recipe, 300, GiB).estimate().phases[-1]
    real = meta_model(tmp_path / "hf")
    materialize(real, "cpu", fill_from(tmp_path / "hf", real, allow_pickle=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        add_adapters(real, recipe.relora, recipe.quant, training_dtype=recipe.training.dtype)
    device = {k: v for k, v in bytes_by_role(real).items() if k not in HOST_CATEGORIES}
    assert relora.after_build == device and device["adapters"] > 0


def test_fit_takes_each_checkpointing_settings_largest_micro_batch_at_the_same_tokens_per_step():
    from qrelora.memory.fit import candidates, with_setting

    recipe = load_recipe(TINY, SMALL + ["--model.num_layers=4", "--training.micro_batch_size=32",
                                        "--training.grad_accum=2"])

    def need(setting, micro, budget=GiB):
        r = with_setting(recipe, setting, micro, 64 // micro)
        return Estimator(r, 8192, budget).estimate(compare_checkpointing=False).need

    assert need("on", 32) < need("warm start only", 32) < need("off", 32)
    budget = (need("on", 32) + need("warm start only", 32)) // 2  # micro-batch 32 fits only with checkpointing
    found = candidates(recipe, 8192, budget)
    assert [c.checkpointing for c in found] == ["off", "warm start only", "on"]  # all fit: fewest recomputes first
    for c in found:
        assert c.fits and c.micro_batch_size * c.grad_accum == 64 and c.need <= budget
        bigger = [d for d in range(c.micro_batch_size + 1, 65) if 64 % d == 0]
        if bigger:  # the next divisor of the 64 sequences per step does not fit
            assert need(c.checkpointing, bigger[0], budget) > budget
    assert found[0].micro_batch_size < 32 and found[1].micro_batch_size < 32 <= found[2].micro_batch_size
    assert found[1].overrides()[-2:] == ["--training.activation_checkpointing=true",
                                         "--relora.activation_checkpointing=false"]


def test_relora_phase_without_checkpointing_is_estimated_as_such():
    on = load_recipe(TINY, SMALL + ["--training.activation_checkpointing=true"])
    off = load_recipe(TINY, SMALL + ["--training.activation_checkpointing=false"])
    mixed = load_recipe(TINY, SMALL + ["--training.activation_checkpointing=true", "--relora.activation_checkpointing=false"])
    phases = {name: Estimator(r, 8192, GiB).estimate(compare_checkpointing=False).phases
              for name, r in (("on", on), ("off", off), ("mixed", mixed))}
    assert phases["mixed"][0].need == phases["on"][0].need  # the warm start: checkpointed
    assert phases["mixed"][1].need == phases["off"][1].need  # the ReLoRA phase: not
    assert phases["on"][1].need < phases["off"][1].need


def test_memory_fit_command_measures_each_candidate(tmp_path, capsys):
    code = main(["memory", str(TINY), *SMALL, f"--run.output_dir={tmp_path}", "--fit", "--measure", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    found = report["candidates"]
    assert {c["checkpointing"] for c in found} == {"off", "warm start only", "on"}
    assert all(c["fits"] and c["tokens_per_s"] > 0 for c in found)
    assert found[0]["tokens_per_s"] >= found[1]["tokens_per_s"]
    assert "--relora.activation_checkpointing=" in found[0]["overrides"][-1]
    assert main(["memory", str(TINY), *SMALL, "--fit", "--budget", "1MiB"]) == 3
    assert "nothing fits" in capsys.readouterr().out
