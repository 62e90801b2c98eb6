"""The call plans' generation counter (:mod:`cvt_kernels._plan`), in a module of its own so
that the dispatcher and the backend registry, which bump it, need not import the ops layer
the plans live in."""

from __future__ import annotations

import os

# Random per process: a plan pickled with its module (torch.save(model)) never serves in
# another process, whose dispatcher may choose otherwise (another GPU, other decisions).
_GENERATION = [int.from_bytes(os.urandom(6), "little")]


def generation() -> int:
    """Changes whenever a choice already made may change (see :mod:`cvt_kernels._plan`)."""
    return _GENERATION[0]


def bump_generation() -> None:
    _GENERATION[0] += 1


__all__ = ["bump_generation", "generation"]
