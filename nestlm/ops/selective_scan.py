"""Mamba-1 selective scan: the chunked CPU/GPU PyTorch path and its token-loop reference.

Per channel d with diagonal state h [n] and real A[d, n] (normally negative):

    delta_t = softplus(delta_t + delta_bias)     (bias / softplus optional)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t
    y_t     = C_t . h_t + D * u_t,  then  y_t *= silu(z_t)   (z optional)

Same signature and semantics as mamba_ssm's selective_scan_fn, plus `initial_state` ([b, d, n],
zeros when None) so a layer can stream. B and C are [b, n, l] (shared by all channels) or grouped
[b, g, n, l] (channel i reads group i // (d // g)). `A` must be real.

Fast path (`_ChunkedScan`): time is cut into chunks. For each chunk the decays exp(delta * A), the
inputs delta * u * B and the read-out C . h are computed as whole-chunk tensor ops; only the
elementwise recurrence h_t = a_t * h_{t-1} + x_t runs step by step, as one fused multiply-add per
step with no autograd graph. Only the state at each chunk start is kept; the backward pass
recomputes a chunk's states from it and runs the adjoint recurrence g_t = C_t gy_t + a_{t+1} g_{t+1}
in reverse, so memory is O(b d n (l / chunk + chunk)) instead of O(b d n l). Decays are exp of
delta * A (never of a positive sum when A <= 0), in fp32 (fp64 for fp64 inputs).

Why not a closed form inside the chunk, as in SSD: Mamba-1's decay differs per (channel, state)
pair, so there is no shared [chunk, chunk] decay matrix to fold into a matmul. The factored form
exp(cs_t) * cumsum(exp(-cs_s) x_s) overflows once a chunk's log decay passes ~-88 (fp32), which
strong channels reach within a few tokens; the stable pairwise form exp(cs_t - cs_s) costs chunk
times the work of the scan. The fused step does one pass over the state per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nestlm.ops import backends
from nestlm.ops._layout import dense, from_time_major, time_major


def _check(u, delta, A, B, C, D, z, delta_bias, initial_state) -> tuple[int, ...]:
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


def _grouped(M: torch.Tensor) -> torch.Tensor:
    """[b, n, l] -> [b, 1, n, l]; grouped [b, g, n, l] unchanged."""
    return M.unsqueeze(1) if M.dim() == 3 else M


def _one_layout(u, delta, z):
    """u, delta, z [b, d, l] as contiguous tensors: layers pass transposed [b, l, d] views (see _layout)."""
    return dense(u), dense(delta), None if z is None else dense(z)


def _prepare_delta(delta, delta_bias, delta_softplus, dtype):
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(y, u, D, z, out_dtype):
    """y + D u, gated by silu(z); all [b, d, l]."""
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


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
    b, d, length, n = _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    cd = backends.compute_dtype(u, delta, A, B, C, initial_state)
    u, delta, z = _one_layout(u, delta, z)
    delta_ = _prepare_delta(delta, delta_bias, delta_softplus, cd)
    h0 = u.new_zeros(b, d, n, dtype=cd) if initial_state is None else initial_state.to(cd)
    # the scan runs in the compute dtype whatever autocast says
    with torch.autocast(device_type=u.device.type, enabled=False):
        y, last = _ChunkedScan.apply(u.to(cd), delta_, A.to(cd), _grouped(B).to(cd), _grouped(C).to(cd), h0, chunk)
    out = _finish(y, u, D, z, u.dtype)
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
    On CUDA the mamba-ssm kernel is used when importable and no initial_state is given.
    """
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if backends.choose("selective_scan", u.device) == "vendor" and initial_state is None and u.dtype != torch.float64:
        fn = backends.vendor_fn("selective_scan")
        return fn(
            u,
            delta,
            A,
            B,
            C,
            D=D,
            z=z,
            delta_bias=delta_bias,
            delta_softplus=delta_softplus,
            return_last_state=return_last_state,
        )
    return _selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)


def selective_scan_ref(
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
    """Token loop over the recurrence in the module docstring (plain autograd, fp64-able)."""
    b, d, length, n = _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    cd = backends.compute_dtype(u, delta, A, B, C, initial_state)
    u, delta, z = _one_layout(u, delta, z)
    delta_ = _prepare_delta(delta, delta_bias, delta_softplus, cd)
    Bg, Cg = _grouped(B).to(cd), _grouped(C).to(cd)
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
    out = _finish(y, u, D, z, u.dtype)
    return (out, h) if return_last_state else out
