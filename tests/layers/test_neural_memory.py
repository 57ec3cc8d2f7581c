"""NeuralMemory layer: chunked == token loop with every parameter's gradient, streaming, causality,
fp32 state under autocast, long-stream stability, bit-identical save / load."""

import math

import pytest
import torch
from layer_checks import run_in_pieces

import nestlm.layers.memory
from nestlm.layers.memory import NeuralMemory
from nestlm.ops.memory import linear_memory_scan_ref, mlp_memory_scan_ref

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    # relative to the reference's size; the +1e-6 keeps exact-zero references meaningful
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / (b.norm() + 1e-6))


def make_layer(depth, chunk_size=5, first_order=False, seed=0, **kw):
    torch.manual_seed(seed)
    m = NeuralMemory(
        24,
        n_heads=2,
        head_dim=6,
        depth=depth,
        chunk_size=chunk_size,
        max_lr=0.5,
        first_order=first_order,
        expansion=2,
        **kw,
    ).double()
    with torch.no_grad():  # livelier gates than the default init, so every path matters
        m.gate_proj.weight.normal_(std=0.5)
    return m


@pytest.mark.parametrize(
    "depth,L,first_order", [(1, 1, False), (1, 63, False), (2, 63, False), (2, 63, True), (2, 257, False)]
)
def test_layer_chunked_matches_reference_with_all_gradients(depth, L, first_order, monkeypatch):
    m = make_layer(depth, chunk_size=16, first_order=first_order)
    x = torch.randn(2, L, 24, dtype=F64)
    results = []
    for use_ref in (False, True):
        if use_ref:  # the same layer on the token-loop reference ops
            monkeypatch.setattr(nestlm.layers.memory, "linear_memory_scan", linear_memory_scan_ref)
            monkeypatch.setattr(nestlm.layers.memory, "mlp_memory_scan", mlp_memory_scan_ref)
        m.zero_grad()
        y, st = m(x)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=F64).view_as(y)).sum()
        loss = loss + sum(st[n].pow(2).sum() for n in st if n.startswith("W"))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        results.append((y, st, grads))
    (y, st, g), (y_r, st_r, g_r) = results
    assert rel_err(y, y_r) < 1e-9
    for n in st:
        assert rel_err(st[n], st_r[n]) < 1e-9, n
    names = set(g)
    assert {
        "W0.0",
        "gate_proj.weight",
        "gate_proj.bias",
        "qkv_proj.weight",
        "conv.weight",
        "o_proj.weight",
        "out_gate.weight",
    } <= names
    for n in names:
        assert g_r[n].norm() > 0, n
        assert rel_err(g[n], g_r[n]) < 1e-9, n


@pytest.mark.parametrize("depth", [1, 2])
def test_layer_streaming_matches_one_call(depth):
    m = make_layer(depth, chunk_size=4)
    x = torch.randn(3, 41, 24, dtype=F64)
    with torch.no_grad():
        y_full, st_full = m(x)
        ys, st = run_in_pieces(m, x, [(0, 1), (1, 2), (2, 7), (7, 8), (8, 9), (9, 22), (22, 23), (23, 41)])
    assert rel_err(ys, y_full) < 1e-9
    assert st.keys() == st_full.keys()
    for n in st:
        assert st[n].dtype == st_full[n].dtype
        assert rel_err(st[n], st_full[n]) < 1e-9, n
    assert int(st["pos"][0]) == 41


@pytest.mark.parametrize("depth", [1, 2])
def test_layer_causal_and_batch_independent(depth):
    m = make_layer(depth, chunk_size=4)
    x = torch.randn(3, 30, 24, dtype=F64)
    with torch.no_grad():
        y, _ = m(x)
        x2 = x.clone()
        x2[:, 13] += 1.0  # a future token
        y2, _ = m(x2)
        assert torch.equal(y[:, :13], y2[:, :13])
        assert (y[:, 13:] - y2[:, 13:]).abs().max() > 1e-6
        x3 = x.clone()
        x3[1] = torch.randn(30, 24, dtype=F64)  # another row
        y3, _ = m(x3)
        assert rel_err(y3[0], y[0]) < 1e-12 and rel_err(y3[2], y[2]) < 1e-12
        y_row, _ = m(x[2:3])
        assert rel_err(y_row[0], y[2]) < 1e-12


