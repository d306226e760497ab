"""How much memory a recipe needs, and with what micro-batch it fits: estimated, and measured.

The estimate does not use rules of thumb: it runs one micro-batch of the recipe's real model, converted to
ReLoRA form by the real layer code, on fake tensors (real shapes and dtypes, no data) and follows every
tensor storage; what no tensor of the step shows (optimizer states, merge temporaries, the CUDA allocator's
reserve and context) is added from known formats. `measure` runs real training steps of the same recipe
(one merge included) and records the peak of each phase, to set against the estimate.

One module per concern:

- `tracker`: `StorageTracker`, which follows tensor storages and their peaks by category, and what each of
  a model's and an optimizer's storages is (`roles_of`, `register_all`, `bytes_by_role`).
- `estimate`: the fake-tensor `Simulator`, the `Estimator` and its `Estimate` of every phase of a run, the
  largest micro-batch that fits, the CUDA figures no tensor shows, and the vocabulary size (`vocab_size_of`).
- `measurement`: `measure`, real steps recorded in a `Measurement`.
- `report`: `parse_bytes`, the estimate against a measurement (`comparison`, `category_comparison`), the
  tables of `qrelora memory` (`render`) and the change to make to a recipe that does not fit (`fix_for`).
- `fit`: `qrelora memory --fit`, the fastest micro-batch / accumulation / checkpointing setting that fits.
- `train_checks`: what `qrelora train` asks of the estimate: `preflight` before anything is built, and
  `out_of_memory_report` when a run goes out of device memory all the same.

The names below are re-exported for `from qrelora.memory import ...`. A test that replaces a name with
monkeypatch patches the module that looks it up (e.g. `qrelora.memory.train_checks.available_host_bytes`),
not this package.
"""

from .estimate import (DEVICE_CATEGORIES, HOST_CATEGORIES, GiB, Estimate, Estimator, PhaseEstimate, Simulator,
                       vocab_size_of)
from .measurement import Measurement, measure
from .report import category_comparison, comparison, fix_for, parse_bytes, render
from .tracker import StorageTracker, bytes_by_role
from .train_checks import out_of_memory_report, preflight

__all__ = [
    "DEVICE_CATEGORIES", "HOST_CATEGORIES", "GiB", "Estimate", "Estimator", "Measurement", "PhaseEstimate",
    "Simulator", "StorageTracker", "bytes_by_role", "category_comparison", "comparison", "fix_for", "measure",
    "out_of_memory_report", "parse_bytes", "preflight", "render", "vocab_size_of",
]
