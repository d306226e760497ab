"""Every `qrelora ...`, `python -m qrelora ...` and `torchrun ... -m qrelora ...` command in README.md's code
blocks, run. The commands are read from README.md itself, so an edited or added command is covered without
touching this file; a README with none of them fails.

How each kind runs (in README order, in a fresh directory where `recipes/` is the shipped recipes, so that
later commands find what earlier ones wrote, e.g. runs/tiny/checkpoints/step_00000600):

- `qrelora train` on a CPU recipe: as written, with its own step counts, on a smaller model and batch
  (SHRINK: width 64, one block, micro-batch 1 x 16 tokens) so that 600 steps take seconds, not minutes. A
  command with recipe overrides of its own gets its own run directory: it is a different run from the one
  the following commands extend, evaluate and export.
- `qrelora eval` / `qrelora export`: as written, once without their `[...]` options and once with them (with
  `a|b` alternatives once per alternative; each export into its own new directory); the default export is
  then evaluated (`qrelora eval exported/`, as the README says).
- `qrelora memory`: as written plus --json (fake tensors: no GPU needed), compared with README's memory
  table (test_every_readme_memory_command_matches_its_table).
- `qrelora train ... --model.init_from=PATH`: needs the user's model and a CUDA GPU; checked at the recipe
  level with a tiny checkpoint standing for PATH (the recipe validates, the pre-flight passes). Training such
  checkpoints is tests/test_pretrained.py.
- `torchrun ... recipes/1b3_24gb.toml`: needs two CUDA GPUs and the Hugging Face hub (C4, the t5-base
  tokenizer), neither of which the test machine has, so it is checked at the recipe level: torchrun's own
  argument parser accepts the command, and the qrelora command line and recipe it launches validate.
  Two-process training itself is tests/test_distributed.py (torchrun on CPU).
- `make ...` and `tools/...` lines are not qrelora commands and are not run here.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from qrelora.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHRINK = ["--model.preset=custom", "--model.hidden_size=64", "--model.num_layers=1", "--model.num_heads=2",
          "--model.mlp_size=64", "--data.seq_len=16", "--data.eval_tokens=64", "--training.micro_batch_size=1",
          "--training.eval_every=0", "--training.log_every=100"]
GiB = 2**30


def readme_commands() -> list[str]:
    """qrelora command lines of README.md's fenced code blocks, comments stripped, in order."""
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M):
        for line in block.splitlines():
            command = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip()
            words = command.split()
            if words[:1] == ["qrelora"] or words[:3] == ["python", "-m", "qrelora"] or (
                    words[:1] == ["torchrun"] and "qrelora" in words):
                commands.append(command)
    return commands


def variants(command: str) -> list[list[str]]:
    """The command without its `[...]` options, then with all of them (once per `a|b` alternative)."""
    groups = [g.split() for g in re.findall(r"\[([^\]]+)\]", command)]
    base = shlex.split(re.sub(r"\s*\[[^\]]+\]", "", command))
    choices = max((len(w.split("|")) for g in groups for w in g), default=0)
    return [base] + [base + [w.split("|")[min(i, w.count("|"))] for g in groups for w in g] for i in range(choices)]


def qrelora_args(argv: list[str]) -> list[str]:
    return argv[3:] if argv[0] == "python" else argv[1:]


def test_readme_shows_the_commands_this_file_runs():
    commands = readme_commands()
    kinds = {qrelora_args(shlex.split(c))[0] for c in commands if not c.startswith("torchrun")}
    assert {"train", "eval", "export", "memory"} <= kinds, commands
    assert variants("qrelora export a b/ [--dtype bf16|fp32]") == [
        ["qrelora", "export", "a", "b/"], ["qrelora", "export", "a", "b/", "--dtype", "bf16"],
        ["qrelora", "export", "a", "b/", "--dtype", "fp32"]]


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def _check_torchrun(argv: list[str]) -> None:
    from torch.distributed.run import parse_args

    from qrelora.cli import _parser, _split_overrides
    from qrelora.recipe import load_recipe

    launched = parse_args(argv[1:])
    assert launched.module and launched.training_script == "qrelora", argv
    overrides, rest = _split_overrides(launched.training_script_args)
    args = _parser().parse_args(rest)
    load_recipe(args.recipe, overrides)


