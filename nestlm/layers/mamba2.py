"""Mamba2: the Mamba-2 block built on state-space duality (SSD; Dao & Gu, 2024), streaming.

    z, xBC, dt = in_proj(u)                      # gate, conv branch, one step size per head
    x, B, C    = silu(causal_conv(xBC))          # ShortConv over x, B and C together
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T    # per head: scalar decay, state [headdim, d_state]
    y_t = h_t C_t + D x_t                        # ssd_scan, chunked (matmuls within a chunk)
    out = out_proj(rmsnorm(y * silu(z)))         # gated RMSNorm, one normalisation group per B/C group

Parameter names, shapes and initialisation follow mamba-ssm's `Mamba2` (and Hugging Face's
`Mamba2Mixer`), so their checkpoints load into this module with `load_state_dict`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nestlm import ops
from nestlm.layers.conv import ShortConv
from nestlm.layers.mamba import init_dt_bias
from nestlm.ops.dtypes import state_dtype


class GatedRMSNorm(nn.Module):
    """norm(x * silu(z)) * weight, with the RMS taken over groups of `group_size` channels.

    Normalising per group keeps each B/C group (a tensor-parallel shard in mamba-ssm) independent.
    Computed in fp32 (fp64 for fp64 inputs). x, z [..., d] -> [..., d].
    """

    def __init__(self, d: int, group_size: int | None = None, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        group_size = d if group_size is None else group_size
        if group_size < 1 or d % group_size:
            raise ValueError(f"GatedRMSNorm group_size={group_size!r} is invalid: expected a divisor of d={d}")
        self.d = d
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(state_dtype(dtype))
        if z is not None:
            x = x * F.silu(z.to(x.dtype))
        xg = x.unflatten(-1, (self.d // self.group_size, self.group_size))
        xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xg.flatten(-2) * self.weight.to(x.dtype)).to(dtype)

    def extra_repr(self) -> str:
        return f"d={self.d}, group_size={self.group_size}, eps={self.eps}"


class Mamba2(nn.Module):
    """Mamba-2 block.

    Args (mamba-ssm names): d_model, d_state (n), d_conv (w), expand (d_inner = expand * d_model),
    headdim (p; nheads h = d_inner / p), ngroups (g B/C groups, h % g == 0), chunk_size (of the SSD
    scan; does not change results), A_init_range (A = -U(A_init_range) per head), dt_min / dt_max /
    dt_init_floor (range of initial step sizes), norm_eps, conv_bias, bias (of in_proj / out_proj).

    forward(x [b, t, d_model], state=None) -> (y [b, t, d_model], state)
    state: {"conv": [b, d_inner + 2 g n, d_conv-1], "ssm": [b, h, p, n] (fp32)}
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 64,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        norm_eps: float = 1e-5,
        conv_bias: bool = True,
        bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        sizes = {
            "d_model": d_model,
            "d_state": d_state,
            "d_conv": d_conv,
            "expand": expand,
            "headdim": headdim,
            "ngroups": ngroups,
            "chunk_size": chunk_size,
        }
        for name, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Mamba2 {name}={value!r} is invalid: expected a positive int")
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"Mamba2 headdim={headdim!r} is invalid: expected a divisor of expand*d_model={d_inner}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"Mamba2 ngroups={ngroups!r} is invalid: expected a divisor of nheads={nheads}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"Mamba2 A_init_range={A_init_range!r} is invalid: expected 0 < lo <= hi")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba2 dt_min={dt_min!r}, dt_max={dt_max!r} are invalid: expected 0 < dt_min <= dt_max")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = d_inner
        self.headdim = headdim
        self.nheads = nheads
        self.ngroups = ngroups
        self.chunk_size = chunk_size
        self.conv_dim = d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + nheads, bias=bias, **factory)
        self.conv1d = ShortConv(self.conv_dim, d_conv, activation="silu", bias=conv_bias, **factory)
        self.dt_bias = nn.Parameter(torch.empty(nheads, **factory))
        self.A_log = nn.Parameter(torch.empty(nheads, **factory))
        self.D = nn.Parameter(torch.empty(nheads, **factory))
        self.norm = GatedRMSNorm(d_inner, group_size=d_inner // ngroups, eps=norm_eps, **factory)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias, **factory)

        self._init_ranges = (A_init_range, dt_min, dt_max, dt_init_floor)
        for p in (self.A_log, self.D, self.dt_bias):
            p._no_weight_decay = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        (a_lo, a_hi), dt_min, dt_max, dt_init_floor = self._init_ranges
        self.dt_bias.copy_(init_dt_bias(self.nheads, dt_min, dt_max, dt_init_floor))
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(a_lo, a_hi)))
        self.D.fill_(1.0)

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict[str, torch.Tensor]:
        """Fresh state: zero conv window and zero SSM state (fp32, or fp64 for an fp64 dtype)."""
        dtype = dtype if dtype is not None else self.in_proj.weight.dtype
        device = device if device is not None else self.in_proj.weight.device
        return {
            "conv": torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            "ssm": torch.zeros(
                batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=state_dtype(dtype)
            ),
        }

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor] | None = None):
        """x [b, t, d_model] -> (y [b, t, d_model], state)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2 input x has shape {tuple(x.shape)}: expected [batch, time, {self.d_model}]")
        b, t, _ = x.shape
        # A fresh state goes to the scan as None: the CUDA kernels take that fast path.
        fresh = state is None
        if fresh:
            state = self.init_state(b, x.device, x.dtype)
        ssm_state = state["ssm"]
        expected = (b, self.nheads, self.headdim, self.d_state)
        if ssm_state.shape != expected:
            raise ValueError(f"Mamba2 state 'ssm' has shape {tuple(ssm_state.shape)}: expected {expected}")

        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xbc, conv_state = self.conv1d.conv_channels_first(xbc.transpose(1, 2), state["conv"])
        xs, B, C = xbc.transpose(1, 2).split(
            [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1
        )
        sd = state_dtype(self.A_log.dtype)
        A = -torch.exp(self.A_log.to(sd))
        y, last_ssm = ops.ssd_scan(
            xs.unflatten(-1, (self.nheads, self.headdim)),
            dt,
            A,
            B.unflatten(-1, (self.ngroups, self.d_state)),
            C.unflatten(-1, (self.ngroups, self.d_state)),
            self.chunk_size,
            D=self.D.to(sd),
            dt_bias=self.dt_bias.to(sd),
            initial_states=None if fresh else ssm_state,
            dt_softplus=True,
            return_final_states=True,
        )
        y = self.norm(y.flatten(-2).to(x.dtype), z)
        return self.out_proj(y), {"conv": conv_state, "ssm": last_ssm.to(ssm_state.dtype)}

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, nheads={self.nheads}, "
            f"headdim={self.headdim}, d_state={self.d_state}, ngroups={self.ngroups}, "
            f"chunk_size={self.chunk_size}"
        )
