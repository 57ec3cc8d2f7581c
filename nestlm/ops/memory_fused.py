"""Chunk-recompute form of the linear neural-memory scan, with a hand-written backward.

This is the algorithm of the fused CUDA kernels in csrc/memory_scan_*.cu, written in PyTorch so it
runs anywhere and can be checked against the token loop in fp64. `LinearMemoryScanFn` is the
autograd wrapper both share: on CUDA tensors with the extension built it calls the kernels,
otherwise these PyTorch functions.

The op, per (batch, head), with memory W and momentum S of shape [dv, dk]:

    chunks are [jC, (j+1)C) of absolute positions (position = offset + t);
    a token in chunk j reads and differentiates against the anchor A_j = W at the chunk start:
        r_t = A_j k_t - v_t                 u_t = grad_W ||W k_t - v_t||^2 at A_j = 2 r_t k_t^T
        S_t = eta_t S_{t-1} - theta_t u_t   W_t = (1 - alpha_t) W_{t-1} + S_t
        y_t = A_j q_t                       (boundary read: in-chunk writes are not visible)

A call is cut into segments at chunk boundaries (the first may be the tail of a chunk begun in an
earlier call, whose anchor is passed in as W_anchor). Over a segment of n tokens starting from
(W0, S0) the recurrence has the closed form

    S1 = E S0 - 2 sum_i a_i r_i k_i^T
    W1 = B W0 + gamma S0 - 2 sum_i c_i r_i k_i^T

with E = prod eta, B = prod (1 - alpha) over the segment and, for token i,
    P_i = prod_{j>i} eta_j,  D_i = prod_{j>i} (1 - alpha_j),  g_i = D_i + eta_{i+1} g_{i+1} (g_{n-1} = 1),
    a_i = theta_i P_i,  c_i = theta_i g_i,  gamma = eta_0 g_0.
The suffix recurrences avoid dividing by cumulative products, so a zero gate is exact. Products run
over at most one chunk, so they stay in fp32 without a log-space detour.

Backward recomputes each segment from its saved start state (W0, S0): only [n_seg, dv, dk] states
per (batch, head) are kept, never per-token gradient matrices.
"""

from __future__ import annotations

import torch

__all__ = [
    "segments",
    "chunk_coefficients",
    "chunk_coefficients_backward",
    "memory_scan_fwd_torch",
    "memory_scan_bwd_torch",
    "LinearMemoryScanFn",
]


def segments(length: int, chunk_size: int, offset: int) -> list[tuple[int, int]]:
    """[start, end) index pairs cutting `length` tokens at absolute multiples of `chunk_size`."""
    out = []
    start = 0
    first = chunk_size - offset % chunk_size
    end = min(length, first)
    while start < length:
        out.append((start, end))
        start, end = end, min(length, end + chunk_size)
    return out


def chunk_coefficients(theta, eta, alpha):
    """Per-segment scalar coefficients of the closed-form update.

    theta, eta, alpha: [..., n]. Returns a, c, P, g, D ([..., n]) and E, B, gamma ([...]).
    """
    n = theta.shape[-1]
    one_minus = 1.0 - alpha
    ones = torch.ones_like(theta[..., 0])
    P, D, g = [ones] * n, [ones] * n, [ones] * n
    for i in range(n - 2, -1, -1):
        P[i] = eta[..., i + 1] * P[i + 1]
        D[i] = one_minus[..., i + 1] * D[i + 1]
        g[i] = D[i] + eta[..., i + 1] * g[i + 1]
    P, D, g = (torch.stack(x, dim=-1) for x in (P, D, g))
    a = theta * P
    c = theta * g
    E = eta[..., 0] * P[..., 0]
    B = one_minus[..., 0] * D[..., 0]
    gamma = eta[..., 0] * g[..., 0]
    return a, c, P, g, D, E, B, gamma


