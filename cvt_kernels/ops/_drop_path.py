"""Drop path (stochastic depth, CvT's :class:`cvt_kernels.models.DropPath`) as the ops fold
it into the GEMM that produces its input (``mlp``'s fc2, ``linear``).

``DropPath`` draws ``rand = torch.rand((B, 1, ..., 1), dtype=y.dtype, device=y.device)``
and returns ``y.div(keep) * floor(keep + rand)`` (``keep = 1 - drop_prob``, the sum
``keep + rand`` in ``y``'s dtype). The ops take the draw as an input: :func:`draw` makes it
exactly as ``DropPath`` does (same shape, dtype, device, so the same generator state gives
the same masks), before the op runs; a kernel backend applies the factor in the GEMM's
epilogue (forward) and to the incoming gradient's rows (backward); a composite backend, or
the float64 truth, applies it with :func:`apply`, ``DropPath``'s own arithmetic.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# DropPath's arithmetic is reference math, used by the reference backend too: it lives in the
# backends layer, re-exported here under the names the ops use.
from ..backends.reference_math import drop_path as apply  # noqa: F401
from ..backends.reference_math import drop_path_row_factors as row_factors  # noqa: F401

__all__ = ["apply", "draw", "row_factors"]


def draw(y_shape, dtype: torch.dtype, device: torch.device, drop_prob: float
         ) -> Optional[Tensor]:
    """``DropPath``'s uniform draws for an output of ``y_shape`` (``None`` when
    ``drop_prob`` is 0: nothing is drawn, as ``DropPath`` draws nothing then)."""
    if not drop_prob:
        return None
    # One small launch, kept: drawing inside the GEMMs (Philox) would give other masks
    # than the reference model's for the same seed.
    return torch.rand((y_shape[0],) + (1,) * (len(y_shape) - 1), dtype=dtype, device=device)
