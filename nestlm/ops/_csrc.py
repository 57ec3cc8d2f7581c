"""Build and call the CUDA kernels in csrc/ (fused linear-memory scan).

The binding registers torch.ops.nestlm_csrc.{memory_scan_fwd, memory_scan_bwd, set_poison}. Loading
order, once per process:
1. the ahead-of-time library `nestlm/_memory_scan_C*.so` (built by `NESTLM_BUILD_CUDA=1 pip install
   --no-build-isolation -e .`);
2. a JIT build of csrc/ with torch.utils.cpp_extension.load (ninja), cached under
   $NESTLM_CSRC_BUILD_DIR or torch's extension cache, so later processes only load the .so.
Nothing is built without CUDA (`available()` is False on CPU-only machines), and
NESTLM_BACKEND=torch keeps every op on its PyTorch path.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("memory_scan_bind.cpp", "memory_scan_fwd.cu", "memory_scan_bwd.cu")
EXT_NAME = "nestlm_memory_scan"
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo")
KEY_DIMS = (32, 64, 128)
MAX_CHUNK = 64


def forced_torch() -> bool:
    """True when NESTLM_BACKEND=torch asks for the PyTorch paths everywhere."""
    return os.environ.get("NESTLM_BACKEND", "").strip().lower() == "torch"


@functools.lru_cache(maxsize=1)
def load():
    """The op namespace torch.ops.nestlm_csrc once the kernels are loaded, or None (reason logged)."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return None
    aot = sorted(Path(__file__).resolve().parents[1].glob("_memory_scan_C*.so"))
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


def available() -> bool:
    return load() is not None


def supports(q: torch.Tensor, v: torch.Tensor, chunk_size: int) -> bool:
    """Whether the kernel handles these shapes (dk in {32, 64, 128}, dv a multiple of 32 <= 256)."""
    dk, dv = q.shape[-1], v.shape[-1]
    return dk in KEY_DIMS and dv % 32 == 0 and 32 <= dv <= 256 and 1 <= chunk_size <= MAX_CHUNK


def _in_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.bfloat16 if all(t.dtype == torch.bfloat16 for t in ts) else torch.float32


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def memory_scan_fwd(q, k, v, lr, momentum, decay, W, S, A, chunk_size, offset, save_states, y_fp32=True):
    """Kernel forward; same contract as nestlm.ops.memory_fused.memory_scan_fwd_torch.

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
    """Kernel backward; same contract as nestlm.ops.memory_fused.memory_scan_bwd_torch."""
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
