"""Checks and input / output steps shared by `selective_scan` and `selective_scan_ref`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nestlm.ops._layout import dense


def check(u, delta, A, B, C, D, z, delta_bias, initial_state) -> tuple[int, ...]:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be [batch, dim, seqlen], got shape {tuple(u.shape)}")
    b, d, length = u.shape
    if tuple(delta.shape) != (b, d, length):
        raise ValueError(f"selective_scan: delta must have u's shape {(b, d, length)}, got {tuple(delta.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported; A must be a real [dim, dstate] tensor")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"selective_scan: A must be [dim={d}, dstate], got shape {tuple(A.shape)}")
    n = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        ok = (M.dim() == 3 and tuple(M.shape) == (b, n, length)) or (
            M.dim() == 4 and M.shape[0] == b and M.shape[2:] == (n, length) and M.shape[1] >= 1 and d % M.shape[1] == 0
        )
        if not ok:
            raise ValueError(
                f"selective_scan: {name} must be [batch, dstate, seqlen]={(b, n, length)} or "
                f"[batch, groups, dstate, seqlen] with groups dividing dim={d}, got {tuple(M.shape)}"
            )
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError(f"selective_scan: B and C must have the same groups, got {B.shape[1]} and {C.shape[1]}")
    if D is not None and tuple(D.shape) != (d,):
        raise ValueError(f"selective_scan: D must be [dim={d}], got shape {tuple(D.shape)}")
    if z is not None and tuple(z.shape) != (b, d, length):
        raise ValueError(f"selective_scan: z must have u's shape {(b, d, length)}, got {tuple(z.shape)}")
    if delta_bias is not None and tuple(delta_bias.shape) != (d,):
        raise ValueError(f"selective_scan: delta_bias must be [dim={d}], got shape {tuple(delta_bias.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (b, d, n):
        raise ValueError(
            f"selective_scan: initial_state must be [batch, dim, dstate]={(b, d, n)}, got {tuple(initial_state.shape)}"
        )
    return b, d, length, n


def grouped(M: torch.Tensor) -> torch.Tensor:
    """[b, n, l] -> [b, 1, n, l]; grouped [b, g, n, l] unchanged."""
    return M.unsqueeze(1) if M.dim() == 3 else M


def one_layout(u, delta, z):
    """u, delta, z [b, d, l] as contiguous tensors: layers pass transposed [b, l, d] views (see _layout)."""
    return dense(u), dense(delta), None if z is None else dense(z)


def prepare_delta(delta, delta_bias, delta_softplus, dtype):
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def finish(y, u, D, z, out_dtype):
    """y + D u, gated by silu(z); all [b, d, l]."""
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)
