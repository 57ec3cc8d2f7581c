"""Titans neural-memory update: chunk-anchored mini-batch gradient descent with momentum and decay.

Per batch row and head, a memory M_W (weights W) is written by gradient descent on the associative
loss l(W; k, v) = ||M_W(k) - v||^2 (summed over the value dims) while the sequence runs:

    u_t = grad_W l(W_a; k_t, v_t)           gradient at the chunk's anchor W_a
    S_t = eta_t * S_{t-1} - theta_t * u_t    momentum ("surprise"), S starts at 0
    W_t = (1 - alpha_t) * W_{t-1} + S_t      forget gate alpha, then the step
    y_t = M_{W_a}(q_t)                       boundary read

theta = lr (inner learning rate), eta = momentum, alpha = decay; all per token and head.

Chunks are fixed on absolute positions: [jC, (j+1)C) counted from the fresh state. The anchor W_a of
chunk j is the memory at the start of chunk j; every gradient inside the chunk is taken at W_a
(mini-batch GD, as in TTT / Titans section 3.2), and a token reads W_a too, so it never sees its
own chunk's writes. chunk_size=1 is plain online GD with momentum (y_t = M_{W_{t-1}}(q_t)).
The state (W_a, W, S, position) is enough to continue exactly in the middle of a chunk: `offset`
is the number of tokens of the current chunk that earlier calls already consumed, and then the
caller passes that chunk's anchor as `W_anchor`.

Two memories:
  depth 1 (linear):  M_W(x) = W x,                       W [dv, dk]
  depth 2 (MLP):     M_W(x) = x + LN(W2 gelu(W1 x)),     W1 [hidden, dk], W2 [dv, hidden], dv = dk
  LN is a layer norm over dv with a per-head affine (ln_weight, ln_bias) that is an ordinary
  parameter: it is not written by the inner loop. gelu is the exact (erf) GELU.

Chunked fast path. Inside a chunk the gradients only depend on the anchor, so the momentum and decay
recurrences are linear and the chunk-end memory has a closed form. With, from the chunk start,
E_t = prod_{s<=t} eta_s and B_t = prod_{s<=t} (1 - alpha_s):

    S_end = E_n S_0 - sum_i e_i u_i,                 e_i = theta_i E_n / E_i
    W_end = B_n W_0 + g S_0 - sum_i c_i u_i,         g = sum_t B_n E_t / B_t,
                                                     c_i = theta_i sum_{t>=i} (B_n / B_t)(E_t / E_i)

Every ratio E_n / E_i, B_n / B_t is a product over a stretch of one chunk, formed with cumprod and
no division: a gate of exactly 0 (eta) or 1 (alpha) is exact, with finite gradients, and products
of at most C factors in fp32 cannot overflow. Each u_i is a sum of outer products P_i R_i^T of
backpropagated vectors (depth 1: 2 r_i k_i^T with r_i = W_a k_i - v_i; depth 2: one pair per
weight, written out analytically below), so sum_i c_i u_i is one matmul per chunk. The gate
coefficients of all chunks are computed at once; the only Python loop is over chunks (L / C
iterations), batched over (batch, heads).

Outer gradients: the update is a differentiable expression of the anchor, so the outer loss
differentiates through the inner gradients (second order) into W0, q/k/v, the gates and the LN.
`first_order=True` computes the inner gradients u with the anchor detached: u stays differentiable
in k, v, lr (and the LN affine) but no gradient flows through u into the anchor (the memory path
through the decay and momentum terms is kept).

The `*_ref` functions are plain token loops applying the same rule, with the inner gradient taken by
torch.autograd; they are the oracle for tests.

State dtype: all arithmetic happens in the dtype of W (keep it fp32 under bf16 autocast, fp64 in
tests); q, k, v and the gates are cast to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nestlm.ops import backends

Tensor = torch.Tensor
Weights = tuple[Tensor, ...]


__all__ = [
    "linear_memory_scan",
    "linear_memory_scan_ref",
    "mlp_memory_scan",
    "mlp_memory_scan_ref",
    "mlp_memory_read",
]


# ------------------------------------------------------------------------------------------------
# memory functions (shared by the fast path and the references)
# ------------------------------------------------------------------------------------------------
def _linear_read(W: Weights, x: Tensor) -> Tensor:
    """W = (W [..., dv, dk],), x [..., n, dk] -> [..., n, dv]."""
    return x @ W[0].transpose(-1, -2)


def _mlp_parts(W: Weights, ln_weight: Tensor, ln_bias: Tensor, x: Tensor, eps: float):
    """Forward of the depth-2 memory, keeping the intermediates the analytic gradient needs.

    W = (W1 [..., hid, dk], W2 [..., dv, hid]), x [..., n, dk], ln_weight/ln_bias broadcastable to
    [..., n, dv]. Returns (out, h, a, zhat, rstd).
    """
    h = x @ W[0].transpose(-1, -2)
    a = F.gelu(h)
    z = a @ W[1].transpose(-1, -2)
    mu = z.mean(-1, keepdim=True)
    zc = z - mu
    rstd = torch.rsqrt(zc.pow(2).mean(-1, keepdim=True) + eps)
    zhat = zc * rstd
    return x + zhat * ln_weight + ln_bias, h, a, zhat, rstd


def mlp_memory_read(W: Weights, ln_weight: Tensor, ln_bias: Tensor, x: Tensor, eps: float = 1e-5) -> Tensor:
    """M_W(x) = x + LN(W2 gelu(W1 x)).

    W = (W1 [b, h, hid, d], W2 [b, h, d, hid]); ln_weight, ln_bias [h, d]; x [b, h, n, d] -> [b, h, n, d].
    """
    return _mlp_parts(W, ln_weight[:, None, :], ln_bias[:, None, :], x, eps)[0]


def _linear_grad_factors(A: Weights, k: Tensor, v: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Half the per-token gradient of ||A k - v||^2 as outer products: u_i / 2 = r_i k_i^T.

    A = (W [n, dv, dk],), k [n, C, dk], v [n, C, dv] (n = batch * heads). Returns [(r, k)].
    """
    return [(torch.baddbmm(v, k, A[0].transpose(1, 2), beta=-1.0), k)]


