"""Tiny random LLaMA-family checkpoints written by transformers, one per layout a user's model may have, with
the sample tokenizer saved next to them (model.init_from, data.tokenizer = "init_from")."""

from pathlib import Path

import torch

VARIANTS = {
    "tied": {"tie_word_embeddings": True},
    "gqa": {"num_key_value_heads": 2},
    "sharded": {},  # written in shards of at most 100 kB, with model.safetensors.index.json
    "bf16": {},  # weights stored in bf16
    "rope scaling": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "mistral": {"sliding_window": 32},
}


def make_checkpoint(path: Path, variant: str, seed: int = 0, vocab_size: int | None = None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from qrelora.data import load_tokenizer

    tokenizer = load_tokenizer("sample")
    config_class, model_class = (MistralConfig, MistralForCausalLM) if variant == "mistral" else (
        LlamaConfig, LlamaForCausalLM)
    shape = dict(vocab_size=vocab_size or len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
                 eos_token_id=tokenizer.eos_token_id)
    config = config_class(**(shape | VARIANTS[variant]))
    torch.manual_seed(seed)
    model = model_class(config)
    if variant == "bf16":
        model.to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="100KB" if variant == "sharded" else "5GB")
    tokenizer.save_pretrained(path)
    return path
