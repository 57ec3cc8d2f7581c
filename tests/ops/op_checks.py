"""Checks of an op's fast path against its token-loop reference (fp64 inputs of order 1)."""

from __future__ import annotations

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max-norm relative error of a against the reference b."""
    # the floor keeps a structurally zero reference (e.g. dA when no state reaches A) from turning
    # an fp64 rounding residue into a huge relative error; inputs here are O(1)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def assert_grads_match(inp: dict[str, torch.Tensor], outs: tuple, refs: tuple, tol: float) -> None:
    """The gradients with respect to every input of `inp` of one random projection of the outputs
    `outs` and of the reference outputs `refs` agree to `tol` (rel)."""
    cots = [torch.randn_like(o) for o in outs]
    leaves = list(inp.values())
    g1 = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cots)), leaves)
    g2 = torch.autograd.grad(sum((r * c).sum() for r, c in zip(refs, cots)), leaves)
    for name, a, r in zip(inp, g1, g2):
        assert rel(a, r) < tol, f"grad of {name}: rel err {rel(a, r)}"
