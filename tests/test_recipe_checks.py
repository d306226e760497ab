"""What `qrelora train` refuses before training: shapes the model cannot have (checked against its real
dimensions when the recipe is loaded) and runs whose memory estimate exceeds this machine (the pre-flight);
and step counts given as fractions of training.steps."""

from __future__ import annotations

import json
import math
import time
import tomllib
from pathlib import Path

import pytest
import torch

import qrelora.memory.estimate
import qrelora.memory.train_checks
import qrelora.monitor  # noqa: F401 - imported by `train`; here so the timing below measures the checks only
import qrelora.train  # noqa: F401
from qrelora import checkpoint
from qrelora.cli import main
from qrelora.config import RecipeError, to_toml
from qrelora.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.toml"
SMALL = ["--model.preset=custom", "--model.hidden_size=64", "--model.num_layers=2", "--model.num_heads=4",
         "--model.mlp_size=128", "--data.seq_len=32", "--data.eval_tokens=256", "--training.micro_batch_size=2"]


def _train(tmp_path, capsys, *overrides, recipe=TINY) -> tuple[int, str]:
    code = main(["train", str(recipe), f"--run.output_dir={tmp_path / 'run'}", *overrides])
    return code, capsys.readouterr().err


def _hf_dir(path: Path, **config) -> Path:
    """A model directory as far as the recipe checks read it: a LLaMA config.json and a weights file (whose
    tensors the checks do not read)."""
    from safetensors.torch import save_file

    path.mkdir()
    base = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 300,
            "max_position_embeddings": 64, "tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(base | config))
    save_file({"lm_head.weight": torch.zeros(1)}, path / "model.safetensors")
    return path


# --------------------------------------------------------------------------------------------------
# Shapes, checked when the recipe is loaded


def test_impossible_rank_is_refused_at_once(tmp_path, capsys):
    start = time.perf_counter()
    code, err = _train(tmp_path, capsys, "--relora.rank=100000")
    seconds = time.perf_counter() - start
    assert code == 2
    assert "[relora] rank = 100000: must be at most 256" in err
    assert "--relora.rank=256 or lower" in err and "1,971M adapter parameters" in err
    assert seconds < 1.0, seconds  # before: the whole warm start, then an out-of-memory kill (exit 137)
    assert not (tmp_path / "run").exists()


def test_rank_limit_is_the_narrowest_layer_of_the_resolved_shape():
    load_recipe(TINY, ["--relora.rank=256"])  # hidden 256 of the tiny preset: allowed
    with pytest.raises(RecipeError, match=r"rank = 97: must be at most 96"):
        load_recipe(TINY, ["--model.mlp_size=96", "--relora.rank=97"])  # gate/up/down are 256 x 96
    load_recipe(TINY, ["--relora.enabled=false", "--relora.rank=100000"])  # no adapters, no limit


@pytest.mark.parametrize("overrides, expected", [
    (["--model.num_heads=3"], ['[model] num_heads = 3: must split hidden_size = 256', 'the "tiny" preset and '
                                "num_heads from the recipe", "Set num_heads = 2 or 4"]),
    (["--model.hidden_size=250"], ["[model] hidden_size = 250: must split", "a multiple of 8", "248 or 256"]),
    (["--model.hidden_size=12", "--model.num_heads=4"], ["num_heads = 4:", "a head would have 3 dimensions",
                                                         "rotary"]),
], ids=["heads from override", "hidden from override", "odd head size"])
def test_heads_must_split_hidden_into_even_heads(overrides, expected, tmp_path, capsys):
    code, err = _train(tmp_path, capsys, *overrides)
    assert code == 2, err
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "run").exists()


def test_init_from_config_gives_the_shape(tmp_path, capsys):
    model = _hf_dir(tmp_path / "hf", num_key_value_heads=1)  # grouped-query attention: k/v are 64 -> 16
    code, err = _train(tmp_path, capsys, f"--model.init_from={model}", "--data.seq_len=128", "--relora.rank=32",
                       "--model.hidden_size=128")
    assert code == 2
    assert "[data] seq_len = 128: the model in init_from" in err and "at most 64 positions" in err
    assert "--data.seq_len=64 or lower" in err
    assert "[relora] rank = 32: must be at most 16" in err and "k/v_proj 16 x 64" in err
    assert "[model] hidden_size = 128: the model comes from init_from" in err and "hidden_size = 64" in err
    assert "3 problem(s)" in err and not (tmp_path / "run").exists()
    load_recipe(TINY, [f"--model.init_from={model}", "--data.seq_len=64", "--relora.rank=16"])


def test_init_from_without_a_usable_config_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match=r"init_from = .*config.json does not exist"):
        load_recipe(TINY, [f"--model.init_from={tmp_path / 'empty'}"])
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    with pytest.raises(RecipeError, match=r"has no intermediate_size, num_attention_heads"):
        load_recipe(TINY, [f"--model.init_from={bert}"])


# --------------------------------------------------------------------------------------------------
# The pre-flight: tokenizer against init_from, memory estimate against this machine


