"""Mamba-2 state-space duality (SSD) scan: the chunked algorithm and its token-loop reference.

Per head h with scalar decay A[h] < 0 and state S [p, n]:

    dt_t = softplus(dt_t + dt_bias)          (bias / softplus optional)
    S_t  = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T
    y_t  = S_t C_t + D * x_t,  then  y_t *= silu(z_t)   (z optional)

Same signature and semantics as mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined.
B and C are shared by the heads of a group: head i reads group i // (nheads // ngroups).

The chunked algorithm splits time into chunks of `chunk_size`:
  1. inside a chunk, outputs are a masked "attention" (C B^T) * L with L[t, s] = exp(sum_{s<r<=t} dt_r A)
     built from within-chunk cumulative log decays (exp of non-positive numbers only);
  2. each chunk's own contribution to the state at its end, in one matmul;
  3. a short loop over chunks carries the state (decay of a whole chunk = exp of its log-decay sum);
  4. the carried-in state's contribution to every position of the chunk, in one matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nestlm.ops import backends


def _check(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states) -> tuple[int, ...]:
    if x.dim() != 4:
        raise ValueError(f"ssd_scan: x must be [batch, seqlen, nheads, headdim], got shape {tuple(x.shape)}")
    b, length, h, p = x.shape
    if tuple(dt.shape) != (b, length, h):
        raise ValueError(
            f"ssd_scan: dt must be [batch, seqlen, nheads]={(b, length, h)}, got {tuple(dt.shape)}"
        )
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
        raise ValueError(
            f"ssd_scan: D must be [nheads={h}] or [nheads, headdim]={(h, p)}, got {tuple(D.shape)}"
        )
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


def _prepare_dt(dt, dt_bias, dt_softplus, dtype):
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    return F.softplus(dt) if dt_softplus else dt


def _finish(y, x, D, z, out_dtype):
    """y + D x, gated by silu(z); y, x, z: [b, l, h, p]."""
    if D is not None:
        Dx = D.to(y.dtype)
        y = y + x.to(y.dtype) * (Dx[:, None] if Dx.dim() == 1 else Dx)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def _decay_matrix(a_cs: torch.Tensor) -> torch.Tensor:
    """a_cs: [..., c] within-chunk cumulative log decays -> [..., c, c] with
    out[t, s] = exp(a_cs[t] - a_cs[s]) = exp(sum_{s<r<=t} a_r) for s <= t, else 0.

    The upper triangle is set to -inf before exp (never exp of a positive number, and a zero
    gradient there); within one chunk the difference of prefix sums loses at most a few ulps of
    the chunk's total log decay.
    """
    c = a_cs.shape[-1]
    causal = torch.ones(c, c, dtype=torch.bool, device=a_cs.device).tril()
    return torch.exp((a_cs[..., :, None] - a_cs[..., None, :]).masked_fill(~causal, float("-inf")))


def _ssd_torch(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, return_final_states):
    b, length, h, p, g, n = _check(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states)
    cd = backends.compute_dtype(x, dt, A, B, C, initial_states)
    r = h // g
    c = chunk_size
    nc = max(1, -(-length // c))
    pad = nc * c - length
    dt_ = _prepare_dt(dt, dt_bias, dt_softplus, cd)
    # Padded steps have dt = 0: decay 1 and no input, so the state passes through unchanged.
    xdt = F.pad(x.to(cd) * dt_[..., None], (0, 0, 0, 0, 0, pad))
    dt_ = F.pad(dt_, (0, 0, 0, pad))
    # contiguous: batched matmuls on permuted views fall back to one small GEMM per matrix on CPU
    Bc = F.pad(B.to(cd), (0, 0, 0, 0, 0, pad)).view(b, nc, c, g, n).permute(0, 3, 1, 2, 4).contiguous()  # [b,g,k,c,n]
    Cc = F.pad(C.to(cd), (0, 0, 0, 0, 0, pad)).view(b, nc, c, g, n).permute(0, 3, 1, 2, 4).contiguous()
    Xc = xdt.view(b, nc, c, g, r, p).permute(0, 3, 4, 1, 2, 5).contiguous()  # [b, g, r, k, c, p]
    a = (dt_ * A.to(cd)).view(b, nc, c, g, r).permute(0, 3, 4, 1, 2)  # [b, g, r, k, c] log decays
    a_cs = a.cumsum(-1)

    # 1. intra-chunk: y_t = sum_{s<=t} (C_t . B_s) exp(segsum[t, s]) dt_s x_s
    scores = Cc @ Bc.transpose(-1, -2)  # [b, g, k, c, c]
    Lmat = _decay_matrix(a_cs)  # [b, g, r, k, c, c]
    y = (scores[:, :, None] * Lmat) @ Xc  # [b, g, r, k, c, p]

    # 2. state each chunk adds at its own end (zero initial state)
    decay_to_end = torch.exp(a_cs[..., -1:] - a_cs)  # [b, g, r, k, c]; exponent <= 0 for A <= 0
    chunk_states = (Xc * decay_to_end[..., None]).transpose(-1, -2) @ Bc[:, :, None]  # [b, g, r, k, p, n]

    # 3. carry the state across chunks
    chunk_decay = torch.exp(a_cs[..., -1])  # [b, g, r, k]
    if initial_states is None:
        state = chunk_states.new_zeros(b, g, r, p, n)
    else:
        state = initial_states.to(cd).view(b, g, r, p, n)
    states_in = []
    # unbind, not indexing: the backward of each index op would add into a full-size zero tensor
    for decay_k, states_k in zip(chunk_decay.unbind(-1), chunk_states.unbind(3)):
        states_in.append(state)
        state = decay_k[..., None, None] * state + states_k
    states_in = torch.stack(states_in, dim=3)  # [b, g, r, k, p, n]

    # 4. carried-in state read out at every position: exp(a_cs[t]) C_t . S_in
    y = y + (Cc[:, :, None] @ states_in.transpose(-1, -2)) * torch.exp(a_cs)[..., None]

    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, nc * c, h, p)[:, :length]
    out = _finish(y, x, D, z, x.dtype)
    if not return_final_states:
        return out
    return out, state.reshape(b, h, p, n)


def _ssd_vendor(
    fn, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, return_final_states
):
    return fn(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=D,
        z=z,
        dt_bias=dt_bias,
        initial_states=initial_states,
        dt_softplus=dt_softplus,
        return_final_states=return_final_states,
    )


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    return_final_states: bool = False,
):
    """SSD scan.

    x: [b, l, h, p]; dt: [b, l, h]; A: [h]; B, C: [b, l, g, n]; D: [h] or [h, p]; z: [b, l, h, p];
    dt_bias: [h]; initial_states: [b, h, p, n].
    returns y [b, l, h, p] in x's dtype (and final_states [b, h, p, n], fp32 or fp64, when asked).
    `l` need not be a multiple of chunk_size.
    """
    args = (x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, return_final_states)
    _check(*args[:10])
    if backends.choose("ssd_scan", x.device) == "vendor" and x.dtype != torch.float64:
        return _ssd_vendor(backends.vendor_fn("ssd_scan"), *args)
    return _ssd_torch(*args)


def ssd_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    return_final_states: bool = False,
):
    """Token loop over the recurrence in the module docstring (chunk_size is accepted and unused)."""
    b, length, h, p, g, n = _check(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states)
    cd = backends.compute_dtype(x, dt, A, B, C, initial_states)
    heads_per_group = h // g
    dt_ = _prepare_dt(dt, dt_bias, dt_softplus, cd)
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
    out = _finish(y, x, D, z, x.dtype)
    if not return_final_states:
        return out
    return out, S
