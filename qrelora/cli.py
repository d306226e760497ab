"""The `qrelora` command line. Exit codes: 0 done, 2 bad input (nothing trained or written),
130 interrupted, 1 anything else."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, QreloraError


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the problem and where help is, not a usage dump."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message}. See {self.prog} --help.\n")


def _vocab_size(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a vocabulary size; give the tokenizer's number of entries, "
                                         "e.g. --vocab-size 32000, or leave the option out to read it from the "
                                         "recipe's tokenizer")
    return n


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qrelora", description="ReLoRA pre-training on 4-bit / 8-bit quantized weights.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train a model from a TOML recipe",
                       description="Train from a recipe. Override any key with --section.key=value, "
                                   "e.g. --training.steps=30 --relora.rank=64.")
    t.add_argument("recipe", help="path to a TOML recipe (see recipes/)")
    t.add_argument("--no-live", action="store_true", help="plain log lines even on a terminal")
    t.add_argument("--extend-to", type=int, metavar="STEPS",
                   help="continue the run in the recipe's run directory to STEPS steps in all (a finished or "
                        "interrupted run); the learning-rate schedule's tail is recomputed from there")
    m = sub.add_parser("memory", help="estimate peak memory of a recipe and the largest micro-batch that fits",
                       description="Peak device and host memory of a recipe by category, the verdict against a "
                                   "budget (exit 3 if it does not fit) and the largest micro-batch that fits. "
                                   "Recipe overrides work as for train.")
    m.add_argument("recipe", help="path to a TOML recipe (see recipes/)")
    m.add_argument("--budget", default="24GiB", help="device memory to fit, e.g. 24GiB, 16GB, 12000MiB (default 24GiB)")
    m.add_argument("--measure", type=int, default=0, metavar="STEPS",
                   help="also run STEPS real training steps (one merge included) and report measured peaks")
    m.add_argument("--vocab-size", type=_vocab_size, default=0, metavar="N",
                   help="vocabulary size, when the recipe's tokenizer is not available offline (default: read it)")
    m.add_argument("--fit", action="store_true",
                   help="find the fastest configuration that fits the budget at the recipe's tokens per step "
                        "(micro-batch, accumulation, activation checkpointing) and print its overrides; with "
                        "--measure STEPS each one that fits is timed")
    m.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    e = sub.add_parser("eval", help="loss and perplexity of a checkpoint or model directory on held-out data")
    e.add_argument("path", help="a checkpoint directory, or a directory written by qrelora export")
    e.add_argument("--data", help="evaluate on this dataset instead of the run's (same spellings as data.dataset)")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    x = sub.add_parser("export", help="write a merged Hugging Face model from a checkpoint")
    x.add_argument("checkpoint", help="a checkpoint directory (runs/<name>/checkpoints/step_<N>)")
    x.add_argument("out_dir", help="a new directory for the Hugging Face model")
    x.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    return p


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """`--section.key=value` arguments are recipe overrides; everything else goes to argparse. The spelling
    `--section.key value` is refused with the fix, exit 2 (argparse would only see a stray `value`)."""
    overrides, rest = [], []
    for i, arg in enumerate(argv):
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." in name and "=" not in arg and i + 1 < len(argv):
            value = argv[i + 1]
            if not value.startswith("--") and not value.endswith(".toml"):  # a recipe there: the value is missing
                print(f"error: {arg} {value}: a recipe override is one argument, joined by '='; write "
                      f"{arg}={value}", file=sys.stderr)
                raise SystemExit(EXIT_BAD_INPUT)
        (overrides if "." in name else rest).append(arg)
    return overrides, rest


def quiet_dependencies() -> None:
    """Silence start-up warnings users cannot act on (torch deprecations inside bitsandbytes, etc.)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    from .recipe import load_recipe
    from .memory import out_of_memory_report, preflight
    from .monitor import make_log
    from .train import train

    recipe = load_recipe(args.recipe, overrides)
    refusal = preflight(recipe, args.recipe, overrides)  # tokenizer vs init_from, memory estimate vs machine
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        train(recipe, make_log(args.no_live), args.extend_to)
    except torch.OutOfMemoryError as e:
        report = out_of_memory_report(recipe, args.recipe, overrides)
        print(f"error: out of device memory ({_first_line(e)}).\n{report}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def cmd_memory(args: argparse.Namespace, overrides: list[str]) -> int:
    import json

    import torch

    from .recipe import load_recipe
    from .memory import GiB, Estimator, fix_for, measure, parse_bytes, render, vocab_size_of
    from .device import check_device

    try:
        budget = parse_bytes(args.budget)
    except ValueError as e:
        return _bad_argument(f"--budget {e}")
    if args.measure < 0 or args.measure == 1:
        return _bad_argument(f"--measure {args.measure}: give at least 2 steps (the run ends with a merge), e.g. "
                             "--measure 20")
    if args.vocab_size < 0:
        return _bad_argument(f"--vocab-size {args.vocab_size}: must be a positive number of tokens")
    recipe = load_recipe(args.recipe, overrides)
    if args.measure:
        check_device(recipe)  # before the estimate, not after it
    vocab, source = vocab_size_of(recipe, args.vocab_size)
    if args.fit:
        return _fit(args, recipe, vocab, budget)
    estimator = Estimator(recipe, vocab, budget, source, args.recipe)
    estimate = estimator.estimate()
    largest = estimator.largest_micro_batch(estimate)
    measured = None
    if args.measure:
        try:
            measured = measure(recipe, args.measure)
        except torch.OutOfMemoryError:
            print(f"error: out of device memory while measuring {args.measure} steps of {args.recipe}; the estimate "
                  f"was {estimate.need / GiB:.2f} GiB against a budget of {budget / GiB:.2f} GiB. "
                  f"{fix_for(recipe, largest)} A memory snapshot is in {recipe.run_dir / 'memory'}.",
                  file=sys.stderr)
            return EXIT_DOES_NOT_FIT
    if args.json:
        from .memory import category_comparison, comparison

        out = estimate.to_dict() | {"largest_micro_batch": largest}
        if measured is not None:
            out["measured"] = {"device_type": measured.device_type, "steps": measured.steps,
                               "tokens_per_s": measured.tokens_per_s, "snapshot": measured.snapshot,
                               "moments": comparison(estimate, measured)}
            if measured.device_type == "cpu":
                out["measured"]["categories"] = category_comparison(estimate, measured)
        print(json.dumps(out))
    else:
        from rich.console import Console

        render(estimate, largest, measured, Console())
    return EXIT_OK if estimate.fits else EXIT_DOES_NOT_FIT


def _fit(args: argparse.Namespace, recipe, vocab: int, budget: int) -> int:
    import json

    from .memory.fit import fit

    found = fit(recipe, vocab, budget, args.measure)
    if args.json:
        print(json.dumps({"budget": budget, "candidates": [c.to_dict() for c in found]}))
    else:
        from rich.console import Console

        from .memory.report import render_fit

        render_fit(args.recipe, found, budget, args.measure, Console())
    return EXIT_OK if found[0].fits else EXIT_DOES_NOT_FIT


def _bad_argument(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    out = export(args.checkpoint, args.out_dir, args.dtype)
    print(f"exported {args.checkpoint} to {out} ({args.dtype} safetensors, config, tokenizer); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .export import evaluate, format_eval

    result = evaluate(args.path, args.data)
    print(json.dumps(result) if args.json else format_eval(result))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = _split_overrides(argv)
    args = _parser().parse_args(rest)  # exits with 2 and a usage line on bad arguments
    if overrides and args.command != "train" and args.command != "memory":
        print(f"qrelora {args.command}: recipe overrides ({overrides[0]}) only apply to train and memory",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    quiet_dependencies()
    from .rundir import RunComplete
    from .train import TrainingInterrupted

    try:
        if args.command == "train":
            return cmd_train(args, overrides)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "eval":
            return cmd_eval(args)
        return cmd_memory(args, overrides)
    except RunComplete as e:  # not an error: the run is done
        print(e)
        return e.exit_code
    except TrainingInterrupted as e:  # the run has said where it stopped
        return e.exit_code
    except QreloraError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted at once (second Ctrl-C); the last periodic checkpoint is intact", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
