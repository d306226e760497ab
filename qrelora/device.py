"""Which device a recipe runs on, and where its model is built."""

from __future__ import annotations

import os

import torch

from .config import Recipe, RecipeError


def device_type(recipe: Recipe) -> str:
    """"cuda" or "cpu": training.device, with "auto" meaning CUDA when torch sees a CUDA device."""
    if recipe.training.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return recipe.training.device


def check_device(recipe: Recipe) -> None:
    """A recipe that asks for CUDA on a machine without it is refused (accelerate would quietly use the CPU)."""
    if recipe.training.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("[training] device", [
            f"device = \"cuda\", but torch {torch.__version__} sees no CUDA device on this machine. Use "
            "--training.device=auto (CUDA when there is one, else the CPU) or --training.device=cpu."])


def free_memory(device: torch.device) -> int:
    """Bytes free for a new model: the CUDA device's free memory, or the host's available memory (Linux
    MemAvailable; the physical total where /proc/meminfo is missing)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def build_device_for(fp32_bytes: int, free_bytes: int, relora_from_start: bool,
                     accelerator: torch.device) -> torch.device:
    """Where the trainer initialises a model (the memory estimator asks the same question): on the
    device (the GPU, or the CPU's host memory) when its fp32 weights take under half the free memory;
    otherwise, when ReLoRA starts at step 0, on the meta device (each layer is then initialised as it is
    quantized); else in host memory."""
    if fp32_bytes < free_bytes / 2:
        return accelerator
    return torch.device("meta") if relora_from_start else torch.device("cpu")
