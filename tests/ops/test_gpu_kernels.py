"""csrc/ memory-scan kernels against the fp64 token loop (needs CUDA; skipped elsewhere).

Fresh random inputs per case, every kernel output pre-filled with NaN, forward outputs, final
states and every gradient compared by relative error ||out - ref|| / ||ref||. Tolerances: fp32
arithmetic well under 1e-3 (we ask 2e-4); bf16 inputs and outputs between 1e-3 and 1e-2 (we ask
1e-2) against the reference fed the same bf16-rounded inputs.
"""

import pytest
import torch
from memory_scan_ref import linear_memory_scan_loop, random_inputs, scan_in_pieces

from nestlm.ops import backends
from nestlm.ops.memory import csrc, linear_memory_scan, linear_memory_scan_ref
from nestlm.ops.memory.chunk import backend
from nestlm.ops.memory.common import Scan, linear_memory
from nestlm.ops.memory.csrc import linear_memory_scan_csrc

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOL = {torch.float32: 2e-4, torch.bfloat16: 1e-2}
NAMES = ["q", "k", "v", "lr", "momentum", "decay", "W", "S", "W_anchor"]


@pytest.fixture(scope="module")
def ext():
    mod = csrc.load()
    assert mod is not None, "the csrc extension failed to build (see the log)"
    mod.set_poison(True)
    yield mod
    mod.set_poison(False)


def rel(out, ref):
    out = out.detach().double().cpu()
    assert not torch.isnan(out).any(), "NaN in kernel output (unwritten element or overflow)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_case(b, L, h, dk, dv, C, offset, dtype, first_order=False):
    cpu = random_inputs(b, L, h, dk, dv)
    if dtype == torch.bfloat16:  # the reference sees exactly what the kernel sees
        for i in range(3):
            cpu[i] = cpu[i].to(torch.bfloat16).double()
    needs_anchor = offset % C != 0
    n_in = 9 if needs_anchor else 8
    ref_in = [t.clone().requires_grad_(True) for t in cpu[:n_in]]
    dev_in = [t.to("cuda", dtype if i < 3 else torch.float32).requires_grad_(True) for i, t in enumerate(cpu[:n_in])]
    anchor_ref = ref_in[8] if needs_anchor else None
    anchor_dev = dev_in[8] if needs_anchor else None
    if first_order:
        y_r, st_r = linear_memory_scan_ref(*ref_in[:8], anchor_ref, chunk_size=C, offset=offset, first_order=True)
    else:
        y_r, st_r = linear_memory_scan_loop(*ref_in[:8], anchor_ref, chunk_size=C, offset=offset)
    y, st = linear_memory_scan_csrc(*dev_in[:8], anchor_dev, chunk_size=C, offset=offset, first_order=first_order)
    tol = TOL[dtype]
    errs = {"y": rel(y, y_r)}
    for name, o, r in zip(("W_end", "S_end", "A_end"), st, st_r):
        errs[name] = rel(o, r)
    cots = [torch.randn(t.shape, dtype=torch.float64) for t in (y_r, *st_r)]
    loss_r = sum((c * t).sum() for c, t in zip(cots, (y_r, *st_r)))
    loss = sum((c.to("cuda", t.dtype) * t).float().sum() for c, t in zip(cots, (y, *st)))
    g_r = torch.autograd.grad(loss_r, ref_in)
    g = torch.autograd.grad(loss, dev_in)
    for name, o, r in zip(NAMES, g, g_r):
        errs["d" + name] = rel(o, r)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"relative errors over {tol}: {bad}"


