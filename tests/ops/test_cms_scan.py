"""cms_scan (chunked, hand-written backward) == cms_scan_ref (token loop) in fp64, from open periods."""

from __future__ import annotations

import pytest
import torch

from nestlm.ops.cms import cms_scan, cms_scan_ref


def test_op_from_an_open_period_and_bad_input():
    torch.manual_seed(1)
    b, t, n, d = 2, 20, 6, 5
    u, k = torch.randn(b, t, n, dtype=torch.float64), torch.randn(b, t, n, dtype=torch.float64)
    v, lr = torch.randn(b, t, d, dtype=torch.float64), torch.rand(b, t, dtype=torch.float64) * 0.1
    W, G = torch.randn(b, n, d, dtype=torch.float64), torch.randn(b, n, d, dtype=torch.float64)
    pos = torch.full((b,), 11, dtype=torch.long)
    out1 = cms_scan(u, k, v, lr, W, G, pos, 4)
    out2 = cms_scan_ref(u, k, v, lr, W, G, pos, 4)
    for a, c in zip(out1, out2):
        assert torch.allclose(a, c, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="pos"):
        cms_scan(u, k, v, lr, W, G, torch.tensor([1, 2]), 4)
    with pytest.raises(ValueError, match="lr"):
        cms_scan(u, k, v, lr[:, :3], W, G, pos, 4)


@pytest.mark.parametrize("p0,t,period", [(0, 37, 5), (3, 37, 5), (3, 2, 5), (4, 1, 5), (2, 16, 16), (7, 9, 1)])
def test_op_gradients_from_an_open_period(p0, t, period):
    """cms_scan == cms_scan_ref in fp64 from a state inside a period (G != 0), every input's gradient."""
    g = torch.Generator().manual_seed(p0 * 100 + t)
    b, n, d = 2, 6, 5

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_(True)

    u, k, v = rnd(b, t, n), rnd(b, t, n), rnd(b, t, d)
    lr = (0.1 * torch.rand(b, t, generator=g, dtype=torch.float64)).requires_grad_(True)
    W = rnd(b, n, d)
    G = rnd(b, n, d, scale=0.0 if p0 % period == 0 else 0.3)  # zero at a period boundary
    pos = torch.full((b,), p0, dtype=torch.long)
    out1, out2 = cms_scan(u, k, v, lr, W, G, pos, period), cms_scan_ref(u, k, v, lr, W, G, pos, period)
    for a, r in zip(out1, out2):
        assert torch.allclose(a, r, rtol=1e-11, atol=1e-13)
    with torch.no_grad():  # the inference path keeps nothing for a backward and computes the same
        for a, r in zip(cms_scan(u, k, v, lr, W, G, pos, period), out1):
            assert torch.equal(a, r)
    ws = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in out1[:3]]
    inputs = (u, k, v, lr, W, G)
    g1 = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out1[:3], ws)), inputs)
    g2 = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out2[:3], ws)), inputs)
    for name, a, r in zip("u k v lr W G".split(), g1, g2):
        assert torch.allclose(a, r, rtol=1e-9, atol=1e-12), name
