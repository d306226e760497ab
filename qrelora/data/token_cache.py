"""The token-stream cache: a map-style corpus (the sample, or local files) tokenized once, every document
followed by eos, and kept as one int32 stream under the cache directory, keyed by the corpus and tokenizer."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig
from ..files import publish
from .base import DataError, cache_dir
from .local import local_files, local_texts
from .packing import encode_documents
from .sample import SAMPLE_SDIST_SHA256, sample_corpus
from .tokenizer import tokenizer_identity

_TOKEN_CACHE_VERSION = 1  # bump when the streams change (it keys every cached stream)
_TOKENIZE_BATCH_DOCS = 256


def _nonblank(texts: Iterable[str | None]) -> Iterator[str]:
    """The documents with text in them (None, "" and whitespace-only ones are dropped), read
    _TOKENIZE_BATCH_DOCS at a time. A batch of nothing but blank documents ends the corpus: that is how the
    version-1 streams were built, kept so that a cached stream and a freshly tokenized one always agree."""
    it = iter(texts)
    while batch := [t for t in itertools.islice(it, _TOKENIZE_BATCH_DOCS) if t and t.strip()]:
        yield from batch


def _pack_documents(tokenizer, texts: Iterable[str | None]) -> torch.Tensor:
    """The non-blank documents tokenized in batches, eos after each (even after one that encodes to no
    tokens), concatenated into one int32 stream."""
    chunks = [torch.tensor(list(itertools.chain.from_iterable(batch)), dtype=torch.int32)
              for batch in encode_documents(tokenizer, _nonblank(texts), _TOKENIZE_BATCH_DOCS, lone_eos=True)]
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int32)


def token_stream(cfg: DataConfig, tokenizer) -> tuple[torch.Tensor, str]:
    """The whole corpus as one int32 token stream (cached), and a description for messages."""
    if cfg.dataset == "sample":
        key_parts: dict[str, Any] = {"sample": SAMPLE_SDIST_SHA256}
        describe = "the sample corpus"
        texts_fn: Callable[[], Iterable[str]] = sample_corpus
    else:
        files = local_files(cfg.dataset)
        key_parts = {"files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
                     "text_field": cfg.text_field}
        describe = f"data.dataset = {cfg.dataset!r} ({len(files)} file(s))"
        texts_fn = lambda: local_texts(files, cfg.text_field, cfg.dataset)  # noqa: E731
    key_parts.update(version=_TOKEN_CACHE_VERSION, tokenizer=tokenizer_identity(tokenizer))
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir() / "tokens" / f"{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True), describe
        except Exception:  # noqa: BLE001 - a truncated or foreign file: rebuild it
            pass
    stream = _pack_documents(tokenizer, texts_fn())
    if stream.numel() == 0:
        raise DataError(f"{describe} contains no text (every document is empty). Point data.dataset at files "
                        "with text in them" + ("" if cfg.dataset == "sample" else
                                               f", or check data.text_field = {cfg.text_field!r}") + ".")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        torch.save(stream, tmp)
        publish(Path(tmp), path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return stream, describe
