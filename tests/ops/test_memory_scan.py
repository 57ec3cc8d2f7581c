"""Titans memory scans: chunked op vs token loop (fp64, every gradient), clipping, saturated gates,
streaming, gradcheck, bad inputs."""

import pytest
import torch
import torch.nn.functional as F

from nestlm.ops.memory import linear_memory_scan, linear_memory_scan_ref, mlp_memory_scan, mlp_memory_scan_ref

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    # relative to the reference's size; the +1e-6 keeps exact-zero references meaningful
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / (b.norm() + 1e-6))


def op_inputs(b, L, h, d, depth, hidden=7, seed=0, W_anchor=False, lr_max=0.5, decay_max=0.3):
    g = torch.Generator().manual_seed(seed)

    def rn(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=F64) * scale).requires_grad_()

    q = F.normalize(torch.randn(b, L, h, d, generator=g, dtype=F64), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(b, L, h, d, generator=g, dtype=F64), dim=-1).requires_grad_()
    v = rn(b, L, h, d)
    lr = (lr_max * torch.rand(b, L, h, generator=g, dtype=F64)).requires_grad_()
    mom = torch.rand(b, L, h, generator=g, dtype=F64).requires_grad_()
    dec = (decay_max * torch.rand(b, L, h, generator=g, dtype=F64)).requires_grad_()
    if depth == 1:
        W, S = rn(b, h, d, d, scale=0.3), rn(b, h, d, d, scale=0.1)
        Wa = rn(b, h, d, d, scale=0.3) if W_anchor else None
    else:
        W = (rn(b, h, hidden, d, scale=0.4), rn(b, h, d, hidden, scale=0.4))
        S = (rn(b, h, hidden, d, scale=0.1), rn(b, h, d, hidden, scale=0.1))
        Wa = (rn(b, h, hidden, d, scale=0.4), rn(b, h, d, hidden, scale=0.4)) if W_anchor else None
    return dict(q=q, k=k, v=v, lr=lr, momentum=mom, decay=dec, W=W, S=S, W_anchor=Wa)


def flat(x):
    return list(x) if isinstance(x, tuple) else [x]


def leaves(inp):
    out = [inp[n] for n in ("q", "k", "v", "lr", "momentum", "decay")]
    for n in ("W", "S", "W_anchor"):
        if inp[n] is not None:
            out += flat(inp[n])
    return out


def run_with_grads(fn, inp, extra_leaves=(), **kw):
    """Outputs, final state and the gradients of a loss touching all of them."""
    y, (W, S, A) = fn(**inp, **kw)
    outs = [y] + flat(W) + flat(S) + flat(A)
    g = torch.Generator().manual_seed(123)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=F64)).sum() for o in outs)
    loss = loss + sum(w.pow(2).sum() for w in flat(W))  # a non-linear use of the final memory
    params = leaves(inp) + list(extra_leaves)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]
    return outs, grads


CASES = [  # (L, chunk_size, offset)
    (1, 4, 0),
    (1, 4, 3),
    (63, 16, 0),
    (63, 5, 2),
    (257, 16, 7),
    (257, 24, 0),
]


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("L,C,offset", CASES)
def test_linear_chunked_matches_token_loop(L, C, offset, first_order):
    inp = op_inputs(2, L, 3, 5, depth=1, seed=L + C, W_anchor=offset > 0)
    kw = dict(chunk_size=C, offset=offset, first_order=first_order)
    fast, g_fast = run_with_grads(linear_memory_scan, inp, **kw)
    ref, g_ref = run_with_grads(linear_memory_scan_ref, inp, **kw)
    for a, b in zip(fast, ref):
        assert rel_err(a, b) < 1e-9
    for a, b in zip(g_fast, g_ref):
        assert rel_err(a, b) < 1e-9
    assert g_ref[6].norm() > 0  # the initial memory W gets a gradient


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("L,C,offset", [(1, 4, 0), (63, 16, 5), (257, 24, 0), (100, 7, 6)])
def test_mlp_chunked_matches_token_loop(L, C, offset, first_order):
    h, d = 2, 4
    # gentler gates than the linear test: with random weights, large steps or a strong forget gate
    # shrink W2 x until the LN's 1/sigma gain makes the dynamics chaotic, and then the reference
    # itself moves by 1e-8 when W0 moves by 1e-15 (lr 0.5, decay 0.3)
    inp = op_inputs(2, L, h, d, depth=2, seed=L + C, W_anchor=offset > 0, lr_max=0.03, decay_max=0.01)
    g = torch.Generator().manual_seed(5)
    lnw = (1 + 0.3 * torch.randn(h, d, generator=g, dtype=F64)).requires_grad_()
    lnb = (0.3 * torch.randn(h, d, generator=g, dtype=F64)).requires_grad_()
    kw = dict(chunk_size=C, offset=offset, first_order=first_order, ln_weight=lnw, ln_bias=lnb)
    fast, g_fast = run_with_grads(mlp_memory_scan, inp, extra_leaves=(lnw, lnb), **kw)
    ref, g_ref = run_with_grads(mlp_memory_scan_ref, inp, extra_leaves=(lnw, lnb), **kw)
    for a, b in zip(fast, ref):
        assert rel_err(a, b) < 1e-9
    for a, b in zip(g_fast, g_ref):
        assert rel_err(a, b) < 1e-9
    assert g_ref[6].norm() > 0 and g_ref[7].norm() > 0


