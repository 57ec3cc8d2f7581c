"""Binding of the CUDA kernels in csrc/: the fused linear-memory scan (forward and backward).

The kernels run the chunk-recompute form of the linear scan (docs/kernels.md): per segment, closed
coefficients from suffix recurrences, and a backward that recomputes each segment from its saved
start state. The binding registers torch.ops.nestlm_csrc.{memory_scan_fwd, memory_scan_bwd,
set_poison}. Loading order, once per process:
1. the ahead-of-time library `nestlm/_memory_scan_C*.so` (built by `NESTLM_BUILD_CUDA=1 pip install
   --no-build-isolation -e .`);
2. a JIT build of csrc/ with torch.utils.cpp_extension.load (ninja), cached under
   $NESTLM_CSRC_BUILD_DIR or torch's extension cache, so later processes only load the .so.
Nothing is built without CUDA (`load()` is None on CPU-only machines), and
nestlm.ops.backends dispatches here through `kernel()` (and NESTLM_BACKEND=torch keeps every op
on its PyTorch path); `unsupported(x)` says which inputs the kernel does not take.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from nestlm.ops.memory.common import Scan, check, linear_memory

log = logging.getLogger(__name__)

CSRC_DIR = Path(__file__).resolve().parents[3] / "csrc"
SOURCES = ("memory_scan_bind.cpp", "memory_scan_fwd.cu", "memory_scan_bwd.cu")
EXT_NAME = "nestlm_memory_scan"
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo")
KEY_DIMS = (32, 64, 128)
MAX_CHUNK = 64


@functools.lru_cache(maxsize=1)
def load():
    """The op namespace torch.ops.nestlm_csrc once the kernels are loaded, or None (reason logged)."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return None
    aot = sorted(Path(__file__).resolve().parents[2].glob("_memory_scan_C*.so"))
    try:
        if aot:
            torch.ops.load_library(str(aot[0]))
        else:
            if not all((CSRC_DIR / s).exists() for s in SOURCES):
                log.info("csrc/ sources not found next to the package; memory scan stays on PyTorch")
                return None
            from torch.utils.cpp_extension import load as jit_load

            build_dir = os.environ.get("NESTLM_CSRC_BUILD_DIR")
            if build_dir:
                Path(build_dir).mkdir(parents=True, exist_ok=True)
            jit_load(
                name=EXT_NAME,
                sources=[str(CSRC_DIR / s) for s in SOURCES],
                extra_cuda_cflags=list(NVCC_FLAGS),
                build_directory=build_dir,
                is_python_module=False,
                verbose=os.environ.get("NESTLM_CSRC_VERBOSE") == "1",
            )
        return torch.ops.nestlm_csrc
    except Exception as err:  # a broken toolchain must not take the model down
        log.warning("loading csrc/ failed (%s); memory scan stays on PyTorch", err)
        return None


def kernel():
    """The kernel entry `scan(x, return_state)` for nestlm.ops.backends, or None when not built."""
    return scan if load() is not None else None


def unsupported(x: Scan) -> str | None:
    """Why the kernel does not run the (checked) inputs `x` of linear_memory_scan; None if it does."""
    dk, dv = x.q.shape[-1], x.v.shape[-1]
    if x.q.shape[1] == 0:
        return "empty call"
    if x.W[0].dtype != torch.float32:
        return "state not fp32 (the kernel keeps fp32 state)"
    if x.max_grad_norm is not None:
        return "max_grad_norm (the kernel does not clip)"
    if x.first_order:
        return "first_order=True (not dispatched to the kernel)"
    if not (dk in KEY_DIMS and dv % 32 == 0 and 32 <= dv <= 256 and x.chunk_size <= MAX_CHUNK):
        return "shape not covered by the kernel (dk in 32/64/128, dv a multiple of 32 up to 256, chunk <= 64)"
    return None


def linear_memory_scan_csrc(
    q, k, v, lr, momentum, decay, W, S, W_anchor=None, *, chunk_size=16, offset=0, return_state=True, first_order=False
):
    """`linear_memory_scan` on the kernels whatever the dispatcher would choose (tests, benchmarks):
    the op's arguments (no max_grad_norm), checked as the op checks them; CUDA tensors, fp32 state."""
    x = Scan(q, k, v, lr, momentum, decay, W, S, W_anchor, chunk_size, offset, first_order, None)
    mem, x = linear_memory(x)
    check("linear_memory_scan_csrc", mem, x)
    return scan(x, return_state)


def scan(x: Scan, return_state: bool = True):
    """linear_memory_scan of checked inputs `x` (fp32 state, CUDA) on the kernels.

    Returns y [b, l, h, dv] (fp32) and, if return_state, (W, S, W_anchor) as the op does.
    """
    W, S = x.W[0], x.S[0]
    A = x.W_anchor[0] if x.offset > 0 else W
    with torch.autocast(device_type=x.q.device.type, enabled=False):
        y, W1, S1, A1 = _KernelScan.apply(
            x.q, x.k, x.v, x.lr, x.momentum, x.decay, W, S, A, x.chunk_size, x.offset, x.first_order
        )
    return (y, (W1, S1, A1)) if return_state else y