def chunk_coefficients_backward(theta, eta, alpha, P, g, D, da, dc, dE, dB, dgamma):
    """Adjoint of `chunk_coefficients`: (da, dc [..., n]; dE, dB, dgamma [...]) -> (dtheta, deta, dalpha).

    The map is linear in the incoming adjoints, so partial sums (e.g. over dv slices) may be pushed
    through separately and added.
    """
    n = theta.shape[-1]
    dtheta = da * P + dc * g
    Pb = da * theta
    gb = dc * theta
    Db = torch.zeros_like(theta)
    deta = torch.zeros_like(theta)
    dalpha = torch.zeros_like(theta)
    Pb[..., 0] += dE * eta[..., 0]
    gb[..., 0] += dgamma * eta[..., 0]
    Db[..., 0] += dB * (1.0 - alpha[..., 0])
    deta[..., 0] = dE * P[..., 0] + dgamma * g[..., 0]
    dalpha[..., 0] = -dB * D[..., 0]
    for i in range(n - 1):
        Db[..., i] += gb[..., i]
        deta[..., i + 1] = gb[..., i] * g[..., i + 1] + Pb[..., i] * P[..., i + 1]
        dalpha[..., i + 1] = -Db[..., i] * D[..., i + 1]
        gb[..., i + 1] += gb[..., i] * eta[..., i + 1]
        Pb[..., i + 1] += Pb[..., i] * eta[..., i + 1]
        Db[..., i + 1] += Db[..., i] * (1.0 - alpha[..., i + 1])
    return dtheta, deta, dalpha


def _heads_first(x):
    # [b, l, h, ...] -> [b, h, l, ...]
    return x.transpose(1, 2)


def memory_scan_fwd_torch(q, k, v, lr, momentum, decay, W, S, A, chunk_size, offset, save_states):
    """Forward over all segments.

    q, k [b, l, h, dk]; v [b, l, h, dv]; lr/momentum/decay [b, l, h]; W, S, A [b, h, dv, dk].
    Returns y [b, l, h, dv], W_end, S_end, A_end (the anchor of the chunk holding the last token)
    and, if save_states, the segment start states
    [b, h, n_seg, dv, dk] for W and S (else None, None).
    """
    L = q.shape[1]
    segs = segments(L, chunk_size, offset)
    qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)
    th, et, al = lr.transpose(1, 2), momentum.transpose(1, 2), decay.transpose(1, 2)
    ys = []
    Ws, Ss = [], []
    for s, e in segs:
        if (offset + s) % chunk_size == 0:
            A = W
        if save_states:
            Ws.append(W)
            Ss.append(S)
        Kc, Qc, Vc = kh[:, :, s:e], qh[:, :, s:e], vh[:, :, s:e]
        a, c, _, _, _, E, B, gamma = chunk_coefficients(th[..., s:e], et[..., s:e], al[..., s:e])
        At = A.transpose(-1, -2)
        R = Kc @ At - Vc
        ys.append(Qc @ At)
        S_new = E[..., None, None] * S - 2.0 * (a[..., None] * R).transpose(-1, -2) @ Kc
        W_rank = (c[..., None] * R).transpose(-1, -2) @ Kc
        W = B[..., None, None] * W + gamma[..., None, None] * S - 2.0 * W_rank
        S = S_new
    if ys:
        y = torch.cat(ys, dim=2).transpose(1, 2)
    else:
        y = v.new_empty(v.shape)
    Wst = torch.stack(Ws, dim=2) if save_states and Ws else None
    Sst = torch.stack(Ss, dim=2) if save_states and Ss else None
    return y, W, S, A, Wst, Sst


