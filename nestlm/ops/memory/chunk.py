"""The chunked PyTorch path of the memory scans, and the public ops (which dispatch).

Inside a chunk the gradients only depend on the anchor, so the momentum and decay recurrences are
linear and the chunk-end memory has a closed form. With, from the chunk start,
E_t = prod_{s<=t} momentum_s and B_t = prod_{s<=t} (1 - decay_s):

    S_end = E_n S_0 - sum_i e_i u_i,                 e_i = lr_i E_n / E_i
    W_end = B_n W_0 + g S_0 - sum_i c_i u_i,         g = sum_t B_n E_t / B_t,
                                                     c_i = lr_i sum_{t>=i} (B_n / B_t)(E_t / E_i)

Every ratio E_n / E_i, B_n / B_t is a product over a stretch of one chunk, formed with cumprod and
no division: a gate of exactly 0 (momentum) or 1 (decay) is exact, with finite gradients, and
products of at most C factors in fp32 cannot overflow. Each u_i is a sum of outer products
P_i R_i^T of backpropagated vectors (depth 1: 2 r_i k_i^T with r_i = W_a k_i - v_i; depth 2: one
pair per weight, see common._mlp_grad_factors), so sum_i c_i u_i is one matmul per chunk. The
coefficients of all chunks are computed at once; the only Python loop is over chunks (L / C
iterations), batched over (batch, heads). Autograd differentiates the loop: measured against the
hand-written backward of the kernel's chunk-recompute algorithm written in PyTorch, this is
4-7x faster on CPU (docs/kernels.md), so that form exists only as the CUDA kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nestlm.ops import backends
from nestlm.ops.memory import csrc
from nestlm.ops.memory.common import (
    Memory,
    Scan,
    Tensor,
    Weights,
    check,
    clip_scale,
    linear_memory,
    mlp_memory,
    run_scan,
    single,
)


def chunk_coefficients(lr: Tensor, momentum: Tensor, decay: Tensor, C: int, offset: int):
    """Closed-form chunk coefficients for all chunks at once.

    lr, momentum, decay [n, L] (state dtype). The sequence is laid on the absolute chunk grid:
    `offset` identity tokens in front, identity tokens after, N = ceil((offset + L) / C) chunks.
    Identity tokens have lr = 0 and factor 1 and are masked out of the sums over t.
    Returns ce [n, N, C, 2] (c_i and e_i side by side) and T [n, N, 2, 2] = [[B_n, g], [0, E_n]],
    the chunk's map of (W_0, S_0).
    """
    n, L = lr.shape
    N = -(-(offset + L) // C)
    pad = (offset, N * C - offset - L)
    mom = F.pad(momentum, pad, value=1.0).view(n, N, C)
    keep = F.pad(1.0 - decay, pad, value=1.0).view(n, N, C)
    step = F.pad(lr, pad).view(n, N, C)
    real = F.pad(torch.ones(L, dtype=torch.bool, device=lr.device), pad).view(N, C)

    # Er[i, t] = prod_{i < s <= t} momentum_s (= E_t / E_i for t >= i): rows start at 1 after their i
    after = torch.ones(C, C, dtype=torch.bool, device=lr.device).triu(1)  # [i, s]: s > i
    Er = torch.where(after, mom[..., None, :], torch.ones_like(mom)[..., None, :]).cumprod(-1)
    E = mom.cumprod(-1)  # E_t
    Bs = keep.flip(-1).cumprod(-1).flip(-1)  # prod_{s >= t} keep_s
    Bsuf = torch.cat((Bs[..., 1:], torch.ones_like(Bs[..., :1])), -1)  # B_n / B_t = prod_{s > t} keep_s
    w_t = torch.where(real, Bsuf, torch.zeros_like(Bsuf))  # real tokens only in the sums over t
    valid = ~after.transpose(0, 1)  # [i, t]: t >= i
    c = step * (torch.where(valid, Er, torch.zeros_like(Er)) * w_t[..., None, :]).sum(-1)
    e = step * Er[..., -1]
    g = (w_t * E).sum(-1, keepdim=True)
    E_n, B_n = E[..., -1:], Bs[..., :1]
    T = torch.stack((torch.cat((B_n, g), -1), torch.cat((torch.zeros_like(g), E_n), -1)), -2)
    return torch.stack((c, e), -1), T


def chunked_scan(mem: Memory, x: Scan):
    """The chunk loop. q, k [b, l, h, dk], v [b, l, h, dv] -> y [b, l, h, dv], (W, S, W_anchor).

    Inside, batch and heads are one dim n = b * h. Each weight m keeps W and S stacked as one
    [n, 2p, r] tensor, so a chunk's update is one bmm with T (the map of W_0, S_0) and one baddbmm
    subtracting [sum_i c_i u_i; sum_i e_i u_i] = (P * [c, e])^T R.
    """
    W, C, offset = x.W, x.chunk_size, x.offset
    b, L, h, _ = x.q.shape
    n, dt = b * h, W[0].dtype
    N = -(-(offset + L) // C)
    pad = (0, 0, offset, N * C - offset - L)

    def chunks(t):  # [b, l, h, d] -> [n, N, C, d]
        t = F.pad(t.to(dt).transpose(1, 2), pad)
        return t.reshape(n, N, C, t.shape[-1])

    qc, kc, vc = chunks(x.q), chunks(x.k), chunks(x.v)
    gates = [g.to(dt).transpose(1, 2).reshape(n, L) for g in (x.lr, x.momentum, x.decay)]
    ce, T = chunk_coefficients(*gates, C, offset)
    ce = 2.0 * ce  # the factors give u / 2
    # per-chunk slices taken once: indexing inside the loop would make autograd scatter every
    # chunk's gradient into a full-size zero tensor
    ks, vs, ces, Ts = kc.unbind(1), vc.unbind(1), ce.unbind(1), T.unbind(1)

    shapes = [w.shape[-2:] for w in W]
    WS = [torch.cat((w.reshape(n, *sh), s.reshape(n, *sh)), 1) for w, s, sh in zip(W, x.S, shapes)]
    Wa = None if x.W_anchor is None else [a.reshape(n, *sh) for a, sh in zip(x.W_anchor, shapes)]
    anchors = []
    for j in range(N):
        A = tuple(Wa) if (j == 0 and offset > 0) else tuple(ws[:, : sh[0]] for ws, sh in zip(WS, shapes))
        anchors.append(A)
        factors = mem.factors(tuple(a.detach() for a in A) if x.first_order else A, ks[j], vs[j])
        cej = ces[j]  # [n, C, 2]
        if x.max_grad_norm is not None:
            # ||u_i||_F^2 = 4 sum over weights of ||P_i||^2 ||R_i||^2 (each u is rank one per weight);
            # the scale is a per-token scalar, so it folds into lr and keeps the closed form
            sq = 4.0 * sum(P.pow(2).sum(-1) * R.pow(2).sum(-1) for P, R in factors)
            cej = cej * clip_scale(sq, x.max_grad_norm)[..., None]
        for m, (P, R) in enumerate(factors):
            p, r = shapes[m]
            P2 = (P[:, :, None, :] * cej[..., None]).reshape(n, C, 2 * p)  # [P c, P e]
            mixed = torch.bmm(Ts[j], WS[m].view(n, 2, p * r)).view(n, 2 * p, r)
            WS[m] = torch.baddbmm(mixed, P2.transpose(1, 2), R, alpha=-1.0)

    # all reads at once: every chunk reads its anchor
    A_all = tuple(torch.stack(ws, dim=1) for ws in zip(*anchors))  # [n, N, p, r]
    y = mem.read_fast(A_all, qc)  # [n, N, C, dv]
    y = y.reshape(b, h, N * C, -1)[:, :, offset : offset + L].transpose(1, 2)

    def unflat(t):
        return t.reshape(b, h, *t.shape[1:])

    W_end = tuple(unflat(ws[:, : sh[0]]) for ws, sh in zip(WS, shapes))
    S_end = tuple(unflat(ws[:, sh[0] :]) for ws, sh in zip(WS, shapes))
    return y, (W_end, S_end, tuple(unflat(a) for a in anchors[-1]))


def backend(x: Scan) -> str:
    """The backend that runs the linear memory scan on inputs `x` ("csrc" or "torch")."""
    return backends.choose("linear_memory_scan", x.q.device, csrc.unsupported(x))


def linear_memory_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    momentum: Tensor,
    decay: Tensor,
    W: Tensor,
    S: Tensor,
    W_anchor: Tensor | None = None,
    chunk_size: int = 16,
    offset: int = 0,
    return_state: bool = True,
    first_order: bool = False,
    max_grad_norm: float | None = None,
):
    """Linear (depth-1) Titans memory, chunked. Semantics in nestlm.ops.memory.

    Args:
        q, k: [b, l, h, dk] (the layer L2-normalises them; the op does not).
        v: [b, l, h, dv].
        lr, momentum, decay: [b, l, h]: lr_t > 0, momentum_t in [0, 1), decay_t in [0, 1].
        W, S: [b, h, dv, dk]: memory and momentum before the first token (fresh: W0 and 0).
        W_anchor: [b, h, dv, dk]: anchor of the chunk in progress; required when offset > 0,
            ignored when offset == 0 (the anchor is then W).
        chunk_size: C; chunks are [jC, (j+1)C) in absolute positions.
        offset: tokens of the current chunk consumed by earlier calls, in [0, C)
            (the absolute position modulo C).
        return_state: also return the final (W, S, W_anchor).
        first_order: take the inner gradients with the anchor detached.
        max_grad_norm: if set, each token's inner gradient u_t (per head, Frobenius norm over all
            memory weights) is scaled by min(1, max_grad_norm / ||u_t||) before it enters the
            momentum. It bounds every step, so long streams stay finite even where mini-batch GD
            at a large lr would diverge.

    Returns:
        y [b, l, h, dv] in W's dtype, and if return_state (W, S, W_anchor) each [b, h, dv, dk]:
        memory and momentum after the last token, and the anchor of the chunk holding the last
        token (a caller continuing with offset = (offset + l) % C passes it back as W_anchor).

    The backend comes from nestlm.ops.backends: the csrc kernel (nestlm.ops.memory.csrc) for CUDA
    inputs it covers, else this PyTorch path.
    """
    x = Scan(q, k, v, lr, momentum, decay, W, S, W_anchor, chunk_size, offset, first_order, max_grad_norm)
    mem, x = linear_memory(x)
    check("linear_memory_scan", mem, x)
    if backend(x) == "csrc":
        return backends.kernel("linear_memory_scan", "csrc")(x, return_state)
    return single(run_scan(chunked_scan, mem, x, return_state), return_state)


def mlp_memory_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    momentum: Tensor,
    decay: Tensor,
    W: Weights,
    S: Weights,
    W_anchor: Weights | None = None,
    ln_weight: Tensor | None = None,
    ln_bias: Tensor | None = None,
    chunk_size: int = 16,
    offset: int = 0,
    return_state: bool = True,
    first_order: bool = False,
    max_grad_norm: float | None = None,
    eps: float = 1e-5,
):
    """Depth-2 Titans memory M(x) = x + LN(W2 gelu(W1 x)), chunked. Semantics in nestlm.ops.memory.

    Same arguments as `linear_memory_scan` except:
        v: [b, l, h, d] with d = dk (the memory is residual).
        W, S, W_anchor: pairs (W1 [b, h, hidden, d], W2 [b, h, d, hidden]).
        ln_weight, ln_bias: [h, d], the LN affine (outer parameters; default 1 and 0).
        eps: LN epsilon.
    Returns y [b, l, h, d] and, if return_state, (W, S, W_anchor) as pairs. PyTorch only.
    """
    x = Scan(q, k, v, lr, momentum, decay, W, S, W_anchor, chunk_size, offset, first_order, max_grad_norm)
    mem, x = mlp_memory("mlp_memory_scan", x, ln_weight, ln_bias, eps)
    check("mlp_memory_scan", mem, x)
    return run_scan(chunked_scan, mem, x, return_state)
