"""benchmarks/RESULTS.md: one section per script and setting, replaced when the script runs again."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch

HEADER = "# Benchmark results\n\nEach section is written by the script it names.\n\n"


def record(path: Path, heading: str, command: str, machine: str, body: list[str]) -> None:
    """Write (or replace) the section `## heading` with the command, date, machine and torch version."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = "\n".join([f"## {heading}", "", f"Command: `{command}`; {stamp}; {machine}; torch {torch.__version__}.",
                         "", *body, ""])
    text = path.read_text() if path.exists() else HEADER
    start = text.find(f"## {heading}\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "")  # the blank line before the next
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
