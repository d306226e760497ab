"""Optimizers (torch AdamW, bitsandbytes 8-bit and paged 8-bit AdamW) and the partial reset of the
adapters' Adam moments at ReLoRA restarts."""

from __future__ import annotations

import ctypes
import sys
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .config import OptimConfig
from .quant import bnb_functional


class OptimizerKind:
    """One optimizer the recipe can name (optim.name): how to build it, and its state's storage format for
    the memory tool."""

    name: str

    def build(self, groups: list[dict], **kwargs) -> torch.optim.Optimizer:
        raise NotImplementedError

    def state_bytes(self, params: list[Tensor]) -> int:
        """Bytes of the state for these parameters once the optimizer has stepped."""
        raise NotImplementedError

    def step_workspace(self, params: list[Tensor], device_type: str) -> int:
        """Temporaries of one step on the device."""
        return 0


class TorchAdamW(OptimizerKind):
    """torch.optim.AdamW: two moments in the parameter's dtype."""

    name = "adamw"

    def build(self, groups, **kwargs):
        return torch.optim.AdamW(groups, **kwargs)

    def state_bytes(self, params):
        return sum(2 * p.numel() * p.element_size() for p in params)

    def step_workspace(self, params, device_type):
        """The multi-tensor path on CUDA builds the square root of every second moment at once; the
        per-tensor path (CPU) two temporaries of the largest tensor."""
        if not params:
            return 0
        if device_type == "cuda":
            return sum(p.numel() * p.element_size() for p in params)
        return 2 * max(p.numel() * p.element_size() for p in params)


