"""Mamba-2 state-space duality (SSD) scan: the chunked algorithm and its token-loop reference.

Per head h with scalar decay A[h] < 0 and state S [p, n]:

    dt_t = softplus(dt_t + dt_bias)          (bias / softplus optional)
    S_t  = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T
    y_t  = S_t C_t + D * x_t,  then  y_t *= silu(z_t)   (z optional)

Same signature and semantics as mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined.
B and C are shared by the heads of a group: head i reads group i // (nheads // ngroups).

The chunked algorithm splits time into chunks of `chunk_size` tokens (on CPU at most
CPU_MAX_CHUNK, see there):
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


class _ChunkedSSD(torch.autograd.Function):
    """Steps 1-4 of the module doc, with a hand-written backward.

    C, B: [b, l, g, n]; xdt = dt * x: [b, l, h, p]; a = dt * A: [b, l, h] (log decays); S0:
    [b, h, p, n]; l a multiple of chunk. Returns y [b, l, h, p] and the final state [b, h, p, n].

    Why by hand: autograd keeps every [c, c] intermediate of step 1 and walks the chunk loop of
    step 3 op by op; here the backward makes five passes over the [c, c] matrices and runs the
    reverse chunk loop without a graph. The per-position decays of steps 2 and 4 scale B and C
    ([.., c, n]) rather than x and y ([.., c, p]): on CPU these passes are memory-bound and
    n <= p in every Mamba-2 configuration. Inputs, outputs and gradients stay contiguous in the
    caller's layout: CPU elementwise ops that mix a permuted view with a contiguous tensor stride
    through memory and run ~10x slower.
    """

    @staticmethod
    def forward(ctx, C, B, xdt, a, S0, chunk: int):
        b, length, h, p = xdt.shape
        g, n = B.shape[-2:]
        r, nc, c = h // g, length // chunk, chunk
        Bc = B.view(b, nc, c, g, n).permute(0, 3, 1, 2, 4).contiguous()  # [b, g, k, c, n]
        Cc = C.view(b, nc, c, g, n).permute(0, 3, 1, 2, 4).contiguous()
        Xc = xdt.view(b, nc, c, g, r, p).permute(0, 3, 4, 1, 2, 5).contiguous()  # [b, g, r, k, c, p]
        a = a.view(b, nc, c, g, r).permute(0, 3, 4, 1, 2)  # [b, g, r, k, c]
        S0 = S0.reshape(b, g, r, p, n)
        a_cs = a.cumsum(-1)
        # 1. intra-chunk: exp of the masked segment sums, never of a positive number
        seg = a_cs[..., :, None] - a_cs[..., None, :]  # [b, g, r, k, c, c]
        seg.masked_fill_(~torch.ones(c, c, dtype=torch.bool, device=a.device).tril(), float("-inf"))
        Lmat = seg.exp_()
        M = Lmat * (Cc @ Bc.transpose(-1, -2))[:, :, None]
        # 2. each chunk's own contribution to the state at its end
        dte = torch.exp(a_cs[..., -1:] - a_cs)  # [b, g, r, k, c]
        Bd = Bc[:, :, None] * dte[..., None]  # [b, g, r, k, c, n]
        chunk_states = Xc.transpose(-1, -2) @ Bd  # [b, g, r, k, p, n]
        # 3. carry across chunks; 4. read the carried-in state at every position
        ein = torch.exp(a_cs)  # decay from the chunk start to each position
        decay = ein[..., -1]  # [b, g, r, k]: of a whole chunk
        states_in = torch.empty_like(chunk_states)
        state = S0
        for i, (decay_i, cs_i) in enumerate(zip(decay.unbind(-1), chunk_states.unbind(3))):
            states_in[:, :, :, i] = state
            state = torch.addcmul(cs_i, decay_i[..., None, None], state)
        Ce = Cc[:, :, None] * ein[..., None]  # [b, g, r, k, c, n]
        y = Ce @ states_in.transpose(-1, -2)  # [b, g, r, k, c, p]
        y.view(-1, c, p).baddbmm_(M.view(-1, c, c), Xc.view(-1, c, p))
        ctx.save_for_backward(Cc, Bc, Xc, Lmat, M, dte, Bd, decay, states_in, ein, Ce)
        return y.permute(0, 3, 4, 1, 2, 5).reshape(b, length, h, p), state.reshape(b, h, p, n)

    @staticmethod
    def backward(ctx, gy, gstate):
        Cc, Bc, Xc, Lmat, M, dte, Bd, decay, states_in, ein, Ce = ctx.saved_tensors
        b, g, r, nc, c, p = Xc.shape
        n = Bc.shape[-1]
        if gy is None:
            gy = torch.zeros_like(Xc)
        else:
            gy = gy.reshape(b, nc, c, g, r, p).permute(0, 3, 4, 1, 2, 5).contiguous()
        # 4. y4 = Ce S_in^T with Ce = C * ein
        gCe = gy @ states_in  # [b, g, r, k, c, n]
        g_in = gy.transpose(-1, -2) @ Ce  # [b, g, r, k, p, n]
        gC = (gCe * ein[..., None]).sum(2)  # [b, g, k, c, n]
        g_acs = (gCe * Ce).sum(-1)  # d ein / d a_cs = ein
        # 3. reverse chunk loop: g_run = dL/d(state leaving chunk i)
        if gstate is None:
            g_run = torch.zeros_like(states_in[:, :, :, 0])
        else:
            g_run = gstate.to(Xc.dtype).reshape(b, g, r, p, n)
        g_cs = torch.empty_like(states_in)
        g_decay = torch.empty_like(decay)
        for i in range(decay.shape[-1] - 1, -1, -1):
            g_cs[:, :, :, i] = g_run
            g_decay[..., i] = (g_run * states_in[:, :, :, i]).sum((-1, -2))
            g_run = torch.addcmul(g_in[:, :, :, i], decay[..., i, None, None], g_run)
        g_last = g_decay * decay  # d/d a_cs[..., -1]
        # 2. chunk_states = Xc^T Bd with Bd = B * dte
        gXc = Bd @ g_cs.transpose(-1, -2)  # [b, g, r, k, c, p]
        gBd = Xc @ g_cs  # [b, g, r, k, c, n]
        gB = (gBd * dte[..., None]).sum(2)  # [b, g, k, c, n]
        g_dte = (gBd * Bd).sum(-1)  # times dte: d dte / d a_cs = -dte
        g_acs -= g_dte
        g_last = g_last + g_dte.sum(-1)
        # 1. y1 = (scores * Lmat) @ Xc
        dM = gy @ Xc.transpose(-1, -2)  # [b, g, r, k, c, c]
        gXc.view(-1, c, p).baddbmm_(M.view(-1, c, c).transpose(-1, -2), gy.view(-1, c, p))
        gscores = (dM * Lmat).sum(2)  # [b, g, k, c, c]
        dM.mul_(M)  # = dL/d(segment sum); zero above the diagonal
        g_acs += dM.sum(-1) - dM.sum(-2)
        gC += gscores @ Bc
        gB += gscores.transpose(-1, -2) @ Cc
        g_acs[..., -1] += g_last
        ga = g_acs.flip(-1).cumsum(-1).flip(-1)  # a_cs = cumsum(a)
        return (
            gC.permute(0, 2, 3, 1, 4).reshape(b, nc * c, g, n),
            gB.permute(0, 2, 3, 1, 4).reshape(b, nc * c, g, n),
            gXc.permute(0, 3, 4, 1, 2, 5).reshape(b, nc * c, g * r, p),
            ga.permute(0, 3, 4, 1, 2).reshape(b, nc * c, g * r),
            g_run.reshape(b, g * r, p, n),
            None,
        )


def _pad(t: torch.Tensor, pad: tuple[int, ...]) -> torch.Tensor:
    """F.pad, without its copy when nothing is padded."""
    return t if not any(pad) else F.pad(t, pad)


# On CPU, step 1's [c, c] work per token grows with c while the chunk loop of step 3 is cheap:
# fwd+bwd at b=2, h=8, p=32, n=16, L=4096 took 77 / 63 / 47 / 61 / 110 / 254 ms (median of 9)
# at c = 8 / 16 / 32 / 64 / 128 / 256 (bench/ops_cpu.py shape, 2 threads). chunk_size is the GPU
# kernels' tile (Mamba-2 configs use 256), so the CPU path caps it; the result does not depend
# on the chunk.
CPU_MAX_CHUNK = 32


def _ssd_torch(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, return_final_states):
    b, length, h, p, g, n = _check(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states)
    cd = backends.compute_dtype(x, dt, A, B, C, initial_states)
    c = min(chunk_size, CPU_MAX_CHUNK) if x.device.type == "cpu" else chunk_size
    pad = max(1, -(-length // c)) * c - length
    dt_ = _prepare_dt(dt, dt_bias, dt_softplus, cd)
    # Padded steps have dt = 0: decay 1 and no input, so the state passes through unchanged.
    pad3 = (0, 0, 0, 0, 0, pad)
    xdt = _pad(x.to(cd) * dt_[..., None], pad3)
    dt_ = _pad(dt_, (0, 0, 0, pad))
    if initial_states is None:
        S0 = xdt.new_zeros(b, h, p, n)
    else:
        S0 = initial_states.to(cd)
    # the scan runs in the compute dtype whatever autocast says
    with torch.autocast(device_type=x.device.type, enabled=False):
        y, state = _ChunkedSSD.apply(_pad(C.to(cd), pad3), _pad(B.to(cd), pad3), xdt, dt_ * A.to(cd), S0, c)
    y = y[:, :length]
    out = _finish(y, x, D, z, x.dtype)
    if not return_final_states:
        return out
    return out, state


def _ssd_vendor(fn, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, return_final_states):
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
    `l` need not be a multiple of chunk_size. chunk_size tiles the GPU kernels; the CPU path tiles
    by min(chunk_size, CPU_MAX_CHUNK) (the result does not depend on the tile).
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
