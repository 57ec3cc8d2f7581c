"""HOPE mixer: self-modifying Titans (Nested Learning, Behrouz et al. 2025, sections 8.1-8.3).

The keys, values, step sizes and decays of the main memory are not static projections: they are
read from memories M_k, M_v, M_eta, M_alpha that are themselves written in context (each towards
its own value of v, "self-generated targets"), so the layer adapts its own projections and its own
learning rule to the sequence. Only the query is static. In a HybridLM block this mixer is followed
by a CMS channel mixer, which completes the HOPE block.

    x [b, t, d] --W_in--> (x_m, x_q) --causal depthwise conv (4) + SiLU--> x_m, q = l2norm(x_q)
                 \\-----> momentum gate mu = sigmoid(x W_mu)                    (static, per head)
    per head:   k, v, eta, alpha = aux memories at x_m     (nestlm.ops.hope, aux chunk size)
                o = M_mem q, M_mem written with (k, v)       (main chunk size)
    y = W_out(RMSNorm_per_head(o))

Choices (the paper leaves them open):
  - All memories are linear maps per head (the notes' eq. 89 uses 2-layer MLPs). A linear memory
    makes the inner gradient a closed-form outer product, so the four aux memories stack into one
    [2c+2, c] matrix per head and a chunk of updates is one matmul; it also keeps per-sequence
    state at (3c + 2) c numbers per head and memory copy.
  - Update rule: gradient descent with momentum and decay (Titans eqs. 13-14) at the chunk anchor;
    the DGD right-multiplication (alpha I - eta k k^T) is not applied. The decay pulls each memory
    towards its learned initial state rather than towards zero (see nestlm.ops.hope for why).
  - v is L2-normalised like k and q: the aux memories map v back into their own targets, and unit
    v bounds that feedback (W (I + eta (v - k) k^T) has spectral radius <= 1 for unit k, v).
  - The output goes through a per-head RMSNorm, so the scale of the memory does not leak into the
    residual stream.

State (all with the batch first):
    conv          [b, d_conv - 1, 2 h c]  last inputs of the causal conv
    aux_W, aux_A, aux_S  [b, h, 2c + 2, c]  aux memories: current, chunk anchor, momentum
    mem_W, mem_A, mem_S  [b, h, c, c]       main memory: current, chunk anchor, momentum
    pos           int64 [b]               tokens consumed since the fresh state (chunk alignment)
Fresh memories are the learned initial weights (aux_init, mem_init), trained by the outer loop
through the inner updates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nestlm.ops.dtypes import state_dtype
from nestlm.ops.hope import l2norm, selfmod_scan, selfmod_scan_ref


def causal_depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [b, t, C]; weight: [C, w]; prev: [b, w-1, C] earlier inputs. Returns (y [b, t, C], new prev)."""
    w = weight.shape[1]
    xp = torch.cat([prev.to(x.dtype), x], 1)
    t = x.shape[1]
    wt = weight.t().to(x.dtype).contiguous()  # rows contiguous: a strided weight column vectorises poorly
    y = bias.to(x.dtype) + sum(xp[:, j : j + t] * wt[j] for j in range(w))
    return y, xp[:, xp.shape[1] - (w - 1) :]