class AdamW8bit(OptimizerKind):
    """bitsandbytes' blockwise 8-bit AdamW: two uint8 moments plus one fp32 scale per block of 256 values
    each, fp32 moments for tensors under 4096 values, two shared 256-entry code tables (the defaults of
    bnb.optim.Optimizer8bit). Its step updates in place."""

    name, bnb_class = "adamw8bit", "AdamW8bit"
    min_8bit_size = 4096
    state_blocksize = 256

    def build(self, groups, **kwargs):
        bnb_functional()  # silences bitsandbytes' CPU import noise
        import bitsandbytes as bnb  # heavy (1.4 s) and unused by torch's AdamW: imported when needed

        with warnings.catch_warnings():
            # Paged optimizers warn that they fall back to ordinary memory on CPU; nothing a user can act on.
            warnings.simplefilter("ignore")
            return getattr(bnb.optim, self.bnb_class)(groups, **kwargs)

    def state_bytes(self, params):
        total = 0
        for p in params:
            n = p.numel()
            total += 2 * n * 4 if n < self.min_8bit_size else 2 * n + 2 * 4 * -(-n // self.state_blocksize)
        if any(p.numel() >= self.min_8bit_size for p in params):
            total += 2 * 256 * 4
        return total


class PagedAdamW8bit(AdamW8bit):
    """The same states in CUDA managed memory, which the driver can page to the host under pressure."""

    name, bnb_class = "paged_adamw8bit", "PagedAdamW8bit"


OPTIMIZERS: dict[str, OptimizerKind] = {o.name: o for o in (TorchAdamW(), AdamW8bit(), PagedAdamW8bit())}


def resolve_optimizer_name(cfg: OptimConfig, device_type: str) -> str:
    if cfg.name != "auto":
        return cfg.name
    # On CPU the 8-bit step is plain torch code, ~7x slower than torch's AdamW (measured: 90 ms against
    # 12 ms for 10M parameters on a 2-core CPU).
    return "paged_adamw8bit" if device_type == "cuda" else "adamw"


def is_adapter(name: str) -> bool:
    """Whether a parameter (by its name in the model) is a low-rank adapter factor: ours and peft's are
    called lora_A and lora_B."""
    return any(part in ("lora_A", "lora_B") for part in name.split("."))


def param_groups(model: nn.Module, weight_decay: float, embedding_lr_ratio: float = 1.0) -> list[dict]:
    """The model's trainable parameters by role, each group marked with it ("role") and with the multiple of the
    run's learning rate it trains at ("lr_scale"): "blocks" (the attention and MLP matrices while they train in
    full, 1x), "adapters" (their low-rank factors: the jagged rate, see schedule.JaggedCosine), "embeddings"
    (token embeddings and LM head, one parameter when tied) and "norms" (norm weights and biases), both at
    embedding_lr_ratio. Matrices decay (weight_decay); norms and biases never do."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings |= {id(p) for p in head.parameters()} if head is not None else set()
    by_role: dict[str, list[Tensor]] = {"blocks": [], "adapters": [], "embeddings": [], "norms": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            role = ("adapters" if is_adapter(name) else "norms" if p.ndim < 2 else
                    "embeddings" if id(p) in embeddings else "blocks")
            by_role[role].append(p)
    scale = {"blocks": 1.0, "adapters": 1.0, "embeddings": embedding_lr_ratio, "norms": embedding_lr_ratio}
    return [{"params": ps, "role": role, "lr_scale": scale[role], "weight_decay": 0.0 if role == "norms" else weight_decay}
            for role, ps in by_role.items() if ps]


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each group's role, rate multiple and weight decay: the run's own, put back after a checkpoint's optimizer
    state is loaded (torch's load_state_dict takes them from the checkpoint)."""
    return [{k: g[k] for k in ("role", "lr_scale", "weight_decay") if k in g} for g in optimizer.param_groups]


def build_optimizer(cfg: OptimConfig, model: nn.Module, lr: float, device_type: str,
                    embedding_lr_ratio: float = 1.0) -> torch.optim.Optimizer:
    kind = OPTIMIZERS[resolve_optimizer_name(cfg, device_type)]
    return kind.build(param_groups(model, cfg.weight_decay, embedding_lr_ratio), lr=lr, betas=tuple(cfg.betas),
                      eps=cfg.eps)


def release_state(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> int:
    """Drop the optimizer's state of `params` (the linears the warm-start switch replaces) and free it now;
    returns the bytes of paged state that were freed explicitly.

    Dropping an ordinary state tensor frees it. A paged 8-bit state does not go that way: bitsandbytes
    allocates it in CUDA managed memory, wraps it in a tensor that does not own it, and keeps it in the
    process-wide GlobalPageManager.paged_tensors (bitsandbytes 0.50: optim/optimizer.py get_state_buffer,
    functional.get_paged), which nothing ever frees. Left there, the switch of the 1.3B recipe would keep about
    2 GiB of the replaced linears' moments for the rest of the run. So each one is taken out of that list and
    handed back to the CUDA driver."""
    registry = _paged_registry()
    freed = 0
    for p in params:
        state = optimizer.state.pop(p, None) or {}
        for t in list(state.values()):
            if isinstance(t, Tensor) and getattr(t, "is_paged", False):
                registry[:] = [r for r in registry if r is not t]
                freed += t.numel() * t.element_size()
                free_paged(t)
        state.clear()
    return freed


def _paged_registry() -> list:
    """bitsandbytes' process-wide list of paged tensors (empty where bitsandbytes is not imported)."""
    functional = sys.modules.get("bitsandbytes.functional")
    return functional.GlobalPageManager.get_instance().paged_tensors if functional else []


def free_paged(t: Tensor) -> None:
    """Return a paged tensor's CUDA managed memory to the driver (cudaFree). The caller must hold the last
    reference to `t`: it must not be read afterwards. bitsandbytes has no call for this, and its library links
    the CUDA runtime dynamically, so the runtime is already loaded in this process under its soname."""
    torch.cuda.synchronize()  # the optimizer's kernels may still be reading it
    cudart = ctypes.CDLL(f"libcudart.so.{torch.version.cuda.split('.')[0]}")
    cudart.cudaFree.argtypes = [ctypes.c_void_p]
    error = cudart.cudaFree(ctypes.c_void_p(t.data_ptr()))
    if error:
        raise RuntimeError(f"cudaFree of a paged optimizer state returned CUDA error {error}")


def carry_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Hand the state of parameters present in both optimizers to the new one (used when the trainable
    set changes at the warm-start switch: embeddings, norms and head keep their moments)."""
    params = {id(p) for g in new.param_groups for p in g["params"]}
    for p, state in old.state.items():
        if id(p) in params:
            new.state[p] = state


# --------------------------------------------------------------------------------------------------
# Partial reset of the adapters' moments


def _moments(state: dict) -> tuple[str, str] | None:
    if "exp_avg" in state:
        return "exp_avg", "exp_avg_sq"
    if "state1" in state:
        return "state1", "state2"
    return None


def _decoded(state: dict, key: str) -> Tensor:
    """A moment as fp32 values, decoding bitsandbytes' blockwise 8-bit form (code[i] * absmax[block])."""
    t = state[key]
    if t.dtype != torch.uint8:
        return t.float()
    suffix = key[-1]
    # Paged states live in CUDA managed memory that torch reports as CPU tensors: compute where they are.
    qmap, absmax = state["qmap" + suffix].to(t.device), state["absmax" + suffix].to(t.device)
    values = qmap[t.reshape(-1).long()]
    # The block size is bitsandbytes' fixed one for optimizer states, not numel / blocks: that guess is wrong
    # whenever the last block is short by at least the number of blocks (8,000 values in 32 blocks: 250).
    blocksize = AdamW8bit.state_blocksize
    pad = (-values.numel()) % blocksize
    values = torch.nn.functional.pad(values, (0, pad)).view(-1, blocksize) * absmax[:, None]
    return values.view(-1)[: t.numel()].view(t.shape)


def _zero_entries(state: dict, key: str, mask: Tensor) -> None:
    """Set the masked entries of a moment to exactly zero. For 8-bit states this writes the index of the
    code's exact-zero entry, leaving every kept entry's code untouched (a requantization would decode a
    zero as ~1e-5 x absmax and perturb the kept values)."""
    t = state[key]
    mask = mask.to(t.device)
    if t.dtype == torch.uint8:
        zero_index = int((state["qmap" + key[-1]] == 0).nonzero()[0])
        t.masked_fill_(mask, zero_index)
    else:
        t.masked_fill_(mask, 0.0)


class MomentReset:
    """Which entries of an adapter's Adam moments a restart zeroes (recipe key relora.reset)."""

    name: str

    def mask(self, m1: Tensor, ratio: float, generator: torch.Generator | None) -> Tensor:
        """True where both moments are zeroed, chosen from the first moment m1 (fp32)."""
        raise NotImplementedError


class MagnitudeReset(MomentReset):
    """The paper's reset: the `ratio` share of entries with the smallest first moment."""

    name = "magnitude"

    def mask(self, m1, ratio, generator):
        k = int(round(ratio * m1.numel()))
        mask = torch.zeros(m1.numel(), dtype=torch.bool, device=m1.device)
        if k > 0:
            mask[torch.topk(m1.abs().view(-1), k, largest=False).indices] = True
        return mask.view(m1.shape)


class RandomReset(MomentReset):
    """A random `ratio` share of entries (drawn on the CPU, so every data-parallel rank draws the same)."""

    name = "random"

    def mask(self, m1, ratio, generator):
        return torch.rand(m1.shape, generator=generator, device="cpu").to(m1.device) < ratio


class ZeroReset(MomentReset):
    """Every entry."""

    name = "zero"

    def mask(self, m1, ratio, generator):
        return torch.ones_like(m1, dtype=torch.bool)


class NoReset(MomentReset):
    """Nothing: the moments carry over the restart."""

    name = "none"

    def mask(self, m1, ratio, generator):
        return torch.zeros_like(m1, dtype=torch.bool)


RESETS: dict[str, MomentReset] = {r.name: r for r in (MagnitudeReset(), RandomReset(), ZeroReset(), NoReset())}


@torch.no_grad()
def prune_adapter_moments(optimizer: torch.optim.Optimizer, params: Iterable[Tensor], mode: str, ratio: float,
                          generator: torch.Generator | None = None) -> float:
    """Zero a share of the Adam moments of `params` (the adapters), with ONE mask per tensor for both
    moments; the step count is kept. Returns the share of moment entries that are zero afterwards.

    One mask matters: an entry whose first moment survives while its second was zeroed takes a step of
    about m / eps. Pruning the moments independently made a small ReLoRA run diverge (measured on a 5.3M-parameter
    LLaMA: eval loss 5.03 -> 6.26 after the second restart, against 4.75 with one mask).
    """
    zero = total = 0
    for p in params:
        state = optimizer.state.get(p)
        keys = _moments(state) if state else None
        if keys is None:
            continue
        m1_key, m2_key = keys
        m1 = _decoded(state, m1_key)
        reset = RESETS["zero"] if ratio >= 1.0 and mode != "none" else RESETS[mode]
        mask = reset.mask(m1, ratio, generator)
        _zero_entries(state, m1_key, mask)
        _zero_entries(state, m2_key, mask)
        both_zero = (_decoded(state, m1_key) == 0) & (_decoded(state, m2_key) == 0)
        zero += int(both_zero.sum())
        total += m1.numel()
    return zero / total if total else 0.0
