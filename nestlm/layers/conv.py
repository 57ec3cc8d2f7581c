"""ShortConv: causal depthwise convolution over time, with a streaming state.

Each channel is convolved with its own length-w filter over the current and the w-1 previous
inputs. The streaming state is the last w-1 inputs, so a sequence fed in pieces gives the same
outputs as one call. Mamba, Mamba-2 and the memory layers use it in front of their projections.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nestlm import ops

ACTIVATIONS = ("silu", None)


class ShortConv(nn.Module):
    """Causal depthwise conv layer.

    Args:
        d: channels.
        kernel_size: filter length w (the state keeps w-1 inputs).
        activation: "silu" or None, applied after the convolution.
        bias: learn a per-channel bias.

    Parameters use the nn.Conv1d layout (weight [d, 1, w], bias [d]) so that `conv1d.*` entries of
    mamba-ssm / Hugging Face Mamba checkpoints load unchanged.

    forward(x [b, t, d], state=None) -> (y [b, t, d], {"conv": [b, d, w-1]})
    """

    def __init__(
        self, d: int, kernel_size: int = 4, activation: str | None = "silu", bias: bool = True, device=None, dtype=None
    ):
        super().__init__()
        if d < 1:
            raise ValueError(f"ShortConv d={d!r} is invalid: expected a positive int")
        if kernel_size < 1:
            raise ValueError(f"ShortConv kernel_size={kernel_size!r} is invalid: expected a positive int")
        if activation not in ACTIVATIONS:
            raise ValueError(f"ShortConv activation={activation!r} is invalid: expected one of {ACTIVATIONS}")
        self.d = d
        self.kernel_size = kernel_size
        self.activation = activation
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(d, 1, kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(d, **factory)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # nn.Conv1d's default for a depthwise conv: U(-1/sqrt(w), 1/sqrt(w)) for weight and bias.
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict[str, torch.Tensor]:
        """Fresh state: w-1 zero inputs, {"conv": [batch_size, d, w-1]}."""
        dtype = dtype if dtype is not None else self.weight.dtype
        return {"conv": torch.zeros(batch_size, self.d, self.kernel_size - 1, device=device, dtype=dtype)}

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor] | None = None):
        """x [b, t, d] -> (y [b, t, d], state)."""
        if x.dim() != 3 or x.shape[-1] != self.d:
            raise ValueError(f"ShortConv input x has shape {tuple(x.shape)}: expected [batch, time, {self.d}]")
        conv_state = None if state is None else state["conv"]
        y, conv_state = self.conv_channels_first(x.transpose(1, 2), conv_state)
        return y.transpose(1, 2), {"conv": conv_state}

    def conv_channels_first(self, x: torch.Tensor, conv_state: torch.Tensor | None = None):
        """The same convolution on the channels-first layout the scan ops use.

        x [b, d, t], conv_state [b, d, w-1] or None -> (y [b, d, t], new conv_state [b, d, w-1]).
        The returned state keeps the dtype of the given state (x's dtype for a fresh one), so a
        state carried through bf16 autocast does not change type between calls.
        """
        b, d, _ = x.shape
        if d != self.d:
            raise ValueError(f"ShortConv input has {d} channels: expected {self.d}")
        w = self.kernel_size
        if conv_state is None:
            conv_state = x.new_zeros(b, d, w - 1)
        elif conv_state.shape != (b, d, w - 1):
            raise ValueError(f"ShortConv state 'conv' has shape {tuple(conv_state.shape)}: expected {(b, d, w - 1)}")
        weight = self.weight[:, 0, :].to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        y, new_state = ops.causal_conv1d(
            x,
            weight,
            bias,
            initial_states=conv_state.to(x.dtype),
            return_final_states=True,
            activation=self.activation,
        )
        return y, new_state.to(conv_state.dtype)

    def extra_repr(self) -> str:
        return f"d={self.d}, kernel_size={self.kernel_size}, activation={self.activation}, bias={self.bias is not None}"
