"""Mamba: the Mamba-1 selective state-space block (Gu & Dao, 2023), streaming.

    x, z  = in_proj(u)                          # two branches of width d_inner = expand * d_model
    x     = silu(causal_conv(x))                # ShortConv, state = last d_conv-1 inputs
    dt, B, C = x_proj(x)                        # input-dependent step (low rank), input and output maps
    dt    = softplus(dt_proj(dt))
    h_t   = exp(dt_t A) h_{t-1} + dt_t B_t x_t  # per channel, d_state diagonal SSM (selective scan)
    y     = (C_t h_t + D x_t) * silu(z_t)
    out   = out_proj(y)

Parameter names, shapes and initialisation follow mamba-ssm's `Mamba` (and Hugging Face's
`MambaMixer`), so their checkpoints load into this module with `load_state_dict`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nestlm import ops
from nestlm.layers.conv import ShortConv
from nestlm.ops.dtypes import state_dtype


def init_dt_bias(n: int, dt_min: float, dt_max: float, dt_init_floor: float) -> torch.Tensor:
    """A bias b with softplus(b) log-uniform in [dt_min, dt_max], so the initial step sizes span
    that range of time scales (inverse softplus: b = dt + log(1 - exp(-dt)))."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba(nn.Module):
    """Mamba-1 block.

    Args (mamba-ssm names): d_model, d_state (n), d_conv (w), expand (d_inner = expand * d_model),
    dt_rank ("auto" = ceil(d_model / 16)), dt_min / dt_max / dt_init_floor (range of initial step
    sizes), dt_scale / dt_init ("random" or "constant", init of dt_proj.weight), conv_bias, bias
    (of in_proj / out_proj).

    forward(x [b, t, d_model], state=None) -> (y [b, t, d_model], state)
    state: {"conv": [b, d_inner, d_conv-1], "ssm": [b, d_inner, d_state] (fp32)}
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        sizes = {"d_model": d_model, "d_state": d_state, "d_conv": d_conv, "expand": expand}
        for name, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Mamba {name}={value!r} is invalid: expected a positive int")
        if dt_rank != "auto" and (not isinstance(dt_rank, int) or dt_rank < 1):
            raise ValueError(f"Mamba dt_rank={dt_rank!r} is invalid: expected 'auto' or a positive int")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba dt_min={dt_min!r}, dt_max={dt_max!r} are invalid: expected 0 < dt_min <= dt_max")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"Mamba dt_init={dt_init!r} is invalid: expected 'random' or 'constant'")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = ShortConv(self.d_inner, d_conv, activation="silu", bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state, **factory))
        self.D = nn.Parameter(torch.empty(self.d_inner, **factory))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

        self._dt_init = (dt_init, dt_scale, dt_min, dt_max, dt_init_floor)
        for p in (self.A_log, self.D, self.dt_proj.bias):
            p._no_weight_decay = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        dt_init, dt_scale, dt_min, dt_max, dt_init_floor = self._dt_init
        std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        self.dt_proj.bias.copy_(init_dt_bias(self.d_inner, dt_min, dt_max, dt_init_floor))
        # S4D-real: A[:, i] = -(i + 1) for every channel.
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32).expand(self.d_inner, -1)
        self.A_log.copy_(torch.log(a))
        self.D.fill_(1.0)

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict[str, torch.Tensor]:
        """Fresh state: zero conv window and zero SSM state (fp32, or fp64 for an fp64 dtype)."""
        dtype = dtype if dtype is not None else self.in_proj.weight.dtype
        device = device if device is not None else self.in_proj.weight.device
        return {
            "conv": torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            "ssm": torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=state_dtype(dtype)),
        }

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor] | None = None):
        """x [b, t, d_model] -> (y [b, t, d_model], state)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Mamba input x has shape {tuple(x.shape)}: expected [batch, time, {self.d_model}]")
        b = x.shape[0]
        # A fresh state goes to the scan as None: the CUDA kernels take that fast path.
        fresh = state is None
        if fresh:
            state = self.init_state(b, x.device, x.dtype)
        ssm_state = state["ssm"]
        expected = (b, self.d_inner, self.d_state)
        if ssm_state.shape != expected:
            raise ValueError(f"Mamba state 'ssm' has shape {tuple(ssm_state.shape)}: expected {expected}")

        xs, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # [b, d_inner, t] each
        xs, conv_state = self.conv1d.conv_channels_first(xs, state["conv"])
        dt, B, C = self.x_proj(xs.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt_proj without its bias: the scan adds the bias in fp32 before the softplus.
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # [b, d_inner, t]
        sd = state_dtype(self.A_log.dtype)
        A = -torch.exp(self.A_log.to(sd))
        y, last_ssm = ops.selective_scan(
            xs,
            dt,
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=self.D.to(sd),
            z=z,
            delta_bias=self.dt_proj.bias.to(sd),
            delta_softplus=True,
            return_last_state=True,
            initial_state=None if fresh else ssm_state,
        )
        y = self.out_proj(y.transpose(1, 2).to(x.dtype))
        return y, {"conv": conv_state, "ssm": last_ssm.to(ssm_state.dtype)}

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, "
            f"d_conv={self.d_conv}, dt_rank={self.dt_rank}"
        )