def _mlp_grad_factors(A: Weights, ln_weight: Tensor, ln_bias: Tensor, k: Tensor, v: Tensor, eps: float):
    """Half the per-token gradient of ||M_A(k) - v||^2 w.r.t. (W1, W2) as outer products per weight.

    A = (W1 [n, hid, d], W2 [n, d, hid]), k, v [n, C, d], ln_weight/ln_bias [n, 1, d].
    Back-propagation through out = k + LN(W2 gelu(W1 k)), one token at a time: dl/dout / 2 = r,
    through the affine and the normalisation to g_z [d], then g_h = gelu'(h) * (W2^T g_z);
    u_W1 / 2 = g_h k^T and u_W2 / 2 = g_z a^T. The LN and GELU backward are aten's own (twice
    differentiable) kernels; mean and rstd enter them as saved statistics of z, whose dependence on z
    the double backward of native_layer_norm_backward accounts for.
    """
    d = k.shape[-1]
    h = torch.bmm(k, A[0].transpose(1, 2))
    a = F.gelu(h)
    z = torch.bmm(a, A[1].transpose(1, 2))
    zhat, mean, rstd = torch.native_layer_norm(z, (d,), None, None, eps)
    g_zhat = (torch.addcmul(ln_bias, zhat, ln_weight) + k - v) * ln_weight
    g_z = torch.ops.aten.native_layer_norm_backward(
        g_zhat, z, (d,), mean.detach(), rstd.detach(), None, None, (True, False, False)
    )[0]
    g_h = torch.ops.aten.gelu_backward(torch.bmm(g_z, A[1]), h)
    return [(g_h, k), (g_z, a)]


# ------------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------------
def _clip_scale(sq_norm: Tensor, max_norm: float) -> Tensor:
    """min(1, max_norm / ||u||) from ||u||^2; the tiny floor keeps the gradient finite at u = 0."""
    return (max_norm * torch.rsqrt(sq_norm + 1e-24)).clamp(max=1.0)


