"""The linear memory scan against the test-side token loop (memory_scan_ref.py, written without the
package), in fp64: chunk coefficients, outputs, final states, every gradient
(incl. W_anchor), first-order mode, streaming pieces == one call."""

import pytest
import torch
from memory_scan_ref import linear_memory_scan_loop, random_inputs, scan_in_pieces

from nestlm.ops.memory import linear_memory_scan, linear_memory_scan_ref
from nestlm.ops.memory.chunk import chunk_coefficients

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("L,C,off", [(1, 1, 0), (2, 4, 1), (7, 3, 0), (7, 3, 2), (13, 5, 4)])
def test_chunk_coefficients_match_their_definition(L, C, off):
    """c_i, e_i and the chunk map [[B_n, g], [0, E_n]] against products written term by term;
    exact zero momentum and full decay included; gradients by finite differences."""
    g = torch.Generator().manual_seed(L * 10 + off)
    lr, mom, dec = (torch.rand(2, L, generator=g, dtype=torch.float64) for _ in range(3))
    mom[0, L // 2] = 0.0
    dec[1, L - 1] = 1.0
    ce, T = chunk_coefficients(lr, mom, dec, C, off)
    N = -(-(off + L) // C)
    assert ce.shape == (2, N, C, 2) and T.shape == (2, N, 2, 2)
    keep = 1.0 - dec

    def prod(x, lo, hi):  # prod of x[:, lo:hi] (1 when empty)
        return x[:, lo:hi].prod(-1) if hi > lo else torch.ones(2, dtype=torch.float64)

    for j in range(N):
        lo, hi = max(j * C - off, 0), min((j + 1) * C - off, L)  # the chunk's real tokens
        for i in range(lo, hi):
            e_i = lr[:, i] * prod(mom, i + 1, hi)
            c_i = lr[:, i] * sum(prod(mom, i + 1, t + 1) * prod(keep, t + 1, hi) for t in range(i, hi))
            slot = i + off - j * C
            assert torch.allclose(ce[:, j, slot, 1], e_i, rtol=1e-13, atol=1e-15)
            assert torch.allclose(ce[:, j, slot, 0], c_i, rtol=1e-13, atol=1e-15)
        g_ = sum(prod(mom, lo, t + 1) * prod(keep, t + 1, hi) for t in range(lo, hi))
        want = [[prod(keep, lo, hi), g_], [torch.zeros(2, dtype=torch.float64), prod(mom, lo, hi)]]
        for r in range(2):
            for c in range(2):
                assert torch.allclose(T[:, j, r, c], want[r][c], rtol=1e-13, atol=1e-15), (j, r, c)
    args = [t.clone().requires_grad_(True) for t in (lr, mom, dec)]
    assert torch.autograd.gradcheck(lambda a, b, c: chunk_coefficients(a, b, c, C, off), args)


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
    y, (W1, S1, A1) = linear_memory_scan(q, k, v, lr, mom, dec, W, S, A_arg, chunk_size=C, offset=off)
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
    x = random_inputs(2, 41, 2, 5, 4)[:8]
    y_full, (W_full, S_full, _) = linear_memory_scan(*x, chunk_size=C)
    y, (W, S) = scan_in_pieces(linear_memory_scan, x, [1, 4, 7, 6, 11, 12], C)
    assert y.shape == y_full.shape
    assert rel(y, y_full) < 1e-12
    assert rel(W, W_full) < 1e-12 and rel(S, S_full) < 1e-12


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("L,C,off", [(37, 8, 0), (37, 8, 3), (5, 4, 1)])
def test_matches_memory_op_reference_with_dk_not_dv(first_order, L, C, off):
    x = random_inputs(2, L, 2, 8, 6)
    xs = [t.clone().requires_grad_(True) for t in x]
    xr = [t.clone().requires_grad_(True) for t in x]
    n = 9 if off else 8
    out = linear_memory_scan(*xs[:8], xs[8] if off else None, chunk_size=C, offset=off, first_order=first_order)
    ref = linear_memory_scan_ref(*xr[:8], xr[8] if off else None, chunk_size=C, offset=off, first_order=first_order)
    outs, refs = (out[0], *out[1]), (ref[0], *ref[1])
    for o, r in zip(outs, refs):
        assert rel(o, r) < 1e-10
    cots = [torch.randn_like(t) for t in refs]
    g = torch.autograd.grad(sum((c * t).sum() for c, t in zip(cots, outs)), xs[:n])
    g_ref = torch.autograd.grad(sum((c * t).sum() for c, t in zip(cots, refs)), xr[:n])
    for o, r in zip(g, g_ref):
        assert rel(o, r) < 1e-9
