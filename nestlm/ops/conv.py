"""Depthwise causal 1-D convolution with carried state (the short conv in front of Mamba's scan).

    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (w - 1) + k])

where positions before the start read `initial_states` (zeros when None). Same signature and
semantics as causal_conv1d.causal_conv1d_fn.

State layout: `initial_states` / `final_states` are [b, d, w - 1] and hold the last w - 1 inputs in
time order (oldest first), i.e. the final state is the last w - 1 columns of
cat([initial_states, x], -1), zero-padded on the left when that is shorter than w - 1 (as in the
reference library). Feeding the final state back as `initial_states` continues the sequence exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nestlm.ops import backends
from nestlm.ops._layout import channel_last, is_channel_last

_ACTIVATIONS = (None, "silu", "swish")


def _check(x, weight, bias, initial_states, activation) -> None:
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


def _final_states(xcat: torch.Tensor, w: int) -> torch.Tensor:
    """Last w - 1 columns of xcat, zero-padded on the left: [b, d, w - 1]."""
    return F.pad(xcat, (w - 1 - xcat.shape[-1], 0))


class _ShiftConv(torch.autograd.Function):
    """Depthwise causal conv as `width` shifted multiply-adds, with a hand-written backward.

    xcat: [b, d, l + w - 1] (state columns then inputs); weight: [d, w]; bias: [d] or None.
    Returns the conv output before or after silu [b, d, l].

    Why not F.conv1d: on CPU its depthwise backward runs one tiny convolution per channel and
    takes ~20x the forward; w shifted passes over contiguous rows are memory-bound and cheap.
    """

    @staticmethod
    def forward(ctx, xcat, weight, bias, silu: bool):
        w = weight.shape[1]
        length = xcat.shape[-1] - (w - 1)
        last = xcat[..., w - 1 :]
        if bias is None:
            pre = last * weight[:, w - 1 :]
        else:
            pre = torch.addcmul(bias[:, None], last, weight[:, w - 1 :])
        for k in range(w - 1):
            pre.addcmul_(xcat[..., k : k + length], weight[:, k : k + 1])
        ctx.save_for_backward(xcat, weight, pre if silu else None)
        ctx.has_bias, ctx.silu = bias is not None, silu
        return F.silu(pre) if silu else pre

    @staticmethod
    def backward(ctx, gout):
        xcat, weight, pre = ctx.saved_tensors
        w = weight.shape[1]
        length = gout.shape[-1]
        # elementwise passes over tensors with different strides run ~10x slower on CPU than over
        # matching ones: the gradient is brought to the layout of the saved activations first
        gout = channel_last(gout) if is_channel_last(xcat) else gout.contiguous()
        gpre = torch.ops.aten.silu_backward(gout, pre) if ctx.silu else gout
        d = gpre.shape[1]
        gxcat = torch.empty_like(xcat)
        gxcat[..., : w - 1] = 0
        torch.mul(gpre, weight[:, w - 1 :], out=gxcat[..., w - 1 :])
        gweight = weight.new_empty(w, d)
        for k in range(w):
            if k < w - 1:
                gxcat[..., k : k + length].addcmul_(gpre, weight[:, k : k + 1])
            gweight[k] = (gpre * xcat[..., k : k + length]).sum((0, 2))
        gweight = gweight.t()
        gbias = gpre.sum((0, 2)) if ctx.has_bias else None
        return gxcat, gweight, gbias, None


def _conv_torch(x, weight, bias, initial_states, return_final_states, activation):
    d, w = weight.shape
    state = x.new_zeros(x.shape[0], d, w - 1) if initial_states is None else initial_states.to(x.dtype)
    if is_channel_last(x):
        # x is a [b, l, d] tensor seen as [b, d, l] (a layer's projection output): keep that
        # layout so that every pass below and the layer's consumers run on matching strides
        xcat = torch.cat([state.transpose(1, 2), x.transpose(1, 2)], dim=1).transpose(1, 2)
    else:
        xcat = torch.cat([state, x], dim=-1)
    out = _ShiftConv.apply(xcat, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), activation is not None)
    if not return_final_states:
        return out
    return out, _final_states(xcat, w).to(x.dtype).contiguous()


def _conv_vendor(fn, x, weight, bias, initial_states, return_final_states, activation):
    if initial_states is not None or return_final_states:
        x = channel_last(x)  # the CUDA kernel takes states only with this layout
        if initial_states is not None:
            initial_states = channel_last(initial_states.to(x.dtype))
    return fn(
        x,
        weight,
        bias,
        initial_states=initial_states,
        return_final_states=return_final_states,
        activation=activation,
    )


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
):
    """Depthwise causal conv.

    x: [b, d, l]; weight: [d, w]; bias: [d]; initial_states: [b, d, w - 1]
    returns out [b, d, l] (and final_states [b, d, w - 1] when return_final_states).
    """
    _check(x, weight, bias, initial_states, activation)
    if (
        backends.choose("causal_conv1d", x.device) == "vendor"
        and x.dtype != torch.float64
        and 2 <= weight.shape[1] <= 4
    ):
        return _conv_vendor(
            backends.vendor_fn("causal_conv1d"),
            x,
            weight,
            bias,
            initial_states,
            return_final_states,
            activation,
        )
    return _conv_torch(x, weight, bias, initial_states, return_final_states, activation)


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
):
    """Token loop: keep a window of the last w inputs and take its dot product with the weight."""
    _check(x, weight, bias, initial_states, activation)
    b, d, length = x.shape
    w = weight.shape[1]
    window = x.new_zeros(b, d, w - 1) if initial_states is None else initial_states.to(x.dtype)
    outs = []
    for x_t in x.unbind(-1):
        window = torch.cat([window, x_t[:, :, None]], dim=-1)  # [b, d, w]
        y_t = (window * weight).sum(-1)
        if bias is not None:
            y_t = y_t + bias
        if activation is not None:
            y_t = y_t * torch.sigmoid(y_t)
        outs.append(y_t)
        window = window[:, :, 1:]
    out = torch.stack(outs, dim=-1) if outs else x.new_zeros(b, d, 0)
    if not return_final_states:
        return out
    return out, window
