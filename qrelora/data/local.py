"""Local corpora: a .txt/.jsonl/.json/.parquet file or a directory of them, read as a sequence of documents;
and the one test of whether a data.dataset or data.tokenizer value names a local path."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .base import DataError, first_line

LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_PATH_PREFIXES = ("/", "./", "../", "~")


def is_local(spec: str) -> bool:
    """Whether a data.dataset or data.tokenizer value names a local path rather than a hub name ("owner/name"):
    it starts with / ./ ../ or ~, exists, or ends in a data-file suffix (.txt .jsonl .json .parquet, any case).
    A value that is local by this test but does not exist is a mistyped path, never a hub name."""
    return spec.startswith(_PATH_PREFIXES) or Path(spec).expanduser().exists() or \
        spec.lower().endswith(tuple(LOCAL_FORMATS))


def local_files(spec: str) -> list[Path]:
    """The data files spec (a file, or a directory searched recursively) names, resolved and sorted."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data.dataset = {spec!r}: no such file or directory. Give an existing .txt/.jsonl/.json/"
                        ".parquet file or a directory of them, a hub dataset name, or \"sample\".")
    if path.is_file():
        if path.suffix.lower() not in LOCAL_FORMATS:
            raise DataError(f"data.dataset = {spec!r}: unsupported file type {path.suffix!r}; use .txt (one "
                            "document per file), .jsonl/.json or .parquet (with data.text_field).")
        return [path.resolve()]
    files = sorted(p.resolve() for p in path.rglob("*")
                   if p.is_file() and p.suffix.lower() in LOCAL_FORMATS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"data.dataset = {spec!r}: the directory holds no .txt, .jsonl, .json or .parquet files "
                        "(searched recursively, hidden files skipped).")
    return files


def local_texts(files: list[Path], text_field: str, spec: str) -> Iterator[str]:
    """Documents of every file: whole .txt files, or the text_field column of jsonl/json/parquet rows."""
    import datasets  # heavy (about 1 s) and optional: only when a local corpus is tokenized

    datasets.disable_progress_bars()
    # The json builder logs "Failed to load JSON from file ..." before raising; the DataError below says it
    # once, with the fix.
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    by_builder: dict[str, list[str]] = {}
    for f in files:
        by_builder.setdefault(LOCAL_FORMATS[f.suffix.lower()], []).append(str(f))
    for builder, group in by_builder.items():
        kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
        field = "text" if builder == "text" else text_field
        # Streaming: read once, no Arrow copy of the user's corpus in the datasets cache.
        try:
            ds = datasets.load_dataset(builder, data_files=group, split="train", streaming=True, **kwargs)
            for i, batch in enumerate(ds.iter(batch_size=1000)):
                if field not in batch:
                    raise DataError(f"data.dataset = {spec!r}: the {builder} files have no column "
                                    f"{field!r} (data.text_field); columns are {', '.join(map(repr, batch))}. "
                                    "Set data.text_field to the column holding the text.")
                for value in batch[field]:
                    if value is not None and not isinstance(value, str):
                        raise DataError(f"data.dataset = {spec!r}: column {field!r} holds "
                                        f"{type(value).__name__} values, not text; set data.text_field to a "
                                        "text column.")
                    yield value
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - malformed JSON, broken parquet, undecodable text...
            raise DataError(f"data.dataset = {spec!r}: could not read the {builder} files ({type(e).__name__}: "
                            f"{first_line(e)}). Check that they are valid {builder} (UTF-8 for text).") from None

