"""ShortConv, Mamba and Mamba2 layers: streaming, fast path vs token-loop references, causality,
batch independence, parameter counts, agreement with the Hugging Face mixers."""

from __future__ import annotations

import math

import pytest
import torch

import nestlm.ops as ops
from nestlm.layers.conv import ShortConv
from nestlm.layers.mamba import Mamba
from nestlm.layers.mamba2 import Mamba2

D_MODEL = 12

# name -> constructor at odd sizes (d_inner 24, dt_rank 1; Mamba2: 3 heads of 8, 3 groups).
LAYERS = {
    "shortconv": lambda: ShortConv(7, kernel_size=4),
    "shortconv_w3_nobias_noact": lambda: ShortConv(5, kernel_size=3, activation=None, bias=False),
    "mamba": lambda: Mamba(D_MODEL, d_state=5, d_conv=4, expand=2),
    "mamba2": lambda: Mamba2(D_MODEL, d_state=6, d_conv=4, expand=2, headdim=8, ngroups=1, chunk_size=16),
    "mamba2_groups": lambda: Mamba2(D_MODEL, d_state=5, d_conv=3, expand=2, headdim=8, ngroups=3, chunk_size=7),
}


def make(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = LAYERS[name]().double()
    # Random D and biases so that every term of the output is exercised.
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            if pname.endswith("D") or pname.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return layer


def width(layer) -> int:
    return layer.d if isinstance(layer, ShortConv) else layer.d_model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def run_pieces(layer, x, sizes, state=None):
    ys = []
    t0 = 0
    for n in sizes:
        y, state = layer(x[:, t0 : t0 + n], state)
        ys.append(y)
        t0 += n
    assert t0 == x.shape[1]
    return torch.cat(ys, dim=1), state


def random_split(T: int, gen: torch.Generator) -> list[int]:
    sizes, left = [], T
    while left:
        n = min(left, int(torch.randint(1, 40, (1,), generator=gen)) if len(sizes) % 3 else 1)
        sizes.append(n)
        left -= n
    return sizes


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("T", [1, 63, 130])
def test_streaming_equals_one_call(name, T):
    layer = make(name)
    x = torch.randn(2, T, width(layer), dtype=torch.float64)
    y_full, s_full = layer(x)
    gen = torch.Generator().manual_seed(T)
    for sizes in (random_split(T, gen), [1] * min(T, 9) + ([T - 9] if T > 9 else [])):
        y, s = run_pieces(layer, x, sizes)
        assert rel_err(y, y_full) <= 1e-9, sizes
        assert s.keys() == s_full.keys()
        for k in s:
            assert s[k].shape == s_full[k].shape and s[k].dtype == s_full[k].dtype
            assert rel_err(s[k], s_full[k]) <= 1e-9, k


@pytest.mark.parametrize("name", ["shortconv", "mamba", "mamba2_groups"])
def test_streaming_gradients(name):
    """Backpropagating through a carried state gives the gradients of the one-call computation."""
    layer = make(name)
    x = torch.randn(2, 41, width(layer), dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 41, width(layer), dtype=torch.float64)
    (layer(x)[0] * w).sum().backward()
    g_full = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    x.grad = None
    (run_pieces(layer, x, [5, 1, 1, 17, 17])[0] * w).sum().backward()
    g = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(g, g_full):
        assert rel_err(a, b) <= 1e-9


def use_refs(monkeypatch):
    for op in ("causal_conv1d", "selective_scan", "ssd_scan"):
        monkeypatch.setattr(ops, op, getattr(ops, op + "_ref"))


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("T", [1, 63, 257])
def test_fast_path_equals_reference_ops(name, T, monkeypatch):
    """The layer on the fast ops == the same layer on the token-loop `*_ref` ops: outputs, final
    state, gradients w.r.t. input, initial state and every parameter."""
    layer = make(name)
    b = 3
    x = torch.randn(b, T, width(layer), dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    state0 = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in layer.init_state(b).items()}
    wy = torch.randn(b, T, width(layer), dtype=torch.float64)
    ws = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in state0.items()}

    def run():
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        si = {k: v.clone().requires_grad_(True) for k, v in state0.items()}
        y, s = layer(xi, si)
        loss = (y * wy).sum() + sum((s[k] * ws[k]).sum() for k in s)
        loss.backward()
        grads = [xi.grad] + [si[k].grad for k in sorted(si)] + [p.grad for p in layer.parameters()]
        return y.detach(), {k: v.detach() for k, v in s.items()}, grads

    y_fast, s_fast, g_fast = run()
    with monkeypatch.context() as m:
        use_refs(m)
        y_ref, s_ref, g_ref = run()
    assert rel_err(y_fast, y_ref) <= 1e-9
    for k in s_ref:
        assert rel_err(s_fast[k], s_ref[k]) <= 1e-9, k
    for a, r in zip(g_fast, g_ref):
        assert r is not None and a is not None
        assert rel_err(a, r) <= 1e-9