def test_layer_state_none_equals_init_state_and_w0_learns():
    m = make_layer(2)
    x = torch.randn(2, 12, 24, dtype=F64)
    y1, _ = m(x)
    y2, _ = m(x, m.init_state(2, device=x.device, dtype=x.dtype))
    assert torch.equal(y1, y2)
    y2.pow(2).sum().backward()
    assert m.W0[0].grad.norm() > 0 and m.W0[1].grad.norm() > 0
    assert getattr(m.W0[0], "_no_weight_decay", False) and getattr(m.gate_proj.bias, "_no_weight_decay", False)


def test_layer_state_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    m = NeuralMemory(16, n_heads=2, head_dim=8, depth=2, chunk_size=4)
    x = torch.randn(1, 10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, st = m(x)
        y2, st2 = m(x, st)
    for n, t in st2.items():
        assert t.dtype == (torch.int64 if n == "pos" else torch.float32), n
    assert torch.isfinite(y2.float()).all()


def test_layer_bad_inputs():
    m = make_layer(1)
    x = torch.randn(2, 5, 24, dtype=F64)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 5, 23, dtype=F64))
    _, st = m(x)
    with pytest.raises(ValueError, match="keys"):
        m(x, {k: v for k, v in st.items() if k != "pos"})
    with pytest.raises(ValueError, match="batch"):
        m(x[:1], st)
    with pytest.raises(ValueError, match="depth"):
        NeuralMemory(24, 2, 6, depth=3)


@pytest.mark.parametrize("depth,max_grad_norm", [(1, 1.0), (2, None)])
def test_long_stream_fp32_at_max_lr_stays_finite(depth, max_grad_norm):
    """20,000 tokens in fp32 with theta pinned at max_lr and strong momentum: no blow-up."""
    torch.manual_seed(0)
    m = NeuralMemory(32, n_heads=2, head_dim=16, depth=depth, chunk_size=32, max_lr=0.1, max_grad_norm=max_grad_norm)
    with torch.no_grad():
        bias = m.gate_proj.bias.view(3, 2)
        bias[0].fill_(30.0)  # theta = max_lr
        bias[1].fill_(math.log(0.95 / 0.05))  # eta ~ 0.95
        bias[2].fill_(-30.0)  # alpha ~ 0: no forgetting
        st, x = None, torch.randn(1, 20000, 32)
        for i in range(0, 20000, 2500):
            y, st = m(x[:, i : i + 2500], st)
            assert torch.isfinite(y).all()
    for n, t in st.items():
        assert torch.isfinite(t.float()).all(), n
        # bounded, not merely finite (measured: |W| settles at ~10x its init for depth 1, ~100x for
        # depth 2, whose normalised MLP is scale-invariant in W; a divergence runs to inf or NaN)
        assert not t.is_floating_point() or float(t.abs().max()) < 1e3, n
    assert int(st["pos"][0]) == 20000


@pytest.mark.parametrize("depth", [1, 2])
def test_state_save_load_continue_is_bit_identical(depth, tmp_path):
    from nestlm.models.state import State

    m = make_layer(depth, chunk_size=8).float()
    x = torch.randn(2, 29, 24)
    with torch.no_grad():
        _, st = m(x[:, :13])  # stops inside a chunk: anchor, position and conv history all matter
        y_cont, st_cont = m(x[:, 13:], st)
        State([{"mixer": st, "channel": {}}]).save(tmp_path / "mem.safetensors")
        loaded = State.load(tmp_path / "mem.safetensors").blocks[0]["mixer"]
        assert loaded.keys() == st.keys()
        y_loaded, st_loaded = m(x[:, 13:], loaded)
    assert torch.equal(y_loaded, y_cont)
    for n in st_cont:
        assert torch.equal(st_loaded[n], st_cont[n]), n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("depth", [1, 2])
def test_cuda_fp32_matches_cpu_fp64(depth):
    m = make_layer(depth, chunk_size=16)
    x = torch.randn(2, 100, 24, dtype=F64)
    y_ref, st_ref = m(x)
    y_ref.square().mean().backward()
    g_ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    mc = make_layer(depth, chunk_size=16).float().cuda()
    mc.load_state_dict(m.state_dict())
    y, st = mc(x.float().cuda())
    y.square().mean().backward()
    assert rel_err(y.cpu(), y_ref) < 1e-3
    for n in st_ref:
        assert st[n].device.type == "cuda"
        assert rel_err(st[n].cpu(), st_ref[n]) < 1e-3, n
    for n, p in mc.named_parameters():
        assert rel_err(p.grad.cpu(), g_ref[n]) < 1e-3, n
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y16, st16 = mc(x.float().cuda())
    assert torch.isfinite(y16.float()).all()
    assert all(t.dtype == (torch.int64 if n == "pos" else torch.float32) for n, t in st16.items())
