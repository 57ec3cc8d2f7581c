"""dgd_scan (HOPE's self-referential Titans with Delta Gradient Descent): chunked == token loop in
fp64, streaming, the update rule against its definitions, closed-form inner gradients, gradcheck."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from pieces import random_pieces

from nestlm.ops import dgd_scan, dgd_scan_ref, selfmod_scan
from nestlm.ops.hope.common import aux_grads, aux_read, gates, init_shapes, l2norm, mem_grads, mem_read
from nestlm.ops.hope.ref import dgd_update

F64 = torch.float64


def make(memory="mlp", momentum=True, b=2, t=23, h=2, c=3, seed=0, scale=0.3, dtype=F64, grad=False):
    """Random inputs and a fresh state (memories at their initial values) for dgd_scan; with `grad`
    every input requires grad and the state is built from the initial memories, as a layer does."""
    g = torch.Generator().manual_seed(seed)
    init = {k: torch.randn(*s, generator=g, dtype=dtype) * scale for k, s in init_shapes(memory, h, c).items()}
    for w in init.values():
        w.requires_grad_(grad)
    state = {}
    for layer, w in init.items():
        W = w.expand(b, *w.shape).clone()
        state[f"{layer}_W"], state[f"{layer}_A"] = W, W
        if momentum:
            state[f"{layer}_S"] = torch.zeros_like(W)
    state["pos"] = torch.zeros(b, dtype=torch.long)
    x = 0.5 * torch.randn(b, t, h, c, generator=g, dtype=dtype)
    q = F.normalize(torch.randn(b, t, h, c, generator=g, dtype=dtype), dim=-1)
    log_momentum = F.logsigmoid(torch.randn(b, t, h, generator=g, dtype=dtype) + 1) if momentum else None
    lr_bias, decay_bias = torch.randn(h, generator=g, dtype=dtype), torch.randn(h, generator=g, dtype=dtype) - 1
    args = [x, q, log_momentum, lr_bias, decay_bias, init]
    for a in args[:5]:
        if a is not None:
            a.requires_grad_(grad)
    return args, state


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / (b.norm() + 1e-300))


def run(fn, args, state, C, Ca, max_lr=0.5, **kw):
    x, q, lm, lrb, db, init = args
    return fn(x, q, lm, lrb, db, init, max_lr, state, C, Ca, **kw)


def leaves(args) -> list[torch.Tensor]:
    x, q, lm, lrb, db, init = args
    return [a for a in (x, q, lm, lrb, db, *init.values()) if a is not None]


def assert_same(o1, s1, o2, s2, tol=1e-10):
    assert s1.keys() == s2.keys()
    assert rel(o1, o2) <= tol
    for k in s1:
        assert torch.isfinite(s2[k].double()).all(), k  # a diverged run would compare noise
        assert rel(s1[k], s2[k]) <= tol, k


CASES = list(itertools.product(["linear", "mlp"], ["dgd", "gd"], [True, False]))


@pytest.mark.parametrize("memory,update,momentum", CASES)
@pytest.mark.parametrize("t,C,Ca", [(1, 5, 3), (37, 1, 1), (41, 6, 4)])
def test_chunked_equals_token_loop_with_gradients(memory, update, momentum, t, C, Ca):
    """Outputs, final state and the gradient of every input, in fp64, at chunk 1 and > 1 and with
    partial chunks; the switches not parametrised here alternate across cases."""
    i = CASES.index((memory, update, momentum))
    kw = dict(memory=memory, update=update, target=("self", "value")[i % 2], decay_to=("zero", "init")[i // 2 % 2])
    args, state = make(memory, momentum, t=t, seed=i, grad=True)
    o1, s1 = run(dgd_scan, args, state, C, Ca, **kw)
    o2, s2 = run(dgd_scan_ref, args, state, C, Ca, **kw)
    assert_same(o1, s1, o2, s2)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(o1.shape, generator=g, dtype=F64)
    fin = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in s1.items() if v.is_floating_point()}

    def loss(o, s):
        return (o * w).sum() + sum((s[k] * fin[k]).sum() for k in fin)

    g1 = torch.autograd.grad(loss(o1, s1), leaves(args))
    g2 = torch.autograd.grad(loss(o2, s2), leaves(args))
    for n, (a, b) in enumerate(zip(g1, g2)):
        assert rel(a, b) <= 1e-9, n
        if t > 1:  # one token reads only the initial memories; beyond it every input is reached
            assert b.abs().sum() > 0, n


@pytest.mark.parametrize(
    "memory,target,decay_to,objective,normalize_v",
    [
        (m, tg, d, o, nv)
        for m, tg, d, o in itertools.product(["linear", "mlp"], ["self", "value"], ["zero", "init"], ["l2", "dot"])
        for nv in (False, True)
        if nv == (o == "dot")  # normalize_v once per (memory, target, decay_to), not doubling the grid
    ],
)
def test_every_switch_matches_the_token_loop(memory, target, decay_to, objective, normalize_v):
    args, state = make(memory, True, t=29, seed=3)
    kw = dict(memory=memory, target=target, decay_to=decay_to, objective=objective, normalize_v=normalize_v)
    for update in ("dgd", "gd"):
        assert_same(
            *run(dgd_scan, args, state, 4, 3, **kw, update=update),
            *run(dgd_scan_ref, args, state, 4, 3, **kw, update=update),
        )


def pieces(t: int, rng: random.Random) -> list[tuple[int, int]]:
    return random_pieces(t, rng, lengths=(1, 1, 2, 3, 5, 9))


@pytest.mark.parametrize("memory,momentum", [("linear", True), ("mlp", True), ("mlp", False)])
def test_streaming_at_unaligned_splits_equals_one_call(memory, momentum):
    args, state = make(memory, momentum, t=53, seed=4)
    x, q, lm = args[:3]
    kw = dict(memory=memory, decay_to="init")
    o, s = run(dgd_scan, args, state, 5, 3, **kw)
    st, outs = state, []
    for a, b in pieces(53, random.Random(7)):
        part = [x[:, a:b], q[:, a:b], None if lm is None else lm[:, a:b], *args[3:]]
        oo, st = run(dgd_scan, part, st, 5, 3, **kw)
        outs.append(oo)
    assert_same(torch.cat(outs, 1), st, o, s, tol=1e-12)
    # an empty call changes nothing
    o0, s0 = run(dgd_scan, [x[:, :0], q[:, :0], None if lm is None else lm[:, :0], *args[3:]], s, 5, 3, **kw)
    assert o0.shape == (2, 0, 2, 3) and all(torch.equal(s0[k], s[k]) for k in s)


def test_token_loop_takes_rows_at_different_positions():
    """The reference continues each row's own open chunk; the chunked path (one position per call)
    agrees row by row."""
    args, state = make("mlp", True, t=17, seed=5)
    args2, _ = make("mlp", True, t=11, seed=6)
    _, mid = run(dgd_scan, args2, state, 5, 3)  # both rows at position 11, mid-chunk for both chunk sizes
    mid = {k: v.clone() for k, v in mid.items()}
    mid["pos"] = torch.tensor([11, 14])
    o, s = run(dgd_scan_ref, args, mid, 5, 3)
    for r in range(2):
        row = [a[r : r + 1] for a in args[:3]] + args[3:]
        o_r, s_r = run(dgd_scan, row, {k: v[r : r + 1] for k, v in mid.items()}, 5, 3)
        assert_same(o_r, s_r, o[r : r + 1], {k: v[r : r + 1] for k, v in s.items()})


def static_aux(args, c):
    """k, v, lr, retain of every token when the aux memories never update within the call (their
    chunk is longer than the call): read at the initial memories."""
    x, _, _, lrb, db, init = args
    k, v, zg, _ = aux_read({"aux": init["aux"]}, x.transpose(1, 2), c)
    lr, log_retain = gates(zg, 0.5, lrb, db)
    return l2norm(k), v, lr, log_retain.exp()


@pytest.mark.parametrize("target", ["self", "value"])
def test_chunk_1_is_the_delta_rule_with_doubled_decay(target):
    """At chunk 1 the anchor is the previous state, so eq. 93 becomes
    M_t = M_{t-1}(a I - 2 lr k k^T) + lr target k^T: the delta rule with the decay along k doubled."""
    args, state = make("linear", False, b=1, t=13, seed=8)
    o, s = run(dgd_scan, args, state, 1, 100, memory="linear", target=target)
    k, v, lr, a = static_aux(args, 3)
    W, outs = state["mem_W"].clone(), []
    q = args[1].transpose(1, 2)
    for j in range(13):
        kj, vj = k[:, :, j, :, None], v[:, :, j, :, None]  # [b, h, c, 1]
        lj, aj = lr[:, :, j, None, None], a[:, :, j, None, None]
        outs.append(W @ q[:, :, j, :, None])
        tgt = W @ vj if target == "self" else vj
        W = W @ (aj * torch.eye(3, dtype=F64) - 2 * lj * kj @ kj.mT) + lj * tgt @ kj.mT
    assert rel(s["mem_W"], W) <= 1e-12
    assert rel(o, torch.cat(outs, -1).permute(0, 3, 1, 2)) <= 1e-12


def test_dot_objective_is_the_gated_delta_rule():
    """Eq. 92 with L = -<M k, v> (descent: +lr v k^T) and fixed values is the gated delta rule
    S_t = a_t S_{t-1}(I - beta_t k k^T) + beta_t v'_t k^T with beta = lr / a and v' = a v."""
    args, state = make("linear", False, b=1, t=11, seed=9)
    _, s = run(dgd_scan, args, state, 4, 100, memory="linear", target="value", objective="dot")
    k, v, lr, a = static_aux(args, 3)
    S = state["mem_W"].clone()
    for j in range(11):
        kj, vj = k[:, :, j, :, None], v[:, :, j, :, None]
        aj, beta = a[:, :, j, None, None], (lr / a)[:, :, j, None, None]
        S = aj * S @ (torch.eye(3, dtype=F64) - beta * kj @ kj.mT) + beta * (aj * vj) @ kj.mT
    assert rel(s["mem_W"], S) <= 1e-12


@pytest.mark.parametrize("norm", [1.0, 0.3, 2.5])
def test_one_dgd_step_is_the_proximal_argmin(norm):
    """W' = argmin_W 1/2 ||W x - u||^2 + 1/(2 lr') ||W - W_t||^2 with u = -g (NL eq. 56) and the
    proximal step lr' = lr / (1 - lr): solved here from its normal equations, for unit and other
    input norms (the hidden layer of an MLP memory is not normalised)."""
    g = torch.Generator().manual_seed(10)
    r, c, lr = 4, 5, 0.3
    W, g_out = torch.randn(r, c, generator=g, dtype=F64), torch.randn(1, r, generator=g, dtype=F64)
    x = norm * F.normalize(torch.randn(1, c, generator=g, dtype=F64), dim=-1)
    zero = torch.zeros(1, dtype=F64)
    new, _ = dgd_update(W, None, x, g_out, torch.tensor([lr], dtype=F64), zero, None, None, "dgd")
    prox = lr / (1 - lr)
    # (W' x - u) x^T + (W' - W_t) / prox = 0  <=>  W' (x x^T + I / prox) = u x^T + W_t / prox
    lhs = x.mT @ x + torch.eye(c, dtype=F64) / prox
    argmin = torch.linalg.solve(lhs, (-g_out.mT @ x + W / prox).mT).mT
    assert rel(new, argmin) <= 1e-13
    # the objective's gradient vanishes there
    Wv = new.clone().requires_grad_()
    obj = 0.5 * (Wv @ x.mT + g_out.mT).square().sum() + (Wv - W).square().sum() / (2 * prox)
    assert float(torch.autograd.grad(obj, Wv)[0].abs().max()) <= 1e-12


@pytest.mark.parametrize("objective", ["l2", "dot"])
def test_mlp_inner_gradients_equal_torch_func_grad(objective):
    """The closed-form per-layer gradients (g^T key summed over the segment) of every MLP memory
    layer equal autograd's gradient of the inner loss with the targets held fixed."""
    g = torch.Generator().manual_seed(11)
    b, h, s, c = 2, 2, 5, 3
    W = {k: torch.randn(b, *shape, generator=g, dtype=F64) * 0.5 for k, shape in init_shapes("mlp", h, c).items()}
    k = l2norm(torch.randn(b, h, s, c, generator=g, dtype=F64))
    v = torch.randn(b, h, s, c, generator=g, dtype=F64)

    def outputs(Wd, x):
        kk, vv, zg, _ = aux_read(Wd, x, c)
        return torch.cat((kk, vv, zg), -1), mem_read(Wd, x)[0]

    with torch.no_grad():
        t_aux, t_mem = outputs(W, v)  # self-generated targets at the anchor, fixed in the inner loss

    def inner_loss(Wd):
        aux, mem = outputs(Wd, k)
        if objective == "l2":
            return 0.5 * ((aux - t_aux).square().sum() + (mem - t_mem).square().sum())
        return -((aux * t_aux).sum() + (mem * t_mem).sum())

    auto = torch.func.grad(inner_loss)(W)
    closed = aux_grads(W, k, v, c, objective) + mem_grads(W, k, v, "self", objective)
    assert sorted(layer for layer, _, _ in closed) == sorted(W)
    for layer, key, g_out in closed:
        assert rel(g_out.transpose(-1, -2) @ key, auto[layer]) <= 1e-12, layer


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_gradcheck_through_one_update(memory):
    """Every input's gradient by finite differences, through one chunk's update into the next
    chunk's reads (chunks of 2 over 3 tokens), with DGD, momentum and self targets."""
    args, _ = make(memory, True, b=1, t=3, h=1, c=2, seed=12, scale=0.5, grad=True)
    x, q, lm, lrb, db, init = args
    names = list(init)

    def f(x, q, lm, lrb, db, *inits):
        state = {}
        for n, w in zip(names, inits):
            state[f"{n}_W"] = state[f"{n}_A"] = w[None]
            state[f"{n}_S"] = torch.zeros_like(w[None])
        state["pos"] = torch.zeros(1, dtype=torch.long)
        o, s = dgd_scan(x, q, lm, lrb, db, dict(zip(names, inits)), 0.5, state, 2, 2, memory=memory)
        return (o, *(s[f"{n}_W"] for n in names))

    assert torch.autograd.gradcheck(f, (x, q, lm, lrb, db, *init.values()))