def test_estimate_above_available_host_memory_is_refused_before_anything_is_written(tmp_path, capsys,
                                                                                     monkeypatch):
    monkeypatch.setattr(qrelora.memory.train_checks, "available_host_bytes", lambda: 40 * 2**20)
    code, err = _train(tmp_path, capsys, *SMALL, "--training.micro_batch_size=16")
    assert code == 2, err
    assert "MiB of host memory at its peak" in err and "this machine has 40.0 MiB available" in err
    assert "--training.micro_batch_size=" in err and "qrelora memory" in err  # the fix and where the details are
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1  # one paragraph
    assert not (tmp_path / "run").exists()


def test_cuda_run_is_checked_against_the_gpu_and_the_host(tmp_path, monkeypatch):
    """The CUDA branches on a CPU machine: the estimate is made on fake tensors for a CUDA device either way."""
    recipe = load_recipe(TINY, [*SMALL, f"--run.output_dir={tmp_path}"])
    monkeypatch.setattr(qrelora.memory.train_checks, "device_type", lambda r: "cuda")  # the check's branches
    monkeypatch.setattr(qrelora.memory.estimate, "device_type", lambda r: "cuda")  # the Estimator's figures
    monkeypatch.setattr(qrelora.memory.train_checks, "device_total_bytes", lambda: 20 * 2**20)
    refusal = qrelora.memory.preflight(recipe, str(TINY), SMALL)
    assert "GiB of GPU memory at its peak" in refusal and "the GPU has 20.0 MiB in all" in refusal
    assert "Not even a micro-batch of one sequence fits" in refusal and "--budget 20MiB" in refusal
    monkeypatch.setattr(qrelora.memory.train_checks, "device_total_bytes", lambda: 80 * 2**30)
    assert qrelora.memory.preflight(recipe, str(TINY), SMALL) is None
    monkeypatch.setattr(qrelora.memory.train_checks, "available_host_bytes", lambda: 100 * 2**10)
    refusal = qrelora.memory.preflight(recipe, str(TINY), SMALL)
    assert "besides the GPU, this run needs an estimated" in refusal and "master copy" in refusal
    assert "--quant.master=mmap" in refusal
    assert not tmp_path.joinpath("config.toml").exists()


def test_a_run_that_fits_passes_the_preflight(tmp_path):
    recipe = load_recipe(TINY, [*SMALL, f"--run.output_dir={tmp_path}"])
    assert qrelora.memory.preflight(recipe, str(TINY), SMALL) is None


def test_tokenizer_larger_than_the_init_from_vocabulary_is_refused(tmp_path, capsys):
    from qrelora.data import _train_sample_tokenizer

    tokenizer = _train_sample_tokenizer([f"line {i} of some text to learn from" for i in range(200)], vocab_size=300)
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    model = _hf_dir(tmp_path / "hf", vocab_size=len(tokenizer) - 10)
    code, err = _train(tmp_path, capsys, f"--model.init_from={model}", f"--data.tokenizer={tmp_path / 'tok'}",
                       "--data.seq_len=64")
    assert code == 2
    assert f"has {len(tokenizer)} entries, but the model in model.init_from" in err
    assert "--data.tokenizer=init_from" in err and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# Step counts as fractions of training.steps


def test_fractions_resolve_to_the_shipped_integers_and_scale_with_steps():
    r = load_recipe(TINY)
    assert (r.training.warmup_steps, r.relora.warm_start_steps, r.relora.restart_every) == (50, 300, 150)
    r = load_recipe(TINY, ["--training.steps=200"])
    assert (r.training.warmup_steps, r.relora.warm_start_steps, r.relora.restart_every) == (17, 100, 50)
    r = load_recipe(TINY, ["--training.steps=210"])
    assert (r.training.warmup_steps, r.relora.warm_start_steps, r.relora.restart_every) == (17, 104, 53)
    assert (210 - 104) % 53 == 0  # the warm start is placed so that the cycles are whole
    r = load_recipe(ROOT / "recipes" / "1b3_24gb.toml")
    assert (r.training.warmup_steps, r.relora.warm_start_steps, r.relora.restart_every) == (500, 10000, 5000)
    r = load_recipe(TINY, ["--relora.warm_start_steps=0", "--relora.restart_every=150"])  # integers still work
    assert (r.relora.warm_start_steps, r.relora.restart_every) == (0, 150)


def test_resolved_integers_go_to_config_toml_and_resume_compares_them(tmp_path):
    r = load_recipe(TINY, ["--training.steps=200"])
    saved = tmp_path / "step"
    saved.mkdir()
    (saved / "config.toml").write_text(to_toml(r))
    resolved = tomllib.loads(to_toml(r))
    assert resolved["relora"]["warm_start_steps"] == 100 and resolved["training"]["warmup_steps"] == 17
    assert "0.5 of training.steps" in to_toml(r)
    checkpoint.check_compatible(saved, load_recipe(TINY, ["--training.steps=200"]))  # same recipe, same integers
    with pytest.raises(checkpoint.CheckpointError, match="warm_start_steps"):
        checkpoint.check_compatible(saved, load_recipe(TINY, ["--training.steps=300"]))


