"""HOPE self-modifying Titans mixer: chunked == token loop (fp64), streaming, causality, stability."""

from __future__ import annotations

import random

import pytest
import torch

from nestlm.layers.hope import HOPE
from nestlm.ops.hope import selfmod_scan, selfmod_scan_ref


def make_hope(chunk=5, aux_chunk=3, d=16, heads=2, head_dim=4, max_lr=0.5, seed=0) -> HOPE:
    torch.manual_seed(seed)
    m = HOPE(d, heads, head_dim, chunk_size=chunk, aux_chunk_size=aux_chunk, max_lr=max_lr).double()
    with torch.no_grad():  # larger projections than the init so the memories move visibly
        m.w_in.weight.normal_(0, 0.5)
        m.b_alpha.fill_(-2.0)
    return m


def rel_close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Norm-relative agreement (the streaming contract's measure): ||a - b|| <= tol * ||b||."""
    return bool((a - b).double().norm() <= tol * b.double().norm() + 1e-300)


def pieces(t: int, rng: random.Random) -> list[tuple[int, int]]:
    cuts, a = [], 0
    while a < t:
        n = rng.choice([1, 1, 2, 4, 6, 11])
        cuts.append((a, min(t, a + n)))
        a += n
    return cuts


@pytest.mark.parametrize("t,chunk,aux_chunk", [(1, 5, 3), (63, 5, 3), (257, 16, 7), (40, 1, 1), (40, 4, 8)])
def test_chunked_equals_token_loop(t, chunk, aux_chunk):
    m = make_hope(chunk, aux_chunk)
    x = torch.randn(2, t, 16, dtype=torch.float64, requires_grad=True)
    m.impl = "chunked"
    y1, s1 = m(x)
    m.impl = "ref"
    y2, s2 = m(x)
    assert rel_close(y1, y2, 1e-10)
    assert s1.keys() == s2.keys()
    for k in s1:
        assert rel_close(s1[k], s2[k], 1e-10), k
    w = torch.randn_like(y1)
    fin = {k: torch.randn_like(v) for k, v in s1.items() if v.is_floating_point()}

    def loss(y, s):
        return (y * w).sum() + sum((s[k] * fin[k]).sum() for k in fin)

    params = [x] + list(m.parameters())
    g1 = torch.autograd.grad(loss(y1, s1), params)
    g2 = torch.autograd.grad(loss(y2, s2), params)
    for name, a, b in zip(["x"] + [n for n, _ in m.named_parameters()], g1, g2):
        assert rel_close(a, b, 1e-9), name
        if name != "b_alpha" or t > 1:
            assert a.abs().sum() > 0, name  # every parameter is reached (incl. through the inner updates)


def test_streaming_equals_one_call():
    m = make_hope(chunk=5, aux_chunk=3)
    x = torch.randn(2, 61, 16, dtype=torch.float64)
    with torch.no_grad():
        y, s = m(x)
        state, ys = None, []
        for a, b in pieces(61, random.Random(7)):
            yy, state = m(x[:, a:b], state)
            ys.append(yy)
    assert (torch.cat(ys, 1) - y).norm() / y.norm() <= 1e-12
    for k in s:
        assert torch.allclose(s[k], state[k], rtol=1e-10, atol=1e-13), k


def test_causality_and_batch_independence():
    m = make_hope()
    x = torch.randn(3, 30, 16, dtype=torch.float64)
    z = x.clone()
    z[1, 17] += 1.0
    with torch.no_grad():
        a, b = m(x)[0], m(z)[0]
    assert torch.equal(a[1, :17], b[1, :17])
    assert not torch.allclose(a[1, 17:], b[1, 17:])
    assert torch.equal(a[[0, 2]], b[[0, 2]])


def test_every_memory_is_written_in_context():
    """M_k, M_v, M_eta, M_alpha (row blocks of aux) and the main memory all change."""
    m = make_hope()
    c = m.head_dim
    with torch.no_grad():
        _, s = m(torch.randn(1, 20, 16, dtype=torch.float64))
    delta = (s["aux_W"][0] - m.aux_init).abs()
    for lo, hi in ((0, c), (c, 2 * c), (2 * c, 2 * c + 1), (2 * c + 1, 2 * c + 2)):
        assert delta[:, lo:hi].sum() > 1e-8
    assert (s["mem_W"][0] - m.mem_init).abs().sum() > 1e-8


def test_gradcheck_through_one_inner_update():
    torch.manual_seed(0)
    b, t, h, c = 1, 3, 1, 2
    xh = torch.randn(b, t, h, c, dtype=torch.float64, requires_grad=True)
    q = torch.randn(b, t, h, c, dtype=torch.float64, requires_grad=True)
    log_mu = (-torch.rand(b, t, h, dtype=torch.float64)).requires_grad_()
    b_eta = torch.zeros(h, dtype=torch.float64, requires_grad=True)
    b_alpha = torch.full((h,), -1.0, dtype=torch.float64, requires_grad=True)
    aux0 = torch.randn(h, 2 * c + 2, c, dtype=torch.float64, requires_grad=True)
    mem0 = torch.randn(h, c, c, dtype=torch.float64, requires_grad=True)

    def f(xh, q, log_mu, b_eta, b_alpha, aux0, mem0):
        aux, mem = aux0.expand(b, -1, -1, -1), mem0.expand(b, -1, -1, -1)
        st = {
            "aux_W": aux,
            "aux_A": aux,
            "aux_S": torch.zeros_like(aux),
            "mem_W": mem,
            "mem_A": mem,
            "mem_S": torch.zeros_like(mem),
        }
        st["pos"] = torch.zeros(b, dtype=torch.long)
        # chunks of 2: token 3 reads the memory after one inner update
        o, s = selfmod_scan(xh, q, log_mu, b_eta, b_alpha, aux0, mem0, 0.7, st, 2, 2)
        return o, s["mem_W"], s["aux_W"]

    assert torch.autograd.gradcheck(f, (xh, q, log_mu, b_eta, b_alpha, aux0, mem0))


def test_long_fp32_stream_at_max_lr_stays_bounded():
    """20,000 tokens in fp32 with every inner step at max_lr: outputs finite and the memories bounded.

    Checks the memories, not only the outputs: the output norm keeps y finite long after a memory
    has diverged. The decay is kept at a 100-token time constant (1 - alpha = 0.99): with no
    forgetting at all, chunk-anchored momentum steps are not a contraction (see HOPE's docstring).
    """
    torch.manual_seed(0)
    m = HOPE(32, 2, 16, chunk_size=16, aux_chunk_size=16)  # the default max_lr
    with torch.no_grad():
        m.b_eta.fill_(30.0)  # eta = max_lr for every token
        m.b_alpha.fill_(-4.6)  # 1 - alpha = sigmoid(4.6) = 0.99
        start = {k: float(getattr(m, k).abs().max()) for k in ("aux_init", "mem_init")}
        state, top = None, 0.0
        for _ in range(10):  # 20,000 tokens
            y, state = m(torch.randn(1, 2000, 32), state)
            top = max(top, float(y.abs().max()))
            assert torch.isfinite(y).all()
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    assert top < 1e3
    # the memories move (they are written) but stay within a few times their initial scale
    assert float(state["aux_W"].abs().max()) < 4 * start["aux_init"]
    assert float(state["mem_W"].abs().max()) < 20 * start["mem_init"]
    assert not torch.allclose(state["mem_W"][0], m.mem_init)


def test_bad_input():
    with pytest.raises(ValueError, match="chunk_size"):
        HOPE(16, 2, 4, chunk_size=0)
    with pytest.raises(ValueError, match="max_lr"):
        HOPE(16, 2, 4, max_lr=0.0)
    m = make_hope()
    s = m.init_state(2, dtype=torch.float64)
    s["mem_W"] = s["mem_W"][:, :1]
    with pytest.raises(ValueError, match="mem_W"):
        m(torch.randn(2, 3, 16, dtype=torch.float64), s)
    s = m.init_state(2, dtype=torch.float64)
    s["pos"] = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="pos"):
        m(torch.randn(2, 3, 16, dtype=torch.float64), s)
    # the reference accepts rows at different positions and agrees row by row with the chunked path
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    m.impl = "ref"
    y, _ = m(x, s)
    m.impl = "chunked"
    for r in range(2):
        sr = {k: v[r : r + 1] for k, v in s.items()}
        yr, _ = m(x[r : r + 1], sr)
        assert torch.allclose(yr, y[r : r + 1], rtol=1e-10, atol=1e-13)


