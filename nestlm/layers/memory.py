"""NeuralMemory: the Titans long-term memory as a sequence mixer.

Per head h a small memory M (depth 1: a linear map; depth 2: x + LN(W2 gelu(W1 x)), hidden =
expansion * head_dim) is trained while the sequence runs, by chunk-anchored mini-batch gradient
descent with momentum and a forget gate on ||M(k_t) - v_t||^2 (see nestlm.ops.memory):

    q, k, v    = SiLU(ShortConv(Linear(x)))            per head; q and k L2-normalised
    lr_t       = max_lr * sigmoid(x w_lr + b)          inner learning rate, per token and head
    momentum_t = sigmoid(x w_momentum + b)             momentum
    decay_t    = sigmoid(x w_decay + b)                forget gate
    o_t        = M_{W_a}(q_t)                          boundary read: the memory at the start of
                                                       t's chunk (absolute chunks [jC, (j+1)C))
    y_t        = o_proj(concat_h o_t * sigmoid(x W_g)) (the gate is optional)

The initial memory W0 is a learned parameter per head (its momentum starts at 0), and the outer
loss differentiates through the inner updates into W0, the projections and the gates (second order;
first_order=True detaches the anchor inside the inner gradients, see nestlm.ops.memory).

State (flat, batch first, fp32 or fp64 whatever the activations' dtype):
    "W.i", "S.i", "W_anchor.i"   memory weight i, its momentum, and the current chunk's anchor
                                 (depth 1: i = 0 [b, h, d, d]; depth 2: i = 0 W1 [b, h, hid, d],
                                 i = 1 W2 [b, h, d, hid])
    "pos"                        int64 [b], tokens consumed since the fresh state
    "conv"                       [b, 3 * h * d, conv_size - 1], the short conv's input history
Because the anchor and position are carried, a sequence fed in pieces split anywhere (inside a
chunk too) gives the same outputs as one call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nestlm.layers.conv import ShortConv
from nestlm.ops.dtypes import state_dtype
from nestlm.ops.memory import linear_memory_scan, mlp_memory_scan


class NeuralMemory(nn.Module):
    """Titans neural memory mixer.

    Args:
        d_model: model width.
        n_heads, head_dim: memory heads and their key/value size (dk = dv = head_dim).
        depth: 1 (linear memory) or 2 (residual MLP memory).
        chunk_size: C, tokens that share one gradient anchor.
        max_lr: upper bound of the inner learning rate lr_t.
        expansion: hidden size of the depth-2 memory, in multiples of head_dim.
        conv_size: short causal conv width in front of q, k, v.
        first_order: cut the second-order path through the inner gradients (faster backward).
        gate: multiply the read by a sigmoid gate computed from x before o_proj.
        max_grad_norm: clip each token's inner gradient to this Frobenius norm (per head) before
            it enters the momentum; None (default) applies the plain rule. The linear memory needs
            it at large max_lr: with well-aligned keys the C gradients taken at one anchor act like
            one step with C times the curvature, and momentum on top diverges (depth 1 at
            max_lr=0.1, C=16 does at init); the LN inside the depth-2 memory bounds its steps.
    forward(x [b, t, d_model], state=None) -> (y [b, t, d_model], state)
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        depth: int = 2,
        chunk_size: int = 16,
        max_lr: float = 0.1,
        expansion: int = 2,
        conv_size: int = 4,
        first_order: bool = False,
        gate: bool = True,
        max_grad_norm: float | None = None,
        ln_eps: float = 1e-5,
    ):
        super().__init__()
        for name, val in (
            ("d_model", d_model),
            ("n_heads", n_heads),
            ("head_dim", head_dim),
            ("chunk_size", chunk_size),
            ("expansion", expansion),
            ("conv_size", conv_size),
        ):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"NeuralMemory {name}={val!r} is invalid: expected a positive int")
        if depth not in (1, 2):
            raise ValueError(f"NeuralMemory depth={depth!r} is invalid: expected 1 or 2")
        if not max_lr > 0:
            raise ValueError(f"NeuralMemory max_lr={max_lr!r} is invalid: expected a positive float")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.depth, self.chunk_size, self.max_lr = depth, chunk_size, float(max_lr)
        self.hidden = expansion * head_dim
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(
                f"NeuralMemory max_grad_norm={max_grad_norm!r} is invalid: expected a positive float or None"
            )
        self.first_order, self.max_grad_norm, self.ln_eps = first_order, max_grad_norm, ln_eps
        inner = n_heads * head_dim

        self.qkv_proj = nn.Linear(d_model, 3 * inner, bias=False)
        self.conv = ShortConv(3 * inner, kernel_size=conv_size, activation="silu")
        self.gate_proj = nn.Linear(d_model, 3 * n_heads)  # lr, momentum, decay logits per head
        if depth == 1:
            self.W0 = nn.ParameterList([nn.Parameter(torch.empty(n_heads, head_dim, head_dim))])
        else:
            self.W0 = nn.ParameterList(
                [
                    nn.Parameter(torch.empty(n_heads, self.hidden, head_dim)),
                    nn.Parameter(torch.empty(n_heads, head_dim, self.hidden)),
                ]
            )
            self.ln_weight = nn.Parameter(torch.ones(n_heads, head_dim))
            self.ln_bias = nn.Parameter(torch.zeros(n_heads, head_dim))
        self.out_gate = nn.Linear(d_model, inner) if gate else None
        self.o_proj = nn.Linear(inner, d_model, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w in self.W0:
            nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[-1]))
        # start with lr = max_lr / 2, momentum ~ 0.9 and decay ~ 0.01: a memory that keeps most of
        # its content over a few hundred tokens
        nn.init.normal_(self.gate_proj.weight, std=0.02)
        bias = self.gate_proj.bias.view(3, self.n_heads)
        bias[0].fill_(0.0)
        bias[1].fill_(math.log(0.9 / 0.1))
        bias[2].fill_(math.log(0.01 / 0.99))
        if self.depth == 2:
            self.ln_weight.fill_(1.0)
            self.ln_bias.zero_()
        for p in self._no_weight_decay_params():
            p._no_weight_decay = True

    def _no_weight_decay_params(self):
        yield from self.W0
        yield self.gate_proj.bias
        if self.depth == 2:
            yield self.ln_weight
            yield self.ln_bias

    # --- state --------------------------------------------------------------------------------
    def _weight_names(self) -> list[str]:
        return [str(i) for i in range(len(self.W0))]

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict[str, torch.Tensor]:
        """Fresh state: W = W_anchor = W0 (learned, differentiable), S = 0, pos = 0, empty conv history."""
        sdt = state_dtype(dtype)
        device = device if device is not None else self.W0[0].device
        state = {}
        for i, w in zip(self._weight_names(), self.W0):
            w = w.to(device=device, dtype=sdt).unsqueeze(0).expand(batch_size, *w.shape)
            state[f"W.{i}"] = w
            state[f"W_anchor.{i}"] = w
            state[f"S.{i}"] = torch.zeros_like(w)
        state["pos"] = torch.zeros(batch_size, dtype=torch.int64, device=device)
        state["conv"] = self.conv.init_state(batch_size, device=device, dtype=sdt)["conv"]
        return state

    def _check_state(self, state: dict[str, torch.Tensor], b: int) -> None:
        expected = {f"{p}.{i}" for p in ("W", "S", "W_anchor") for i in self._weight_names()} | {
            "pos",
            "conv",
        }
        if set(state) != expected:
            raise ValueError(f"NeuralMemory state has keys {sorted(state)}: expected {sorted(expected)}")
        for name, t in state.items():
            if t.shape[0] != b:
                raise ValueError(f"NeuralMemory state '{name}' has batch {t.shape[0]}: expected {b} like x")

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor] | None = None):
        """x [b, t, d_model] -> (y [b, t, d_model], state)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"NeuralMemory input x has shape {tuple(x.shape)}: expected [batch, time, {self.d_model}]")
        b, t, _ = x.shape
        h, d = self.n_heads, self.head_dim
        if state is None:
            state = self.init_state(b, x.device, x.dtype)
        self._check_state(state, b)
        pos = state["pos"]
        if b > 1 and bool((pos != pos[0]).any()):
            raise ValueError("NeuralMemory state 'pos' differs across the batch: expected rows advanced together")
        offset = int(pos[0]) % self.chunk_size

        qkv, conv_state = self.conv(self.qkv_proj(x), {"conv": state["conv"]})
        q, k, v = qkv.view(b, t, 3, h, d).unbind(2)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        gates = torch.sigmoid(self.gate_proj(x).to(state_dtype(x.dtype))).view(b, t, 3, h)
        lr, momentum, decay = gates.unbind(2)
        lr = lr * self.max_lr

        names = self._weight_names()
        W = tuple(state[f"W.{i}"] for i in names)
        S = tuple(state[f"S.{i}"] for i in names)
        Wa = tuple(state[f"W_anchor.{i}"] for i in names)
        inputs = (q, k, v, lr, momentum, decay)
        opts = dict(chunk_size=self.chunk_size, offset=offset, first_order=self.first_order)
        opts["max_grad_norm"] = self.max_grad_norm
        if self.depth == 1:
            o, (W, S, Wa) = linear_memory_scan(*inputs, W[0], S[0], Wa[0], **opts)
            W, S, Wa = (W,), (S,), (Wa,)
        else:
            o, (W, S, Wa) = mlp_memory_scan(*inputs, W, S, Wa, self.ln_weight, self.ln_bias, eps=self.ln_eps, **opts)
        o = o.to(x.dtype).reshape(b, t, h * d)
        if self.out_gate is not None:
            o = o * torch.sigmoid(self.out_gate(x))
        y = self.o_proj(o)

        new_state = {"pos": pos + t, "conv": conv_state["conv"]}
        for i, w, s, a in zip(names, W, S, Wa):
            new_state[f"W.{i}"], new_state[f"S.{i}"], new_state[f"W_anchor.{i}"] = w, s, a
        return y, new_state

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}, depth={self.depth}, "
            f"chunk_size={self.chunk_size}, max_lr={self.max_lr}, hidden={self.hidden}, "
            f"first_order={self.first_order}"
        )
