"""Recipes and the command line: validation, exit codes, what a run writes."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from qrelora.cli import main
from qrelora.config import RecipeError
from qrelora.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))


# Recipes for a model of the user's: their model is given on the command line (here, a shape without weights).
GIVEN = {"continue_7b_24gb.toml": [f"--model.init_from={ROOT / 'recipes' / 'shapes' / 'llama-7b'}"]}


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path, GIVEN.get(path.name, []))
    assert recipe.run.name == path.stem


GOOD = """
[model]
preset = "tiny"
[data]
seq_len = 32
eval_tokens = 64
[training]
steps = 10
warmup_steps = 2
"""

# (recipe text or None for GOOD, overrides, expected fragments of the message)
BAD = {
    "unknown section": ("[modle]\npreset = 'tiny'\n", [], ["unknown section [modle]", "did you mean 'model'"]),
    "unknown key": ("[training]\nstesp = 10\n", [], ["[training] unknown key 'stesp'", "did you mean 'steps'"]),
    "wrong type": ("[training]\nsteps = 'ten'\n", [], ["[training] steps = 'ten' must be an integer"]),
    "bool as int": ("[training]\nsteps = true\n", [], ["steps = True must be an integer"]),
    "bad choice": ("[quant]\nbits = 3\n", [], ["[quant] bits = 3 must be one of 4, 8, 16"]),
    "out of range": ("[training]\nlr = -0.1\n", [], ["[training] lr = -0.1: must be in (0, 1]"]),
    "not toml": ("[training\nsteps = 1\n", [], ["not valid TOML"]),
    "override unknown key": (None, ["--training.stpes=5"], ["command line: [training] unknown key 'stpes'",
                                                             "did you mean 'steps'"]),
    "override wrong type": (None, ["--relora.rank=big"], ["[relora] rank = 'big' must be an integer"]),
    "override unknown section": (None, ["--trainer.steps=5"], ["unknown section [trainer]"]),
    "override malformed": (None, ["--training.steps"], ["must look like --section.key=value"]),
    "cycle does not divide": (None, ["--relora.enabled=true", "--relora.restart_every=4"],
                              ["[relora] restart_every = 4: must divide the ReLoRA phase"]),
    "warm-up longer than cycle": (None, ["--relora.enabled=true", "--relora.restart_every=5",
                                         "--relora.restart_warmup=5"], ["restart_warmup = 5: must be shorter than"]),
    "missing data file": (None, ["--data.dataset=./nowhere/corpus.txt"],
                          ["[data] dataset = './nowhere/corpus.txt': path does not exist"]),
    "betas": ("[optim]\nbetas = [0.9]\n", [], ["[optim] betas = [0.9] must be a list of 2 numbers"]),
    "several at once": ("[training]\ngrad_clip = -1.0\nlr = 2.0\n[quant]\nmerge = 'lossy'\n", [],
                        ["3 problem(s)", "grad_clip = -1.0", "lr = 2.0", "merge = 'lossy'"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_recipes_exit_2_with_the_intended_message(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text, overrides, expected = BAD[case]
    recipe = tmp_path / "r.toml"
    recipe.write_text(GOOD if text is None else text)
    code = main(["train", str(recipe), f"--run.output_dir={tmp_path / 'run'}", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert str(recipe) in err  # the message names the file
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()  # nothing written


def test_missing_recipe_file_exits_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "absent.toml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_a_directory_as_the_recipe_lists_the_recipes_in_it(tmp_path, capsys):
    assert main(["train", str(ROOT / "recipes")]) == 2
    err = capsys.readouterr().err
    assert "is a directory, not a recipe file" in err and "not found" not in err
    assert all(str(ROOT / "recipes" / p.name) in err for p in RECIPES)
    assert main(["memory", str(tmp_path)]) == 2  # nothing to suggest
    assert "is a directory with no .toml recipe files in it" in capsys.readouterr().err


def exit_code(argv: list[str]) -> int:
    """main()'s exit code, also where argparse exits by raising SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_an_override_written_with_a_space_gets_the_spelling_to_use(capsys):
    tiny = str(ROOT / "recipes" / "tiny.toml")
    for argv in (["train", tiny, "--training.steps", "10"], ["train", "--training.steps", "10", tiny]):
        assert exit_code(argv) == 2
        err = capsys.readouterr().err
        assert "write --training.steps=10" in err and "usage:" not in err, err
    # A key with nothing after it (or the recipe after it) is not mistaken for that spelling.
    assert exit_code(["train", "--relora.enabled", tiny]) == 2
    assert "must look like --section.key=value" in capsys.readouterr().err