def test_v1_switches_are_selfmod_scan():
    """With GD, linear memories, momentum, the value target, decay towards the initial memories and
    a normalised v, dgd_scan is nestlm's first HOPE recurrence (selfmod_scan)."""
    args, state = make("linear", True, t=31, seed=13)
    x, q, lm, lrb, db, init = args
    kw = dict(memory="linear", update="gd", target="value", decay_to="init", normalize_v=True)
    o1, s1 = run(dgd_scan, args, state, 5, 3, **kw)
    o2, s2 = selfmod_scan(x, q, lm, lrb, db, init["aux"], init["mem"], 0.5, state, 5, 3)
    assert_same(o1, s1, o2, s2, tol=1e-12)


def test_bad_input_is_a_one_line_error():
    args, state = make("mlp", True, t=4)
    x, q, lm, lrb, db, init = args
    bad = [
        (dict(memory="deep"), "memory"),
        (dict(update="adam"), "update"),
        (dict(target="v"), "target"),
        (dict(decay_to="one"), "decay_to"),
        (dict(objective="l1"), "objective"),
    ]
    for kw, field in bad:
        for fn in (dgd_scan, dgd_scan_ref):
            with pytest.raises(ValueError, match=field) as e:
                fn(x, q, lm, lrb, db, init, 0.5, state, 4, 4, **kw)
            assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="max_lr"):
        dgd_scan(x, q, lm, lrb, db, init, 1.0, state, 4, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        dgd_scan(x, q, lm, lrb, db, init, 0.5, state, 0, 4)
    with pytest.raises(ValueError, match="'mem_out_S'"):
        dgd_scan(x, q, lm, lrb, db, init, 0.5, {k: v for k, v in state.items() if k != "mem_out_S"}, 4, 4)
    with pytest.raises(ValueError, match="init"):
        dgd_scan(x, q, lm, lrb, db, init, 0.5, state, 4, 4, memory="linear")
    with pytest.raises(ValueError, match="log_momentum"):
        dgd_scan(x, q, lm[:, :2], lrb, db, init, 0.5, state, 4, 4)
    with pytest.raises(ValueError, match="pos"):
        dgd_scan(x, q, lm, lrb, db, init, 0.5, {**state, "pos": torch.tensor([0, 1])}, 4, 4)


def gated_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=False):
    """flash-linear-attention's chunk_gated_delta_rule as its documentation defines it, token by
    token: S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T with a_t = exp(g_t); q, k
    [B, T, H, K], v [B, T, H, V], g, beta [B, T, H], state [B, H, K, V]; outputs q_t^T S_t."""
    S, outs = initial_state.float(), []
    for kt, vt, gt, bt, qt in zip(k.unbind(1), v.unbind(1), g.unbind(1), beta.unbind(1), q.unbind(1)):
        kt, vt, qt = kt.float(), vt.float(), qt.float()
        S = gt.exp()[..., None, None] * S
        u = bt.float()[..., None] * (vt - (S * kt[..., None]).sum(-2))
        S = S + kt[..., None] * u[..., None, :]
        outs.append((qt[..., None] * S).sum(-2))
    return torch.stack(outs, 1), S if output_final_state else None


@pytest.mark.parametrize("target,decay_to", [("self", "zero"), ("value", "init")])
def test_fla_binding_matches_the_torch_path(monkeypatch, target, decay_to):
    """The gated-delta-rule binding of the linear main memory (layouts, beta = lr / a, values
    -a (e + rest k), one kernel call per chunk carrying the state), run on CPU with a token-loop
    stand-in for the kernel; bf16 activations, as the kernel takes them."""
    import nestlm.ops.hope.chunk as chunk

    args, state = make("linear", False, t=23, seed=14, dtype=torch.float32)
    kw = dict(memory="linear", target=target, decay_to=decay_to)
    o, s = run(dgd_scan, args, state, 5, 3, **kw)
    monkeypatch.setattr(chunk, "_main_backend", lambda *a: "vendor")
    monkeypatch.setattr(chunk.backends, "kernel", lambda op, backend: gated_delta_rule if op == "dgd_scan" else None)
    o_f, s_f = run(dgd_scan, args, state, 5, 3, **kw)
    assert s_f.keys() == s.keys()
    assert rel(o_f, o) <= 2e-2
    for k in s:
        assert rel(s_f[k], s[k]) <= 2e-2, k
