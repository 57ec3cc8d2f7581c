"""Backend choice (CPU) and, on CUDA, vendor kernels (mamba-ssm / causal-conv1d) vs the PyTorch path."""

import logging

import pytest
import torch

from nestlm.ops import backends, causal_conv1d, selective_scan, ssd_scan
from nestlm.ops.conv.shift import _conv_torch
from nestlm.ops.selective_scan.chunk import _selective_scan_torch
from nestlm.ops.ssd.chunk import _ssd_torch


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    monkeypatch.delenv("NESTLM_BACKEND", raising=False)
    backends.reset()
    yield
    backends.reset()


# ----------------------------------------------------------------------------------------- CPU


def test_cpu_uses_torch_and_logs_once(caplog):
    with caplog.at_level(logging.INFO, logger="nestlm.ops"):
        for _ in range(3):
            assert backends.choose("selective_scan", torch.device("cpu")) == "torch"
        selective_scan(
            *[torch.randn(1, 2, 3), torch.rand(1, 2, 3), -torch.rand(2, 2), torch.randn(1, 2, 3), torch.randn(1, 2, 3)]
        )
    lines = [r.getMessage() for r in caplog.records if "selective_scan on cpu" in r.getMessage()]
    assert len(lines) == 1 and "torch" in lines[0]


def test_vendor_chosen_for_cuda_when_importable_and_env_forces_torch(monkeypatch, caplog):
    monkeypatch.setitem(backends._loaded, ("causal_conv1d", "vendor"), lambda *a, **k: None)
    with caplog.at_level(logging.INFO, logger="nestlm.ops"):
        assert backends.choose("causal_conv1d", "cuda") == "vendor"
        assert backends.choose("causal_conv1d", "cuda") == "vendor"
        monkeypatch.setenv("NESTLM_BACKEND", "torch")
        assert backends.choose("causal_conv1d", "cuda") == "torch"
        assert backends.forced() == "torch"
    msgs = [r.getMessage() for r in caplog.records if "causal_conv1d on cuda" in r.getMessage()]
    assert len(msgs) == 2 and "vendor" in msgs[0] and "NESTLM_BACKEND" in msgs[1]


def test_own_kernel_takes_precedence(monkeypatch):
    monkeypatch.setitem(backends.KERNELS, "ssd_scan", [("csrc", "own:kernel"), ("vendor", "vendor:kernel")])
    monkeypatch.setitem(backends._loaded, ("ssd_scan", "vendor"), lambda *a, **k: None)
    monkeypatch.setitem(backends._loaded, ("ssd_scan", "csrc"), lambda *a, **k: None)
    assert backends.choose("ssd_scan", "cuda") == "csrc"
    assert backends.choose("ssd_scan", "cpu") == "torch"


def test_unsupported_inputs_run_torch_and_say_why_once(monkeypatch, caplog):
    monkeypatch.setitem(backends._loaded, ("selective_scan", "vendor"), lambda *a, **k: None)
    with caplog.at_level(logging.INFO, logger="nestlm.ops"):
        assert backends.choose("selective_scan", "cuda") == "vendor"
        for _ in range(2):
            assert backends.choose("selective_scan", "cuda", unsupported="initial_state given") == "torch"
        assert backends.choose("selective_scan", "cuda") == "vendor"
        assert backends.choose("selective_scan", "cpu", unsupported="initial_state given") == "torch"
    msgs = [r.getMessage() for r in caplog.records if "selective_scan on cuda" in r.getMessage()]
    assert len(msgs) == 2 and "vendor" in msgs[0] and "torch (initial_state given)" in msgs[1]


def test_op_without_kernels_dispatches_to_torch():
    assert "selfmod_scan" not in backends.KERNELS
    assert backends.choose("selfmod_scan", "cuda") == "torch"
    assert backends.kernel("selfmod_scan", "csrc") is None


def test_bad_backend_env_raises(monkeypatch):
    monkeypatch.setenv("NESTLM_BACKEND", "triton")
    with pytest.raises(ValueError, match="NESTLM_BACKEND"):
        backends.choose("selective_scan", "cpu")