class HOPE(nn.Module):
    """Self-modifying Titans mixer. x: [b, t, d_model] -> y: [b, t, d_model].

    n_heads x head_dim: memory heads; chunk_size: chunk of the main memory; aux_chunk_size: chunk of
    the memories producing k, v, eta, alpha; max_lr: bound of the inner step eta.

    Stability. A chunk sums up to `chunk_size` steps taken at one anchor (mini-batch GD); without
    momentum, unit keys and max_lr * chunk_size <= 2 make that a contraction. Momentum re-applies
    each step at every later token of the chunk (up to 1 / (1 - mu) times) with no feedback from
    the anchor, and the aux memories' self-generated targets move with the memory, so the decay gate
    is what keeps a long stream bounded. Measured (d_model 32, 2 heads of 16, chunk 16, eta pinned
    at max_lr = 0.1, 20,000 tokens): with 1 - alpha = 0.99 the memories stay within their initial
    scale; with no forgetting they diverged in 4 of 4 seeds (to 10^3-10^4 times it, or NaN).
    `impl="ref"` runs the token-loop reference instead of the chunked path (tests).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        chunk_size: int = 16,
        aux_chunk_size: int = 16,
        max_lr: float = 0.1,
        d_conv: int = 4,
        norm_eps: float = 1e-5,
        init_std: float = 0.02,
        out_std: float | None = None,
        impl: str = "chunked",
    ):
        super().__init__()
        for name, val in (
            ("n_heads", n_heads),
            ("head_dim", head_dim),
            ("chunk_size", chunk_size),
            ("aux_chunk_size", aux_chunk_size),
            ("d_conv", d_conv),
        ):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"HOPE: {name}={val!r} must be a positive int")
        if not max_lr > 0:
            raise ValueError(f"HOPE: max_lr={max_lr!r} must be positive")
        if impl not in ("chunked", "ref"):
            raise ValueError(f"HOPE: impl={impl!r} must be 'chunked' or 'ref'")
        h, c = n_heads, head_dim
        self.n_heads, self.head_dim, self.d_conv = h, c, d_conv
        self.chunk_size, self.aux_chunk_size, self.max_lr, self.norm_eps, self.impl = (
            chunk_size,
            aux_chunk_size,
            max_lr,
            norm_eps,
            impl,
        )
        self.w_in = nn.Linear(d_model, 2 * h * c + h, bias=False)  # memory input, query, momentum gate
        self.conv_weight = nn.Parameter(torch.randn(2 * h * c, d_conv) / d_conv**0.5)
        self.conv_bias = nn.Parameter(torch.zeros(2 * h * c))
        # rows: M_k (c), M_v (c), M_eta (1), M_alpha (1); input: the head's memory input
        self.aux_init = nn.Parameter(torch.cat([torch.randn(h, 2 * c, c) / c**0.5, torch.randn(h, 2, c) * init_std], 1))
        self.mem_init = nn.Parameter(torch.randn(h, c, c) * init_std)
        self.b_eta = nn.Parameter(torch.zeros(h))  # eta starts at max_lr / 2
        self.b_alpha = nn.Parameter(torch.full((h,), -4.0))  # forget ~2% per token at the start
        self.out_norm = nn.Parameter(torch.ones(h * c))
        self.w_out = nn.Linear(h * c, d_model, bias=False)
        nn.init.normal_(self.w_in.weight, std=init_std)
        nn.init.normal_(self.w_out.weight, std=out_std or init_std)

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        dt = state_dtype(dtype)
        h, c = self.n_heads, self.head_dim
        aux = self.aux_init.to(device=device, dtype=dt).expand(batch_size, -1, -1, -1)
        mem = self.mem_init.to(device=device, dtype=dt).expand(batch_size, -1, -1, -1)
        return {
            "conv": torch.zeros(batch_size, self.d_conv - 1, 2 * h * c, device=device, dtype=dt),
            "aux_W": aux,
            "aux_A": aux,
            "aux_S": torch.zeros_like(aux),
            "mem_W": mem,
            "mem_A": mem,
            "mem_S": torch.zeros_like(mem),
            "pos": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        b, t, _ = x.shape
        h, c = self.n_heads, self.head_dim
        if state is None:
            state = self.init_state(b, x.device, x.dtype)
        if "conv" not in state:
            raise ValueError("HOPE: state lacks 'conv' (expected a state made by HOPE.init_state)")
        proj = self.w_in(x)
        u, conv = causal_depthwise_conv(proj[..., : 2 * h * c], self.conv_weight, self.conv_bias, state["conv"])
        u = F.silu(u)
        xh = u[..., : h * c].reshape(b, t, h, c)
        q = l2norm(u[..., h * c :].reshape(b, t, h, c))
        scan = selfmod_scan_ref if self.impl == "ref" else selfmod_scan
        with torch.autocast(x.device.type, enabled=False):
            log_mu = F.logsigmoid(proj[..., 2 * h * c :].to(state["mem_W"].dtype))
            o, new = scan(
                xh,
                q,
                log_mu,
                self.b_eta,
                self.b_alpha,
                self.aux_init,
                self.mem_init,
                self.max_lr,
                state,
                self.chunk_size,
                self.aux_chunk_size,
            )
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        o = o.reshape(b, t, h * c).to(x.dtype) * self.out_norm.to(x.dtype)
        new["conv"] = conv.to(state["conv"].dtype)
        return self.w_out(o), {k: new[k] for k in ("conv", "aux_W", "aux_A", "aux_S", "mem_W", "mem_A", "mem_S", "pos")}
