"""Token-loop reference of the CMS level update (the rule of nestlm.ops.cms, one token at a time)."""

from __future__ import annotations

import torch

from nestlm.ops.cms.common import check


def cms_scan_ref(u, k, v, lr, W, G, pos, period):
    """Token-loop reference of `cms_scan` (same arguments and results; rows may be at any position)."""
    check("cms_scan_ref", u, k, v, lr, W, G, pos, period)
    dt = W.dtype
    u, k, v, lr = u.to(dt), k.to(dt), v.to(dt), lr.to(dt)
    ys = []
    # unbind, not indexing: the backward of every index would fill a full-length zero tensor
    for u_i, k_i, v_i, lr_i in zip(u.unbind(1), k.unbind(1), v.unbind(1), lr.unbind(1)):
        # matmul, not einsum: einsum copies W into its own layout on every call
        ys.append((u_i[:, None, :] @ W)[:, 0])
        err = (k_i[:, None, :] @ W)[:, 0] - v_i
        G = G + lr_i[:, None, None] * k_i[:, :, None] * err[:, None, :]
        pos = pos + 1
        done = (pos % period == 0)[:, None, None]
        # only when some row closes a period: a new W per token would be kept for the backward
        # of every read (O(l n d) memory: ~24 GB at l = 4096, d = 256)
        if bool(done.any()):
            W = torch.where(done, W - G / period, W)
            G = torch.where(done, torch.zeros_like(G), G)
    y = torch.stack(ys, 1) if ys else u.new_zeros(u.shape[0], 0, W.shape[-1]).to(dt)
    return y, W, G, pos
