"""A SentencePiece tokenizer directory (tokenizer.model + tokenizer_config.json, the LLaMA / Mistral layout)
loads, encodes like SentencePiece itself, and trains. transformers converts such a model through protobuf;
without it the load falls through to the tiktoken reader and fails ("`tiktoken` is required")."""

from __future__ import annotations

import io
import json
import tomllib
from pathlib import Path

import pytest

from qrelora.cli import main
from qrelora.data import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = "when shall we three meet again in thunder lightning or in rain fair is foul and foul is fair".split()
SMALL = ["--model.preset=custom", "--model.hidden_size=64", "--model.num_layers=2", "--model.num_heads=4",
         "--model.mlp_size=128", "--data.seq_len=32", "--data.eval_tokens=256", "--training.micro_batch_size=2",
         "--training.eval_every=0", "--no-live"]


def _lines(n: int) -> list[str]:
    return [f"{WORDS[i % 19]} {WORDS[(i * 7) % 19]} {WORDS[(i * 11) % 19]}, number {i * 13 % 997}." for i in range(n)]


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory) -> Path:
    """A 300-piece SentencePiece BPE trained here (a few hundredths of a second), saved the LLaMA way."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("spm")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_lines(3000)), model_writer=model, vocab_size=300,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return out


def test_sentencepiece_directory_loads_and_encodes_like_sentencepiece(sentencepiece_dir):
    import sentencepiece as spm

    tokenizer = load_tokenizer(str(sentencepiece_dir))
    assert len(tokenizer) == 300 and tokenizer.eos_token_id == 2 and tokenizer.eos_token == "</s>"
    reference = spm.SentencePieceProcessor(model_file=str(sentencepiece_dir / "tokenizer.model"))
    for text in ["fair is foul and foul is fair", "when shall we three meet again, number 42.", "thunder"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == reference.encode(text), text
        assert len(ids) < len(text)  # merged pieces, not one id per character
        assert tokenizer.decode(ids) == text


def test_training_with_a_sentencepiece_tokenizer(sentencepiece_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_lines(2000)) + "\n")
    run = tmp_path / "run"
    code = main(["train", str(ROOT / "recipes" / "tiny_fullrank.toml"), *SMALL, f"--data.tokenizer={sentencepiece_dir}",
                 f"--data.dataset={corpus}", "--training.steps=4", "--training.log_every=1",
                 f"--run.output_dir={run}"])
    assert code == 0, capsys.readouterr().err
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 4
    assert tomllib.loads((run / "config.toml").read_text())["data"]["tokenizer"] == str(sentencepiece_dir)
