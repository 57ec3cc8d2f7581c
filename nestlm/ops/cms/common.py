"""Argument checks shared by `cms_scan` and `cms_scan_ref`."""

from __future__ import annotations

from torch import Tensor


def check(name: str, u: Tensor, k: Tensor, v: Tensor, lr: Tensor, W: Tensor, G: Tensor, pos: Tensor, period: int):
    """A one-line ValueError naming the first input whose shape does not fit u [b, t, n] and W [b, n, d]."""
    b, t, n = u.shape
    d = W.shape[-1]
    expect = {
        "k": (k, (b, t, n)),
        "v": (v, (b, t, d)),
        "lr": (lr, (b, t)),
        "W": (W, (b, n, d)),
        "G": (G, (b, n, d)),
        "pos": (pos, (b,)),
    }
    for key, (x, shape) in expect.items():
        if tuple(x.shape) != shape:
            raise ValueError(f"{name}: {key} must have shape {shape}, got {tuple(x.shape)}")
    if not isinstance(period, int) or period < 1:
        raise ValueError(f"{name}: period must be a positive int, got {period!r}")