@pytest.mark.parametrize(
    "b,L,h,dk,dv,C,offset",
    [
        (1, 1, 1, 32, 32, 16, 0),
        (2, 63, 3, 64, 64, 16, 0),
        (2, 257, 2, 128, 128, 16, 0),
        (1, 100, 2, 64, 128, 64, 0),
        (2, 77, 1, 128, 64, 7, 3),
        (1, 45, 2, 32, 96, 16, 11),
        (1, 5, 2, 64, 32, 16, 9),
    ],
)
def test_kernel_matches_token_loop_fp32(ext, b, L, h, dk, dv, C, offset):
    check_case(b, L, h, dk, dv, C, offset, torch.float32)


@pytest.mark.parametrize("b,L,h,dk,dv,C,offset", [(2, 63, 2, 64, 64, 16, 0), (1, 129, 2, 128, 128, 32, 5)])
def test_kernel_matches_token_loop_bf16(ext, b, L, h, dk, dv, C, offset):
    check_case(b, L, h, dk, dv, C, offset, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_first_order_matches_reference(ext, dtype):
    check_case(2, 70, 2, 64, 64, 16, 6, dtype, first_order=True)


def test_kernel_streaming_pieces_equal_one_call(ext):
    C = 16
    x = [t.to("cuda", torch.float32) for t in random_inputs(2, 150, 2, 64, 64)][:8]
    y_full, (W_full, S_full, _) = linear_memory_scan_csrc(*x, chunk_size=C)
    y, (W, S) = scan_in_pieces(linear_memory_scan_csrc, x, (1, 20, 16, 37, 64, 12), C)
    assert y.shape == y_full.shape
    assert rel(y, y_full.double().cpu()) < 1e-5
    assert rel(W, W_full.double().cpu()) < 1e-5 and rel(S, S_full.double().cpu()) < 1e-5


def test_dispatch_picks_kernel_and_env_forces_torch(ext, monkeypatch):
    backends.reset()

    def inputs(dk, first_order=False, max_grad_norm=None):
        q = torch.randn(1, 4, 1, dk, device="cuda")
        v, gate, W = torch.randn(1, 4, 1, 64, device="cuda"), q.new_zeros(1, 4, 1), q.new_zeros(1, 1, 64, dk)
        return linear_memory(Scan(q, q, v, gate, gate, gate, W, W, None, 16, 0, first_order, max_grad_norm))[1]

    assert backend(inputs(64)) == "csrc"
    assert backend(inputs(48)) == "torch"  # dk not covered
    assert backend(inputs(64, first_order=True)) == "torch"
    assert backend(inputs(64, max_grad_norm=1.0)) == "torch"
    monkeypatch.setenv("NESTLM_BACKEND", "torch")
    assert backend(inputs(64)) == "torch"


def test_memory_op_on_cuda_runs_the_kernel_and_matches_its_reference(ext):
    first_order = False

    x = random_inputs(2, 75, 2, 64, 64)
    C, off = 16, 5
    cpu = [t.clone().requires_grad_(True) for t in x]
    dev = [t.to("cuda", torch.float32).requires_grad_(True) for t in x]
    calls = []
    real = csrc.memory_scan_fwd

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    csrc.memory_scan_fwd = spy
    try:
        y, st = linear_memory_scan(*dev, chunk_size=C, offset=off, first_order=first_order)
    finally:
        csrc.memory_scan_fwd = real
    assert calls, "linear_memory_scan on CUDA did not reach the csrc kernel"
    y_r, st_r = linear_memory_scan_ref(*cpu, chunk_size=C, offset=off, first_order=first_order)
    outs, refs = (y, *st), (y_r, *st_r)
    for o, r in zip(outs, refs):
        assert rel(o, r.detach()) < TOL[torch.float32]
    cots = [torch.randn(t.shape, dtype=torch.float64) for t in refs]
    g = torch.autograd.grad(sum((c.cuda().float() * t).sum() for c, t in zip(cots, outs)), dev)
    g_r = torch.autograd.grad(sum((c * t).sum() for c, t in zip(cots, refs)), cpu)
    for name, o, r in zip(NAMES, g, g_r):
        assert rel(o, r) < TOL[torch.float32], name