def memory_scan_bwd_torch(
    q,
    k,
    v,
    lr,
    momentum,
    decay,
    A_in,
    W_states,
    S_states,
    chunk_size,
    offset,
    dy,
    dW_end,
    dS_end,
    dA_end,
    first_order=False,
):
    """Reverse sweep over segments, recomputing each from its saved start state.

    first_order: the inner gradients were taken at a detached anchor, so the anchor gets gradient
    only through the reads y = A q.

    Returns dq, dk, dv, dlr, dmomentum, ddecay, dW0, dS0, dA_in (shapes of the forward inputs).
    """
    L = q.shape[1]
    segs = segments(L, chunk_size, offset)
    qh, kh, vh, dyh = _heads_first(q), _heads_first(k), _heads_first(v), _heads_first(dy)
    th, et, al = lr.transpose(1, 2), momentum.transpose(1, 2), decay.transpose(1, 2)
    dq, dk, dv = torch.zeros_like(qh), torch.zeros_like(kh), torch.zeros_like(vh)
    dth, det, dal = torch.zeros_like(th), torch.zeros_like(et), torch.zeros_like(al)
    dW = dW_end.clone()
    dS = dS_end.clone()
    dA_in = torch.zeros_like(A_in)
    for j in range(len(segs) - 1, -1, -1):
        s, e = segs[j]
        W0, S0 = W_states[:, :, j], S_states[:, :, j]
        anchor_is_w0 = (offset + s) % chunk_size == 0
        A = W0 if anchor_is_w0 else A_in
        Kc, Qc, Vc, dYc = kh[:, :, s:e], qh[:, :, s:e], vh[:, :, s:e], dyh[:, :, s:e]
        a, c, P, g, D, E, B, gamma = chunk_coefficients(th[..., s:e], et[..., s:e], al[..., s:e])
        R = Kc @ A.transpose(-1, -2) - Vc
        M1 = Kc @ dS.transpose(-1, -2)
        M2 = Kc @ dW.transpose(-1, -2)
        GR = -2.0 * (a[..., None] * M1 + c[..., None] * M2)
        da = -2.0 * (R * M1).sum(-1)
        dc = -2.0 * (R * M2).sum(-1)
        dE = (dS * S0).sum((-1, -2))
        dB = (dW * W0).sum((-1, -2))
        dgamma = (dW * S0).sum((-1, -2))
        dA = dYc.transpose(-1, -2) @ Qc
        if not first_order:
            dA = dA + GR.transpose(-1, -2) @ Kc
        if j == len(segs) - 1:
            dA = dA + dA_end  # the returned anchor is the last segment's
        dq[:, :, s:e] = dYc @ A
        dk[:, :, s:e] = GR @ A - 2.0 * (a[..., None] * R) @ dS - 2.0 * (c[..., None] * R) @ dW
        dv[:, :, s:e] = -GR
        t_, e_, a_ = chunk_coefficients_backward(
            th[..., s:e], et[..., s:e], al[..., s:e], P, g, D, da, dc, dE, dB, dgamma
        )
        dth[..., s:e], det[..., s:e], dal[..., s:e] = t_, e_, a_
        dS, dW = E[..., None, None] * dS + gamma[..., None, None] * dW, B[..., None, None] * dW
        if anchor_is_w0:
            dW = dW + dA
        else:
            dA_in = dA_in + dA
    if not segs:
        dA_in = dA_in + dA_end
    return (
        dq.transpose(1, 2),
        dk.transpose(1, 2),
        dv.transpose(1, 2),
        dth.transpose(1, 2),
        det.transpose(1, 2),
        dal.transpose(1, 2),
        dW,
        dS,
        dA_in,
    )


class LinearMemoryScanFn(torch.autograd.Function):
    """Autograd wrapper around the chunk-recompute scan (CUDA kernel or the PyTorch form above).

    forward(q, k, v, lr, momentum, decay, W, S, A, chunk_size, offset, use_kernel, first_order)
        -> y [b, l, h, dv], W_end, S_end, A_end [b, h, dv, dk]
    A is the anchor of the chunk in progress (pass W when offset is chunk-aligned). The kernel
    path needs fp32 W, S, A and returns y in fp32; the PyTorch path computes in W's dtype.
    """

    @staticmethod
    def forward(ctx, q, k, v, lr, momentum, decay, W, S, A, chunk_size, offset, use_kernel, first_order=False):
        save = any(ctx.needs_input_grad[:9])
        if use_kernel:
            from nestlm.ops import _csrc

            y, W1, S1, A1, Wst, Sst = _csrc.memory_scan_fwd(
                q, k, v, lr, momentum, decay, W, S, A, chunk_size, offset, save
            )
        else:
            q, k, v, lr, momentum, decay = (t.to(W.dtype) for t in (q, k, v, lr, momentum, decay))
            y, W1, S1, A1, Wst, Sst = memory_scan_fwd_torch(
                q, k, v, lr, momentum, decay, W, S, A, chunk_size, offset, save
            )
        if save:
            ctx.save_for_backward(q, k, v, lr, momentum, decay, A, Wst, Sst)
        ctx.chunk_size, ctx.offset, ctx.use_kernel, ctx.first_order = chunk_size, offset, use_kernel, first_order
        ctx.in_dtypes = [t.dtype for t in (q, k, v, lr, momentum, decay)]
        return y, W1, S1, A1

    @staticmethod
    def backward(ctx, dy, dW1, dS1, dA1):
        q, k, v, lr, momentum, decay, A, Wst, Sst = ctx.saved_tensors

        def zeros_if_none(t, like):
            return torch.zeros_like(like) if t is None else t.contiguous()

        dy = zeros_if_none(dy, v)
        dW1, dS1, dA1 = (zeros_if_none(t, A) for t in (dW1, dS1, dA1))
        if ctx.use_kernel:
            from nestlm.ops import _csrc

            grads = _csrc.memory_scan_bwd(
                q,
                k,
                v,
                lr,
                momentum,
                decay,
                A,
                Wst,
                Sst,
                ctx.chunk_size,
                ctx.offset,
                dy,
                dW1,
                dS1,
                dA1,
                ctx.first_order,
            )
        else:
            grads = memory_scan_bwd_torch(
                q,
                k,
                v,
                lr,
                momentum,
                decay,
                A,
                Wst,
                Sst,
                ctx.chunk_size,
                ctx.offset,
                dy,
                dW1,
                dS1,
                dA1,
                ctx.first_order,
            )
        grads = [g.to(dt) for g, dt in zip(grads[:6], ctx.in_dtypes)] + list(grads[6:])
        return (*grads, None, None, None, None)