@pytest.mark.parametrize("depth", [1, 2])
def test_clipped_inner_gradients_match_token_loop(depth):
    """max_grad_norm: the per-token clip folded into theta equals clipping u in the token loop."""
    L, C = 45, 8
    inp = op_inputs(
        2,
        L,
        2,
        4,
        depth=depth,
        seed=7,
        W_anchor=True,
        lr_max=0.2 if depth == 1 else 0.03,
        decay_max=0.3 if depth == 1 else 0.01,
    )
    fns = (linear_memory_scan, linear_memory_scan_ref) if depth == 1 else (mlp_memory_scan, mlp_memory_scan_ref)
    kw = dict(chunk_size=C, offset=3, max_grad_norm=0.5)
    fast, g_fast = run_with_grads(fns[0], inp, **kw)
    ref, g_ref = run_with_grads(fns[1], inp, **kw)
    for a, b in zip(fast + g_fast, ref + g_ref):
        assert rel_err(a, b) < 1e-9
    unclipped, _ = run_with_grads(fns[0], inp, chunk_size=C, offset=3)
    assert rel_err(unclipped[1], fast[1]) > 1e-3  # the clip is active in this case


@pytest.mark.parametrize("depth", [1, 2])
def test_saturated_gates_match_token_loop(depth):
    """eta = 0 (no momentum) and alpha = 1 (full forget) exactly: the clamped logs stay exact and finite."""
    inp = op_inputs(1, 40, 2, 4, depth=depth, seed=9, lr_max=0.05, decay_max=0.01)
    with torch.no_grad():
        inp["momentum"][:, 5:9] = 0.0
        inp["decay"][:, 17] = 1.0
        inp["decay"][:, 30:33] = 1.0
    fns = (linear_memory_scan, linear_memory_scan_ref) if depth == 1 else (mlp_memory_scan, mlp_memory_scan_ref)
    fast, g_fast = run_with_grads(fns[0], inp, chunk_size=8)
    ref, g_ref = run_with_grads(fns[1], inp, chunk_size=8)
    for a, b in zip(fast + g_fast, ref + g_ref):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < 1e-9


def test_first_order_changes_only_gradients():
    inp = op_inputs(1, 40, 2, 4, depth=2, seed=3)
    full, g_full = run_with_grads(mlp_memory_scan, inp, chunk_size=8)
    fo, g_fo = run_with_grads(mlp_memory_scan, inp, chunk_size=8, first_order=True)
    for a, b in zip(full, fo):
        assert rel_err(a, b) < 1e-12
    assert rel_err(g_fo[6], g_full[6]) > 1e-6  # the second-order path into W0 is cut


