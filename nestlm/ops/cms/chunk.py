"""The chunked path of the CMS level update: one batched step per period and a hand-written backward."""

from __future__ import annotations

import torch
from torch import Tensor

from nestlm.ops._chunks import chunk_pieces
from nestlm.ops.cms.common import check


def _period_loop(u, k, v, lr, W, G, pieces: list[int], r0: int, period: int, keep: bool):
    """The forward of `_PeriodScan`; with keep=False (no gradient wanted) nothing is kept per piece.

    Returns (y, W, G) and, for the backward, ([u; k] of every piece [b, 2t, n], the W each piece read,
    each piece's residual, whether each piece closed its period).
    """
    ys, Ws, errs, closes = [], [], [], []
    r = r0
    # every piece's [u; k] rows side by side, built in one copy: [b, 2t, n]
    uk = torch.cat([x for pair in zip(u.split(pieces, 1), k.split(pieces, 1)) for x in pair], 1)
    uk_pieces = uk.split([2 * s for s in pieces], 1)
    for uk_s, k_s, v_s, lr_s in zip(uk_pieces, *(x.split(pieces, dim=1) for x in (k, v, lr))):
        s = k_s.shape[1]
        y_s, kW = (uk_s @ W).split(s, 1)
        err = kW - v_s  # [b, s, d]: residual k W_p - v at the period start
        ke = (k_s * lr_s[..., None]).transpose(1, 2)  # [b, n, s]
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

    u, k: [b, t, n]; v: [b, t, d]; lr: [b, t]; W, G: [b, n, d]; pieces: lengths cutting t at period
    ends; r0: tokens of the first piece's period consumed before this call. Returns (y, W, G).

    Why by hand: per piece, reads and keys hit the same W_p, so [u; k] W_p is one matmul forward
    and backward, and the gradient of W_p accumulates in place across pieces; autograd runs two
    matmuls for each of the three and copies the W gradient at every accumulation.
    """

    @staticmethod
    def forward(ctx, u, k, v, lr, W, G, pieces: list[int], r0: int, period: int):
        out, (uk, Ws, errs, closes) = _period_loop(u, k, v, lr, W, G, pieces, r0, period, keep=True)
        ctx.save_for_backward(uk, k, lr, *Ws, *errs)
        ctx.pieces, ctx.closes, ctx.period = pieces, closes, period
        return out

    @staticmethod
    def backward(ctx, gy, gW, gG):
        uk, k, lr, *rest = ctx.saved_tensors
        pieces, closes, period = ctx.pieces, ctx.closes, ctx.period
        Ws, errs = rest[: len(pieces)], rest[len(pieces) :]
        gW = gW.clone()  # accumulated in place below
        gu, gk, gv, glr = [], [], [], []
        splits = zip(uk.split([2 * s for s in pieces], 1), *(x.split(pieces, dim=1) for x in (k, lr, gy)))
        for j, ((uk_s, k_s, lr_s, gy_s), W, err, close) in reversed(list(enumerate(zip(splits, Ws, errs, closes)))):
            s = k_s.shape[1]
            ke = k_s * lr_s[..., None]  # [b, s, n]
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
            gk.append(torch.addcmul(g_uk[:, s:], g_ke, lr_s[..., None]))
            glr.append((g_ke * k_s).sum(-1))
            gv.append(-g_err)
        grads = (torch.cat(x[::-1], 1) for x in (gu, gk, gv, glr))  # pieces were visited last first
        return (*grads, gW, gG, None, None, None)


def cms_scan(
    u: Tensor, k: Tensor, v: Tensor, lr: Tensor, W: Tensor, G: Tensor, pos: Tensor, period: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Chunked CMS level: read and write fast weights over a segment.

    u, k: [b, t, n] read / key features; v: [b, t, d] targets; lr: [b, t] per-token step sizes.
    W, G: [b, n, d] fast weights and open-period gradient; pos: int64 [b] tokens consumed so far
    (all rows must be at the same position). Returns (y [b, t, d], W, G, pos).
    """
    check("cms_scan", u, k, v, lr, W, G, pos, period)
    b, t, _ = u.shape
    if t == 0:
        return u.new_zeros(b, 0, W.shape[-1]), W, G, pos
    p0 = int(pos[0]) if b else 0
    if b and not bool((pos == p0).all()):
        raise ValueError("cms_scan: pos must be equal across the batch (rows at different positions)")
    dt = W.dtype
    u, k, v, lr = u.to(dt), k.to(dt), v.to(dt), lr.to(dt)
    sizes, _ = chunk_pieces(p0, t, period)
    args = (u, k, v, lr, W, G, sizes, p0 % period, period)
    if torch.is_grad_enabled() and any(x.requires_grad for x in args[:6]):
        y, W, G = _PeriodScan.apply(*args)
    else:  # inference: keep nothing per period (a long call would hold every period's W)
        (y, W, G), _ = _period_loop(*args, keep=False)
    return y, W, G, pos + t
