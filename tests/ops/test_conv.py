"""causal_conv1d (shifted multiply-add path) against its token-loop reference, fp64."""

import pytest
import torch
from op_checks import rel

from nestlm.ops import causal_conv1d, causal_conv1d_ref

F64 = torch.float64


def make(b, d, length, w, seed=0, bias=True, init=True, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    inp = dict(
        x=torch.randn(b, d, length, generator=g, dtype=dtype),
        weight=torch.randn(d, w, generator=g, dtype=dtype),
    )
    if bias:
        inp["bias"] = torch.randn(d, generator=g, dtype=dtype)
    if init:
        inp["initial_states"] = torch.randn(b, d, w - 1, generator=g, dtype=dtype)
    return inp


def call(fn, inp, activation):
    kw = dict(inp)
    return fn(kw.pop("x"), kw.pop("weight"), **kw, return_final_states=True, activation=activation)


@pytest.mark.parametrize(
    "b,d,T,w,bias,init,act",
    [
        (1, 3, 1, 4, True, True, "silu"),
        (2, 5, 63, 4, False, False, None),
        (2, 7, 257, 3, True, False, "swish"),
        (1, 4, 1000, 4, True, True, "silu"),
        (2, 3, 2, 5, True, False, None),  # shorter than the window: final state zero-padded
        (1, 2, 9, 1, True, True, None),  # width 1: empty state
    ],
)
def test_outputs_states_grads_match_reference(b, d, T, w, bias, init, act):
    inp = make(b, d, T, w, seed=T + w, bias=bias, init=init)
    for t in inp.values():
        t.requires_grad_(True)
    y, s = call(causal_conv1d, inp, act)
    yr, sr = call(causal_conv1d_ref, inp, act)
    assert y.shape == (b, d, T) and s.shape == (b, d, w - 1)
    assert rel(y, yr) < 1e-12
    if w > 1:
        assert rel(s, sr) < 1e-12
    names = list(inp)
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    g1 = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), [inp[k] for k in names])
    g2 = torch.autograd.grad((yr * gy).sum() + (sr * gs).sum(), [inp[k] for k in names], allow_unused=True)
    for name, a, r in zip(names, g1, g2):
        r = torch.zeros_like(a) if r is None else r
        assert a.shape == r.shape
        if a.numel():
            assert (a - r).abs().max() <= 1e-12 * max(1.0, r.abs().max().item()), f"grad of {name}"


def test_final_state_layout():
    """Final state = last w-1 inputs, oldest first, zero-padded on the left when the input is short."""
    x = torch.arange(1.0, 3.0, dtype=F64).view(1, 1, 2)  # [1, 2]
    w = torch.ones(1, 4, dtype=F64)
    _, s = causal_conv1d(x, w, return_final_states=True)
    assert s.tolist() == [[[0.0, 1.0, 2.0]]]
    _, s = causal_conv1d(x, w, initial_states=torch.tensor([[[7.0, 8.0, 9.0]]], dtype=F64), return_final_states=True)
    assert s.tolist() == [[[9.0, 1.0, 2.0]]]
    y = causal_conv1d(x, w, initial_states=torch.tensor([[[7.0, 8.0, 9.0]]], dtype=F64))
    assert y.tolist() == [[[7.0 + 8 + 9 + 1, 8.0 + 9 + 1 + 2]]]


@pytest.mark.parametrize("pieces", [[1] * 7, [2, 1, 30, 3], [1, 2, 1, 40]])
def test_streaming_equals_one_call(pieces):
    T = sum(pieces)
    inp = make(2, 3, T, 4, seed=5)
    y, s = call(causal_conv1d, inp, "silu")
    state, ys, t0 = inp["initial_states"], [], 0
    for p in pieces:
        part = dict(inp, x=inp["x"][..., t0 : t0 + p], initial_states=state)
        yp, state = call(causal_conv1d, part, "silu")
        ys.append(yp)
        t0 += p
    assert rel(torch.cat(ys, -1), y) < 1e-12 and torch.equal(state, s)


def test_causal_and_sensitive():
    inp = make(1, 2, 20, 4, seed=1)
    y, _ = call(causal_conv1d, inp, None)
    x2 = inp["x"].clone()
    x2[..., 10] += 1.0
    y2, _ = call(causal_conv1d, dict(inp, x=x2), None)
    assert torch.equal(y[..., :10], y2[..., :10])
    assert (y[..., 10:14] - y2[..., 10:14]).abs().amin() > 0
    assert torch.equal(y[..., 14:], y2[..., 14:])


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda i: i.update(x=i["x"][0]), "x must be"),
        (lambda i: i.update(weight=i["weight"][:-1]), "weight must be"),
        (lambda i: i.update(bias=i["bias"][:-1]), "bias must be"),
        (lambda i: i.update(initial_states=i["initial_states"][..., :-1]), "initial_states must be"),
    ],
)
def test_bad_inputs_raise(change, match):
    inp = make(2, 3, 8, 4)
    change(inp)
    with pytest.raises(ValueError, match=match):
        call(causal_conv1d, inp, None)


def test_bad_activation_raises():
    inp = make(1, 2, 4, 3)
    with pytest.raises(ValueError, match="activation"):
        call(causal_conv1d, inp, "relu")


@pytest.mark.parametrize("init", [True, False])
def test_channel_last_input_matches_contiguous(init):
    """A [b, l, d] tensor seen as [b, d, l] (how the layers call the op) takes the layout-keeping
    path; outputs, states and gradients equal the contiguous path's and the reference's."""
    inp = make(2, 6, 37, 4, seed=5, init=init)
    xcl = inp["x"].transpose(1, 2).contiguous().transpose(1, 2)
    assert xcl.stride(1) == 1
    outs = []
    for x in (inp["x"], xcl):
        leaf = {k: v.detach().clone().requires_grad_(True) for k, v in dict(inp, x=x).items()}
        y, s = call(causal_conv1d, leaf, "silu")
        gy = torch.linspace(-1, 1, y.numel(), dtype=F64).view(y.shape)
        # a gradient in the other layout, as a transposing consumer would send it
        gy = gy.transpose(1, 2).contiguous().transpose(1, 2) if x is inp["x"] else gy.contiguous()
        grads = torch.autograd.grad((y * gy).sum() + s.sum(), list(leaf.values()))
        outs.append((y, s, grads))
    (y1, s1, g1), (y2, s2, g2) = outs
    assert rel(y2, y1) < 1e-12 and rel(s2, s1) < 1e-12
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() <= 1e-12
    yr, sr = call(causal_conv1d_ref, inp, "silu")
    assert rel(y2, yr) < 1e-12 and rel(s2, sr) < 1e-12
