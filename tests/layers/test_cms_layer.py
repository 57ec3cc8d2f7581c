"""CMS layer: chunked path == token loop (fp64) with every gradient, streaming, causality, cadence,
stability."""

from __future__ import annotations

import random

import pytest
import torch
from layer_checks import assert_causal_and_batch_independent, assert_streaming_equals_one_call
from pieces import random_pieces

import nestlm.layers.cms
from nestlm.layers.cms import CMS
from nestlm.ops.cms import cms_scan_ref


def make_cms(periods=(None, 3, 7), d=16, hidden=24, lr=0.5, seed=0) -> CMS:
    torch.manual_seed(seed)
    m = CMS(d, periods=periods, hidden=hidden, lr=lr).double()
    with torch.no_grad():  # move the views / lr gates off their init so every path is exercised
        for lvl in m.levels:
            if lvl.period is not None:
                lvl.w_key.weight.add_(0.3 * torch.randn_like(lvl.w_key.weight))
                lvl.w_lr.weight.normal_(0, 0.5)
                lvl.w_value.weight.normal_(0, 0.5)
    return m


def pieces(t: int, rng: random.Random) -> list[tuple[int, int]]:
    return random_pieces(t, rng, lengths=(1, 1, 2, 4, 5, 9))


@pytest.mark.parametrize(
    "t,periods",
    [(1, (None, 3, 7)), (63, (None, 3, 7)), (257, (None, 3, 7)), (1, (5, None, 1, 16)), (41, (5, None, 1, 16))],
)
def test_chunked_equals_token_loop(t, periods, monkeypatch):
    m = make_cms(periods)
    x = torch.randn(2, t, 16, dtype=torch.float64, requires_grad=True)
    y1, s1 = m(x)
    with monkeypatch.context() as mp:  # the same layer on the token-loop reference op
        mp.setattr(nestlm.layers.cms, "cms_scan", cms_scan_ref)
        y2, s2 = m(x)
    assert (y1 - y2).abs().max() <= 1e-12 * (1 + y2.abs().max())
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.allclose(s1[k], s2[k], rtol=1e-10, atol=1e-13), k
    # outer gradients, through the inner updates, of every parameter and the input
    w = torch.randn_like(y1)
    fin = {k: torch.randn_like(v) for k, v in s1.items() if v.is_floating_point()}
    params = [x] + list(m.parameters())

    def loss(y, s):
        return (y * w).sum() + sum((s[k] * fin[k]).sum() for k in fin)

    g1 = torch.autograd.grad(loss(y1, s1), params, allow_unused=True)
    g2 = torch.autograd.grad(loss(y2, s2), params, allow_unused=True)
    for (name, _), a, b in zip([("x", x)] + list(m.named_parameters()), g1, g2):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name


def test_streaming_equals_one_call():
    m = make_cms((None, 3, 7, 16))
    x = torch.randn(2, 70, 16, dtype=torch.float64)
    s, state = assert_streaming_equals_one_call(m, x, pieces(70, random.Random(3)), 1e-12)
    for k in s:
        assert torch.allclose(s[k], state[k], rtol=1e-11, atol=1e-14), k
    assert int(state["level1.pos"][0]) == 70


def test_causality_and_batch_independence():
    m = make_cms()
    assert_causal_and_batch_independent(m, torch.randn(3, 40, 16, dtype=torch.float64), row=1, t=25)


def test_fast_weights_change_only_at_period_ends():
    m = make_cms((None, 3, 7))
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        _, s = m(x)
        slow3, slow7 = m.levels[1].w_down, m.levels[2].w_down
        assert not torch.equal(s["level1.W"][0], slow3)  # two periods of 3 completed
        assert torch.equal(s["level1.G"], torch.zeros_like(s["level1.G"]))  # nothing open at pos 6
        assert torch.equal(s["level2.W"][0], slow7)  # period 7 still open ...
        assert s["level2.G"].abs().sum() > 0  # ... its gradient is buffered
        _, s = m(torch.randn(1, 1, 16, dtype=torch.float64), s)
        assert not torch.equal(s["level2.W"][0], slow7)
        assert int(s["level2.pos"][0]) == 7


def test_period_one_is_online_and_reads_before_write():
    """Period 1: token t reads the weights after tokens < t (never its own write)."""
    m = make_cms((1,))
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
        y_first, s = m(x[:, :1])
        assert torch.allclose(y[:, :1], y_first, rtol=0, atol=1e-15)
        y_second, _ = m(x[:, 1:2], s)
        assert torch.allclose(y[:, 1:2], y_second, rtol=0, atol=1e-15)
        y_second_fresh, _ = m(x[:, 1:2])
        assert not torch.allclose(y_second, y_second_fresh)


def test_layer_bad_input():
    with pytest.raises(ValueError, match="periods"):
        CMS(8, periods=(0,))
    with pytest.raises(ValueError, match="lr"):
        CMS(8, lr=1.5)
    with pytest.raises(ValueError, match="level1"):
        make_cms()(torch.randn(1, 2, 16, dtype=torch.float64), {"level2.W": torch.zeros(1)})


def test_long_fp32_stream_at_max_lr_stays_finite():
    torch.manual_seed(0)
    m = CMS(32, periods=(None, 1, 16), hidden=64, lr=1.0)
    with torch.no_grad():
        for lvl in m.levels[1:]:
            lvl.w_lr.bias.fill_(20.0)  # sigmoid -> 1: every step at lr
            lvl.w_value.weight.normal_(0, 1.0)
        state, top = None, 0.0
        for _ in range(10):  # 20,000 tokens in pieces of 2,000
            y, state = m(3 * torch.randn(1, 2000, 32), state)
            top = max(top, float(y.abs().max()))
            assert torch.isfinite(y).all()
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    assert top < 1e3
