"""Token-loop reference of the SSD scan: the recurrence of nestlm.ops.ssd, one step at a time with
plain autograd (fp64-able)."""

from __future__ import annotations

import torch

from nestlm.ops.dtypes import state_dtype
from nestlm.ops.ssd.common import check, finish, prepare_dt


def ssd_scan_ref(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    dt_softplus=False,
    return_final_states=False,
):
    """Token-loop reference of `ssd_scan` (same arguments and results; chunk_size is unused)."""
    b, length, h, p, g, n = check(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states)
    cd = state_dtype(x, dt, A, B, C, initial_states)
    heads_per_group = h // g
    dt_ = prepare_dt(dt, dt_bias, dt_softplus, cd)
    S = x.new_zeros(b, h, p, n, dtype=cd) if initial_states is None else initial_states.to(cd)
    ys = []
    steps = zip(x.to(cd).unbind(1), dt_.unbind(1), B.to(cd).unbind(1), C.to(cd).unbind(1))
    for x_t, dt_t, B_t, C_t in steps:
        B_t = B_t.repeat_interleave(heads_per_group, dim=1)  # [b, h, n]
        C_t = C_t.repeat_interleave(heads_per_group, dim=1)
        decay = torch.exp(dt_t * A.to(cd))  # [b, h]
        S = decay[:, :, None, None] * S + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
        ys.append((S * C_t[:, :, None, :]).sum(-1))  # [b, h, p]
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p, dtype=cd)
    out = finish(y, x, D, z, x.dtype)
    if not return_final_states:
        return out
    return out, S
