"""Backend choice for every nestlm op and layer: the one dispatcher, and the only module that
imports optional CUDA packages.

An op (or a layer calling a kernel, e.g. Attention and flash-attn) asks once per call

    backend = backends.choose(op, device, unsupported=None)    # "csrc" | "vendor" | "torch"
    fn = backends.kernel(op, backend)                           # the kernel, for "csrc" / "vendor"

and runs its PyTorch path for "torch". The choice is, in order of preference:

    "csrc"    our own compiled kernel (csrc/), for CUDA tensors when it is built
    "vendor"  the mamba-ssm / causal-conv1d / flash-attn kernel, for CUDA tensors when it imports
    "torch"   the op's PyTorch path (always available; the only path on CPU)

It is computed once per (op, device type), cached, and logged once at INFO on the "nestlm.ops"
logger. `unsupported` is the caller's reason why no kernel can take *these* inputs (a dtype, a
shape, an option the kernel lacks); the call then runs on "torch" and the reason is logged once.
`NESTLM_BACKEND=torch` forces the PyTorch path everywhere (read on every call). An op without an
entry in KERNELS (e.g. `selfmod_scan`) always gets "torch", so every op can dispatch the same way.
The token-loop references `<op>_ref` are never dispatched to: tests call them directly.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger("nestlm.ops")

BACKENDS = ("csrc", "vendor", "torch")
_ENV = "NESTLM_BACKEND"

# op -> [(backend, "module:attribute")], most preferred first. A vendor attribute is the kernel
# itself; a csrc attribute is a loader returning the kernel, or None when it is not built.
KERNELS: dict[str, list[tuple[str, str]]] = {
    "linear_memory_scan": [("csrc", "nestlm.ops.memory.csrc:kernel")],
    "selective_scan": [("vendor", "mamba_ssm.ops.selective_scan_interface:selective_scan_fn")],
    "ssd_scan": [("vendor", "mamba_ssm.ops.triton.ssd_combined:mamba_chunk_scan_combined")],
    "causal_conv1d": [("vendor", "causal_conv1d:causal_conv1d_fn")],
    "flash_attn": [("vendor", "flash_attn:flash_attn_func")],
    "dgd_scan": [("vendor", "fla.ops.gated_delta_rule:chunk_gated_delta_rule")],  # its linear main memory
}

_loaded: dict[tuple[str, str], Callable | None] = {}  # (op, backend) -> kernel or None
_choice: dict[tuple[str, str], tuple[str, str]] = {}  # (op, device type) -> (backend, why)
_logged: set[tuple[str, str, str, str]] = set()


def _load(backend: str, spec: str) -> Callable | None:
    module, attr = spec.split(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
        return obj() if backend == "csrc" else obj
    except Exception:  # ImportError, or a broken CUDA build raising OSError/RuntimeError on import
        return None


def kernel(op: str, backend: str) -> Callable | None:
    """The `backend` kernel of `op` ("csrc" or "vendor"), imported once; None if unavailable."""
    key = (op, backend)
    if key not in _loaded:
        spec = dict(KERNELS.get(op, [])).get(backend)
        _loaded[key] = None if spec is None else _load(backend, spec)
    return _loaded[key]


def forced() -> str | None:
    """The backend forced through NESTLM_BACKEND, or None. Only "torch" may be forced."""
    value = os.environ.get(_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value != "torch":
        raise ValueError(f"{_ENV}={value!r} is not supported; expected 'torch' or unset")
    return value


def _log_once(op: str, dev_type: str, backend: str, why: str) -> None:
    key = (op, dev_type, backend, why)
    if key not in _logged:
        _logged.add(key)
        log.info("nestlm.ops: %s on %s -> %s (%s)", op, dev_type, backend, why)


def _automatic(op: str, dev_type: str) -> tuple[str, str]:
    if dev_type == "cuda":
        for backend, spec in KERNELS.get(op, []):
            if kernel(op, backend) is not None:
                return backend, spec.replace(":", ".")
        if op in KERNELS:
            return "torch", "PyTorch path; no CUDA kernel importable"
    return "torch", "PyTorch path"


def choose(op: str, device: torch.device | str, unsupported: str | None = None) -> str:
    """The backend that runs `op` on `device`: "csrc", "vendor" or "torch" (see the module doc).

    unsupported: why no kernel can take this call's inputs (None: nothing stands in the way).
    """
    dev_type = torch.device(device).type
    if forced() is not None:
        _log_once(op, dev_type, "torch", f"forced by {_ENV}")
        return "torch"
    key = (op, dev_type)
    if key not in _choice:
        _choice[key] = _automatic(op, dev_type)
    backend, why = _choice[key]
    if backend != "torch" and unsupported is not None:
        backend, why = "torch", unsupported
    _log_once(op, dev_type, backend, why)
    return backend


def reset() -> None:
    """Forget loaded kernels, cached choices and logged lines (tests)."""
    _loaded.clear()
    _choice.clear()
    _logged.clear()


@contextlib.contextmanager
def serial_cpu(device: torch.device, numel: int, limit: int = 1 << 19) -> Iterator[None]:
    """Run the block with one intra-op CPU thread when its tensors hold at most `limit` elements.

    Chunked loops issue thousands of cache-sized ops; waking and joining the thread pool for each
    costs more than it saves, and far more on a loaded machine (a parallel region waits for its
    slowest thread). Bigger tensors keep the configured threads. Only the calling thread's setting
    changes, and it is restored on exit.
    """
    prev = torch.get_num_threads()
    if torch.device(device).type != "cpu" or prev == 1 or numel > limit:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