def _check_args(name, q, k, v, lr, momentum, decay, W, S, W_anchor, chunk_size, offset, weight_shapes):
    if q.dim() != 4:
        raise ValueError(f"{name}: q has shape {tuple(q.shape)}: expected [batch, length, heads, dk]")
    b, L, h, dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"{name}: k has shape {tuple(k.shape)}: expected {tuple(q.shape)} like q")
    if v.dim() != 4 or v.shape[:3] != (b, L, h):
        raise ValueError(f"{name}: v has shape {tuple(v.shape)}: expected [{b}, {L}, {h}, dv]")
    for nm, g in (("lr", lr), ("momentum", momentum), ("decay", decay)):
        if g.shape != (b, L, h):
            raise ValueError(f"{name}: {nm} has shape {tuple(g.shape)}: expected [{b}, {L}, {h}]")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name}: chunk_size={chunk_size!r}: expected a positive int")
    if not isinstance(offset, int) or not 0 <= offset < chunk_size:
        raise ValueError(f"{name}: offset={offset!r}: expected an int in [0, chunk_size={chunk_size})")
    if offset > 0 and W_anchor is None:
        raise ValueError(f"{name}: offset={offset} > 0 (continuing a chunk) needs W_anchor, the chunk's anchor")
    for nm, ws in (("W", W), ("S", S), ("W_anchor", W_anchor)):
        if ws is None:
            continue
        if len(ws) != len(weight_shapes):
            raise ValueError(f"{name}: {nm} has {len(ws)} tensors: expected {len(weight_shapes)}")
        for i, (t, shp) in enumerate(zip(ws, weight_shapes)):
            if tuple(t.shape) != shp:
                raise ValueError(f"{name}: {nm}[{i}] has shape {tuple(t.shape)}: expected {list(shp)}")
            if t.dtype != W[0].dtype:
                raise ValueError(f"{name}: {nm}[{i}] has dtype {t.dtype}: expected {W[0].dtype} like W")


def _as_tuple(W) -> Weights:
    return tuple(W) if isinstance(W, (tuple, list)) else (W,)


# ------------------------------------------------------------------------------------------------
# chunked fast path (generic over the memory)
# ------------------------------------------------------------------------------------------------
class _Memory(NamedTuple):
    """How one memory reads and is differentiated, in the two layouts.

    read_ref(A, x): A [b, h, p, r] weights, x [b, h, 1, d] (token loop).
    read_fast(A, x): A [n, N, p, r], x [n, N, C, d] with n = b * h (all chunks at once).
    factors(A, k, v): A [n, p, r], k, v [n, C, d] -> per weight (P, R) with u / 2 = P_i R_i^T.
    loss(A, k, v): A [b, h, p, r], k, v [b, h, 1, d] -> ||M_A(k) - v||^2 [b, h].
    shapes: the expected [b, h, p, r] of each weight.
    """

    read_ref: Callable
    read_fast: Callable
    factors: Callable
    loss: Callable
    shapes: list


