"""Hugging Face hub datasets, streamed: a quick probe of whether the hub can serve a name, the held-out
blocks (the validation split, or the first documents of train), and the train split packed on the fly."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Iterator

import torch

from ..config import DataConfig
from .base import DataError, first_line
from .packing import STREAM_BATCH_DOCS, StreamingTokenData, encode_documents

_SHUFFLE_BUFFER_DOCS = 10_000
HUB_PROBE_TIMEOUT_S = 5.0


def hub_problem(kind: str, name: str) -> tuple[bool, str] | None:
    """Why the Hugging Face hub cannot serve the dataset or model repository `name`, as (the hub answered,
    reason); None when it can, or when it is unclear (a server error: the loader then reports it).

    One request with a short timeout, no retries. Without it the hub client retries a failed connection
    five times with backoff before the same error: 23 s for a dataset and 48 s for a tokenizer, measured on a
    machine without network. In offline mode (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE) the
    libraries read only their cache and fail at once, so nothing is asked."""
    # huggingface_hub.HfApi takes a quarter of a second to import: only when a hub name is asked about.
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
    return (False, f"the hub ({constants.ENDPOINT}) could not be reached ({type(e).__name__}: {first_line(e)})"
            if network else None)


def _hub_error(cfg: DataConfig, e: BaseException) -> DataError:
    config = f" (configuration {cfg.dataset_config!r})" if cfg.dataset_config else ""
    return DataError(f"data.dataset = {cfg.dataset!r}{config}: could not stream this dataset from the Hugging Face hub: "
                     f"either the hub could not be reached (offline, or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) "
                     f"or no such dataset or configuration exists ({type(e).__name__}: {first_line(e)}). Check the "
                     "name and data.dataset_config, or use a local file or directory, or \"sample\".")


def _eval_blocks_from(texts: Iterable[str], tokenizer, seq_len: int, num_eval: int) -> tuple[torch.Tensor, int]:
    """Pack documents until num_eval blocks are full; return the blocks and how many documents were used
    (those without tokens included: training skips exactly that many)."""
    need = num_eval * seq_len
    ids: list[int] = []
    used = 0
    batches = encode_documents(tokenizer, texts, STREAM_BATCH_DOCS)
    while len(ids) < need and (batch := next(batches, None)) is not None:
        for doc in batch:
            if len(ids) >= need:
                break
            used += 1
            ids.extend(doc)
    if len(ids) < need:
        return torch.zeros(0, seq_len, dtype=torch.int32), used
    return torch.tensor(ids[:need], dtype=torch.int32).view(num_eval, seq_len), used


def build_streaming(cfg: DataConfig, tokenizer, seed: int) -> StreamingTokenData:
    try:
        import datasets  # heavy (about 1 s) and optional: only when a hub dataset is streamed
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
