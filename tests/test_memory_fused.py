"""The kernels' chunk-recompute algorithm (PyTorch form) against the token loop, in fp64."""

import pytest
import torch
from memory_scan_ref import linear_memory_scan_loop, random_inputs

from nestlm.ops.memory_fused import (
    LinearMemoryScanFn,
    chunk_coefficients,
    chunk_coefficients_backward,
    segments,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def run_fused(q, k, v, lr, mom, dec, W, S, A, C, off):
    return LinearMemoryScanFn.apply(q, k, v, lr, mom, dec, W, S, A, C, off, False)


def test_segments_cover_and_cut_at_chunk_boundaries():
    assert segments(0, 4, 0) == []
    assert segments(5, 4, 0) == [(0, 4), (4, 5)]
    assert segments(5, 4, 3) == [(0, 1), (1, 5)]
    assert segments(2, 4, 1) == [(0, 2)]
    for L, C, off in [(63, 16, 0), (63, 16, 5), (257, 7, 13), (1, 16, 15)]:
        segs = segments(L, C, off)
        assert segs[0][0] == 0 and segs[-1][1] == L
        assert all(a[1] == b[0] for a, b in zip(segs, segs[1:]))
        assert all((off + e) % C == 0 for _, e in segs[:-1])


@pytest.mark.parametrize("n", [1, 2, 7])
def test_coefficient_backward_matches_autograd(n):
    g = torch.Generator().manual_seed(n)
    th, et, al = (torch.rand(3, n, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    a, c, P, gg, D, E, B, gamma = chunk_coefficients(th, et, al)
    ws = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (a, c, E, B, gamma)]
    loss = sum((w * t).sum() for w, t in zip(ws, (a, c, E, B, gamma)))
    ref = torch.autograd.grad(loss, (th, et, al))
    got = chunk_coefficients_backward(th.detach(), et.detach(), al.detach(), P.detach(), gg.detach(), D.detach(), *ws)
    for r, o in zip(ref, got):
        assert rel(o, r) < 1e-12


@pytest.mark.parametrize(
    "L,C,off,dk,dv", [(1, 16, 0, 5, 3), (63, 16, 0, 8, 6), (63, 16, 9, 4, 7), (37, 4, 3, 6, 5), (20, 5, 0, 3, 3)]
)
def test_forward_backward_match_token_loop(L, C, off, dk, dv):
    inputs = random_inputs(2, L, 3, dk, dv)
    for t in inputs:
        t.requires_grad_(True)
    q, k, v, lr, mom, dec, W, S, A = inputs
    A_arg = A if off % C else None
    y_ref, (W_ref, S_ref, A_ref) = linear_memory_scan_loop(q, k, v, lr, mom, dec, W, S, A_arg, C, off)
    y, W1, S1, A1 = run_fused(q, k, v, lr, mom, dec, W, S, A if off % C else W, C, off)
    for o, r in [(y, y_ref), (W1, W_ref), (S1, S_ref), (A1, A_ref)]:
        assert rel(o, r) < 1e-10
    gen = torch.Generator().manual_seed(L * 100 + off)
    cots = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (y, W1, S1, A1)]
    loss_ref = sum((c * t).sum() for c, t in zip(cots, (y_ref, W_ref, S_ref, A_ref)))
    loss = sum((c * t).sum() for c, t in zip(cots, (y, W1, S1, A1)))
    wrt = inputs if off % C else inputs[:8]
    g_ref = torch.autograd.grad(loss_ref, wrt, allow_unused=True)
    g = torch.autograd.grad(loss, wrt, allow_unused=True)
    for name, o, r in zip("q k v lr mom dec W S A".split(), g, g_ref):
        assert rel(o, r) < 1e-9, name


def test_streaming_pieces_equal_one_call():
    C = 6
    q, k, v, lr, mom, dec, W, S, _ = random_inputs(2, 41, 2, 5, 4)
    y_full, W_full, S_full, _ = run_fused(q, k, v, lr, mom, dec, W, S, W, C, 0)
    ys, A, pos = [], W, 0
    for n in [1, 4, 7, 6, 11, 12]:
        sl = slice(pos, pos + n)
        pieces = [t[:, sl] for t in (q, k, v, lr, mom, dec)]
        y, W, S, A = run_fused(*pieces, W, S, A, C, pos)
        ys.append(y)
        pos += n
    assert pos == 41
    assert rel(torch.cat(ys, 1), y_full) < 1e-12
    assert rel(W, W_full) < 1e-12 and rel(S, S_full) < 1e-12


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("L,C,off", [(37, 8, 0), (37, 8, 3), (5, 4, 1)])
def test_matches_memory_op_reference(first_order, L, C, off):
    memory = pytest.importorskip("nestlm.ops.memory")
    from nestlm.ops.memory_fused import linear_memory_scan_fused

    x = random_inputs(2, L, 2, 8, 6)
    xs = [t.clone().requires_grad_(True) for t in x]
    xr = [t.clone().requires_grad_(True) for t in x]
    n = 9 if off else 8
    out = linear_memory_scan_fused(*xs[:8], xs[8] if off else None, chunk_size=C, offset=off, first_order=first_order)
    ref = memory.linear_memory_scan_ref(
        *xr[:8], xr[8] if off else None, chunk_size=C, offset=off, first_order=first_order
    )
    outs, refs = (out[0], *out[1]), (ref[0], *ref[1])
    for o, r in zip(outs, refs):
        assert rel(o, r) < 1e-10
    cots = [torch.randn_like(t) for t in refs]
    g = torch.autograd.grad(sum((c * t).sum() for c, t in zip(cots, outs)), xs[:n])
    g_ref = torch.autograd.grad(sum((c * t).sum() for c, t in zip(cots, refs)), xr[:n])
    for o, r in zip(g, g_ref):
        assert rel(o, r) < 1e-9
