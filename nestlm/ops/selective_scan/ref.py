"""Token-loop reference of the selective scan: the recurrence of nestlm.ops.selective_scan, one step
at a time with plain autograd (fp64-able)."""

from __future__ import annotations

import torch

from nestlm.ops.dtypes import state_dtype
from nestlm.ops.selective_scan.common import check, finish, grouped, one_layout, prepare_delta


def selective_scan_ref(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    *,
    initial_state=None,
):
    """Token-loop reference of `selective_scan` (same arguments and results)."""
    b, d, length, n = check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    cd = state_dtype(u, delta, A, B, C, initial_state)
    u, delta, z = one_layout(u, delta, z)
    delta_ = prepare_delta(delta, delta_bias, delta_softplus, cd)
    Bg, Cg = grouped(B).to(cd), grouped(C).to(cd)
    per_group = d // Bg.shape[1]
    A_ = A.to(cd)
    h = u.new_zeros(b, d, n, dtype=cd) if initial_state is None else initial_state.to(cd)
    ys = []
    steps = zip(u.to(cd).unbind(-1), delta_.unbind(-1), Bg.unbind(-1), Cg.unbind(-1))
    for u_t, dt_t, B_t, C_t in steps:
        B_t = B_t.repeat_interleave(per_group, dim=1)  # [b, d, n]
        C_t = C_t.repeat_interleave(per_group, dim=1)
        h = torch.exp(dt_t[:, :, None] * A_) * h + (dt_t * u_t)[:, :, None] * B_t
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(b, d, 0, dtype=cd)
    out = finish(y, u, D, z, u.dtype)
    return (out, h) if return_last_state else out
