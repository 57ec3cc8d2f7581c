"""Token-loop references of the memory scans: the rule of nestlm.ops.memory applied one token at a
time, with the inner gradient taken by torch.autograd. The oracle for tests (fp64-able)."""

from __future__ import annotations

import torch

from nestlm.ops.memory.common import Memory, Scan, check, clip_scale, linear_memory, mlp_memory, run_scan, single


def token_loop(mem: Memory, x: Scan):
    """One token at a time, the gradient taken by autograd at the current anchor."""
    dt = x.W[0].dtype
    outer_grad = torch.is_grad_enabled()
    Wt, St = tuple(x.W), tuple(x.S)
    A = tuple(x.W_anchor) if x.offset > 0 else Wt
    ys = []
    # unbind, not indexing: the backward of every index would fill a full-length zero tensor
    seqs = (x.q, x.k, x.v, x.lr, x.momentum, x.decay)
    for t, (q_t, k_t, v_t, lr_t, mom_t, dec_t) in enumerate(zip(*(s.to(dt).unbind(1) for s in seqs))):
        if (x.offset + t) % x.chunk_size == 0:
            A = Wt
        ys.append(mem.read_ref(A, q_t[:, :, None, :])[:, :, 0])
        with torch.enable_grad():
            if x.first_order or not any(a.requires_grad for a in A):
                A_in = tuple(a.detach().requires_grad_(True) for a in A)
            else:
                A_in = A
            loss = mem.loss(A_in, k_t[:, :, None, :], v_t[:, :, None, :]).sum()
            u = torch.autograd.grad(loss, A_in, create_graph=outer_grad)
            if x.max_grad_norm is not None:
                scale = clip_scale(sum(ui.pow(2).sum((-1, -2)) for ui in u), x.max_grad_norm)
                u = tuple(ui * scale[..., None, None] for ui in u)
        lr_, mom, dec = (g[:, :, None, None] for g in (lr_t, mom_t, dec_t))
        St = tuple(mom * s - lr_ * ui for s, ui in zip(St, u))
        Wt = tuple((1.0 - dec) * w + s for w, s in zip(Wt, St))
    return torch.stack(ys, dim=1), (Wt, St, A)


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
    x = Scan(q, k, v, lr, momentum, decay, W, S, W_anchor, chunk_size, offset, first_order, max_grad_norm)
    mem, x = linear_memory(x)
    check("linear_memory_scan_ref", mem, x)
    return single(run_scan(token_loop, mem, x, return_state), return_state)


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
    x = Scan(q, k, v, lr, momentum, decay, W, S, W_anchor, chunk_size, offset, first_order, max_grad_norm)
    mem, x = mlp_memory("mlp_memory_scan_ref", x, ln_weight, ln_bias, eps)
    check("mlp_memory_scan_ref", mem, x)
    return run_scan(token_loop, mem, x, return_state)
