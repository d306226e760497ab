"""Seeds derived from the recipe's one seed, so that every random stream of a run is fixed by it."""

from __future__ import annotations

# One stride per stream, each a prime larger than the count of values it indexes (layers, merges), so
# that streams of different seeds and indices never collide in practice.
STRIDES = {"adapter layer": 100_003, "stochastic rounding": 1_000_003, "adapter init": 1_000_033, "moment reset": 7919,
           "low-rank split": 101}


def derive_seed(seed: int, index: int, stream: str) -> int:
    """The seed of item `index` (a layer, a merge) of a named random stream."""
    return seed * STRIDES[stream] + index
