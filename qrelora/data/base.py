"""What every part of the data package shares: its error type, the cache directory, and error summaries."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BadInput


class DataError(BadInput):
    """A dataset or tokenizer the user asked for that cannot be used; the message says what to fix."""


def cache_dir() -> Path:
    """$QRELORA_CACHE if set, else ~/.cache/qrelora; created on demand."""
    env = os.environ.get("QRELORA_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "qrelora"
    path.mkdir(parents=True, exist_ok=True)
    return path


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, for a one-line report."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
