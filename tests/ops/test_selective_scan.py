"""selective_scan (chunked path) against its token-loop reference and an explicit-sum formula, fp64."""

import pytest
import torch
from op_checks import assert_grads_match, rel

from nestlm.ops import selective_scan, selective_scan_ref
from nestlm.ops.selective_scan.chunk import _selective_scan_torch

F64 = torch.float64


def make(b, d, n, length, groups=None, seed=0, dtype=F64, h0=True, extras=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    bc = (b, groups, n, length) if groups else (b, n, length)
    inp = dict(
        u=r(b, d, length),
        delta=r(b, d, length) * 0.5,
        A=-torch.rand(d, n, generator=g, dtype=dtype) * 2 - 0.1,
        B=r(*bc),
        C=r(*bc),
    )
    if extras:
        inp.update(D=r(d), z=r(b, d, length), delta_bias=r(d) * 0.3)
    if h0:
        inp["initial_state"] = r(b, d, n)
    return inp


def call(fn, inp, softplus, chunk=None):
    kw = dict(inp)
    args = [kw.pop(k) for k in ("u", "delta", "A", "B", "C")]
    if chunk is None:
        return fn(*args, **kw, delta_softplus=softplus, return_last_state=True)
    return _selective_scan_torch(
        *args, kw.get("D"), kw.get("z"), kw.get("delta_bias"), softplus, True, kw.get("initial_state"), chunk=chunk
    )


CASES = [
    # (b, d, n, T, groups, extras, h0, softplus, chunk)
    (1, 3, 2, 1, None, False, False, False, None),
    (2, 5, 3, 63, None, True, True, True, None),
    (2, 6, 4, 257, 3, True, True, True, None),
    (1, 4, 3, 257, 2, False, True, False, 16),
    (2, 4, 5, 63, 4, True, False, True, 7),
    (1, 2, 3, 5, None, True, True, False, 64),
]


@pytest.mark.parametrize("b,d,n,T,groups,extras,h0,softplus,chunk", CASES)
def test_outputs_states_grads_match_reference(b, d, n, T, groups, extras, h0, softplus, chunk):
    inp = make(b, d, n, T, groups, seed=T + d, h0=h0, extras=extras)
    if not softplus:  # without softplus keep delta positive, as in use
        inp["delta"] = inp["delta"].abs()
    for t in inp.values():
        t.requires_grad_(True)
    y, h = call(selective_scan if chunk is None else _selective_scan_torch, inp, softplus, chunk)
    yr, hr = call(selective_scan_ref, inp, softplus)
    assert y.shape == (b, d, T) and h.shape == (b, d, n) and y.dtype == F64
    assert rel(y, yr) < 1e-10 and rel(h, hr) < 1e-10
    assert_grads_match(inp, (y, h), (yr, hr), 1e-9)


def test_long_sequence_outputs_and_state():
    inp = make(1, 3, 4, 1000, groups=None, seed=3)
    y, h = call(selective_scan, inp, True)
    yr, hr = call(selective_scan_ref, inp, True)
    assert rel(y, yr) < 1e-10 and rel(h, hr) < 1e-10


def test_reference_matches_explicit_sum():
    """Independent check of the reference: h_t = sum_s exp(sum_{s<r<=t} delta_r A) delta_s u_s B_s."""
    b, d, n, T = 2, 3, 4, 9
    inp = make(b, d, n, T, groups=None, seed=5, h0=False, extras=False)
    u, delta, A, B, C = (inp[k] for k in ("u", "delta", "A", "B", "C"))
    delta = delta.abs()
    y = torch.zeros(b, d, T, dtype=F64)
    for t in range(T):
        for s in range(t + 1):
            logdecay = (delta[:, :, s + 1 : t + 1, None] * A[None, :, None, :]).sum(2)  # [b, d, n]
            contrib = torch.exp(logdecay) * (delta[:, :, s] * u[:, :, s])[..., None] * B[:, None, :, s]
            y[:, :, t] += (contrib * C[:, None, :, t]).sum(-1)
    yr = selective_scan_ref(u, delta, A, B, C)
    yf = selective_scan(u, delta, A, B, C)
    assert rel(yr, y) < 1e-12 and rel(yf, y) < 1e-12


@pytest.mark.parametrize("pieces", [[1] * 11, [4, 1, 30, 2, 40], [63, 1, 13]])
def test_streaming_equals_one_call(pieces):
    T = sum(pieces)
    inp = make(2, 4, 3, T, groups=2, seed=11)
    y, h = call(selective_scan, inp, True)
    state, ys, t0 = inp["initial_state"], [], 0
    for p in pieces:
        part = {
            k: (v[..., t0 : t0 + p] if v.dim() >= 3 and v.shape[-1] == T and k != "initial_state" else v)
            for k, v in inp.items()
        }
        part["initial_state"] = state
        yp, state = call(selective_scan, part, True)
        ys.append(yp)
        t0 += p
    assert rel(torch.cat(ys, -1), y) < 1e-10 and rel(state, h) < 1e-10


def test_causal_and_sensitive():
    inp = make(1, 3, 2, 40, seed=2)
    y, _ = call(selective_scan, inp, True)
    inp2 = dict(inp)
    inp2["u"] = inp["u"].clone()
    inp2["u"][..., 20] += 1.0
    y2, _ = call(selective_scan, inp2, True)
    assert torch.equal(y[..., :20], y2[..., :20])
    assert (y[..., 20:] - y2[..., 20:]).abs().amax(dim=(0, 1)).min() > 0


def test_fp32_and_bf16_inputs():
    inp = make(2, 4, 3, 70, seed=4, dtype=torch.float32)
    y32, h32 = call(selective_scan, inp, True)
    assert y32.dtype == torch.float32 and h32.dtype == torch.float32
    yr, hr = call(selective_scan_ref, {k: v.double() for k, v in inp.items()}, True)
    assert rel(y32.double(), yr) < 1e-4 and rel(h32.double(), hr) < 1e-4
    ybf, hbf = call(selective_scan, {k: v.bfloat16() for k, v in inp.items()}, True)
    assert ybf.dtype == torch.bfloat16 and hbf.dtype == torch.float32  # state stays fp32
    assert rel(ybf.double(), yr) < 5e-2


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda i: i.update(u=i["u"][0]), "u must be"),
        (lambda i: i.update(delta=i["delta"][..., :-1]), "delta must"),
        (lambda i: i.update(A=i["A"][:-1]), "A must be"),
        (lambda i: i.update(A=torch.complex(i["A"], i["A"])), "complex A"),
        (lambda i: i.update(B=i["B"][:, :, :-1]), "B must be"),
        (lambda i: i.update(C=torch.randn(2, 3, 3, 10, dtype=F64)), "C must be"),
        (lambda i: i.update(D=torch.randn(5, dtype=F64)), "D must be"),
        (lambda i: i.update(initial_state=torch.randn(2, 4, 2, dtype=F64)), "initial_state must be"),
    ],
)
def test_bad_inputs_raise(change, match):
    inp = make(2, 4, 3, 10, seed=0)
    change(inp)
    with pytest.raises(ValueError, match=match):
        call(selective_scan, inp, False)


@pytest.mark.parametrize("b", [1, 3])
def test_transposed_view_inputs_match_reference(b):
    """Layers pass [b, l, d] activations seen as [b, d, l]; the op brings them to one layout first.
    Outputs, final state and gradients equal the reference's for such views."""
    inp = make(b, 6, 3, 41, seed=11)
    views = {
        k: (v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z") else v) for k, v in inp.items()
    }
    assert views["u"].stride(1) == 1
    leaves = {k: v.detach().requires_grad_(True) for k, v in views.items()}
    y, s = call(selective_scan, leaves, True)
    yr, sr = call(selective_scan_ref, inp, True)
    assert rel(y, yr) < 1e-12 and rel(s, sr) < 1e-12
    gy = torch.randn_like(y)
    g = torch.autograd.grad((y * gy).sum() + s.sum(), list(leaves.values()))
    ref_leaves = {k: v.detach().requires_grad_(True) for k, v in inp.items()}
    yr, sr = call(selective_scan_ref, ref_leaves, True)
    gr = torch.autograd.grad((yr * gy).sum() + sr.sum(), list(ref_leaves.values()))
    for name, a, r in zip(leaves, g, gr):
        assert rel(a, r) < 1e-10, f"grad of {name}"