def test_chunk_size_one_is_online_gd():
    """C = 1 equals a hand-written online GD with momentum: read W_{t-1}, then step."""
    inp = op_inputs(2, 30, 3, 4, depth=1, seed=11)
    with torch.no_grad():
        y, (W_end, S_end, _) = linear_memory_scan(**inp, chunk_size=1)
        W, S = inp["W"].clone(), inp["S"].clone()
        for t in range(30):
            q, k, v = (inp[n][:, t] for n in ("q", "k", "v"))
            th, et, al = (inp[n][:, t, :, None, None] for n in ("lr", "momentum", "decay"))
            y_t = torch.einsum("bhij,bhj->bhi", W, q)
            assert rel_err(y[:, t], y_t) < 1e-12
            r = torch.einsum("bhij,bhj->bhi", W, k) - v
            S = et * S - th * 2 * r[..., :, None] * k[..., None, :]
            W = (1 - al) * W + S
    assert rel_err(W_end, W) < 1e-12 and rel_err(S_end, S) < 1e-12


@pytest.mark.parametrize("depth", [1, 2])
def test_op_streaming_matches_one_call(depth):
    L, C = 50, 8
    inp = op_inputs(2, L, 2, 4, depth=depth, seed=21)
    fn = linear_memory_scan if depth == 1 else mlp_memory_scan
    with torch.no_grad():
        y_full, st_full = fn(**inp, chunk_size=C)
        W, S, A, ys, pos = inp["W"], inp["S"], None, [], 0
        for a, b in [(0, 3), (3, 4), (4, 13), (13, 14), (14, 16), (16, 35), (35, 50)]:
            part = {n: inp[n][:, a:b] for n in ("q", "k", "v", "lr", "momentum", "decay")}
            y, (W, S, A) = fn(**part, W=W, S=S, W_anchor=A, chunk_size=C, offset=pos % C)
            ys.append(y)
            pos = b
    assert rel_err(torch.cat(ys, 1), y_full) < 1e-12
    for a, b in zip(flat(W) + flat(S) + flat(A), flat(st_full[0]) + flat(st_full[1]) + flat(st_full[2])):
        assert rel_err(a, b) < 1e-12


def test_gradcheck_through_one_inner_update():
    """d(read after one update)/d(W0, k, v, lr, q, LN) by finite differences, both memories."""
    g = torch.Generator().manual_seed(0)
    h, d, hid = 1, 3, 4

    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64).requires_grad_()

    q, k, v = r(1, 2, h, d), r(1, 2, h, d), r(1, 2, h, d)
    lr = torch.full((1, 2, h), 0.3, dtype=F64, requires_grad=True)
    mom = torch.full((1, 2, h), 0.5, dtype=F64)
    dec = torch.full((1, 2, h), 0.1, dtype=F64)
    W1, W2 = r(1, h, hid, d), r(1, h, d, hid)
    lnw, lnb = r(h, d), r(h, d)

    def mlp(q, k, v, lr, W1, W2, lnw, lnb):  # token 1 reads the memory after token 0's update
        S0 = (torch.zeros_like(W1), torch.zeros_like(W2))
        return mlp_memory_scan(
            q, k, v, lr, mom, dec, (W1, W2), S0, ln_weight=lnw, ln_bias=lnb, chunk_size=1, return_state=False
        )[:, 1]

    assert torch.autograd.gradcheck(mlp, (q, k, v, lr, W1, W2, lnw, lnb))
    W = r(1, h, d, d)

    def lin(q, k, v, lr, W):
        return linear_memory_scan(q, k, v, lr, mom, dec, W, torch.zeros_like(W), chunk_size=1, return_state=False)[:, 1]

    assert torch.autograd.gradcheck(lin, (q, k, v, lr, W))
    assert torch.autograd.gradgradcheck(lin, (q, k, v, lr, W))


def test_op_bad_inputs():
    inp = op_inputs(1, 10, 2, 4, depth=1)
    with torch.no_grad():
        with pytest.raises(ValueError, match="lr"):
            linear_memory_scan(**{**inp, "lr": inp["lr"][:, :5]})
        with pytest.raises(ValueError, match="W_anchor"):
            linear_memory_scan(**inp, offset=3)
        with pytest.raises(ValueError, match="offset"):
            linear_memory_scan(**inp, chunk_size=4, offset=4)
        with pytest.raises(ValueError, match="S"):
            linear_memory_scan(**{**inp, "S": inp["S"][:, :1]})
        inp2 = op_inputs(1, 10, 2, 4, depth=2)
        with pytest.raises(ValueError, match="ln_weight"):
            mlp_memory_scan(**inp2, ln_weight=torch.ones(3, 4, dtype=F64))
