"""SwiGLU feed-forward channel mixer (Shazeer 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden(d_model: int, ratio: float, multiple: int = 64) -> int:
    """Hidden width ratio * d_model rounded up to a multiple (matmul-friendly)."""
    h = int(ratio * d_model)
    return multiple * ((h + multiple - 1) // multiple)


class MLP(nn.Module):
    """y = W_down(silu(W_gate x) * W_up x). Stateless; follows the layer protocol.

    x: [b, t, d] -> y: [b, t, d]
    """

    def __init__(
        self,
        d_model: int,
        hidden: int | None = None,
        ratio: float = 8 / 3,
        init_std: float = 0.02,
        out_std: float | None = None,
    ):
        super().__init__()
        hidden = hidden or swiglu_hidden(d_model, ratio)
        self.w_gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)
        nn.init.normal_(self.w_gate_up.weight, std=init_std)
        nn.init.normal_(self.w_down.weight, std=out_std or init_std)

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up), {}

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        return {}
