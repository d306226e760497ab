"""LLaMA-style decoders (transformers' LlamaForCausalLM) in the ReLoRA paper's shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_size: int


# hidden / layers / heads / MLP from the ReLoRA paper (Lialin et al. 2023, table 9); "tiny" is ours, sized for a
# CPU run of a few minutes.
PRESETS: dict[str, Shape] = {
    "tiny": Shape(256, 4, 4, 704),
    "60m": Shape(512, 8, 8, 1376),
    "130m": Shape(768, 12, 12, 2048),
    "250m": Shape(768, 24, 16, 2560),
    "350m": Shape(1024, 24, 16, 2736),
    "1b3": Shape(2048, 24, 32, 5461),
    "7b": Shape(4096, 32, 32, 11008),
}


def resolve_shape(cfg: ModelConfig) -> Shape:
    base = PRESETS.get(cfg.preset, Shape(0, 0, 0, 0))
    return Shape(
        hidden_size=cfg.hidden_size or base.hidden_size,
        num_layers=cfg.num_layers or base.num_layers,
        num_heads=cfg.num_heads or base.num_heads,
        mlp_size=cfg.mlp_size or base.mlp_size,
    )


def llama_config(cfg: ModelConfig, vocab_size: int, seq_len: int, bos_id: int | None = None, eos_id: int | None = None):
    from transformers import LlamaConfig

    s = resolve_shape(cfg)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.mlp_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_heads,
        max_position_embeddings=max(seq_len, 2048),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        attn_implementation="sdpa",
    )


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, *, device: str | torch.device = "cpu",
                seed: int = 0, eos_id: int | None = None) -> nn.Module:
    """A fresh fp32 LlamaForCausalLM (or the one in cfg.init_from). device="meta" allocates nothing."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if cfg.init_from:
        return AutoModelForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32).to(device)
    config = llama_config(cfg, vocab_size, seq_len, eos_id=eos_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; quantized frozen weights count by their logical size."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():
        logical = getattr(m, "logical_numel", None)
        if logical is not None:
            total += logical()
    return total, trainable
