"""Run the csrc/ kernels themselves on the CPU (one host thread per CUDA thread) against the fp64
token loop: forward outputs, final states and every gradient, NaN-poisoned outputs and shared
memory. This executes the exact kernel source (index arithmetic, barriers, reductions, bf16
conversion) on machines without a GPU; timing means nothing here.
"""

import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from memory_scan_ref import linear_memory_scan_loop, random_inputs

ROOT = Path(__file__).resolve().parents[2]
EMU = Path(__file__).resolve().parent / "csrc_emu"
SOURCES = [ROOT / "csrc" / "memory_scan_fwd.cu", ROOT / "csrc" / "memory_scan_bwd.cu"]
CXX = shutil.which("g++")
NAN = float("nan")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if CXX is None:
        pytest.skip("no g++ to build the CPU emulation of the kernels")
    files = [
        *SOURCES,
        EMU / "emu_main.cpp",
        EMU / "cuda_runtime.h",
        EMU / "cuda_bf16.h",
        ROOT / "csrc" / "memory_scan.h",
        ROOT / "csrc" / "memory_scan_common.cuh",
    ]
    digest = hashlib.sha1(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    out = tmp_path_factory.mktemp("emu") / f"libmemscan_emu_{digest}.so"
    cmd = [
        CXX,
        "-std=c++20",
        "-O1",
        "-fPIC",
        "-shared",
        "-pthread",
        "-Wl,--no-undefined",
        f"-I{EMU}",
        f"-I{ROOT / 'csrc'}",
        "-x",
        "c++",
        *map(str, SOURCES),
        "-x",
        "none",
        str(EMU / "emu_main.cpp"),
        "-o",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    so = ctypes.CDLL(str(out))
    so.emu_set_reverse_order.argtypes = [ctypes.c_int]
    so.emu_max_smem_bytes.restype = ctypes.c_size_t
    so.emu_num_segments.restype = ctypes.c_int64
    so.emu_num_segments.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int64]
    for fn in (so.emu_fwd, so.emu_bwd):
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p)]
    return so


def _call(fn, dims, tensors):
    for t in tensors:
        assert t is None or t.is_contiguous()
    d = (ctypes.c_int64 * len(dims))(*dims)
    p = (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])
    rc = fn(d, p)
    assert rc == 0, f"emulated launch returned {rc}"


def kernel_fwd(lib, q, k, v, lr, mom, dec, W, S, A, C, offset, y_dtype):
    b, L, h, dk = q.shape
    dv = v.shape[-1]
    dims = [b, L, h, dk, dv, C, offset, int(q.dtype == torch.bfloat16), int(y_dtype == torch.bfloat16), 0]
    n_seg = lib.emu_num_segments(L, C, offset)
    y = torch.full(v.shape, NAN, dtype=y_dtype)
    W1, S1, A1 = (torch.full(W.shape, NAN) for _ in range(3))
    Wst, Sst = (torch.full((b, h, n_seg, dv, dk), NAN) for _ in range(2))
    _call(lib.emu_fwd, dims, [q, k, v, lr, mom, dec, W, S, A, y, W1, S1, A1, Wst, Sst])
    return y, W1, S1, A1, Wst, Sst


def kernel_bwd(lib, q, k, v, lr, mom, dec, A, Wst, Sst, C, offset, dy, dW, dS, dA_end, first_order):
    b, L, h, dk = q.shape
    dv = v.shape[-1]
    dims = [
        b,
        L,
        h,
        dk,
        dv,
        C,
        offset,
        int(q.dtype == torch.bfloat16),
        int(dy.dtype == torch.bfloat16),
        int(first_order),
    ]
    ns = dv // lib.emu_bwd_rows(dv)
    dq_p, dk_p = (torch.full((ns, b, L, h, dk), NAN) for _ in range(2))
    dg = torch.full((3, ns, b, L, h), NAN)
    dv_out = torch.full(v.shape, NAN, dtype=v.dtype)
    dW0, dS0 = torch.full(A.shape, NAN), torch.full(A.shape, NAN)
    dA = torch.full(A.shape, NAN) if offset % C else torch.zeros(A.shape)
    _call(
        lib.emu_bwd,
        dims,
        [q, k, v, dy, lr, mom, dec, A, Wst, Sst, dW, dS, dA_end, dq_p, dk_p, dv_out, dg[0], dg[1], dg[2], dW0, dS0, dA],
    )
    g = dg.sum(1)
    return dq_p.sum(0), dk_p.sum(0), dv_out, g[0], g[1], g[2], dW0, dS0, dA


def rel(out, ref):
    out = out.double()
    assert not torch.isnan(out).any(), "NaN in kernel output: an element was never written"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


