"""ssd_scan (chunked SSD) against its token-loop reference and an explicit-sum formula, fp64."""

import pytest
import torch
from op_checks import assert_grads_match, rel

import nestlm.ops.ssd.chunk as ssd
from nestlm.ops import ssd_scan, ssd_scan_ref

F64 = torch.float64


def make(b, length, h, p, g, n, seed=0, dtype=F64, extras=True, s0=True, d_per_channel=False):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    inp = dict(
        x=r(b, length, h, p),
        dt=r(b, length, h) * 0.5,
        A=-torch.rand(h, generator=gen, dtype=dtype) * 2 - 0.1,
        B=r(b, length, g, n),
        C=r(b, length, g, n),
    )
    if extras:
        inp.update(D=r(h, p) if d_per_channel else r(h), z=r(b, length, h, p), dt_bias=r(h) * 0.3)
    if s0:
        inp["initial_states"] = r(b, h, p, n)
    return inp


def call(fn, inp, chunk, softplus=True):
    kw = dict(inp)
    args = [kw.pop(k) for k in ("x", "dt", "A", "B", "C")]
    return fn(*args, chunk, **kw, dt_softplus=softplus, return_final_states=True)


CASES = [
    # (b, T, h, p, g, n, chunk, extras, s0, softplus, d_per_channel)
    (1, 1, 2, 3, 1, 2, 16, False, False, True, False),
    (2, 63, 4, 3, 2, 5, 16, True, True, True, False),
    (2, 257, 6, 2, 3, 4, 64, True, True, True, True),
    (1, 257, 2, 3, 1, 3, 257, False, True, True, False),
    (2, 63, 3, 2, 3, 2, 1, True, False, False, True),
    (1, 100, 4, 2, 4, 3, 33, True, True, True, False),
]


@pytest.mark.parametrize("cpu_max_chunk", [ssd.CPU_MAX_CHUNK, 1024], ids=["cpu-tile", "caller-chunk"])
@pytest.mark.parametrize("b,T,h,p,g,n,chunk,extras,s0,softplus,dpc", CASES)
def test_outputs_states_grads_match_reference(
    b, T, h, p, g, n, chunk, extras, s0, softplus, dpc, cpu_max_chunk, monkeypatch
):
    # caller-chunk: the chunks the CUDA PyTorch path uses (the CPU path caps them at CPU_MAX_CHUNK)
    monkeypatch.setattr(ssd, "CPU_MAX_CHUNK", cpu_max_chunk)
    inp = make(b, T, h, p, g, n, seed=T + h, extras=extras, s0=s0, d_per_channel=dpc)
    if not softplus:
        inp["dt"] = inp["dt"].abs()
    for t in inp.values():
        t.requires_grad_(True)
    y, s = call(ssd_scan, inp, chunk, softplus)
    yr, sr = call(ssd_scan_ref, inp, chunk, softplus)
    assert y.shape == (b, T, h, p) and s.shape == (b, h, p, n)
    assert rel(y, yr) < 1e-10 and rel(s, sr) < 1e-10
    assert_grads_match(inp, (y, s), (yr, sr), 1e-9)


def test_long_sequence_outputs_and_state():
    inp = make(1, 1000, 2, 3, 1, 4, seed=7)
    y, s = call(ssd_scan, inp, 64)
    yr, sr = call(ssd_scan_ref, inp, 64)
    assert rel(y, yr) < 1e-10 and rel(s, sr) < 1e-10


def test_reference_matches_explicit_sum():
    """y_t[h] = sum_{s<=t} (C_t . B_s) exp(A_h sum_{s<r<=t} dt_r) dt_s x_s, heads sharing groups."""
    b, T, h, p, g, n = 2, 8, 4, 3, 2, 5
    inp = make(b, T, h, p, g, n, seed=9, extras=False, s0=False)
    x, dt, A, B, C = (inp[k] for k in ("x", "dt", "A", "B", "C"))
    dt = dt.abs()
    y = torch.zeros(b, T, h, p, dtype=F64)
    for head in range(h):
        grp = head // (h // g)
        for t in range(T):
            for s in range(t + 1):
                decay = torch.exp(A[head] * dt[:, s + 1 : t + 1, head].sum(1))  # [b]
                cb = (C[:, t, grp] * B[:, s, grp]).sum(-1)  # [b]
                y[:, t, head] += (cb * decay * dt[:, s, head])[:, None] * x[:, s, head]
    assert rel(ssd_scan_ref(x, dt, A, B, C, 4), y) < 1e-12
    assert rel(ssd_scan(x, dt, A, B, C, 4), y) < 1e-12


@pytest.mark.parametrize("pieces", [[1] * 9, [5, 1, 40, 17], [64, 1, 63]])
def test_streaming_equals_one_call(pieces):
    T = sum(pieces)
    inp = make(2, T, 4, 2, 2, 3, seed=13)
    y, s = call(ssd_scan, inp, 16)
    state, ys, t0 = inp["initial_states"], [], 0
    for piece in pieces:
        part = {k: (v[:, t0 : t0 + piece] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inp.items()}
        part["initial_states"] = state
        yp, state = call(ssd_scan, part, 16)
        ys.append(yp)
        t0 += piece
    assert rel(torch.cat(ys, 1), y) < 1e-10 and rel(state, s) < 1e-10


def test_causal_and_sensitive():
    inp = make(1, 50, 2, 2, 1, 3, seed=3)
    y, _ = call(ssd_scan, inp, 16)
    inp2 = dict(inp, x=inp["x"].clone())
    inp2["x"][:, 30] += 1.0
    y2, _ = call(ssd_scan, inp2, 16)
    assert torch.equal(y[:, :30], y2[:, :30])
    assert (y[:, 30:] - y2[:, 30:]).abs().amax(dim=(0, 2, 3)).min() > 0


def test_fp32_and_bf16_inputs():
    inp = make(2, 70, 4, 8, 2, 16, seed=4, dtype=torch.float32)
    y32, s32 = call(ssd_scan, inp, 32)
    yr, sr = call(ssd_scan_ref, {k: v.double() for k, v in inp.items()}, 32)
    assert y32.dtype == torch.float32 and rel(y32.double(), yr) < 1e-4 and rel(s32.double(), sr) < 1e-4
    ybf, sbf = call(ssd_scan, {k: v.bfloat16() for k, v in inp.items()}, 32)
    assert ybf.dtype == torch.bfloat16 and sbf.dtype == torch.float32
    assert rel(ybf.double(), yr) < 5e-2


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda i: i.update(x=i["x"][0]), "x must be"),
        (lambda i: i.update(dt=i["dt"][:, :-1]), "dt must be"),
        (lambda i: i.update(A=i["A"][:-1]), "A must be"),
        (lambda i: i.update(B=torch.randn(2, 10, 3, 3, dtype=F64)), "ngroups=3"),
        (lambda i: i.update(C=i["C"][..., :-1]), "C must have"),
        (lambda i: i.update(D=torch.randn(4, 3, dtype=F64)), "D must be"),
        (lambda i: i.update(initial_states=torch.randn(2, 4, 2, 2, dtype=F64)), "initial_states must be"),
    ],
)
def test_bad_inputs_raise(change, match):
    inp = make(2, 10, 4, 2, 2, 3, seed=0)
    change(inp)
    with pytest.raises(ValueError, match=match):
        call(ssd_scan, inp, 8)


def test_bad_chunk_size_raises():
    inp = make(1, 4, 2, 2, 1, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        call(ssd_scan, inp, 0)
