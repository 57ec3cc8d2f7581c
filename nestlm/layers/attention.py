"""Causal multi-head attention with GQA and RoPE; full or sliding-window, with a streaming KV state.

Full attention (`window=None`) keeps every past key/value: its state grows with the sequence.
Sliding-window attention (`window=W`) lets a query at position i see keys at positions (i-W, i]; its
state is a fixed-size buffer of the last W-1 keys/values, so memory does not grow with the sequence.

Kernels: flash-attn's causal / sliding-window kernel for a fresh segment (no cached keys) of fp16 /
bf16 CUDA tensors when the package imports (the training case), else PyTorch SDPA with an explicit
mask. NESTLM_BACKEND=torch forces SDPA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nestlm.ops import backends


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """RoPE tables for absolute positions pos [b, t] -> cos, sin [b, t, 1, head_dim/2].

    Angles are formed in fp64: at position ~1e5 an fp32 angle is off by ~1e-2 rad.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float64) / head_dim)
    ang = pos.to(torch.float64)[..., None] * inv_freq
    return ang.cos().to(dtype)[:, :, None, :], ang.sin().to(dtype)[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the last dim. x: [b, t, h, dh]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Causal self-attention. x: [b, t, d_model] -> y: [b, t, d_model].

    State: {"k", "v": [b, P, n_kv_heads, head_dim], "pos": int64 [b]} with P = tokens so far (full)
    or P = window - 1 (sliding window; slots before the first token are masked out).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        window: int | None = None,
        rope_theta: float = 10000.0,
        init_std: float = 0.02,
        out_std: float | None = None,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        if n_heads % self.n_kv_heads:
            raise ValueError(f"Attention: n_kv_heads={self.n_kv_heads} must divide n_heads={n_heads}")
        if window is not None and window < 1:
            raise ValueError(f"Attention: window={window} must be a positive int or None")
        self.head_dim = d_model // n_heads
        self.window = window
        self.rope_theta = rope_theta
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(d_model, 2 * self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        for lin in (self.wq, self.wkv):
            nn.init.normal_(lin.weight, std=init_std)
        nn.init.normal_(self.wo.weight, std=out_std or init_std)

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        p = 0 if self.window is None else self.window - 1
        kv = torch.zeros(batch_size, p, self.n_kv_heads, self.head_dim, device=device, dtype=dtype)
        return {"k": kv, "v": kv.clone(), "pos": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        b, t, _ = x.shape
        no_past = state is None  # no key before this segment (a sliding window's buffer is all padding)
        if state is None:
            state = self.init_state(b, x.device, x.dtype)
        pos0 = state["pos"]  # [b]
        pos = pos0[:, None] + torch.arange(t, device=x.device)  # [b, t]
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)
        k, v = self.wkv(x).view(b, t, 2, self.n_kv_heads, self.head_dim).unbind(2)
        cos, sin = rope_cos_sin(pos, self.head_dim, self.rope_theta, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        k_all = torch.cat([state["k"].to(k.dtype), k], dim=1)  # [b, P+t, hkv, dh]
        v_all = torch.cat([state["v"].to(v.dtype), v], dim=1)
        p = state["k"].shape[1]
        fresh = p == 0
        if fresh and self.window is None:
            mask, causal = None, True
        else:
            # key j sits at absolute position pos0 - p + j; keep it if it exists, is not in the future and is
            # inside the window
            kpos = pos0[:, None] - p + torch.arange(p + t, device=x.device)  # [b, P+t]
            rel = pos[:, :, None] - kpos[:, None, :]  # [b, t, P+t]
            mask = (rel >= 0) & (kpos[:, None, :] >= 0)
            if self.window is not None:
                mask = mask & (rel < self.window)
            mask, causal = mask[:, None], False  # broadcast over heads
        scale = 1.0 / math.sqrt(self.head_dim)
        unsupported = None if no_past or fresh else "keys cached from earlier calls"
        if x.dtype not in (torch.float16, torch.bfloat16):
            unsupported = "not fp16 / bf16"
        if backends.choose("flash_attn", x.device, unsupported) == "vendor":
            # keys (i - window, i] for query i: flash-attn's window_size counts keys to the left
            window = (-1, -1) if self.window is None else (self.window - 1, 0)
            flash = backends.kernel("flash_attn", "vendor")
            y = flash(q, k, v, causal=True, window_size=window, softmax_scale=scale)
        else:
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k_all.transpose(1, 2),
                v_all.transpose(1, 2),
                attn_mask=mask,
                is_causal=causal,
                enable_gqa=self.n_kv_heads != self.n_heads,
                scale=scale,
            ).transpose(1, 2)
        y = self.wo(y.reshape(b, t, self.n_heads * self.head_dim))

        if self.window is None:
            new_k, new_v = k_all, v_all
        else:
            keep = self.window - 1
            new_k, new_v = k_all[:, k_all.shape[1] - keep :], v_all[:, v_all.shape[1] - keep :]
        return y, {"k": new_k, "v": new_v, "pos": pos0 + t}
