"""Backend selection for nestlm ops: the only module that imports optional CUDA packages.

Each op asks `choose(op, device)` which implementation to run. The answer is computed once per
(op, device type), logged once at INFO on the "nestlm.ops" logger, and cached:

    "csrc"    our own compiled kernel, when one is registered for the op (see `register_csrc`)
    "vendor"  the mamba-ssm / causal-conv1d kernel, for CUDA tensors when the package imports
    "torch"   the chunked PyTorch path (always available; the only path on CPU)

`NESTLM_BACKEND=torch` forces the PyTorch path everywhere. Other ops (memory updates, ...) reuse
`choose`, `register_csrc`, `vendor_fn`, `forced_torch` and `log_once` with their own op names;
`memory_scan_backend` is the shape-aware choice for the linear memory scan's csrc kernel.
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


def _try_import(module: str, attr: str) -> Callable | None:
    """Import `module.attr`, or return None when the package (or its compiled part) is missing."""
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception:  # ImportError, or a broken CUDA build raising OSError/RuntimeError on import
        return None


# op name -> (module, attribute) of the vendor kernel; imported lazily, once.
_VENDOR = {
    "selective_scan": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
    "ssd_scan": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
    "causal_conv1d": ("causal_conv1d", "causal_conv1d_fn"),
    "flash_attn": ("flash_attn", "flash_attn_func"),
    "fla_chunk_gla": ("fla.ops.gla", "chunk_gla"),
}
_vendor_cache: dict[str, Callable | None] = {}
_csrc: dict[str, Callable] = {}
_choice: dict[tuple[str, str, str | None], str] = {}


def vendor_fn(op: str) -> Callable | None:
    """The vendor kernel for `op` (e.g. mamba-ssm's selective_scan_fn), or None if not importable."""
    if op not in _vendor_cache:
        spec = _VENDOR.get(op)
        _vendor_cache[op] = _try_import(*spec) if spec is not None else None
    return _vendor_cache[op]


def register_csrc(op: str, fn: Callable) -> None:
    """Register our own compiled kernel for `op` (used for CUDA tensors); clears cached choices."""
    _csrc[op] = fn
    for key in [k for k in _choice if k[0] == op]:
        del _choice[key]


def csrc_fn(op: str) -> Callable | None:
    return _csrc.get(op)


def forced_torch() -> bool:
    """True when NESTLM_BACKEND=torch forces the PyTorch paths."""
    return forced() == "torch"


def forced() -> str | None:
    """The backend forced through NESTLM_BACKEND, or None. Only "torch" may be forced."""
    value = os.environ.get(_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value != "torch":
        raise ValueError(f"{_ENV}={value!r} is not supported; expected 'torch' or unset")
    return value


def choose(op: str, device: torch.device | str) -> str:
    """Pick the backend for `op` on `device` ("csrc", "vendor" or "torch"); cached and logged once.

    NESTLM_BACKEND is read on every call, so setting it takes effect at once; the automatic choice
    is made once per (op, device type).
    """
    dev_type = torch.device(device).type
    force = forced()
    key = (op, dev_type, force)
    if key in _choice:
        return _choice[key]
    if force is not None:
        choice, why = force, f"forced by {_ENV}"
    elif dev_type == "cuda" and csrc_fn(op) is not None:
        choice, why = "csrc", "nestlm compiled kernel"
    elif dev_type == "cuda" and vendor_fn(op) is not None:
        spec = _VENDOR[op]
        choice, why = "vendor", f"{spec[0]}.{spec[1]}"
    else:
        choice = "torch"
        why = "chunked PyTorch path" + ("" if dev_type != "cuda" else "; no CUDA kernel importable")
    _choice[key] = choice
    log.info("nestlm.ops: %s on %s -> %s (%s)", op, dev_type, choice, why)
    return choice


def reset() -> None:
    """Forget cached choices and logged lines (tests)."""
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


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: recurrent state and decays never run in half precision."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


_logged: set[tuple[str, str, str]] = set()


def log_once(op: str, device: torch.device, choice: str, why: str = "") -> None:
    """Log an (op, device type, choice) decision at INFO the first time it is made."""
    key = (op, torch.device(device).type, choice)
    if key not in _logged:
        _logged.add(key)
        log.info("nestlm.ops: %s on %s -> %s%s", op, key[1], choice, f" ({why})" if why else "")


def memory_scan_backend(q: torch.Tensor, v: torch.Tensor, chunk_size: int) -> str:
    """'csrc' (fused CUDA kernel in csrc/) or 'torch' for the linear memory scan on these inputs."""
    if q.device.type != "cuda":
        return "torch"
    if forced_torch():
        log_once("linear_memory_scan", q.device, "torch", "NESTLM_BACKEND=torch")
        return "torch"
    from nestlm.ops import _csrc

    if not _csrc.supports(q, v, chunk_size):
        log_once("linear_memory_scan", q.device, "torch", "shape not covered by the csrc kernel")
        return "torch"
    if not _csrc.available():
        log_once("linear_memory_scan", q.device, "torch", "csrc kernel not built")
        return "torch"
    log_once("linear_memory_scan", q.device, "csrc")
    return "csrc"
