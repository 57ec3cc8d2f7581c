"""The precision rule for recurrent state: fp32, and fp64 stays fp64.

Recurrent states, decays and inner-loop memories are long products of updates; in half precision
they drift within a few hundred tokens. Every op and layer keeps them in fp32 whatever the
activations' dtype (bf16 autocast included), except that fp64 inputs (tests) keep fp64.
"""

from __future__ import annotations

import torch


def state_dtype(*like: torch.Tensor | torch.dtype | None) -> torch.dtype:
    """fp64 if any of `like` (tensors or dtypes; None entries are skipped) is fp64, else fp32.

    With nothing given (only None), the default dtype decides: fp64 under
    torch.set_default_dtype(torch.float64), else fp32.
    """
    dtypes = [x.dtype if isinstance(x, torch.Tensor) else x for x in like if x is not None]
    if not dtypes:
        dtypes = [torch.get_default_dtype()]
    return torch.float64 if torch.float64 in dtypes else torch.float32