@pytest.mark.parametrize("name", list(LAYERS))
def test_causality(name):
    layer = make(name)
    T, t0 = 37, 20
    x = torch.randn(2, T, width(layer), dtype=torch.float64)
    y, _ = layer(x)
    x2 = x.clone()
    x2[:, t0] += torch.randn_like(x2[:, t0])
    y2, _ = layer(x2)
    assert torch.equal(y[:, :t0], y2[:, :t0])
    assert (y[:, t0] - y2[:, t0]).abs().max() > 1e-6


@pytest.mark.parametrize("name", list(LAYERS))
def test_batch_independence(name):
    layer = make(name)
    x = torch.randn(3, 29, width(layer), dtype=torch.float64)
    y, s = layer(x)
    x2 = x.clone()
    x2[1] = torch.randn_like(x2[1])
    y2, s2 = layer(x2)
    for i in (0, 2):
        assert torch.equal(y[i], y2[i])
        for k in s:
            assert torch.equal(s[k][i], s2[k][i])
    assert (y[1] - y2[1]).abs().max() > 1e-6
    # A batch of one row gives the row of the batch.
    y1, _ = layer(x[2:3])
    assert rel_err(y1[0], y[2]) <= 1e-12


@pytest.mark.parametrize("name", list(LAYERS))
def test_fresh_state_equals_zero_state(name):
    """state=None (scans get no initial state) == an explicit init_state (zeros); same state dtypes."""
    layer = make(name)
    x = torch.randn(2, 23, width(layer), dtype=torch.float64)
    y0, s0 = layer(x)
    y1, s1 = layer(x, layer.init_state(2, x.device, x.dtype))
    assert rel_err(y0, y1) <= 1e-12
    for k in s1:
        assert s0[k].dtype == s1[k].dtype and rel_err(s0[k], s1[k]) <= 1e-12


def test_parameter_counts():
    d, n, w, e = 40, 9, 3, 3
    di, r = e * d, math.ceil(d / 16)
    m = Mamba(d, d_state=n, d_conv=w, expand=e)
    expected = d * 2 * di + di * w + di + di * (r + 2 * n) + r * di + di + di * n + di + di * d
    assert sum(p.numel() for p in m.parameters()) == expected
    m = Mamba(d, d_state=n, d_conv=w, expand=e, dt_rank=7, bias=True, conv_bias=False)
    expected = (d + 1) * 2 * di + di * w + di * (7 + 2 * n) + 7 * di + di + di * n + di + (di + 1) * d
    assert sum(p.numel() for p in m.parameters()) == expected

    p, g = 20, 2
    h = di // p
    m2 = Mamba2(d, d_state=n, d_conv=w, expand=e, headdim=p, ngroups=g)
    conv_dim = di + 2 * g * n
    expected = d * (di + conv_dim + h) + conv_dim * (w + 1) + 3 * h + di + di * d
    assert sum(q.numel() for q in m2.parameters()) == expected
    assert sum(q.numel() for q in ShortConv(11, 5).parameters()) == 11 * 6
    assert sum(q.numel() for q in ShortConv(11, 5, bias=False).parameters()) == 11 * 5


