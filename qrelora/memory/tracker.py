"""Following tensor storages: live bytes by category and their peaks (`StorageTracker`), and what each of a
model's and an optimizer's storages is (`roles_of`, `register_all`, `bytes_by_role`).

The estimate runs the tracker over fake tensors, the CPU measurement over the real ones; both name the
storages with the same categories (those of `estimate.DEVICE_CATEGORIES` and `estimate.HOST_CATEGORIES`).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..quant import FrozenWeight
from ..relora import ReLoRALinear


class StorageTracker(TorchDispatchMode):
    """Live bytes of every tensor storage it has been shown, and their peak in each phase.

    Storages are registered with a category (`register`) or, for the outputs of every op run while the
    tracker is active, with the current `category` (tensors whose last dimension is the vocabulary are
    "logits and loss"). An output that shares storage with an input (a view, an in-place op) is not new
    memory and is not counted. A storage leaves the count when torch frees it.
    """

    def __init__(self, vocab_size: int = 0):
        super().__init__()
        self.vocab_size = vocab_size
        # Storage keys (the address of the storage) are reused once a storage is freed, so each tracked
        # storage also gets a serial number; snapshots are by serial number.
        self.live: dict[int, tuple[int, int, str]] = {}
        """Storage key -> (serial, bytes, category)."""
        self._serial = 0
        self.total = 0
        self.phase = "idle"
        self.category = "activations"
        self.peak: dict[str, int] = {}
        self.at_peak: dict[str, dict[int, tuple[int, str]]] = {}
        """Phase -> serial -> (bytes, category) of the storages live at the phase's peak."""
        self._rising = False

    def register(self, t: Tensor, category: str) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live or storage.nbytes() == 0 or t.is_meta:  # meta tensors own no memory
            return
        self._serial += 1
        self.live[key] = (self._serial, storage.nbytes(), category)
        self.total += storage.nbytes()
        weakref.finalize(storage, self._free, key, self._serial)
        if self.total > self.peak.get(self.phase, -1):
            self.peak[self.phase] = self.total
            self._rising = True

    def _snapshot(self) -> dict[int, tuple[int, str]]:
        return {serial: (nbytes, category) for serial, nbytes, category in self.live.values()}

    def _free(self, key: int, serial: int) -> None:
        if key not in self.live or self.live[key][0] != serial:
            return
        if self._rising:  # the total is about to fall from a local maximum: remember what made it
            self.at_peak[self.phase] = self._snapshot()
            self._rising = False
        self.total -= self.live.pop(key)[1]

    @contextlib.contextmanager
    def in_phase(self, phase: str, category: str | None = None):
        """Peaks inside the block are the phase's; new storages get `category` (default: activations)."""
        previous = self.phase, self.category
        self.phase, self.category = phase, category or "activations"
        if self.total > self.peak.get(phase, -1):
            self.peak[phase] = self.total
            self._rising = True
        try:
            yield
        finally:
            if self._rising:
                self.at_peak[self.phase] = self._snapshot()
                self._rising = False
            self.phase, self.category = previous

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.untyped_storage()._cdata not in inputs:
                vocab = self.vocab_size and t.ndim >= 2 and t.shape[-1] == self.vocab_size
                self.register(t, "logits and loss" if vocab and self.category == "activations" else self.category)
        return out

    def by_category(self, phase: str, roles: dict[int, str] | None = None) -> dict[str, int]:
        """Bytes by category at the phase's peak. `roles` (storage key -> category, from `roles_of`) names
        what the storages still alive are now, overriding the category they were created with (a
        gradient is born as the output of an op of the backward)."""
        now = {self.live[key][0]: category for key, category in (roles or {}).items() if key in self.live}
        out: dict[str, int] = {}
        for serial, (nbytes, category) in self.at_peak.get(phase, {}).items():
            category = now.get(serial, category)
            out[category] = out.get(category, 0) + nbytes
        return out


def _storages_by_role(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                      extra: dict[str, list[Tensor]] | None = None) -> dict[int, tuple[Tensor, str]]:
    """Storage key -> (one tensor on it, what it is) for the model's, the optimizer's and `extra` tensors."""
    found: dict[int, tuple[Tensor, str]] = {}

    def put(t: Tensor | None, category: str) -> None:
        if isinstance(t, Tensor) and t.untyped_storage().nbytes():
            found.setdefault(t.untyped_storage()._cdata, (t, category))

    for module in model.modules():
        if isinstance(module, FrozenWeight):
            for b in module.buffers(recurse=False):
                put(b, "frozen weights")
            if module.host is not None:
                put(module.host.tensor, module.mode.host_category)
        elif isinstance(module, ReLoRALinear):
            put(module.lora_A, "adapters")
            put(module.lora_B, "adapters")
    for p in model.parameters():
        put(p.grad, "gradients")
        put(p, "full-rank weights")
    for b in model.buffers():
        put(b, "full-rank weights")
    if optimizer is not None:
        for state in optimizer.state.values():
            for t in state.values():
                put(t, "optimizer states")
    for category, tensors in (extra or {}).items():
        for t in tensors:
            put(t, category)
    return found


def roles_of(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             extra: dict[str, list[Tensor]] | None = None) -> dict[int, str]:
    """What each of the model's and optimizer's storages (and `extra` ones, by category) is, by storage key."""
    return {key: category for key, (_, category) in _storages_by_role(model, optimizer, extra).items()}


def register_all(tracker: StorageTracker, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    for t, category in _storages_by_role(model, optimizer).values():
        tracker.register(t, category)


def bytes_by_role(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    for t, category in _storages_by_role(model, optimizer).values():
        out[category] = out.get(category, 0) + t.untyped_storage().nbytes()
    return out
