"""What `qrelora train` asks of the memory estimate: the pre-flight check before anything is built or
written (`preflight`: the tokenizer against an init_from model, the run's estimated peak against this
machine's host memory and GPU), and the report when a run goes out of device memory all the same
(`out_of_memory_report`).
"""

from __future__ import annotations

import os

import psutil
import torch

from ..config import Recipe
from ..data import load_tokenizer
from ..device import check_device, device_type
from ..pretrained import PretrainedError, weight_files
from .estimate import Estimate, Estimator, GiB, vocab_size_of
from .report import fix_for


# --------------------------------------------------------------------------------------------------
# The pre-flight check

TOKENIZER_SHARE = 0.9  # the least share of an init_from model's embedding rows its tokenizer may fill


def available_host_bytes() -> int:
    """Host memory a new run can use: psutil's "available" (free plus reclaimable page cache)."""
    return psutil.virtual_memory().available


def device_total_bytes() -> int:
    """All the memory of this process's CUDA device."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def host_parts(estimate: Estimate) -> dict[str, int]:
    """Host-memory bytes by category at their largest over the phases (files on disk left out)."""
    host: dict[str, int] = {}
    for phase in estimate.phases:
        for key, value in phase.host.items():
            if value and "disk" not in key:
                host[key] = max(host.get(key, 0), value)
    return host


def host_fix_for(host: dict[str, int]) -> str:
    """A concrete change for a CUDA run whose host-memory part does not fit."""
    biggest = max(host, key=host.get, default="")
    if biggest == "master copy":
        return ("Keep the exact merges' fp32 master copy in a memory-mapped file in the run directory "
                "(--quant.master=mmap), or keep only the bf16 rounding residual (--quant.merge=error_feedback).")
    if biggest == "residual":
        return "Merge with stochastic rounding, which keeps nothing in host memory (--quant.merge=stochastic)."
    if biggest == "fp32 model while building":
        return ("The fp32 model is built whole in host memory because of the warm start; start "
                "ReLoRA at step 0 (--relora.warm_start_steps=0) so it is built layer by layer on the GPU, or "
                "choose a smaller model.")
    return "Choose a smaller model, or free host memory."


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def preflight(recipe: Recipe, recipe_path: str, overrides: list[str]) -> str | None:
    """What `qrelora train` checks after the recipe and before anything is built or written: that the
    init_from checkpoint's weights are all there and its embeddings fit the tokenizer, and that the run's estimated peak
    fits this machine (host memory available now; on CUDA also the device's total memory). Returns the
    refusal as one paragraph (the estimate, what the machine has, what to change), or None.

    It costs one estimate (fake tensors, nothing allocated): about a second for recipes/tiny.toml on a
    2-core CPU, on top of what the trainer's own start-up costs (imports, tokenizer) which it shares."""
    check_device(recipe)  # a CUDA recipe on a machine without CUDA: RecipeError, exit 2
    vocab, source = vocab_size_of(recipe)
    if recipe.model.init_from:
        try:  # the weights are all there and readable (shard index and file headers only)
            weight_files(recipe.model.init_from, recipe.checkpoint.allow_pickle)
        except PretrainedError as e:
            return f"{recipe_path}: model.init_from = {recipe.model.init_from!r}: {e}"
        tokens = len(load_tokenizer(recipe.data.tokenizer))
        if tokens > vocab or tokens < TOKENIZER_SHARE * vocab:
            why = (f"so token ids from {vocab:,} up would have none" if tokens > vocab else
                   "so it is not the tokenizer the model was trained with (a model's embedding table is at most "
                   "padded a little past its tokenizer), and its token ids would pick other tokens' embeddings")
            return (f"{recipe_path}: data.tokenizer = {recipe.data.tokenizer!r} has {tokens:,} entries, but the model "
                    f"in model.init_from = {recipe.model.init_from!r} has embeddings for {vocab:,} (vocab_size in its "
                    f"config.json), {why}. Use the tokenizer the model was trained with: the one saved with it, "
                    "--data.tokenizer=init_from (a directory written by qrelora export holds one too).")
    on = device_type(recipe)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun: ranks on this machine share its RAM
    host_available = available_host_bytes()
    budget = device_total_bytes() if on == "cuda" else host_available // processes
    estimator = Estimator(recipe, vocab, budget, source, recipe_path)
    estimate = estimator.estimate(compare_checkpointing=False)
    worst = max(estimate.phases, key=lambda p: p.need)
    moment = ("building the fp32 model" if worst.peak_moment == "build" else
              f"the {worst.peak_moment} of the {worst.name.split(' (')[0]} phase")
    where = (f"{moment}, micro-batch "
             f"{recipe.training.micro_batch_size} x {recipe.data.seq_len} tokens, {vocab:,}-entry vocabulary"
             + (f", x {processes} processes on this machine" if processes > 1 else ""))
    budget_arg = f"{budget / GiB:.1f}GiB" if budget >= GiB else f"{max(budget // 2**20, 1)}MiB"
    rest = (f"Nothing was trained or written; `{' '.join(['qrelora memory', recipe_path, *overrides])} --budget "
            f"{budget_arg}` itemizes the estimate.")
    if on == "cuda" and estimate.device_need > budget:
        fix = fix_for(recipe, estimator.largest_micro_batch(estimate))
        return (f"{recipe_path}: this run needs an estimated {_size(estimate.device_need)} of GPU memory at its peak "
                f"({where}), but the GPU has {_size(budget)} in all. {fix} {rest}")
    if on != "cuda":
        need = estimate.need * processes
        if need <= host_available:
            return None
        fix = fix_for(recipe, estimator.largest_micro_batch(estimate))
        return (f"{recipe_path}: this run needs an estimated {_size(need)} of host memory at its peak ({where}), but "
                f"this machine has {_size(host_available)} available. {fix} {rest}")
    need = estimate.host_need * processes
    if need <= host_available:
        return None
    host = host_parts(estimate)
    parts = ", ".join(f"{k} {_size(v)}" for k, v in sorted(host.items(), key=lambda kv: -kv[1]))
    return (f"{recipe_path}: besides the GPU, this run needs an estimated {_size(need)} of host memory ({parts}"
            + (f"; x {processes} processes on this machine" if processes > 1 else "")
            + f"), but this machine has {_size(host_available)} available. {host_fix_for(host)} {rest}")


# --------------------------------------------------------------------------------------------------
# Out of device memory all the same


def out_of_memory_report(recipe: Recipe, recipe_path: str, overrides: list[str]) -> str:
    """For `train` running out of device memory: what the estimator says about the recipe on this card,
    and what to change."""
    budget = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 24 * GiB
    command = " ".join(["qrelora memory", recipe_path, *overrides, f"--budget {budget / GiB:.0f}GiB"])
    try:
        estimator = Estimator(recipe, vocab_size_of(recipe)[0], budget)
        estimate = estimator.estimate(compare_checkpointing=False)
        largest = estimator.largest_micro_batch(estimate)
    except Exception as e:  # noqa: BLE001 - the advice must not hide the original error
        return f"The memory estimate could not be made ({type(e).__name__}: {e}). Run: {command}"
    worst = max(estimate.phases, key=lambda p: p.need)
    return (f"The estimate for this recipe is {estimate.need / GiB:.2f} GiB at the {worst.peak_moment} of the "
            f"{worst.name.split(' (')[0]} phase, against {budget / GiB:.2f} GiB on this card; the largest "
            f"micro-batch that fits is {largest}. {fix_for(recipe, largest)} Details: {command}")