def test_no_weight_decay_and_init():
    m = Mamba(32, d_state=8)
    flagged = {n for n, p in m.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert flagged == {"A_log", "D", "dt_proj.bias"}
    assert torch.allclose(-torch.exp(m.A_log), -torch.arange(1, 9.0).expand(64, 8))
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    m2 = Mamba2(32, d_state=8, headdim=16)
    flagged = {n for n, p in m2.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert flagged == {"A_log", "D", "dt_bias"}
    a = torch.exp(m2.A_log)
    assert a.min() >= 1 and a.max() <= 16
    dt = torch.nn.functional.softplus(m2.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_state_shapes_and_bf16_autocast(name):
    layer = LAYERS[name]()
    s = layer.init_state(2, torch.device("cpu"), torch.float32)
    if name == "mamba":
        assert s["conv"].shape == (2, 24, 3) and s["ssm"].shape == (2, 24, 5)
    else:
        assert s["conv"].shape == (2, 24 + 2 * 6, 3) and s["ssm"].shape == (2, 3, 8, 6)
    x = torch.randn(2, 19, D_MODEL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s1 = layer(x[:, :10], s)
        y2, s2 = layer(x[:, 10:], s1)
    assert s2["ssm"].dtype == torch.float32 and s2["conv"].dtype == torch.float32
    y_ref, _ = layer(x)
    assert rel_err(torch.cat([y, y2], 1).float(), y_ref) < 0.1


def test_bad_inputs():
    m = Mamba(D_MODEL, d_state=4)
    with pytest.raises(ValueError, match="Mamba input x"):
        m(torch.randn(2, 5, D_MODEL + 1))
    with pytest.raises(ValueError, match="'ssm'"):
        m(torch.randn(2, 5, D_MODEL), m.init_state(3))
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(D_MODEL, headdim=7)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2(D_MODEL, headdim=8, ngroups=2)
    with pytest.raises(ValueError, match="activation"):
        ShortConv(4, activation="relu")
    with pytest.raises(ValueError, match="'conv'"):
        ShortConv(4)(torch.randn(2, 3, 4), {"conv": torch.zeros(2, 4, 2)})


def test_matches_huggingface_mixers():
    """Loading a Hugging Face MambaMixer / Mamba2Mixer state dict gives the same outputs (fp32;
    their gated norm computes in fp32)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba.modeling_mamba import MambaMixer
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    torch.manual_seed(0)
    x = torch.randn(2, 45, 32)
    hf = MambaMixer(transformers.MambaConfig(hidden_size=32, state_size=8, expand=2, num_hidden_layers=1), 0)
    ours = Mamba(32, d_state=8)
    ours.load_state_dict(hf.state_dict())
    with torch.no_grad():
        assert rel_err(ours(x)[0], hf.eval()(x)) < 1e-5

    cfg = transformers.Mamba2Config(
        hidden_size=32,
        state_size=8,
        expand=2,
        head_dim=16,
        num_heads=4,
        n_groups=2,
        chunk_size=16,
        num_hidden_layers=1,
        layer_norm_epsilon=1e-5,
    )
    hf = Mamba2Mixer(cfg, 0)
    ours = Mamba2(32, d_state=8, headdim=16, ngroups=2, chunk_size=16)
    ours.load_state_dict(hf.state_dict())
    with torch.no_grad():
        assert rel_err(ours(x)[0], hf.eval()(x)) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["mamba", "mamba2", "mamba2_groups"])
def test_cuda_layers_match_cpu_fp64(name):
    """On CUDA (vendor kernels when importable, else the PyTorch path), fp32: one call and a streamed
    call agree with the fp64 CPU layer in outputs and gradients."""
    cpu = make(name)
    gpu = make(name).float().cuda()
    x = torch.randn(2, 150, width(cpu), dtype=torch.float64)
    w = torch.randn_like(x)
    xc = x.clone().requires_grad_(True)
    (cpu(xc)[0] * w).sum().backward()
    xg = x.float().cuda().requires_grad_(True)
    y, _ = gpu(xg)
    (y * w.float().cuda()).sum().backward()
    ys, _ = run_pieces(gpu, xg.detach(), [1, 70, 79])
    assert rel_err(y.double().cpu(), cpu(x)[0]) < 1e-4
    assert rel_err(ys.double().cpu(), cpu(x)[0]) < 1e-4
    assert rel_err(xg.grad.double().cpu(), xc.grad) < 1e-3
    for pc, pg in zip(cpu.parameters(), gpu.parameters()):
        assert rel_err(pg.grad.double().cpu(), pc.grad) < 1e-3
