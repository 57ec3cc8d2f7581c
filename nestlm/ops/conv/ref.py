"""Token-loop reference of the causal conv (fp64-able)."""

from __future__ import annotations

import torch

from nestlm.ops.conv.common import check


def causal_conv1d_ref(x, weight, bias=None, initial_states=None, return_final_states=False, activation=None):
    """Token-loop reference of `causal_conv1d` (same arguments and results): keep a window of the last
    w inputs and take its dot product with the weight."""
    check(x, weight, bias, initial_states, activation)
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