@pytest.mark.parametrize("overrides, expected", [
    (["--relora.warm_start_steps=1.5"], ["warm_start_steps = 1.5 must be a whole number of steps or a fraction "
                                         "of training.steps between 0 and 1"]),
    (["--relora.warm_start_steps=200", "--relora.restart_every=100", "--training.steps=450"],
     ["restart_every = 100: must divide the ReLoRA phase (training.steps - relora.warm_start_steps = 450 - 200 = "
      "250)", "Set restart_every = 50 or 125, or training.steps = 400 or 500, or give warm_start_steps as a "
      "fraction of training.steps (e.g. 0.44)"]),
    (["--relora.warm_start_steps=200", "--training.steps=200"],
     ["warm_start_steps = 200: must be in [0, training.steps)", "as a fraction of training.steps"]),
    (["--training.steps=20"], ["restart_warmup = 10: must be shorter than a cycle, restart_every = 5 (0.25 of "
                               "training.steps = 20); set --relora.restart_warmup=0"]),
    (["--training.steps=4", "--relora.restart_every=2", "--relora.restart_warmup=1", "--relora.warm_start_steps=0",
      "--training.warmup_steps=1"],
     ["restart_warmup = 1: with restart_every = 2, 1 cycle of the ReLoRA phase (steps 1-2) gives the adapters no "
      "step at a learning rate above zero", "Set --relora.restart_warmup=0"]),
], ids=["not a fraction", "cycles not whole", "no ReLoRA phase", "cycle shorter than its warm-up",
        "a cycle with no adapter step"])
def test_step_count_messages_say_what_to_set(overrides, expected):
    with pytest.raises(RecipeError) as e:
        load_recipe(TINY, overrides)
    for fragment in expected:
        assert fragment in str(e.value), (fragment, str(e.value))


def test_a_cpu_run_is_estimated_where_the_trainer_builds_it():
    """As on CUDA (train.initial_device): whole in fp32 when that takes under half the budget, else, going
    straight to ReLoRA, layer by layer from the meta device, so the pre-flight counts what the build holds."""
    from qrelora.memory import Estimator
    from qrelora.models import fp32_model_bytes

    recipe = load_recipe(TINY, [*SMALL, "--relora.warm_start_steps=0", "--relora.restart_every=100",
                                "--training.warmup_steps=10"])
    fp32 = fp32_model_bytes(recipe.model, 8192, recipe.data.seq_len)
    build = lambda budget: Estimator(recipe, 8192, budget).estimate(compare_checkpointing=False).phases[0].parts["build"]  # noqa: E731
    assert build(2**30) == {"full-rank weights": fp32}
    by_layer = build(fp32)
    assert by_layer["full-rank weights"] < fp32 and by_layer["build workspace"] > 0  # embeddings and head only


def test_largest_micro_batch_on_cpu_takes_few_estimates():
    """On CPU the budget holds the host copies too (here the exact merges' fp32 master, 7 MiB: several
    sequences' worth at 8 tokens). The prediction leaves room for them, and a miss is settled by bisection:
    walking down one sequence per estimate took 30 estimates (165 s) for a 1.3B model on CPU."""
    from qrelora.memory import Estimator

    recipe = load_recipe(TINY, ["--model.num_layers=2", "--data.seq_len=8", "--data.eval_tokens=64",
                                "--training.micro_batch_size=4", "--relora.warm_start_steps=0",
                                "--relora.restart_every=100", "--training.warmup_steps=10"])
    estimator = Estimator(recipe, 8192, budget=0)
    at = estimator.estimate(compare_checkpointing=False)
    assert at.host_need > 5 * 2**20
    estimator.budget = estimator.estimate(24, compare_checkpointing=False).need
    calls = []
    estimate = estimator.estimate
    estimator.estimate = lambda m, **kw: calls.append(m) or estimate(m, **kw)
    largest = estimator.largest_micro_batch(at)
    assert estimate(largest, compare_checkpointing=False).need <= estimator.budget
    assert estimate(largest + 1, compare_checkpointing=False).need > estimator.budget
    assert len(calls) <= 3 + math.ceil(math.log2(largest + 1)), calls


@pytest.mark.parametrize("overrides", [["--relora.lr_ratio=0"], ["--relora.lr_ratio=12"],
                                       ["--training.lr=0.2", "--relora.lr_ratio=6"]],
                         ids=["zero", "too large", "rate above 1"])
def test_relora_lr_ratio_range_is_checked(overrides):
    with pytest.raises(RecipeError) as e:
        load_recipe(TINY, overrides)
    assert "lr_ratio" in str(e.value) and "must be in (0, 10]" in str(e.value)
    assert load_recipe(TINY, ["--relora.lr_ratio=1.5"]).relora.lr_ratio == 1.5
