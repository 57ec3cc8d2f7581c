"""Fast-weight update of one Continuum Memory System level (see nestlm.layers.cms).

Per batch row, a level holds fast weights W [n, d] (the level's down projection) that tokens read as

    y_t = u_t W                                           u_t: the level's hidden features [n]

and that are written once every `period` tokens by one step of gradient descent on a local
associative loss, summed over the period and taken at the period-start weights W_p:

    G   = sum_{t in period} eta_t * k_t^T (k_t W_p - v_t)     k_t [n]: key features, v_t [d]: target
    W  <- W_p - G / period                                     at the period's last token

Periods are fixed on absolute positions [jC, (j+1)C) counted from the fresh state. A token reads the
weights as of its period start (it never sees its own period's writes). A period that is cut by the
end of a call stays open in the state: G holds the gradient accumulated so far and `pos` the number
of tokens consumed, so feeding a sequence in pieces equals one call.

`cms_scan` is the chunked path (one batched computation per period, a Python loop over periods);
`cms_scan_ref` is the plain token loop that applies the same rule, the oracle for tests. Both are
differentiable in every input (the inner gradient is written out, so the outer gradient flows
through it: second order).

Arithmetic happens in the dtype of W (keep it fp32 under bf16 autocast, fp64 in tests).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nestlm.ops._chunks import chunk_pieces


def _check(u: Tensor, k: Tensor, v: Tensor, eta: Tensor, W: Tensor, G: Tensor, pos: Tensor, period: int) -> None:
    b, t, n = u.shape
    d = W.shape[-1]
    expect = {"k": (k, (b, t, n)), "v": (v, (b, t, d)), "eta": (eta, (b, t)), "W": (W, (b, n, d)),
              "G": (G, (b, n, d)), "pos": (pos, (b,))}
    for name, (x, shape) in expect.items():
        if tuple(x.shape) != shape:
            raise ValueError(f"cms_scan: {name} must have shape {shape}, got {tuple(x.shape)}")
    if not isinstance(period, int) or period < 1:
        raise ValueError(f"cms_scan: period must be a positive int, got {period!r}")


def cms_scan(u: Tensor, k: Tensor, v: Tensor, eta: Tensor, W: Tensor, G: Tensor, pos: Tensor, period: int
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Chunked CMS level: read and write fast weights over a segment.

    u, k: [b, t, n] read / key features; v: [b, t, d] targets; eta: [b, t] per-token step sizes.
    W, G: [b, n, d] fast weights and open-period gradient; pos: int64 [b] tokens consumed so far
    (all rows must be at the same position). Returns (y [b, t, d], W, G, pos).
    """
    _check(u, k, v, eta, W, G, pos, period)
    b, t, _ = u.shape
    if t == 0:
        return u.new_zeros(b, 0, W.shape[-1]), W, G, pos
    p0 = int(pos[0]) if b else 0
    if b and not bool((pos == p0).all()):
        raise ValueError("cms_scan: pos must be equal across the batch (rows at different positions)")
    dt = W.dtype
    u, k, v, eta = u.to(dt), k.to(dt), v.to(dt), eta.to(dt)
    sizes, _ = chunk_pieces(p0, t, period)
    ys = []
    r = p0 % period
    zero = None
    for u_s, k_s, v_s, eta_s in zip(*(x.split(sizes, dim=1) for x in (u, k, v, eta))):
        ys.append(u_s @ W)
        err = torch.baddbmm(v_s, k_s, W, beta=-1.0)  # [b, s, d]: residual k W_p - v at the period start
        ke = (k_s * eta_s[..., None]).transpose(1, 2)  # [b, n, s]
        if r == 0 and u_s.shape[1] == period:
            # a whole period: G is zero at its start, so the step is one fused update
            W = torch.baddbmm(W, ke, err, alpha=-1.0 / period)
            zero = torch.zeros_like(G) if zero is None else zero
            G = zero
        else:
            G = torch.baddbmm(G, ke, err)
            if r + u_s.shape[1] == period:  # the open period is complete: take the step
                W = W - G / period
                G = zero = torch.zeros_like(G) if zero is None else zero
        r = 0
    return torch.cat(ys, 1), W, G, pos + t


def cms_scan_ref(u: Tensor, k: Tensor, v: Tensor, eta: Tensor, W: Tensor, G: Tensor, pos: Tensor, period: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Token-loop reference of `cms_scan` (same arguments and results; rows may be at any position)."""
    _check(u, k, v, eta, W, G, pos, period)
    dt = W.dtype
    u, k, v, eta = u.to(dt), k.to(dt), v.to(dt), eta.to(dt)
    ys = []
    # unbind, not indexing: the backward of every index would fill a full-length zero tensor
    for u_i, k_i, v_i, eta_i in zip(u.unbind(1), k.unbind(1), v.unbind(1), eta.unbind(1)):
        # matmul, not einsum: einsum copies W into its own layout on every call
        ys.append((u_i[:, None, :] @ W)[:, 0])
        err = (k_i[:, None, :] @ W)[:, 0] - v_i
        G = G + eta_i[:, None, None] * k_i[:, :, None] * err[:, None, :]
        pos = pos + 1
        done = (pos % period == 0)[:, None, None]
        # only when some row closes a period: a new W per token would be kept for the backward
        # of every read (O(l n d) memory: ~24 GB at l = 4096, d = 256)
        if bool(done.any()):
            W = torch.where(done, W - G / period, W)
            G = torch.where(done, torch.zeros_like(G), G)
    y = torch.stack(ys, 1) if ys else u.new_zeros(u.shape[0], 0, W.shape[-1]).to(dt)
    return y, W, G, pos
