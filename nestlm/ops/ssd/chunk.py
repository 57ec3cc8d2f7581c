"""The chunked PyTorch path of the SSD scan (steps 1-4 of nestlm.ops.ssd), and the op."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nestlm.ops import backends
from nestlm.ops.dtypes import state_dtype
from nestlm.ops.ssd.common import check, finish, prepare_dt


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
    b, length, h, p, g, n = check(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states)
    cd = state_dtype(x, dt, A, B, C, initial_states)
    c = min(chunk_size, CPU_MAX_CHUNK) if x.device.type == "cpu" else chunk_size
    pad = max(1, -(-length // c)) * c - length
    dt_ = prepare_dt(dt, dt_bias, dt_softplus, cd)
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
    out = finish(y, x, D, z, x.dtype)
    if not return_final_states:
        return out
    return out, state


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
    by min(chunk_size, CPU_MAX_CHUNK) (the result does not depend on the tile). On CUDA mamba-ssm's
    kernel runs when it imports (nestlm.ops.backends).
    """
    args = (x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, return_final_states)
    check(*args[:10])
    unsupported = "fp64 inputs" if x.dtype == torch.float64 else None
    if backends.choose("ssd_scan", x.device, unsupported) == "vendor":
        kw = dict(D=D, z=z, dt_bias=dt_bias, initial_states=initial_states, dt_softplus=dt_softplus)
        return backends.kernel("ssd_scan", "vendor")(*args[:6], return_final_states=return_final_states, **kw)
    return _ssd_torch(*args)
