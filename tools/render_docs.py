"""Render docs/live.svg (the terminal display in the middle of a real run) and docs/metrics.png.

    python tools/render_docs.py [--steps 240]

Trains recipes/tiny.toml for --steps steps (a third warm start, then ReLoRA with a merge every sixth of
the rest) with the rich display on a recording console, saves what the terminal showed at two thirds of
the run as SVG, then plots the run's metrics.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from qrelora.cli import quiet_dependencies  # noqa: E402
from qrelora.recipe import load_recipe  # noqa: E402
from qrelora.monitor import RichLog  # noqa: E402
from qrelora.train import Trainer  # noqa: E402


class SnapshotLog(RichLog):
    """The live display, saved as SVG when the run reaches a given step."""

    def __init__(self, console: Console, at_step: int, out: Path):
        super().__init__(console)
        self.at_step, self.out = at_step, out

    def step(self, r, total_steps, eta_s, status=""):
        super().step(r, total_steps, eta_s, status)
        if r["step"] == self.at_step:
            snapshot = Console(record=True, width=self.console.width, force_terminal=True,
                               color_system="truecolor", file=io.StringIO())
            snapshot.print(self.screen())
            snapshot.save_svg(str(self.out), title="qrelora train recipes/tiny.toml")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=240)
    args = ap.parse_args()
    quiet_dependencies()
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    warm = args.steps // 3
    every = (args.steps - warm) // 4
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "tiny"
        recipe = load_recipe(ROOT / "recipes" / "tiny.toml", [
            f"--run.output_dir={run}", f"--training.steps={warm + 4 * every}", f"--relora.warm_start_steps={warm}",
            f"--relora.restart_every={every}", "--training.warmup_steps=50", "--training.log_every=5",
            f"--training.eval_every={every}"])
        console = Console(width=150, force_terminal=True, color_system="truecolor")
        at = warm + 2 * every + every // 2
        Trainer(recipe, SnapshotLog(console, at, docs / "live.svg")).run()
        subprocess.run([sys.executable, str(ROOT / "tools" / "plot_metrics.py"), str(run),
                        "--out", str(docs / "metrics.png")], check=True)
    print(f"wrote {docs / 'live.svg'} and {docs / 'metrics.png'}")


if __name__ == "__main__":
    main()