def _chunk_coefficients(lr: Tensor, momentum: Tensor, decay: Tensor, C: int, offset: int):
    """Closed-form chunk coefficients for all chunks at once.

    lr, momentum, decay [n, L] (state dtype). The sequence is laid on the absolute chunk grid:
    `offset` identity tokens in front, identity tokens after, N = ceil((offset + L) / C) chunks.
    Identity tokens have theta = 0 and factor 1 and are masked out of the sums over t.
    Returns ce [n, N, C, 2] (c_i and e_i side by side) and T [n, N, 2, 2] = [[B_n, g], [0, E_n]],
    the chunk's map of (W_0, S_0).

    Every ratio is a product over a stretch of the chunk, formed by cumprod without division, so a
    gate of exactly 0 (eta) or 1 (alpha) gives exact values and exact, finite gradients; a product
    has at most C factors, so it cannot overflow and its underflow is to the right limit, 0.
    """
    n, L = lr.shape
    N = -(-(offset + L) // C)
    pad = (offset, N * C - offset - L)
    eta = F.pad(momentum, pad, value=1.0).view(n, N, C)
    keep = F.pad(1.0 - decay, pad, value=1.0).view(n, N, C)
    theta = F.pad(lr, pad).view(n, N, C)
    real = F.pad(torch.ones(L, dtype=torch.bool, device=lr.device), pad).view(N, C)

    # Er[i, t] = prod_{i < s <= t} eta_s (= E_t / E_i for t >= i): rows start at 1 after their i
    after = torch.ones(C, C, dtype=torch.bool, device=lr.device).triu(1)  # [i, s]: s > i
    Er = torch.where(after, eta[..., None, :], torch.ones_like(eta)[..., None, :]).cumprod(-1)
    E = eta.cumprod(-1)  # E_t
    Bs = keep.flip(-1).cumprod(-1).flip(-1)  # prod_{s >= t} keep_s
    Bsuf = torch.cat((Bs[..., 1:], torch.ones_like(Bs[..., :1])), -1)  # B_n / B_t = prod_{s > t} keep_s
    w_t = torch.where(real, Bsuf, torch.zeros_like(Bsuf))  # real tokens only in the sums over t
    valid = ~after.transpose(0, 1)  # [i, t]: t >= i
    c = theta * (torch.where(valid, Er, torch.zeros_like(Er)) * w_t[..., None, :]).sum(-1)
    e = theta * Er[..., -1]
    g = (w_t * E).sum(-1, keepdim=True)
    E_n, B_n = E[..., -1:], Bs[..., :1]
    T = torch.stack((torch.cat((B_n, g), -1), torch.cat((torch.zeros_like(g), E_n), -1)), -2)
    return torch.stack((c, e), -1), T


def _chunked_scan(
    mem: _Memory,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    momentum: Tensor,
    decay: Tensor,
    W: Weights,
    S: Weights,
    W_anchor: Weights | None,
    C: int,
    offset: int,
    first_order: bool,
    max_grad_norm: float | None,
):
    """Shared chunk loop. q, k [b, l, h, dk], v [b, l, h, dv] -> y [b, l, h, dv], (W, S, W_anchor).

    Inside, batch and heads are one dim n = b * h. Each weight m keeps W and S stacked as one
    [n, 2p, r] tensor, so a chunk's update is one bmm with T (the map of W_0, S_0) and one baddbmm
    subtracting [sum_i c_i u_i; sum_i e_i u_i] = (P * [c, e])^T R.
    """
    read_fn, factors_fn = mem.read_fast, mem.factors
    b, L, h, _ = q.shape
    n, dt = b * h, W[0].dtype
    N = -(-(offset + L) // C)
    pad = (0, 0, offset, N * C - offset - L)

    def chunks(x):  # [b, l, h, d] -> [n, N, C, d]
        x = F.pad(x.to(dt).transpose(1, 2), pad)
        return x.reshape(n, N, C, x.shape[-1])

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    gates = [g.to(dt).transpose(1, 2).reshape(n, L) for g in (lr, momentum, decay)]
    ce, T = _chunk_coefficients(*gates, C, offset)
    ce = 2.0 * ce  # the factors give u / 2
    # per-chunk slices taken once: indexing inside the loop would make autograd scatter every
    # chunk's gradient into a full-size zero tensor
    ks, vs, ces, Ts = kc.unbind(1), vc.unbind(1), ce.unbind(1), T.unbind(1)

    shapes = [w.shape[-2:] for w in W]
    WS = [torch.cat((w.reshape(n, *sh), s.reshape(n, *sh)), 1) for w, s, sh in zip(W, S, shapes)]
    Wa = None if W_anchor is None else [a.reshape(n, *sh) for a, sh in zip(W_anchor, shapes)]
    anchors = []
    for j in range(N):
        A = tuple(Wa) if (j == 0 and offset > 0) else tuple(ws[:, : sh[0]] for ws, sh in zip(WS, shapes))
        anchors.append(A)
        factors = factors_fn(tuple(a.detach() for a in A) if first_order else A, ks[j], vs[j])
        cej = ces[j]  # [n, C, 2]
        if max_grad_norm is not None:
            # ||u_i||_F^2 = 4 sum over weights of ||P_i||^2 ||R_i||^2 (each u is rank one per weight)
            sq = 4.0 * sum(P.pow(2).sum(-1) * R.pow(2).sum(-1) for P, R in factors)
            cej = cej * _clip_scale(sq, max_grad_norm)[..., None]
        for m, (P, R) in enumerate(factors):
            p, r = shapes[m]
            P2 = (P[:, :, None, :] * cej[..., None]).reshape(n, C, 2 * p)  # [P c, P e]
            mixed = torch.bmm(Ts[j], WS[m].view(n, 2, p * r)).view(n, 2 * p, r)
            WS[m] = torch.baddbmm(mixed, P2.transpose(1, 2), R, alpha=-1.0)

    # all reads at once: every chunk reads its anchor
    A_all = tuple(torch.stack(ws, dim=1) for ws in zip(*anchors))  # [n, N, p, r]
    y = read_fn(A_all, qc)  # [n, N, C, dv]
    y = y.reshape(b, h, N * C, -1)[:, :, offset : offset + L].transpose(1, 2)

    def unflat(x):
        return x.reshape(b, h, *x.shape[1:])

    W_end = tuple(unflat(ws[:, : sh[0]]) for ws, sh in zip(WS, shapes))
    S_end = tuple(unflat(ws[:, sh[0] :]) for ws, sh in zip(WS, shapes))
    return y, (W_end, S_end, tuple(unflat(a) for a in anchors[-1]))


# ------------------------------------------------------------------------------------------------
# token-loop references (generic over the memory)
# ------------------------------------------------------------------------------------------------
def _token_loop_ref(mem, q, k, v, lr, momentum, decay, W, S, W_anchor, C, offset, first_order, max_grad_norm):
    """One token at a time, the gradient taken by autograd at the current anchor."""
    read_fn, loss_fn = mem.read_ref, mem.loss
    dt = W[0].dtype
    q, k, v, lr, momentum, decay = (x.to(dt) for x in (q, k, v, lr, momentum, decay))
    outer_grad = torch.is_grad_enabled()
    Wt, St = tuple(W), tuple(S)
    A = tuple(W_anchor) if offset > 0 else Wt
    ys = []
    # unbind, not indexing: the backward of every index would fill a full-length zero tensor
    steps = zip(*(x.unbind(1) for x in (q, k, v, lr, momentum, decay)))
    for t, (q_t, k_t, v_t, lr_t, mom_t, dec_t) in enumerate(steps):
        if (offset + t) % C == 0:
            A = Wt
        ys.append(read_fn(A, q_t[:, :, None, :])[:, :, 0])
        with torch.enable_grad():
            if first_order or not any(a.requires_grad for a in A):
                A_in = tuple(a.detach().requires_grad_(True) for a in A)
            else:
                A_in = A
            loss = loss_fn(A_in, k_t[:, :, None, :], v_t[:, :, None, :]).sum()
            u = torch.autograd.grad(loss, A_in, create_graph=outer_grad)
            if max_grad_norm is not None:
                scale = _clip_scale(sum(ui.pow(2).sum((-1, -2)) for ui in u), max_grad_norm)
                u = tuple(ui * scale[..., None, None] for ui in u)
        th, et, al = (x[:, :, None, None] for x in (lr_t, mom_t, dec_t))
        St = tuple(et * s - th * ui for s, ui in zip(St, u))
        Wt = tuple((1.0 - al) * w + s for w, s in zip(Wt, St))
    y = torch.stack(ys, dim=1) if ys else q.new_zeros(*q.shape[:3], W[0].shape[-2])
    return y, (Wt, St, A)


# ------------------------------------------------------------------------------------------------
# public ops
# ------------------------------------------------------------------------------------------------
def _run(
    name,
    fast,
    mem,
    q,
    k,
    v,
    lr,
    momentum,
    decay,
    W,
    S,
    W_anchor,
    chunk_size,
    offset,
    return_state,
    first_order,
    max_grad_norm,
):
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"{name}: max_grad_norm={max_grad_norm!r}: expected a positive float or None")
    _check_args(name, q, k, v, lr, momentum, decay, W, S, W_anchor, chunk_size, offset, mem.shapes)
    if q.shape[1] == 0:
        y = q.new_zeros(*q.shape[:3], W[0].shape[-2]).to(W[0].dtype)
        state = (W, S, W_anchor if W_anchor is not None else W)
    else:
        scan = _chunked_scan if fast else _token_loop_ref
        # the recurrence runs in the state dtype whatever autocast says
        with torch.autocast(device_type=q.device.type, enabled=False):
            y, state = scan(
                mem, q, k, v, lr, momentum, decay, W, S, W_anchor, chunk_size, offset, first_order, max_grad_norm
            )
    return (y, state) if return_state else y


def _linear_memory(q, v, W, S, W_anchor):
    W, S = _as_tuple(W), _as_tuple(S)
    W_anchor = None if W_anchor is None else _as_tuple(W_anchor)
    b, _, h, dk = q.shape

    def loss(A, k, v):
        return (_linear_read(A, k) - v).pow(2).sum((-1, -2))

    mem = _Memory(_linear_read, _linear_read, _linear_grad_factors, loss, [(b, h, v.shape[-1], dk)])
    return mem, W, S, W_anchor


def _unpack_linear(out, return_state):
    if not return_state:
        return out
    y, (W, S, A) = out
    return y, (W[0], S[0], A[0])


def linear_memory_scan(
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
    max_grad_norm=None,
):
    """Linear (depth-1) Titans memory, chunked. Semantics in the module docstring.

    Args:
        q, k: [b, l, h, dk] (the layer L2-normalises them; the op does not).
        v: [b, l, h, dv].
        lr, momentum, decay: [b, l, h]: theta_t > 0, eta_t in [0, 1), alpha_t in [0, 1].
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
            momentum. The scale is a per-token scalar, so it folds into theta and keeps the closed
            form; it bounds every step, so long streams stay finite even where mini-batch GD at a
            large lr would diverge.

    Returns:
        y [b, l, h, dv] in W's dtype, and if return_state (W, S, W_anchor) each [b, h, dv, dk]:
        memory and momentum after the last token, and the anchor of the chunk holding the last
        token (a caller continuing with offset = (offset + l) % C passes it back as W_anchor).

    On CUDA tensors with the csrc kernel built (and first_order=False, max_grad_norm=None) the fused
    kernel of nestlm.ops.memory_fused runs instead; NESTLM_BACKEND=torch forces this PyTorch path.
    """
    mem, W, S, W_anchor = _linear_memory(q, v, W, S, W_anchor)
    if (
        q.device.type == "cuda"
        and not first_order
        and max_grad_norm is None
        and backends.memory_scan_backend(q, v, chunk_size) == "csrc"
    ):
        from nestlm.ops.memory_fused import linear_memory_scan_fused

        Wa = None if W_anchor is None else W_anchor[0]
        return linear_memory_scan_fused(
            q, k, v, lr, momentum, decay, W[0], S[0], Wa, chunk_size, offset, return_state, use_kernel=True
        )
    out = _run(
        "linear_memory_scan",
        True,
        mem,
        q,
        k,
        v,
        lr,
        momentum,
        decay,
        W,
        S,
        W_anchor,
        chunk_size,
        offset,
        return_state,
        first_order,
        max_grad_norm,
    )
    return _unpack_linear(out, return_state)


def linear_memory_scan_ref(
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
    max_grad_norm=None,
):
    """Token-loop reference of `linear_memory_scan` (same arguments and results)."""
    mem, W, S, W_anchor = _linear_memory(q, v, W, S, W_anchor)
    out = _run(
        "linear_memory_scan_ref",
        False,
        mem,
        q,
        k,
        v,
        lr,
        momentum,
        decay,
        W,
        S,
        W_anchor,
        chunk_size,
        offset,
        return_state,
        first_order,
        max_grad_norm,
    )
    return _unpack_linear(out, return_state)


def _mlp_memory(name, q, v, W, S, W_anchor, ln_weight, ln_bias, eps):
    W, S = _as_tuple(W), _as_tuple(S)
    W_anchor = None if W_anchor is None else _as_tuple(W_anchor)
    b, _, h, d = q.shape
    if ln_weight is None:
        ln_weight = q.new_ones(h, d)
    if ln_bias is None:
        ln_bias = q.new_zeros(h, d)
    if v.shape[-1] != d:
        raise ValueError(f"{name}: v has {v.shape[-1]} dims: the residual MLP memory needs dv = dk = {d}")
    if len(W) != 2:
        raise ValueError(f"{name}: W has {len(W)} tensors: expected (W1 [b, h, hidden, dk], W2 [b, h, dv, hidden])")
    hid = W[0].shape[-2]
    for nm, p in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if p.shape != (h, d):
            raise ValueError(f"{name}: {nm} has shape {tuple(p.shape)}: expected [{h}, {d}]")
    dt = W[0].dtype
    lw, lb = ln_weight.to(dt), ln_bias.to(dt)
    lw_n, lb_n = lw.expand(b, h, d).reshape(b * h, 1, d), lb.expand(b, h, d).reshape(b * h, 1, d)

    def read_ref(A, x):  # x [b, h, 1, d]
        return _mlp_parts(A, lw[:, None], lb[:, None], x, eps)[0]

    def read_fast(A, x):  # x [b * h, N, C, d]
        return _mlp_parts(A, lw_n[:, None], lb_n[:, None], x, eps)[0]

    def factors(A, k, v):
        return _mlp_grad_factors(A, lw_n, lb_n, k, v, eps)

    def loss(A, k, v):
        return (read_ref(A, k) - v).pow(2).sum((-1, -2))

    mem = _Memory(read_ref, read_fast, factors, loss, [(b, h, hid, d), (b, h, d, hid)])
    return mem, W, S, W_anchor


def mlp_memory_scan(
    q,
    k,
    v,
    lr,
    momentum,
    decay,
    W,
    S,
    W_anchor=None,
    ln_weight=None,
    ln_bias=None,
    chunk_size=16,
    offset=0,
    return_state=True,
    first_order=False,
    max_grad_norm=None,
    eps=1e-5,
):
    """Depth-2 Titans memory M(x) = x + LN(W2 gelu(W1 x)), chunked. Semantics in the module docstring.

    Same arguments as `linear_memory_scan` except:
        v: [b, l, h, d] with d = dk (the memory is residual).
        W, S, W_anchor: pairs (W1 [b, h, hidden, d], W2 [b, h, d, hidden]).
        ln_weight, ln_bias: [h, d], the LN affine (outer parameters; default 1 and 0).
        eps: LN epsilon.
    Returns y [b, l, h, d] and, if return_state, (W, S, W_anchor) as pairs.
    """
    mem, W, S, W_anchor = _mlp_memory("mlp_memory_scan", q, v, W, S, W_anchor, ln_weight, ln_bias, eps)
    return _run(
        "mlp_memory_scan",
        True,
        mem,
        q,
        k,
        v,
        lr,
        momentum,
        decay,
        W,
        S,
        W_anchor,
        chunk_size,
        offset,
        return_state,
        first_order,
        max_grad_norm,
    )


def mlp_memory_scan_ref(
    q,
    k,
    v,
    lr,
    momentum,
    decay,
    W,
    S,
    W_anchor=None,
    ln_weight=None,
    ln_bias=None,
    chunk_size=16,
    offset=0,
    return_state=True,
    first_order=False,
    max_grad_norm=None,
    eps=1e-5,
):
    """Token-loop reference of `mlp_memory_scan` (same arguments and results)."""
    mem, W, S, W_anchor = _mlp_memory("mlp_memory_scan_ref", q, v, W, S, W_anchor, ln_weight, ln_bias, eps)
    return _run(
        "mlp_memory_scan_ref",
        False,
        mem,
        q,
        k,
        v,
        lr,
        momentum,
        decay,
        W,
        S,
        W_anchor,
        chunk_size,
        offset,
        return_state,
        first_order,
        max_grad_norm,
    )
