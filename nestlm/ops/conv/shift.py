"""The PyTorch path of the causal conv (w shifted multiply-adds with a hand-written backward), and the op."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nestlm.ops import backends
from nestlm.ops._layout import channel_last, is_channel_last
from nestlm.ops.conv.common import check


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


def _conv_vendor(x, weight, bias, initial_states, return_final_states, activation):
    if initial_states is not None or return_final_states:
        x = channel_last(x)  # the CUDA kernel takes states only with this layout
        if initial_states is not None:
            initial_states = channel_last(initial_states.to(x.dtype))
    kw = dict(initial_states=initial_states, return_final_states=return_final_states, activation=activation)
    return backends.kernel("causal_conv1d", "vendor")(x, weight, bias, **kw)


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
    On CUDA causal-conv1d's kernel runs when it imports (nestlm.ops.backends).
    """
    check(x, weight, bias, initial_states, activation)
    unsupported = "fp64 inputs" if x.dtype == torch.float64 else None
    unsupported = f"width {weight.shape[1]} (the kernel takes 2 to 4)" if not 2 <= weight.shape[1] <= 4 else unsupported
    args = (x, weight, bias, initial_states, return_final_states, activation)
    if backends.choose("causal_conv1d", x.device, unsupported) == "vendor":
        return _conv_vendor(*args)
    return _conv_torch(*args)
