"""Text corpora, tokenizers, and the token stream the training loop draws batches from.

Sources: the built-in Shakespeare sample, local txt/jsonl/parquet files, or a streamed hub dataset.
Map-style sources (sample, local files) are tokenized once, cached as one int32 stream, and cut into
non-overlapping blocks of seq_len tokens; a fixed, seed-independent set of blocks spread evenly over
the stream is held out for evaluation. Hub datasets are streamed and packed on the fly.

One module per concern: sample (the built-in corpus), tokenizer, local (local files, and which values
are local paths), packing (documents into token ids and the TokenData classes), token_cache (the cached
stream of a map-style corpus), hub (hub datasets). Only torch is imported at module level: datasets,
transformers and tokenizers are imported where used, so the training entry point starts fast and runs
on machines that lack `datasets`. A test that replaces a function patches the module that calls it
(e.g. qrelora.data.hub.hub_problem), not this package.
"""

from __future__ import annotations

from ..config import DataConfig
from .base import DataError, cache_dir
from .hub import build_streaming
from .local import LOCAL_FORMATS, is_local
from .packing import PackedTokenData, StreamingTokenData, TokenData, eval_block_indices
from .sample import SAMPLE_SDIST, SAMPLE_SDIST_SHA256, sample_corpus
from .token_cache import token_stream
from .tokenizer import SAMPLE_EOS, SAMPLE_VOCAB_SIZE, _train_sample_tokenizer, load_tokenizer, sample_tokenizer_size

__all__ = ["DataError", "LOCAL_FORMATS", "PackedTokenData", "SAMPLE_EOS", "SAMPLE_SDIST", "SAMPLE_SDIST_SHA256",
           "SAMPLE_VOCAB_SIZE", "StreamingTokenData", "TokenData", "_train_sample_tokenizer", "build_data",
           "cache_dir", "eval_block_indices", "is_local", "load_tokenizer", "sample_corpus", "sample_tokenizer_size"]


def build_data(cfg: DataConfig, tokenizer, seed: int, eval_only: bool = False) -> TokenData:
    """The token data for cfg.dataset: packed in memory for "sample" and local files, streamed for hub names.
    eval_only (for `qrelora eval`): a local corpus needs to hold only the held-out blocks, not a training set
    beside them; the held-out blocks are the ones a training run on it would hold out."""
    if cfg.dataset == "sample" or is_local(cfg.dataset):
        stream, describe = token_stream(cfg, tokenizer)
        return PackedTokenData(stream, cfg.seq_len, cfg.eval_tokens, seed, describe, eval_only)
    return build_streaming(cfg, tokenizer, seed)