def test_argument_errors_are_one_line_with_where_help_is(capsys):
    assert exit_code(["train"]) == 2
    err = capsys.readouterr().err
    assert err == "error: qrelora train: the following arguments are required: recipe. See qrelora train --help.\n"


@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_memory_refuses_a_vocabulary_size_that_is_not_positive(value, capsys):
    assert exit_code(["memory", str(ROOT / "recipes" / "tiny.toml"), "--vocab-size", value]) == 2
    err = capsys.readouterr().err
    assert f"--vocab-size: {value} is not a vocabulary size" in err and "leave the option out" in err
    assert "\n" not in err.rstrip("\n")  # one paragraph, no usage dump


def test_bad_data_exits_2_before_writing(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    recipe = tmp_path / "r.toml"
    recipe.write_text(GOOD)
    code = main(["train", str(recipe), f"--data.dataset={empty}", "--data.tokenizer=sample",
                 f"--run.output_dir={tmp_path / 'run'}"])
    assert code == 2
    assert "empty.txt" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_precedence_command_line_over_file_over_defaults(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(GOOD)
    r = load_recipe(recipe, ["--training.steps=7", "--relora.alpha=8", "--optim.betas=[0.8, 0.9]"])
    assert r.training.steps == 7            # command line
    assert r.data.seq_len == 32             # file
    assert r.training.grad_clip == 1.0      # default
    assert r.relora.alpha == 8.0 and r.optim.betas == (0.8, 0.9)
    assert r.run.output_dir == str(Path("runs") / "r")


def test_recipe_error_lists_problems_as_data():
    with pytest.raises(RecipeError) as e:
        load_recipe(ROOT / "recipes" / "tiny.toml", ["--training.steps=0", "--quant.bits=2"])
    assert len(e.value.problems) >= 2


@pytest.mark.slow
def test_train_end_to_end_writes_config_and_metrics_and_lowers_loss(tmp_path):
    """A 20-step CPU run through the real entry point (python -m qrelora) on the built-in sample."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "qrelora", "train", str(ROOT / "recipes" / "tiny_fullrank.toml"),
           f"--run.output_dir={run}", "--model.preset=custom", "--model.hidden_size=64", "--model.num_layers=2",
           "--model.num_heads=4", "--model.mlp_size=128", "--training.steps=20", "--training.warmup_steps=2",
           "--training.log_every=5", "--training.eval_every=10", "--training.micro_batch_size=8",
           "--data.eval_tokens=4096"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "\x1b[" not in out.stdout  # plain lines when not on a terminal
    resolved = tomllib.loads((run / "config.toml").read_text())
    assert resolved["training"]["steps"] == 20 and resolved["model"]["hidden_size"] == 64
    assert set(resolved) == {"run", "model", "data", "training", "relora", "quant", "optim", "checkpoint"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [5, 10, 15, 20]
    for r in steps:
        assert {"step", "tokens", "loss", "lr", "tokens_per_s"} <= set(r)
        assert r["tokens"] == r["step"] * 8 * 128
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert all(abs(r["eval_ppl"] - 2.718281828 ** r["eval_loss"]) < 1e-6 * r["eval_ppl"] for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 1.0
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_console_script_and_module_agree_on_help():
    exe = Path(sys.executable).with_name("qrelora")
    a = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    b = subprocess.run([sys.executable, "-m", "qrelora", "--help"], capture_output=True, text=True)
    assert a.returncode == b.returncode == 0
    assert "train" in a.stdout and a.stdout.replace("qrelora", "") == b.stdout.replace("qrelora", "")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["train"], ["memory", "--measure", "2"]])
def test_asking_for_cuda_without_it_exits_2(command, tmp_path, capsys):
    code = main([command[0], str(ROOT / "recipes" / "tiny.toml"), *command[1:], "--training.device=cuda",
                 f"--run.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and 'device = "cuda", but torch' in err and "--training.device=auto" in err
    assert not (tmp_path / "run").exists()