def _check_user_model_command(args: list[str], tmp_path: Path) -> None:
    """`qrelora train RECIPE --model.init_from=PATH --data.dataset=DIR`: a tiny checkpoint stands for PATH and a
    text file for the data; the recipe validates and its weights pass the pre-flight."""
    import sys

    from qrelora.cli import _split_overrides
    from qrelora.memory.train_checks import preflight
    from qrelora.recipe import load_recipe

    sys.path.insert(0, str(ROOT / "tests"))
    from hf_checkpoints import make_checkpoint

    model = tmp_path / "user-model"
    if not model.exists():
        make_checkpoint(model, "gqa")
    args = [a.replace("PATH", str(model)).replace("my_corpus/", "other.txt") for a in args]
    overrides, rest = _split_overrides(args[1:])
    overrides += ["--training.device=cpu", "--data.seq_len=64", "--relora.rank=8"]  # the stand-in is tiny
    recipe = load_recipe(rest[0], overrides)
    assert recipe.data.tokenizer == str(model)
    assert preflight(recipe, rest[0], overrides) is None


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    (tmp_path / "other.txt").write_text("".join(f"Line {i}: to be, or not to be, that is the question.\n"
                                                for i in range(300)))
    ran = []
    for n, command in enumerate(readme_commands()):
        for i, argv in enumerate(variants(command)):
            if argv[0] == "torchrun":
                _check_torchrun(argv)
                ran.append(command)
                continue
            args = qrelora_args(argv)
            if args[0] == "memory":
                continue  # test_every_readme_memory_command_matches_its_table
            if "PATH" in " ".join(args):  # a model of the user's: checked at the recipe level, see above
                _check_user_model_command(args, tmp_path)
                ran.append(" ".join(argv))
                continue
            if args[0] == "train":
                own_run = [f"--run.output_dir=runs/readme-{n}"] if any(a.startswith("--") and "." in a.split("=")[0]
                                                                      for a in args) else []
                args = [*args, *SHRINK, *own_run]
            elif args[0] == "export" and i > 0:
                args[2] = args[2].rstrip("/") + f"-{i}/"
            code, out, err = _run(args, capsys)
            assert code == 0, f"{' '.join(argv)} -> exit {code}\n{err[-3000:]}"
            if args[0] == "export" and i == 0:
                code, out, err = _run(["eval", args[2]], capsys)
                assert code == 0 and "loss" in out, err
            ran.append(" ".join(argv))
    assert ran, "README.md shows no qrelora command"


@pytest.mark.slow
def test_every_readme_memory_command_matches_its_table(tmp_path, monkeypatch, capsys):
    """`qrelora memory` as written plus --json (about 30 s for the 1.3B recipe: fake tensors, no GPU). The
    `--measure 20` of the README's comment would train the 1.3B model for real and is not run here
    (tests/test_memory.py measures a small model)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    commands = [qrelora_args(argv) for c in readme_commands() for argv in variants(c)
                if not c.startswith("torchrun") and qrelora_args(argv)[0] == "memory"]
    assert commands, "README.md shows no qrelora memory command"
    rows = 0
    for args in commands:
        code, out, err = _run([*args, "--json"] if "--json" not in args else args, capsys)
        assert code == 0, f"{' '.join(args)} -> exit {code}\n{err[-3000:]}"
        if "--fit" in args:  # README's results quote every candidate: micro-batch x accumulation, estimate
            text = README.read_text(encoding="utf-8")
            for c in json.loads(out)["candidates"]:
                assert f"{c['micro_batch_size']} x {c['grad_accum']}" in text and f"{c['need'] / GiB:.2f} GiB" in text, c
        else:
            rows += _check_against_readme_table(args[1], json.loads(out))
    assert rows == 3, "README's memory table has a row for each of the 24 GB recipes, each under a command"


def _check_against_readme_table(recipe: str, estimate: dict) -> int:
    """README's memory table row for this recipe, if it has one: device need, largest micro-batch, disk."""
    for row in README.read_text(encoding="utf-8").splitlines():
        if row.startswith(f"| `{Path(recipe).name}`") and "GiB" in row:
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert f"{estimate['device_need'] / GiB:.2f} GiB" == cells[1], (row, estimate["device_need"] / GiB)
            assert str(estimate["largest_micro_batch"]) == cells[4], row
            assert cells[5].startswith(f"{estimate['disk_need'] / GiB:.2f} GiB ({estimate['checkpoints_at_once']} "
                                       "checkpoints of "), (row, estimate["disk_need"] / GiB)
            return 1
    return 0