def _check(name, t, shape, what):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {tuple(shape)}, got {tuple(t.shape)}")


def linear_memory_scan_fused(
    q,
    k,
    v,
    lr,
    momentum,
    decay,
    W,
    S,
    W_anchor=None,
    chunk_size=16,
    offset=0,
    return_state=True,
    first_order=False,
    use_kernel=None,
):
    """Linear memory scan through the fused kernels (CUDA) or their PyTorch form.

    q, k [b, l, h, dk]; v [b, l, h, dv]; lr (theta), momentum (eta), decay (alpha) [b, l, h];
    W, S, W_anchor [b, h, dv, dk] (W_anchor: anchor of the chunk in progress, needed only when
    offset is not a multiple of chunk_size). Returns y [b, l, h, dv] in W's dtype and, if
    return_state, (W, S, W_anchor) after the last token. first_order: inner gradients at a detached
    anchor. use_kernel=None picks the kernel when it can run (CUDA, fp32 state, supported shape).
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be [batch, length, heads, dk], got {tuple(q.shape)}, {tuple(k.shape)}")
    b, L, h, dk = q.shape
    if v.dim() != 4 or tuple(v.shape[:3]) != (b, L, h):
        raise ValueError(f"v must be [batch, length, heads, dv] = ({b}, {L}, {h}, dv), got {tuple(v.shape)}")
    dv = v.shape[-1]
    for name, t in (("lr", lr), ("momentum", momentum), ("decay", decay)):
        _check(name, t, (b, L, h), "[batch, length, heads]")
    for name, t in (("W", W), ("S", S)):
        _check(name, t, (b, h, dv, dk), "[batch, heads, dv, dk]")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if torch.is_tensor(offset):
        if offset.numel() and not bool((offset == offset.reshape(-1)[0]).all()):
            raise ValueError("offset must be the same for every batch row")
        offset = int(offset.reshape(-1)[0]) if offset.numel() else 0
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if offset % chunk_size:
        if W_anchor is None:
            raise ValueError("W_anchor is required when offset is not a multiple of chunk_size")
        _check("W_anchor", W_anchor, (b, h, dv, dk), "[batch, heads, dv, dk]")
        A = W_anchor
    else:
        A = W
    if use_kernel is None:
        from nestlm.ops import backends

        use_kernel = W.dtype == torch.float32 and backends.memory_scan_backend(q, v, chunk_size) == "csrc"
    if L == 0 or W.dtype != torch.float32:
        use_kernel = False  # the kernels keep fp32 state; fp64 (tests) stays on the PyTorch form
    # the recurrence runs in the state dtype whatever autocast says
    with torch.autocast(device_type=q.device.type, enabled=False):
        y, W1, S1, A1 = LinearMemoryScanFn.apply(
            q, k, v, lr, momentum, decay, W, S, A, chunk_size, offset, bool(use_kernel), bool(first_order)
        )
    return (y, (W1, S1, A1)) if return_state else y
