"""Plot a run: train and eval loss, learning rate, merges and the effective rank of the ReLoRA update.

    python tools/plot_metrics.py RUN_DIR [--out FILE.png]     (needs matplotlib: pip install -e ".[plot]")
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"error: {path} not found; give a run directory written by `qrelora train`.")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def schedule_of(run_dir: Path):
    """The run's learning-rate schedule rebuilt from its config.toml (None if that cannot be done)."""
    try:
        sys.path.insert(0, str(ROOT))
        from qrelora.schedule import JaggedCosine

        cfg = tomllib.loads((run_dir / "config.toml").read_text())
        t, r = cfg["training"], cfg["relora"]
        return JaggedCosine(lr=t["lr"], total_steps=t["steps"], warmup_steps=t["warmup_steps"],
                            min_lr_ratio=t["min_lr_ratio"], restart_every=r["restart_every"] if r["enabled"] else 0,
                            restart_warmup=r["restart_warmup"], relora_start=r["warm_start_steps"],
                            relora_lr_ratio=r.get("lr_ratio", 1.0))
    except (ImportError, OSError, KeyError, TypeError, ValueError):
        return None


def lr_curve(records: list[dict], run_dir: Path) -> tuple[list[int], list[float], str]:
    """Steps and learning rates to draw, and what they are.

    The step just before each merge runs at learning rate 0 (it moves no weights), and with log_every
    dividing the cycle every merge falls on a logged step: a line through the logged values dips to 0
    there and hides the re-warm-up that follows. So the schedule is drawn per step, rebuilt from
    config.toml, when it reproduces every logged value (an extended run's schedule is not rebuilt and
    fails the check); otherwise the logged values are drawn without the pre-merge zeros, which the
    caller marks on their own. A record at step s holds the learning rate of optimizer step s - 1.
    """
    train = [r for r in records if "lr" in r and "event" not in r]
    schedule = schedule_of(run_dir)
    if train and schedule is not None and all(math.isclose(schedule(r["step"] - 1), r["lr"], rel_tol=1e-6,
                                                           abs_tol=1e-12) for r in train):
        steps = list(range(1, train[-1]["step"] + 1))
        return (steps, [schedule(s - 1) for s in steps],
                f"per step from config.toml, matching all {len(train)} logged values")
    merge_steps = {r["step"] for r in records if r.get("event") == "merge"}
    kept = [r for r in train if not (r["step"] in merge_steps and r["lr"] == 0)]
    gaps = [b["step"] - a["step"] for a, b in zip(train, train[1:]) if b["step"] > a["step"]]
    every = f"every {min(gaps)} steps" if gaps else "values"
    return ([r["step"] for r in kept], [r["lr"] for r in kept],
            f"logged {every}" + ("; re-warm-ups after merges fall between log points" if merge_steps else ""))


def plot(records: list[dict], out: Path, title: str, run_dir: Path | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r and "event" not in r]
    evals = [r for r in records if "eval_loss" in r]
    merges = [r for r in records if r.get("event") == "merge"]
    switch = [r for r in records if r.get("event") == "relora_start"]
    rows = 3 if merges else 2
    fig, axes = plt.subplots(rows, 1, figsize=(9, 2.6 * rows + 0.6), sharex=True)
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", ms=4, label="eval loss")
    ax.set_ylabel("loss")
    ax.set_title(title)
    steps, lrs, lr_source = lr_curve(records, run_dir if run_dir is not None else Path("."))
    axes[1].plot(steps, lrs, lw=1, color="tab:green",
                 label=f"learning rate (the adapters' after the switch; {lr_source})")
    zero_steps = [m["step"] for m in merges]
    axes[1].plot(zero_steps, [0.0] * len(zero_steps), "v", ms=4, color="tab:red",
                 label="lr 0 for the one step before each merge")
    axes[1].set_ylabel("learning rate")
    axes[1].legend(fontsize=7)
    for a in axes:
        for m in merges:
            a.axvline(m["step"], color="tab:red", lw=0.8, alpha=0.5)
        for s in switch:
            a.axvline(s["step"], color="black", lw=1, ls="--")
    if merges:
        for i, name in enumerate(merges[0].get("effective_rank", {})):
            axes[2].plot([m["step"] for m in merges], [m["effective_rank"][name] for m in merges], "s-", ms=4,
                         label=name.removeprefix("model."))
        axes[2].set_ylabel("effective rank\nof W - W_start")
        axes[2].legend(fontsize=7)
    axes[0].legend()
    axes[-1].set_xlabel("step (red: merges, dashed: switch to ReLoRA)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return lr_source


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, help="PNG to write (default: RUN_DIR/metrics.png)")
    args = ap.parse_args()
    out = args.out or args.run_dir / "metrics.png"
    lr_source = plot(load(args.run_dir), out, args.run_dir.name, args.run_dir)
    print(f"wrote {out} (learning rate: {lr_source})")


if __name__ == "__main__":
    main()
