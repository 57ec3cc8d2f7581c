"""Argument checks shared by `causal_conv1d` and `causal_conv1d_ref`."""

from __future__ import annotations

_ACTIVATIONS = (None, "silu", "swish")


def check(x, weight, bias, initial_states, activation) -> None:
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be [batch, dim, seqlen], got shape {tuple(x.shape)}")
    d = x.shape[1]
    if weight.dim() != 2 or weight.shape[0] != d or weight.shape[1] < 1:
        raise ValueError(f"causal_conv1d: weight must be [dim={d}, width>=1], got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"causal_conv1d: bias must be [dim={d}], got shape {tuple(bias.shape)}")
    w = weight.shape[1]
    if initial_states is not None and tuple(initial_states.shape) != (x.shape[0], d, w - 1):
        raise ValueError(
            f"causal_conv1d: initial_states must be [batch={x.shape[0]}, dim={d}, width-1={w - 1}], "
            f"got shape {tuple(initial_states.shape)}"
        )
    if activation not in _ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be one of None, 'silu', 'swish'; got {activation!r}")