def test_ops_reference_matches_from_mid_chunk():
    torch.manual_seed(3)
    b, t, h, c = 2, 23, 2, 3
    xh, q = torch.randn(b, t, h, c, dtype=torch.float64), torch.randn(b, t, h, c, dtype=torch.float64)
    log_mu = -torch.rand(b, t, h, dtype=torch.float64)
    st = {
        k: torch.randn(b, h, r, c, dtype=torch.float64) * 0.3
        for k, r in (
            ("aux_W", 2 * c + 2),
            ("aux_A", 2 * c + 2),
            ("aux_S", 2 * c + 2),
            ("mem_W", c),
            ("mem_A", c),
            ("mem_S", c),
        )
    }
    st["pos"] = torch.full((b,), 13, dtype=torch.long)
    z = torch.zeros(h, dtype=torch.float64)
    args = (xh, q, log_mu, z, z, st["aux_A"][0], st["mem_A"][1], 0.3, st, 6, 4)
    o1, s1 = selfmod_scan(*args)
    o2, s2 = selfmod_scan_ref(*args)
    assert torch.allclose(o1, o2, rtol=1e-11, atol=1e-13)
    for k in s1:
        assert torch.allclose(s1[k], s2[k], rtol=1e-11, atol=1e-13), k


@pytest.mark.parametrize("name", ["hope", "hope-hybrid", "titans"])
def test_memory_preset_sizes(name):
    import importlib.util

    from nestlm.models import HybridConfig, HybridLM

    needs = {"hope-hybrid": "nestlm.layers.mamba2", "titans": "nestlm.layers.memory"}.get(name)
    if needs and importlib.util.find_spec(needs) is None:
        pytest.skip(f"needs {needs}")
    counts = {}
    for size in ("tiny", "125m"):
        with torch.device("meta"):  # count without allocating
            counts[size] = HybridLM(HybridConfig.preset(name, size)).num_params()
    assert 1e6 <= counts["tiny"] <= 5e6, counts
    assert 110e6 <= counts["125m"] <= 140e6, counts