def test_missing_vendor_package_is_none():
    assert backends.kernel("no_such_op", "vendor") is None
    if not torch.cuda.is_available():
        assert backends.choose("selective_scan", "cuda") in ("torch", "vendor")


def _flash_attn_semantics(q, k, v, causal, window_size, softmax_scale):
    """flash_attn_func as documented: q [b, s, h, d], k, v [b, s, hkv, d]; query i sees keys
    j in [i - left, i + right] (left = -1: unbounded), j <= i when causal."""
    s, h, hkv = q.shape[1], q.shape[2], k.shape[2]
    k, v = (x.repeat_interleave(h // hkv, dim=2) for x in (k, v))
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    left, right = window_size
    allowed = (j <= i) if causal else torch.ones(s, s, dtype=torch.bool)
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    scores = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) * softmax_scale
    p = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bhij,bjhd->bihd", p, v.float()).to(q.dtype)


@pytest.mark.parametrize("window", [None, 5])
def test_attention_flash_path_passes_the_window_flash_attn_expects(monkeypatch, window):
    """The flash-attn call (taken for fresh fp16/bf16 CUDA segments) against the SDPA path, with a
    stand-in that implements flash_attn_func's documented window semantics; GQA, odd length."""
    from nestlm.layers.attention import Attention

    torch.manual_seed(0)
    attn = Attention(64, n_heads=4, n_kv_heads=2, window=window).to(torch.bfloat16)
    x = torch.randn(2, 23, 64, dtype=torch.bfloat16)
    y_sdpa, _ = attn(x)
    calls = []

    def fake(q, k, v, causal, window_size, softmax_scale):
        calls.append(window_size)
        return _flash_attn_semantics(q, k, v, causal, window_size, softmax_scale)

    monkeypatch.setitem(backends._loaded, ("flash_attn", "vendor"), fake)
    monkeypatch.setitem(backends._choice, ("flash_attn", "cpu"), ("vendor", "stand-in"))
    y_flash, _ = attn(x)
    assert calls == [(-1, -1) if window is None else (window - 1, 0)]
    assert (y_flash.float() - y_sdpa.float()).abs().max() < 2e-2
    attn(x, attn.init_state(2, dtype=torch.bfloat16) | {"pos": torch.full((2,), 3)})  # cached keys: SDPA
    assert len(calls) == 1 + (window is None)


# ----------------------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = {torch.float32: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


def _grads(out, inputs):
    return torch.autograd.grad(out.float().square().sum(), inputs, allow_unused=True)


def _check_close(a, b, dtype, what):
    a, b = a.float(), b.float()
    scale = b.abs().max().clamp_min(1e-6)
    err = ((a - b).abs().max() / scale).item()
    assert err < TOL[dtype]["rtol"] * 10, f"{what}: rel err {err}"


def _check_outputs_states_grads(got, want, dtype, state_name, names, inputs):
    """A kernel's (output, state) against the PyTorch path's, and the gradients of the outputs
    with respect to `inputs` (named by the words of `names`)."""
    (y1, s1), (y2, s2) = got, want
    _check_close(y1, y2, dtype, "out")
    _check_close(s1, s2, dtype, state_name)
    for name, g1, g2 in zip(names.split(), _grads(y1, inputs), _grads(y2, inputs)):
        _check_close(g1, g2, dtype, f"grad {name}")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_scan_vendor_vs_torch(dtype):
    if backends.kernel("selective_scan", "vendor") is None:
        pytest.skip("mamba-ssm not importable")
    torch.manual_seed(0)
    b, d, n, L = 2, 64, 16, 300
    dev = "cuda"
    u = torch.randn(b, d, L, device=dev, dtype=dtype)
    delta = torch.randn(b, d, L, device=dev, dtype=dtype)
    A = -torch.rand(d, n, device=dev) * 4 - 0.5
    B, C = torch.randn(b, n, L, device=dev, dtype=dtype), torch.randn(b, n, L, device=dev, dtype=dtype)
    D, z, bias = torch.randn(d, device=dev), torch.randn(b, d, L, device=dev, dtype=dtype), torch.randn(d, device=dev)
    ins = [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
    assert backends.choose("selective_scan", dev) == "vendor"
    y1, h1 = selective_scan(*ins[:5], D=D, z=z, delta_bias=bias, delta_softplus=True, return_last_state=True)
    y2, h2 = _selective_scan_torch(*ins[:5], D, z, bias, True, True, None)
    _check_outputs_states_grads((y1, h1), (y2, h2), dtype, "last_state", "u delta A B C D z bias", ins)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_vendor_vs_torch(dtype):
    if backends.kernel("ssd_scan", "vendor") is None:
        pytest.skip("mamba-ssm not importable")
    torch.manual_seed(0)
    b, L, h, p, g, n, dev = 2, 300, 8, 32, 2, 16, "cuda"
    x = torch.randn(b, L, h, p, device=dev, dtype=dtype)
    dt = torch.randn(b, L, h, device=dev, dtype=dtype)
    A = -torch.rand(h, device=dev) * 4 - 0.5
    B, C = torch.randn(b, L, g, n, device=dev, dtype=dtype), torch.randn(b, L, g, n, device=dev, dtype=dtype)
    D, z, bias = torch.randn(h, device=dev), torch.randn_like(x), torch.randn(h, device=dev)
    s0 = torch.randn(b, h, p, n, device=dev)
    ins = [t.requires_grad_() for t in (x, dt, A, B, C, D, z, bias, s0)]
    kw = dict(D=D, z=z, dt_bias=bias, initial_states=s0, dt_softplus=True, return_final_states=True)
    assert backends.choose("ssd_scan", dev) == "vendor"
    y1, s1 = ssd_scan(x, dt, A, B, C, 64, **kw)
    y2, s2 = _ssd_torch(x, dt, A, B, C, 64, D, z, bias, s0, True, True)
    _check_outputs_states_grads((y1, s1), (y2, s2), dtype, "final_states", "x dt A B C D z bias s0", ins)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d_vendor_vs_torch(dtype):
    if backends.kernel("causal_conv1d", "vendor") is None:
        pytest.skip("causal-conv1d not importable")
    torch.manual_seed(0)
    b, d, L, w, dev = 2, 64, 300, 4, "cuda"
    x = torch.randn(b, d, L, device=dev, dtype=dtype)
    weight, bias = torch.randn(d, w, device=dev, dtype=dtype), torch.randn(d, device=dev, dtype=dtype)
    s0 = torch.randn(b, d, w - 1, device=dev, dtype=dtype)
    ins = [t.requires_grad_() for t in (x, weight, bias, s0)]
    assert backends.choose("causal_conv1d", dev) == "vendor"
    y1, f1 = causal_conv1d(x, weight, bias, s0, True, "silu")
    y2, f2 = _conv_torch(x, weight, bias, s0, True, "silu")
    _check_outputs_states_grads((y1, f1), (y2, f2), dtype, "final_states", "x weight bias", ins[:3])


@gpu
@needs_cuda
def test_env_forces_torch_on_cuda(monkeypatch):
    monkeypatch.setenv("NESTLM_BACKEND", "torch")
    assert backends.choose("selective_scan", "cuda") == "torch"
    x = torch.randn(1, 4, 10, device="cuda")
    y = causal_conv1d(x, torch.randn(4, 3, device="cuda"))
    assert y.shape == x.shape


@gpu
@needs_cuda
@pytest.mark.parametrize("window", [None, 64])
def test_attention_flash_attn_vs_sdpa(monkeypatch, window):
    if backends.kernel("flash_attn", "vendor") is None:
        pytest.skip("flash-attn not importable")
    from nestlm.layers.attention import Attention

    torch.manual_seed(0)
    attn = Attention(256, n_heads=8, n_kv_heads=2, window=window).cuda().to(torch.bfloat16)
    x = torch.randn(2, 257, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y1, _ = attn(x)
    g1 = _grads(y1, [x])
    monkeypatch.setenv("NESTLM_BACKEND", "torch")
    y2, _ = attn(x)
    g2 = _grads(y2, [x])
    _check_close(y1, y2, torch.bfloat16, "attention output")
    _check_close(g1[0], g2[0], torch.bfloat16, "grad x")
