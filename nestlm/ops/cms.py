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

`cms_scan` is the chunked path (one batched computation per period, a Python loop over periods,
and a hand-written backward);
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
    expect = {
        "k": (k, (b, t, n)),
        "v": (v, (b, t, d)),
        "eta": (eta, (b, t)),
        "W": (W, (b, n, d)),
        "G": (G, (b, n, d)),
        "pos": (pos, (b,)),
    }
    for name, (x, shape) in expect.items():
        if tuple(x.shape) != shape:
            raise ValueError(f"cms_scan: {name} must have shape {shape}, got {tuple(x.shape)}")
    if not isinstance(period, int) or period < 1:
        raise ValueError(f"cms_scan: period must be a positive int, got {period!r}")


def _period_loop(u, k, v, eta, W, G, pieces: list[int], r0: int, period: int, keep: bool):
    """The forward of `_PeriodScan`; with keep=False (no gradient wanted) nothing is kept per piece.

    Returns (y, W, G) and, for the backward, ([u; k] of every piece [b, 2t, n], the W each piece read,
    each piece's residual, whether each piece closed its period).
    """
    ys, Ws, errs, closes = [], [], [], []
    r = r0
    # every piece's [u; k] rows side by side, built in one copy: [b, 2t, n]
    uk = torch.cat([x for pair in zip(u.split(pieces, 1), k.split(pieces, 1)) for x in pair], 1)
    uk_pieces = uk.split([2 * s for s in pieces], 1)
    for uk_s, k_s, v_s, eta_s in zip(uk_pieces, *(x.split(pieces, dim=1) for x in (k, v, eta))):
        s = k_s.shape[1]
        y_s, kW = (uk_s @ W).split(s, 1)
        err = kW - v_s  # [b, s, d]: residual k W_p - v at the period start
        ke = (k_s * eta_s[..., None]).transpose(1, 2)  # [b, n, s]
        if keep:
            Ws.append(W)
            errs.append(err)
        closes.append(r + s == period)
        if closes[-1] and len(closes) > 1 and r == 0:
            # a whole period after a closed one: G is zero at its start, so one fused step
            W = torch.baddbmm(W, ke, err, alpha=-1.0 / period)
        elif closes[-1]:
            W = W - torch.baddbmm(G, ke, err) / period
            G = torch.zeros_like(G)
        else:
            G = torch.baddbmm(G, ke, err)
        ys.append(y_s)
        r = 0
    return (torch.cat(ys, 1), W, G), (uk, Ws, errs, closes)


class _PeriodScan(torch.autograd.Function):
    """The period loop of `cms_scan` with a hand-written backward.

    u, k: [b, t, n]; v: [b, t, d]; eta: [b, t]; W, G: [b, n, d]; pieces: lengths cutting t at period
    ends; r0: tokens of the first piece's period consumed before this call. Returns (y, W, G).

    Why by hand: per piece, reads and keys hit the same W_p, so [u; k] W_p is one matmul forward
    and backward, and the gradient of W_p accumulates in place across pieces; autograd runs two
    matmuls for each of the three and copies the W gradient at every accumulation.
    """

    @staticmethod
    def forward(ctx, u, k, v, eta, W, G, pieces: list[int], r0: int, period: int):
        out, (uk, Ws, errs, closes) = _period_loop(u, k, v, eta, W, G, pieces, r0, period, keep=True)
        ctx.save_for_backward(uk, k, eta, *Ws, *errs)
        ctx.pieces, ctx.closes, ctx.period = pieces, closes, period
        return out

    @staticmethod
    def backward(ctx, gy, gW, gG):
        uk, k, eta, *rest = ctx.saved_tensors
        pieces, closes, period = ctx.pieces, ctx.closes, ctx.period
        Ws, errs = rest[: len(pieces)], rest[len(pieces) :]
        gW = gW.clone()  # accumulated in place below
        gu, gk, gv, geta = [], [], [], []
        splits = zip(uk.split([2 * s for s in pieces], 1), *(x.split(pieces, dim=1) for x in (k, eta, gy)))
        for j, ((uk_s, k_s, eta_s, gy_s), W, err, close) in reversed(list(enumerate(zip(splits, Ws, errs, closes)))):
            s = k_s.shape[1]
            ke = k_s * eta_s[..., None]  # [b, s, n]
            # the piece's write A = ke^T err enters W' = W - (G + A) / C when it closes the period,
            # else G' = G + A; W passes through. Every piece but the last closes its period, so
            # the gradient of the incoming G matters only for the first piece. The -1/C scales
            # the small [s, .] operands: a new [n, d] tensor per piece costs more than the product.
            if close:
                g_err = (ke * (-1.0 / period)) @ gW  # [b, s, d]
                g_ke = (err * (-1.0 / period)) @ gW.transpose(1, 2)  # [b, s, n]
                if j == 0:
                    gG = gW * (-1.0 / period)
            else:
                g_err, g_ke = ke @ gG, err @ gG.transpose(1, 2)
            # reads and residuals: [y; k W] = [u; k] W
            g_out = torch.cat((gy_s, g_err), 1)  # [b, 2s, d]
            g_uk = g_out @ W.transpose(1, 2)  # [b, 2s, n]
            gW.baddbmm_(uk_s.transpose(1, 2), g_out)
            gu.append(g_uk[:, :s])
            gk.append(torch.addcmul(g_uk[:, s:], g_ke, eta_s[..., None]))
            geta.append((g_ke * k_s).sum(-1))
            gv.append(-g_err)
        grads = (torch.cat(x[::-1], 1) for x in (gu, gk, gv, geta))  # pieces were visited last first
        return (*grads, gW, gG, None, None, None)


def cms_scan(
    u: Tensor, k: Tensor, v: Tensor, eta: Tensor, W: Tensor, G: Tensor, pos: Tensor, period: int
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
    args = (u, k, v, eta, W, G, sizes, p0 % period, period)
    if torch.is_grad_enabled() and any(x.requires_grad for x in args[:6]):
        y, W, G = _PeriodScan.apply(*args)
    else:  # inference: keep nothing per period (a long call would hold every period's W)
        (y, W, G), _ = _period_loop(*args, keep=False)
    return y, W, G, pos + t


def cms_scan_ref(
    u: Tensor, k: Tensor, v: Tensor, eta: Tensor, W: Tensor, G: Tensor, pos: Tensor, period: int
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
