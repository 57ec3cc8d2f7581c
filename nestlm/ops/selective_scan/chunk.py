"""The chunked PyTorch path of the selective scan (see nestlm.ops.selective_scan), and the op."""

from __future__ import annotations

import torch

from nestlm.ops import backends
from nestlm.ops._layout import from_time_major, time_major
from nestlm.ops.dtypes import state_dtype
from nestlm.ops.selective_scan.common import check, finish, grouped, one_layout, prepare_delta


def _auto_chunk(b: int, d: int, n: int) -> int:
    """Tokens per chunk: keep a chunk's [chunk, b, d, n] tensors cache-sized (~256k elements)."""
    return max(1, min(64, (1 << 18) // max(1, b * d * n)))


class _ChunkedScan(torch.autograd.Function):
    """Core scan y_t = C_t . h_t, h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t (see module doc).

    u, delta: [b, d, l]; A: [d, n]; B, C: [b, g, n, l]; h0: [b, d, n]; all one float dtype.
    Returns y [b, d, l] and the last state [b, d, n].

    Inside, tensors are time-major and the state is laid out [b, g, n, d/g] so that the channel
    dimension is innermost and contiguous: every elementwise op then runs over long contiguous rows
    and B, C, delta broadcast along outer dimensions only.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, chunk):
        b, d, length = u.shape
        g, n = B.shape[1], B.shape[2]
        dg = d // g
        c = max(1, min(chunk or _auto_chunk(b, d, n), length))
        At = A.reshape(g, dg, n).transpose(1, 2).contiguous()  # [g, n, dg]
        dl = time_major(delta).view(length, b, g, 1, dg)  # [l, b, g, 1, dg]
        ut = time_major(u).view(length, b, g, 1, dg)
        du = dl * ut
        Bt = time_major(B).unsqueeze(-1)  # [l, b, g, n, 1]
        Ct = time_major(C).unsqueeze(-2)  # [l, b, g, 1, n]
        y = u.new_empty(length, b, g, 1, dg)
        decay = u.new_empty(c, b, g, n, dg)  # buffers reused by every chunk
        hs = u.new_empty(c, b, g, n, dg)
        h = h0.reshape(b, g, dg, n).transpose(-1, -2).contiguous()  # [b, g, n, dg]
        starts = []
        for t0 in range(0, length, c):
            t1 = min(t0 + c, length)
            starts.append(h)
            # clone: the buffers are overwritten by the next chunk
            h = _chunk_states(dl[t0:t1], du[t0:t1], At, Bt[t0:t1], h, decay, hs).clone()
            torch.matmul(Ct[t0:t1], hs[: t1 - t0], out=y[t0:t1])
        ctx.save_for_backward(ut, dl, du, At, Bt, Ct, *starts)
        ctx.chunk = c
        last = h.transpose(-1, -2).reshape(b, d, n)
        return from_time_major(y.view(length, b, d)), last

    @staticmethod
    def backward(ctx, gy, glast):
        ut, dl, du, At, Bt, Ct, *starts = ctx.saved_tensors
        c = ctx.chunk
        length, b, g, _, dg = ut.shape
        n, d = At.shape[1], g * dg
        if gy is None:
            gy = ut.new_zeros(b, d, length)
        gyt = time_major(gy).view(length, b, g, 1, dg)
        carry = ut.new_zeros(b, g, n, dg)
        if glast is not None:
            carry = glast.reshape(b, g, dg, n).transpose(-1, -2).to(ut.dtype).contiguous()
        gu, gdl = torch.empty_like(dl), torch.empty_like(dl)  # [l, b, g, 1, dg]
        gB, gC = torch.empty_like(Bt), torch.empty(length, b, g, n, 1, dtype=ut.dtype, device=ut.device)
        gA = torch.zeros(g, n, dg, dtype=ut.dtype, device=ut.device)
        decay, hs, gh, tmp = (ut.new_empty(c, b, g, n, dg) for _ in range(4))
        for k in reversed(range(len(starts))):
            t0 = k * c
            t1 = min(t0 + c, length)
            cl = t1 - t0
            _chunk_states(dl[t0:t1], du[t0:t1], At, Bt[t0:t1], starts[k], decay, hs)
            a, h, G, w = decay[:cl], hs[:cl], gh[:cl], tmp[:cl]
            # adjoint recurrence: G_t = dL/dh_t = C_t gy_t + a_{t+1} G_{t+1}
            torch.mul(gyt[t0:t1], Ct[t0:t1].transpose(-1, -2), out=G)
            G[cl - 1] += carry
            Gs, As = G.unbind(0), a.unbind(0)
            with backends.serial_cpu(ut.device, Gs[0].numel()):
                for t in range(cl - 2, -1, -1):
                    Gs[t].addcmul_(As[t + 1], Gs[t + 1])
            carry = As[0] * Gs[0]
            # w = dL/d(log decay_t) = G_t * a_t * h_{t-1}
            torch.mul(G, a, out=w)
            w[1:] *= h[:-1]
            w[0] *= starts[k]
            GB = torch.matmul(Bt[t0:t1].transpose(-1, -2), G)  # [cl, b, g, 1, dg]
            torch.mul(GB, dl[t0:t1], out=gu[t0:t1])
            torch.mul(GB, ut[t0:t1], out=gdl[t0:t1])
            torch.matmul(G, du[t0:t1].transpose(-1, -2), out=gB[t0:t1])
            torch.matmul(h, gyt[t0:t1].transpose(-1, -2), out=gC[t0:t1])
            gdl[t0:t1] += (w * At).sum(-2, keepdim=True)
            w *= dl[t0:t1]
            gA += w.sum((0, 1))
        gu = from_time_major(gu.view(length, b, d))
        gdelta = from_time_major(gdl.view(length, b, d))
        gB = from_time_major(gB.squeeze(-1))
        gC = from_time_major(gC.squeeze(-1))
        gh0 = carry.transpose(-1, -2).reshape(b, d, n)
        return gu, gdelta, gA.transpose(1, 2).reshape(d, n), gB, gC, gh0, None


def _chunk_states(dl, du, At, Bt, h, decay, hs):
    """Fill decay[:cl] = exp(delta A) and hs[:cl] = states h_t of one chunk, from h = h_{t0-1}.

    dl, du: [cl, b, g, 1, dg] (delta, delta * u); At: [g, n, dg]; Bt: [cl, b, g, n, 1];
    h: [b, g, n, dg]. Returns a view of h_{t1-1}.
    """
    cl = dl.shape[0]
    a, x = decay[:cl], hs[:cl]
    torch.mul(dl, At, out=a)
    a.exp_()
    torch.mul(du, Bt, out=x)
    # the recurrence, in place: x_t <- x_t + a_t * h_{t-1}
    xs, as_ = x.unbind(0), a.unbind(0)
    # per-step ops on cache-sized slices: one thread (see backends.serial_cpu)
    with backends.serial_cpu(h.device, h.numel()):
        xs[0].addcmul_(as_[0], h)
        for t in range(1, cl):
            xs[t].addcmul_(as_[t], xs[t - 1])
    return xs[cl - 1]


def _selective_scan_torch(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state, chunk=None
):
    b, d, length, n = check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    cd = state_dtype(u, delta, A, B, C, initial_state)
    u, delta, z = one_layout(u, delta, z)
    delta_ = prepare_delta(delta, delta_bias, delta_softplus, cd)
    h0 = u.new_zeros(b, d, n, dtype=cd) if initial_state is None else initial_state.to(cd)
    # the scan runs in the compute dtype whatever autocast says
    with torch.autocast(device_type=u.device.type, enabled=False):
        y, last = _ChunkedScan.apply(u.to(cd), delta_, A.to(cd), grouped(B).to(cd), grouped(C).to(cd), h0, chunk)
    out = finish(y, u, D, z, u.dtype)
    return (out, last) if return_last_state else out


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: torch.Tensor | None = None,
):
    """Selective scan.

    u, delta: [b, d, l]; A: [d, n]; B, C: [b, n, l] or [b, g, n, l]; D: [d]; z: [b, d, l];
    delta_bias: [d]; initial_state: [b, d, n].
    returns out [b, d, l] in u's dtype (and last_state [b, d, n], fp32 or fp64, when asked).
    On CUDA mamba-ssm's kernel runs when it imports and no initial_state is given (nestlm.ops.backends).
    """
    check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    unsupported = "initial_state given" if initial_state is not None else None
    unsupported = "fp64 inputs" if u.dtype == torch.float64 else unsupported
    if backends.choose("selective_scan", u.device, unsupported) == "vendor":
        kw = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, return_last_state=return_last_state)
        return backends.kernel("selective_scan", "vendor")(u, delta, A, B, C, **kw)
    return _selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)
