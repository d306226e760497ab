"""Tokenizers: "sample" (a byte-level BPE trained on the sample corpus once, then cached), a local tokenizer
directory, or a hub tokenizer name; and the identity that keys the token-stream cache."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..files import publish
from . import hub
from .base import DataError, cache_dir, first_line
from .local import is_local
from .sample import sample_corpus

SAMPLE_EOS = "<|endoftext|>"
SAMPLE_VOCAB_SIZE = 8192
_SAMPLE_TOKENIZER_DIR = "tokenizer-sample-v1"  # bump the suffix when the training recipe changes


def _train_sample_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style) with one special token, used as end of document."""
    # tokenizers and transformers are heavy imports: only when a tokenizer is built.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SAMPLE_EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SAMPLE_EOS, pad_token=SAMPLE_EOS,
                                   clean_up_tokenization_spaces=False)


def sample_tokenizer_size(spec: str) -> int | None:
    """The vocabulary size a "sample" tokenizer spec asks for: "sample" (8,192 entries) or "sample-N" (N entries,
    256 < N <= 65,536); None for any other spec."""
    if spec == "sample":
        return SAMPLE_VOCAB_SIZE
    match = re.fullmatch(r"sample-(\d+)", spec)
    if match and 256 < int(match.group(1)) <= 65536:
        return int(match.group(1))
    return None


def _sample_tokenizer(vocab_size: int = SAMPLE_VOCAB_SIZE):
    from transformers import PreTrainedTokenizerFast  # heavy: only when a tokenizer is loaded

    name = _SAMPLE_TOKENIZER_DIR if vocab_size == SAMPLE_VOCAB_SIZE else f"tokenizer-sample-{vocab_size}-v1"
    dest = cache_dir() / name
    if not dest.is_dir():
        tokenizer = _train_sample_tokenizer(sample_corpus(), vocab_size)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".tokenizer-tmp-"))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published cache should be readable like any other
        try:
            tokenizer.save_pretrained(str(tmp))
            publish(tmp, dest, replace=False)  # a concurrent process that got there first wins
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(str(dest))


def load_tokenizer(spec: str):
    """"sample" (a BPE of 8,192 entries trained on the sample corpus) or "sample-N" (N entries), a local tokenizer
    directory, or a hub tokenizer name."""
    if (size := sample_tokenizer_size(spec)) is not None:
        tokenizer = _sample_tokenizer(size)
    else:
        from transformers import AutoTokenizer  # heavy: only when a tokenizer is loaded

        path = Path(spec).expanduser()
        if path.is_dir():
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(path))
            except Exception as e:  # noqa: BLE001 - any loader failure is a bad directory
                raise DataError(f"data.tokenizer = {spec!r}: the directory could not be loaded as a tokenizer "
                                f"({type(e).__name__}: {e}). It should hold tokenizer.json or tokenizer.model "
                                "with tokenizer_config.json, as written by save_pretrained.") from None
        elif is_local(spec):
            raise DataError(f"data.tokenizer = {spec!r} is not an existing directory. Give a tokenizer directory, a hub "
                            "tokenizer name, or \"sample\".")
        else:
            problem = hub.hub_problem("model", spec)
            if problem is not None and problem[0]:
                raise DataError(f"data.tokenizer = {spec!r}: {problem[1]}. Check the name, or use a local tokenizer "
                                "directory, or \"sample\" for the built-in one.")
            try:
                # Unreachable hub: the local cache only, at once, instead of the hub client's retries.
                tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=problem is not None)
            except Exception as e:  # noqa: BLE001 - offline, missing repo, gated repo, bad files
                if problem is not None:
                    raise DataError(f"data.tokenizer = {spec!r}: {problem[1]}, and this tokenizer is not in the local "
                                    "cache. Load it once with the network up, or use a local tokenizer directory, or "
                                    "\"sample\" for the built-in one.") from None
                raise DataError(f"data.tokenizer = {spec!r}: could not load this tokenizer from the Hugging Face "
                                f"hub: either the hub could not be reached (offline, or HF_HUB_OFFLINE is set and it "
                                f"is not in the local cache) or no such tokenizer exists ({type(e).__name__}: "
                                f"{first_line(e)}). Use a local tokenizer directory, or \"sample\" for the built-in "
                                "one.") from None
    if tokenizer.eos_token_id is None:
        raise DataError(f"data.tokenizer = {spec!r} has no end-of-sequence token; documents are packed with eos "
                        "between them, so choose a tokenizer that defines eos_token.")
    return tokenizer


def tokenizer_identity(tokenizer) -> str:
    """A digest that changes whenever the tokenizer would produce different ids."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(str(tokenizer.eos_token_id).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    return h.hexdigest()