F32, BF16 = torch.float32, torch.bfloat16
CASES = [
    # b, L, h, dk, dv, C, offset, input dtype, y dtype, first_order
    (1, 1, 1, 32, 32, 16, 0, F32, F32, False),
    (1, 63, 2, 64, 64, 16, 0, F32, F32, False),
    (1, 50, 1, 64, 64, 16, 0, F32, F32, "reverse"),
    (1, 70, 1, 128, 96, 16, 5, F32, F32, False),
    (2, 37, 1, 32, 64, 7, 3, F32, F32, True),
    (1, 70, 1, 128, 32, 64, 6, F32, F32, False),
    (1, 45, 1, 64, 64, 16, 13, BF16, BF16, False),
    (1, 33, 1, 32, 32, 8, 0, BF16, F32, True),
]


def loop_first_order(q, k, v, lr, mom, dec, W, S, A, C, offset):
    """Token loop whose inner gradients see a detached anchor (reads still differentiate it)."""
    L = q.shape[1]
    ys = []
    for t in range(L):
        if (offset + t) % C == 0:
            A = W
        r = torch.einsum("bhvk,bhk->bhv", A.detach(), k[:, t]) - v[:, t]
        u = 2.0 * r[..., :, None] * k[:, t, :, None, :]
        S = mom[:, t, :, None, None] * S - lr[:, t, :, None, None] * u
        W = (1.0 - dec[:, t, :, None, None]) * W + S
        ys.append(torch.einsum("bhvk,bhk->bhv", A, q[:, t]))
    return torch.stack(ys, dim=1), (W, S, A)


@pytest.mark.parametrize("b,L,h,dk,dv,C,offset,dtype,y_dtype,first_order", CASES)
def test_emulated_kernels_match_token_loop(lib, b, L, h, dk, dv, C, offset, dtype, y_dtype, first_order):
    x = random_inputs(b, L, h, dk, dv)
    if dtype == torch.bfloat16:
        for i in range(3):
            x[i] = x[i].to(torch.bfloat16).double()
    aligned = offset % C == 0
    ref_in = [t.clone().requires_grad_(True) for t in x]
    # "reverse": schedule the emulated threads last-to-first between barriers
    lib.emu_set_reverse_order(int(first_order == "reverse"))
    first_order = first_order is True
    loop = loop_first_order if first_order else linear_memory_scan_loop
    y_r, st_r = loop(*ref_in[:8], None if aligned else ref_in[8], C, offset)
    cots = [torch.randn(t.shape, dtype=torch.float64) for t in (y_r, *st_r)]
    loss = sum((c * t).sum() for c, t in zip(cots, (y_r, *st_r)))
    g_r = torch.autograd.grad(loss, ref_in, allow_unused=True)

    qkv = [t.to(dtype).contiguous() for t in x[:3]]
    rest = [t.float().contiguous() for t in x[3:]]
    A = rest[3] if aligned else rest[5]  # rest: lr, momentum, decay, W, S, W_anchor
    y, W1, S1, A1, Wst, Sst = kernel_fwd(lib, *qkv, *rest[:5], A, C, offset, y_dtype)
    tol = 1e-2 if BF16 in (dtype, y_dtype) else 1e-4
    for name, o, r in zip(("y", "W", "S", "A"), (y, W1, S1, A1), (y_r, *st_r)):
        assert rel(o, r.detach()) < tol, name
    dy = cots[0].to(y_dtype).contiguous()
    grads = kernel_bwd(
        lib, *qkv, *rest[:3], A, Wst, Sst, C, offset, dy, *(c.float().contiguous() for c in cots[1:]), first_order
    )
    names = ["q", "k", "v", "lr", "momentum", "decay", "W", "S", "W_anchor"]
    for name, o, r in zip(names, grads, g_r):
        if name == "W_anchor" and aligned:
            assert torch.equal(o, torch.zeros_like(o))
            continue
        assert rel(o, r) < tol, name


def test_shared_memory_fits_hopper_at_the_largest_shape(lib):
    # dk = 128 with the largest chunk (64) needs the most shared memory; an H100 / H200 block can
    # opt in to at most 227 KiB.
    x = random_inputs(1, 64, 1, 128, 32)
    qkv = [t.float().contiguous() for t in x[:3]]
    rest = [t.float().contiguous() for t in x[3:]]
    _, _, _, _, Wst, Sst = kernel_fwd(lib, *qkv, *rest[:5], rest[3], 64, 0, torch.float32)
    zeros = torch.zeros_like(rest[3])
    kernel_bwd(lib, *qkv, *rest[:3], rest[3], Wst, Sst, 64, 0, torch.randn(x[2].shape), zeros, zeros, zeros, False)
    assert 0 < lib.emu_max_smem_bytes() <= 227 * 1024
