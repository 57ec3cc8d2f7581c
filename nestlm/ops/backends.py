"""One place that decides which implementation an op runs, and imports optional kernels.

NESTLM_BACKEND=torch forces the PyTorch paths. Choices are logged once at INFO.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os

import torch

log = logging.getLogger(__name__)
_logged: set[tuple[str, str, str]] = set()
# Set while a compiled kernel hands a call it cannot serve back to the PyTorch path.
_torch_only = contextvars.ContextVar("nestlm_torch_only", default=False)


def forced_torch() -> bool:
    return os.environ.get("NESTLM_BACKEND", "").strip().lower() == "torch"


def _log_once(op: str, device: torch.device, choice: str, why: str = "") -> None:
    key = (op, device.type, choice)
    if key not in _logged:
        _logged.add(key)
        log.info("%s on %s: %s%s", op, device.type, choice, f" ({why})" if why else "")


def memory_scan_backend(q: torch.Tensor, v: torch.Tensor, chunk_size: int) -> str:
    """'csrc' (fused CUDA kernel in csrc/) or 'torch' for the linear memory scan on these inputs."""
    if q.device.type != "cuda":
        return "torch"
    if forced_torch():
        _log_once("linear_memory_scan", q.device, "torch", "NESTLM_BACKEND=torch")
        return "torch"
    from nestlm.ops import _csrc

    if not _csrc.supports(q, v, chunk_size):
        _log_once("linear_memory_scan", q.device, "torch", "shape not covered by the csrc kernel")
        return "torch"
    if not _csrc.available():
        _log_once("linear_memory_scan", q.device, "torch", "csrc kernel not built")
        return "torch"
    _log_once("linear_memory_scan", q.device, "csrc")
    return "csrc"


@contextlib.contextmanager
def torch_path():
    """Within this block `kernel()` offers nothing: ops run their PyTorch path."""
    token = _torch_only.set(True)
    try:
        yield
    finally:
        _torch_only.reset(token)


def kernel(op: str, x: torch.Tensor):
    """Our compiled kernel for `op` (e.g. "linear_memory_scan") on x's device, or None.

    None on CPU, under NESTLM_BACKEND=torch, inside `torch_path()`, or when csrc/ is not built. The
    returned callable takes the op's own arguments and itself falls back to the PyTorch path for
    arguments the kernel does not cover.
    """
    if x.device.type != "cuda" or forced_torch() or _torch_only.get():
        return None
    from nestlm.ops import _csrc

    fn = _csrc.KERNELS.get(op)
    if fn is None or not _csrc.available():
        _log_once(op, x.device, "torch", "no csrc kernel built")
        return None
    _log_once(op, x.device, "csrc")
    return fn
