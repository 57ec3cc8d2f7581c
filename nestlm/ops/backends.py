"""One place that decides which implementation an op runs, and imports optional kernels.

NESTLM_BACKEND=torch forces the PyTorch paths. Choices are logged once at INFO.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)
_logged: set[tuple[str, str, str]] = set()


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
