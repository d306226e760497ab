"""qrelora: ReLoRA pre-training with 4-bit / 8-bit quantized frozen weights."""

__version__ = "0.1.0"
