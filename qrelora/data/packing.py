"""Documents into token blocks: every document's token ids with eos after it, and the TokenData the training
loop draws batches from (a corpus packed in memory, or documents streamed and packed on the fly)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator

import torch

from .base import DataError

STREAM_BATCH_DOCS = 64  # documents tokenized at a time when streaming; it shows in saved data positions


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens (no BOS); the caller appends eos."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The Rust tokenizer directly: parallel, and no "longer than model_max_length" warning per document.
        return [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def encode_documents(tokenizer, texts: Iterable[str | None], batch_docs: int, *,
                     lone_eos: bool = False) -> Iterator[list[list[int]]]:
    """The documents tokenized batch_docs at a time (read lazily, one batch per step), as one list per
    document in order: its token ids followed by eos. A document that encodes to no tokens (None, "", or
    text the tokenizer drops) gives [], without an eos, so the i-th list is always the i-th document;
    with lone_eos it gives [eos] instead (the format of the cached token streams, which must not change)."""
    eos = tokenizer.eos_token_id
    it = iter(texts)
    while batch := list(itertools.islice(it, batch_docs)):
        yield [ids + [eos] if ids or lone_eos else [] for ids in _encode_batch(tokenizer, [t or "" for t in batch])]


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
        docs = itertools.islice(iter(self._open_epoch(epoch)), doc_index, None)
        self._docs = encode_documents(self._tokenizer, docs, STREAM_BATCH_DOCS)  # batches of documents' tokens
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
        while len(self._buf) < want:
            batch = next(self._docs, None)
            if batch is None:
                return False
            for doc in batch:
                doc_index = self._next_doc
                self._next_doc += 1
                if not doc:
                    continue  # empty documents contribute nothing, not even an eos
                self._buf.extend(doc)
                self._buf_docs.append([doc_index, len(doc), len(doc)])
                self._epoch_tokens += len(doc)
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

