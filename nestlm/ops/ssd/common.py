"""Checks and input / output steps shared by `ssd_scan` and `ssd_scan_ref`."""

from __future__ import annotations

import torch.nn.functional as F


def check(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states) -> tuple[int, ...]:
    if x.dim() != 4:
        raise ValueError(f"ssd_scan: x must be [batch, seqlen, nheads, headdim], got shape {tuple(x.shape)}")
    b, length, h, p = x.shape
    if tuple(dt.shape) != (b, length, h):
        raise ValueError(f"ssd_scan: dt must be [batch, seqlen, nheads]={(b, length, h)}, got {tuple(dt.shape)}")
    if tuple(A.shape) != (h,):
        raise ValueError(f"ssd_scan: A must be [nheads={h}], got shape {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, length):
        raise ValueError(f"ssd_scan: B must be [batch, seqlen, ngroups, dstate], got shape {tuple(B.shape)}")
    g, n = B.shape[2], B.shape[3]
    if h % g != 0:
        raise ValueError(f"ssd_scan: ngroups={g} (B.shape[2]) must divide nheads={h}")
    if tuple(C.shape) != tuple(B.shape):
        raise ValueError(f"ssd_scan: C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd_scan: chunk_size must be a positive int, got {chunk_size!r}")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"ssd_scan: D must be [nheads={h}] or [nheads, headdim]={(h, p)}, got {tuple(D.shape)}")
    if z is not None and tuple(z.shape) != tuple(x.shape):
        raise ValueError(f"ssd_scan: z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None and tuple(dt_bias.shape) != (h,):
        raise ValueError(f"ssd_scan: dt_bias must be [nheads={h}], got shape {tuple(dt_bias.shape)}")
    if initial_states is not None and tuple(initial_states.shape) != (b, h, p, n):
        raise ValueError(
            f"ssd_scan: initial_states must be [batch, nheads, headdim, dstate]={(b, h, p, n)}, "
            f"got {tuple(initial_states.shape)}"
        )
    return b, length, h, p, g, n


def prepare_dt(dt, dt_bias, dt_softplus, dtype):
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    return F.softplus(dt) if dt_softplus else dt


def finish(y, x, D, z, out_dtype):
    """y + D x, gated by silu(z); y, x, z: [b, l, h, p]."""
    if D is not None:
        Dx = D.to(y.dtype)
        y = y + x.to(y.dtype) * (Dx[:, None] if Dx.dim() == 1 else Dx)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)
