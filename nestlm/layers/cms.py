"""Continuum Memory System (CMS): a chain of MLP levels that learn at different timescales.

Nested Learning (Behrouz et al. 2025, section 7.1) replaces the feed-forward block by a chain of
MLPs, h_l = h_{l-1} + MLP_l(h_{l-1}), where level l has its own update period C_l: its weights change
once every C_l tokens from the signal accumulated over that period. A level with period None is an
ordinary MLP that only the outer optimiser trains.

Level l (SwiGLU features u = silu(x W_gate) * (x W_up), fast down projection W [n, d]):

    x_t   = h_{t, l-1}                    (RMS-normalised for l > 0; the block already normalised l = 0)
    y_t   = u(x_t) W_p                    W_p: fast weights as of the start of t's period
    loss  = 1/2 ||u(x_t K) W - x_t V||^2   local associative loss with learned views K, V [d, d]
    lr_t  = lr * sigmoid(x_t w_lr + b_lr) / (||u(x_t K)||^2 + eps)
    W    <- W_p - (1/C) sum_{t in period} lr_t grad_W loss_t(W_p)       at the period's end

Why this objective. The paper's level is trained by the LM-loss gradient; that needs a backward
pass of the whole model inside the forward pass. A local loss keeps the layer self-contained and
exactly streamable. The TTT-style reconstruction with learned views (Sun et al. 2024) lets the outer
loop decide *what* a level memorises: K picks the training view, V the target, and the gradients
through the written-out inner step (second order) train K, V, w_lr and the slow weights. The loss
is taken on the level's own hidden features, so the write and the read use the same feature map.
The step is normalised (normalised-LMS): a token's step along its own feature direction is at most
lr, and the period mean keeps it independent of C, so any lr in (0, 1] is a contraction of the
error on the features written - the fast weights stay bounded over arbitrarily long streams.

Why only the down projection is fast. Per-sequence state for a full level is 3 n d numbers; the
down projection alone is n d (plus an open-period gradient of n d), and it is the part whose
gradient is a closed-form outer product (the loss is linear-least-squares in W), so the chunked
path is a few matmuls per period. Gate / up projections and the views stay slow (shared).

Per-level state (level index l, periods with None are stateless):
    level{l}.W    [b, n, d]  fast weights (fresh: the learned slow W)
    level{l}.G    [b, n, d]  gradient accumulated over the open period
    level{l}.pos  int64 [b]  tokens consumed since the fresh state (period alignment)
Each level is its own component for reset policies (see nestlm.models.state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nestlm.layers.mlp import swiglu_hidden
from nestlm.layers.norm import RMSNorm
from nestlm.ops.cms import cms_scan
from nestlm.ops.dtypes import state_dtype


class CMSLevel(nn.Module):
    """One level: x [b, t, d] -> MLP output [b, t, d]; fast down projection when `period` is set."""

    def __init__(
        self,
        d_model: int,
        hidden: int,
        period: int | None,
        lr: float,
        norm: bool,
        norm_eps: float,
        init_std: float,
        out_std: float,
        eps: float = 1e-3,
    ):
        super().__init__()
        self.period, self.lr, self.eps = period, lr, eps
        self.norm = RMSNorm(d_model, norm_eps) if norm else nn.Identity()
        self.w_gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_down = nn.Parameter(torch.randn(hidden, d_model) * out_std)  # [n, d]: y = u @ W
        nn.init.normal_(self.w_gate_up.weight, std=init_std)
        if period is not None:
            self.w_key = nn.Linear(d_model, d_model, bias=False)
            self.w_value = nn.Linear(d_model, d_model, bias=False)
            self.w_lr = nn.Linear(d_model, 1)
            nn.init.eye_(self.w_key.weight)  # start by training on the read view itself
            nn.init.normal_(self.w_value.weight, std=init_std)
            nn.init.zeros_(self.w_lr.weight)
            nn.init.zeros_(self.w_lr.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return F.silu(gate) * up

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        if self.period is None:
            return {}
        dt = state_dtype(dtype)
        W = self.w_down.to(device=device, dtype=dt).expand(batch_size, -1, -1)
        return {"W": W, "G": torch.zeros_like(W), "pos": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def forward(self, x: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        x = self.norm(x)
        u = self.features(x)
        if self.period is None:
            return u @ self.w_down.to(u.dtype), {}
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        k = self.features(self.w_key(x))
        v = self.w_value(x)
        with torch.autocast(x.device.type, enabled=False):
            kf = k.to(state["W"].dtype)
            lr_t = self.lr * torch.sigmoid(self.w_lr(x).squeeze(-1).to(kf.dtype)) / (kf.pow(2).sum(-1) + self.eps)
            y, W, G, pos = cms_scan(u, kf, v, lr_t, state["W"], state["G"], state["pos"], self.period)
        return y.to(x.dtype), {"W": W, "G": G, "pos": pos}


class CMS(nn.Module):
    """Continuum Memory System channel mixer. x: [b, t, d_model] -> y: [b, t, d_model].

    periods: one entry per level, in chain order; None = an ordinary (slow-only) MLP level.
    hidden: SwiGLU width of every level (default: `swiglu_hidden(d_model, ratio)`, as the MLP).
    lr: maximal inner step (0 < lr <= 1, see module docstring).
    y = h_L - x with h_0 = x, h_l = h_{l-1} + level_l(h_{l-1}) (returned as the sum of the level
    outputs), so the surrounding block adds the residual exactly once.
    """

    def __init__(
        self,
        d_model: int,
        periods=(None, 16, 64),
        hidden: int | None = None,
        lr: float = 0.01,
        ratio: float = 8 / 3,
        norm_eps: float = 1e-5,
        init_std: float = 0.02,
        out_std: float | None = None,
    ):
        super().__init__()
        periods = tuple(periods)
        if not periods:
            raise ValueError("CMS: periods must name at least one level")
        for p in periods:
            if p is not None and (not isinstance(p, int) or isinstance(p, bool) or p < 1):
                raise ValueError(f"CMS: periods={periods!r} must hold positive ints or None")
        if not (0 < lr <= 1):
            raise ValueError(f"CMS: lr={lr!r} must be in (0, 1]")
        hidden = hidden or swiglu_hidden(d_model, ratio)
        self.periods = periods
        self.levels = nn.ModuleList(
            CMSLevel(
                d_model, hidden, p, lr, norm=i > 0, norm_eps=norm_eps, init_std=init_std, out_std=out_std or init_std
            )
            for i, p in enumerate(periods)
        )

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        out = {}
        for i, lvl in enumerate(self.levels):
            out.update({f"level{i}.{k}": v for k, v in lvl.init_state(batch_size, device, dtype).items()})
        return out

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        h, total, new = x, 0, {}
        for i, lvl in enumerate(self.levels):
            s = None
            if state is not None and lvl.period is not None:
                missing = [f"level{i}.{k}" for k in ("W", "G", "pos") if f"level{i}.{k}" not in state]
                if missing:
                    raise ValueError(
                        f"CMS: state lacks {missing} (expected the state of a CMS with periods={self.periods})"
                    )
                s = {k: state[f"level{i}.{k}"] for k in ("W", "G", "pos")}
            y, s = lvl(h, s)
            h, total = h + y, total + y
            new.update({f"level{i}.{k}": v for k, v in s.items()})
        return total, new