class _KernelScan(torch.autograd.Function):
    """Autograd around the kernels: forward saves the segment-start states, backward recomputes.

    forward(q, k, v, lr, momentum, decay, W, S, A, chunk_size, offset, first_order)
        -> y [b, l, h, dv], W_end, S_end, A_end [b, h, dv, dk]
    A is the anchor of the chunk in progress (W when offset is 0).
    """

    @staticmethod
    def forward(ctx, q, k, v, lr, momentum, decay, W, S, A, chunk_size, offset, first_order):
        save = any(ctx.needs_input_grad[:9])
        y, W1, S1, A1, Wst, Sst = memory_scan_fwd(q, k, v, lr, momentum, decay, W, S, A, chunk_size, offset, save)
        if save:
            ctx.save_for_backward(q, k, v, lr, momentum, decay, A, Wst, Sst)
        ctx.chunk_size, ctx.offset, ctx.first_order = chunk_size, offset, first_order
        ctx.in_dtypes = [t.dtype for t in (q, k, v, lr, momentum, decay)]
        return y, W1, S1, A1

    @staticmethod
    def backward(ctx, dy, dW1, dS1, dA1):
        q, k, v, lr, momentum, decay, A, Wst, Sst = ctx.saved_tensors
        dy = torch.zeros_like(v) if dy is None else dy.contiguous()
        ends = [torch.zeros_like(A) if g is None else g.contiguous() for g in (dW1, dS1, dA1)]
        inputs = (q, k, v, lr, momentum, decay, A, Wst, Sst)
        grads = memory_scan_bwd(*inputs, ctx.chunk_size, ctx.offset, dy, *ends, ctx.first_order)
        grads = [g.to(dt) for g, dt in zip(grads[:6], ctx.in_dtypes)] + list(grads[6:])
        return (*grads, None, None, None)


def _in_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.bfloat16 if all(t.dtype == torch.bfloat16 for t in ts) else torch.float32


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def memory_scan_fwd(q, k, v, lr, momentum, decay, W, S, A, chunk_size, offset, save_states, y_fp32=True):
    """Kernel forward over all segments of one call.

    q, k [b, l, h, dk]; v [b, l, h, dv]; lr/momentum/decay [b, l, h]; W, S, A [b, h, dv, dk].
    Returns y [b, l, h, dv], W_end, S_end, A_end (the anchor of the chunk holding the last token)
    and, if save_states, the segment start states [b, h, n_seg, dv, dk] of W and S (else None).
    y is fp32 (the state dtype) unless y_fp32=False, which keeps bf16 inputs' y in bf16.
    """
    ext = load()
    dt = _in_dtype(q, k, v)
    f32 = [t.to(torch.float32).contiguous() for t in (lr, momentum, decay, W, S, A)]
    with torch.cuda.device(q.device):
        y, W1, S1, A1, Wst, Sst = ext.memory_scan_fwd(
            q.to(dt).contiguous(),
            k.to(dt).contiguous(),
            v.to(dt).contiguous(),
            *f32,
            int(chunk_size),
            int(offset),
            bool(save_states),
            bool(y_fp32 or dt == torch.float32),
            _stream(q.device),
        )
    if not save_states:
        Wst = Sst = None
    return y, W1.to(W.dtype), S1.to(S.dtype), A1.to(A.dtype), Wst, Sst


def memory_scan_bwd(
    q,
    k,
    v,
    lr,
    momentum,
    decay,
    A,
    W_states,
    S_states,
    chunk_size,
    offset,
    dy,
    dW_end,
    dS_end,
    dA_end,
    first_order=False,
):
    """Kernel backward: the reverse sweep over segments, each recomputed from its saved start state.

    first_order: the inner gradients were taken at a detached anchor, so the anchor gets gradient
    only through the reads y = A q. Returns dq, dk, dv, dlr, dmomentum, ddecay, dW0, dS0, dA (the
    shapes of the forward inputs).
    """
    ext = load()
    dt = _in_dtype(q, k, v)
    f32 = [t.to(torch.float32).contiguous() for t in (lr, momentum, decay, A)]
    ends = [t.to(torch.float32).contiguous() for t in (dW_end, dS_end, dA_end)]
    with torch.cuda.device(q.device):
        out = ext.memory_scan_bwd(
            q.to(dt).contiguous(),
            k.to(dt).contiguous(),
            v.to(dt).contiguous(),
            *f32,
            W_states,
            S_states,
            int(chunk_size),
            int(offset),
            (dy if dy.dtype == torch.float32 else dy.to(dt)).contiguous(),
            *ends,
            bool(first_order),
            _stream(q.device),
        )
    dq, dk, dv, dlr, dmom, ddec, dW0, dS0, dA = out
    return (
        dq.to(q.dtype),
        dk.to(k.dtype),
        dv.to(v.dtype),
        dlr.to(lr.dtype),
        dmom.to(momentum.dtype),
        ddec.to(decay.dtype),
        dW0.to(A.dtype),
        dS0.to(A.dtype),
        dA.to(A.dtype),
    )
