"""Memory-layout changes for the CPU paths of the scan ops.

Two facts about CPU PyTorch drive these helpers: an elementwise op over tensors with different
strides runs ~10x slower than over matching ones, and a general permute copy runs ~5x slower
than a 2-D transpose of the same data (torch copies 2-D transposes in cache blocks). So the ops
bring their inputs to one layout up front, and change layouts with 2-D transposes.
"""

from __future__ import annotations

import torch


def is_channel_last(t: torch.Tensor) -> bool:
    """[b, d, l] stored as a contiguous [b, l, d] tensor (its slices t[i] are transposed matrices)."""
    return t.dim() == 3 and t.shape[1] > 1 and t.stride(1) == 1 and t.stride(2) == t.shape[1]


def channel_last(t: torch.Tensor) -> torch.Tensor:
    """t [b, d, l] with the same values, stored as a contiguous [b, l, d] tensor."""
    return t if is_channel_last(t) else t.transpose(1, 2).contiguous().transpose(1, 2)


def dense(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous tensor (a layer's [b, l, d] activation seen as [b, d, l] is transposed
    per batch row)."""
    if t.is_contiguous():
        return t
    if is_channel_last(t):
        rows = [r.contiguous() for r in t.unbind(0)]
        return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)
    return t.contiguous()


def time_major(t: torch.Tensor) -> torch.Tensor:
    """[..., l] -> contiguous [l, ...]."""
    if t.stride(-1) != 1:  # time is not the innermost dimension: moving it keeps rows contiguous
        return t.movedim(-1, 0).contiguous()
    return t.reshape(-1, t.shape[-1]).t().contiguous().view(t.shape[-1], *t.shape[:-1])


def from_time_major(t: torch.Tensor) -> torch.Tensor:
    """[l, ...] -> contiguous [..., l] (the inverse of time_major)."""
    return t.reshape(t.shape[0], -1).t().contiguous().view(*t.shape[1:], t.shape[0])
