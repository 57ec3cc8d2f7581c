"""What the chunked path, the token loop and the kernel share: the two memories (how each reads and
how its inner gradient factors), the inputs of one call, and their checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Weights = tuple[Tensor, ...]


class Scan(NamedTuple):
    """The inputs of one memory-scan call (shapes in `linear_memory_scan` / `mlp_memory_scan`)."""

    q: Tensor
    k: Tensor
    v: Tensor
    lr: Tensor
    momentum: Tensor
    decay: Tensor
    W: Weights
    S: Weights
    W_anchor: Weights | None
    chunk_size: int
    offset: int
    first_order: bool
    max_grad_norm: float | None


class Memory(NamedTuple):
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


# ------------------------------------------------------------------------------------------------
# the two memories
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


def clip_scale(sq_norm: Tensor, max_norm: float) -> Tensor:
    """min(1, max_norm / ||u||) from ||u||^2; the tiny floor keeps the gradient finite at u = 0."""
    return (max_norm * torch.rsqrt(sq_norm + 1e-24)).clamp(max=1.0)


def _as_tuple(W) -> Weights | None:
    if W is None:
        return None
    return tuple(W) if isinstance(W, (tuple, list)) else (W,)


def linear_memory(x: Scan) -> tuple[Memory, Scan]:
    """The depth-1 memory for inputs `x` (single weight tensors become 1-tuples)."""
    x = x._replace(W=_as_tuple(x.W), S=_as_tuple(x.S), W_anchor=_as_tuple(x.W_anchor))
    b, _, h, dk = x.q.shape

    def loss(A, k, v):
        return (_linear_read(A, k) - v).pow(2).sum((-1, -2))

    return Memory(_linear_read, _linear_read, _linear_grad_factors, loss, [(b, h, x.v.shape[-1], dk)]), x


def mlp_memory(name: str, x: Scan, ln_weight: Tensor | None, ln_bias: Tensor | None, eps: float):
    """The depth-2 memory with LN affine (ln_weight, ln_bias) [h, d] (default 1, 0) for inputs `x`."""
    x = x._replace(W=_as_tuple(x.W), S=_as_tuple(x.S), W_anchor=_as_tuple(x.W_anchor))
    b, _, h, d = x.q.shape
    ln_weight = x.q.new_ones(h, d) if ln_weight is None else ln_weight
    ln_bias = x.q.new_zeros(h, d) if ln_bias is None else ln_bias
    if x.v.shape[-1] != d:
        raise ValueError(f"{name}: v has {x.v.shape[-1]} dims: the residual MLP memory needs dv = dk = {d}")
    if len(x.W) != 2:
        raise ValueError(f"{name}: W has {len(x.W)} tensors: expected (W1 [b, h, hidden, dk], W2 [b, h, dv, hidden])")
    for nm, p in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if p.shape != (h, d):
            raise ValueError(f"{name}: {nm} has shape {tuple(p.shape)}: expected [{h}, {d}]")
    hid, dt = x.W[0].shape[-2], x.W[0].dtype
    lw, lb = ln_weight.to(dt), ln_bias.to(dt)
    lw_n, lb_n = (p.expand(b, h, d).reshape(b * h, 1, d) for p in (lw, lb))

    def read_ref(A, z):  # z [b, h, 1, d]
        return _mlp_parts(A, lw[:, None], lb[:, None], z, eps)[0]

    def read_fast(A, z):  # z [b * h, N, C, d]
        return _mlp_parts(A, lw_n[:, None], lb_n[:, None], z, eps)[0]

    def factors(A, k, v):
        return _mlp_grad_factors(A, lw_n, lb_n, k, v, eps)

    def loss(A, k, v):
        return (read_ref(A, k) - v).pow(2).sum((-1, -2))

    return Memory(read_ref, read_fast, factors, loss, [(b, h, hid, d), (b, h, d, hid)]), x


def check(name: str, mem: Memory, x: Scan) -> None:
    """A one-line ValueError naming the first argument of `x` that does not fit `mem`."""
    q, W, C, offset = x.q, x.W, x.chunk_size, x.offset
    if q.dim() != 4:
        raise ValueError(f"{name}: q has shape {tuple(q.shape)}: expected [batch, length, heads, dk]")
    b, L, h, dk = q.shape
    if x.k.shape != q.shape:
        raise ValueError(f"{name}: k has shape {tuple(x.k.shape)}: expected {tuple(q.shape)} like q")
    if x.v.dim() != 4 or x.v.shape[:3] != (b, L, h):
        raise ValueError(f"{name}: v has shape {tuple(x.v.shape)}: expected [{b}, {L}, {h}, dv]")
    for nm in ("lr", "momentum", "decay"):
        if getattr(x, nm).shape != (b, L, h):
            raise ValueError(f"{name}: {nm} has shape {tuple(getattr(x, nm).shape)}: expected [{b}, {L}, {h}]")
    if not isinstance(C, int) or C < 1:
        raise ValueError(f"{name}: chunk_size={C!r}: expected a positive int")
    if not isinstance(offset, int) or not 0 <= offset < C:
        raise ValueError(f"{name}: offset={offset!r}: expected an int in [0, chunk_size={C})")
    if offset > 0 and x.W_anchor is None:
        raise ValueError(f"{name}: offset={offset} > 0 (continuing a chunk) needs W_anchor, the chunk's anchor")
    if x.max_grad_norm is not None and not x.max_grad_norm > 0:
        raise ValueError(f"{name}: max_grad_norm={x.max_grad_norm!r}: expected a positive float or None")
    for nm in ("W", "S", "W_anchor"):
        ws = getattr(x, nm)
        if ws is None:
            continue
        if len(ws) != len(mem.shapes):
            raise ValueError(f"{name}: {nm} has {len(ws)} tensors: expected {len(mem.shapes)}")
        for i, (t, shp) in enumerate(zip(ws, mem.shapes)):
            if tuple(t.shape) != shp:
                raise ValueError(f"{name}: {nm}[{i}] has shape {tuple(t.shape)}: expected {list(shp)}")
            if t.dtype != W[0].dtype:
                raise ValueError(f"{name}: {nm}[{i}] has dtype {t.dtype}: expected {W[0].dtype} like W")


def run_scan(scan: Callable, mem: Memory, x: Scan, return_state: bool):
    """scan(mem, x) -> (y, (W, S, W_anchor)) in the state dtype, autocast off; an empty call passes
    the state through."""
    if x.q.shape[1] == 0:
        y = x.q.new_zeros(*x.q.shape[:3], x.W[0].shape[-2]).to(x.W[0].dtype)
        out = y, (x.W, x.S, x.W_anchor if x.W_anchor is not None else x.W)
    else:
        with torch.autocast(device_type=x.q.device.type, enabled=False):
            out = scan(mem, x)
    return out if return_state else out[0]


def single(out, return_state: bool):
    """The linear memory's results with its 1-tuples of weights unpacked."""
    if not return_state:
        return out
    y, (W, S, A) = out
    return y, (W[0], S[0], A[0])
