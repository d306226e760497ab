"""Plot a run: train and eval loss, learning rate, merges and the effective rank of the ReLoRA update.

    python tools/plot_metrics.py RUN_DIR [--out FILE.png]     (needs matplotlib: pip install -e ".[plot]")
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"error: {path} not found; give a run directory written by `qrelora train`.")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(records: list[dict], out: Path, title: str) -> None:
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
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train], lw=1, color="tab:green")
    axes[1].set_ylabel("learning rate")
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, help="PNG to write (default: RUN_DIR/metrics.png)")
    args = ap.parse_args()
    out = args.out or args.run_dir / "metrics.png"
    plot(load(args.run_dir), out, args.run_dir.name)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
