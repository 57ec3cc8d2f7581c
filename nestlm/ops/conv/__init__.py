"""Depthwise causal 1-D convolution with carried state (the short conv in front of Mamba's scan): the
PyTorch path (shift.py, with the public op, which dispatches to causal-conv1d's kernel where it can)
and the token-loop reference (ref.py).

    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (w - 1) + k])

where positions before the start read `initial_states` (zeros when None). Same signature and
semantics as causal_conv1d.causal_conv1d_fn.

State layout: `initial_states` / `final_states` are [b, d, w - 1] and hold the last w - 1 inputs in
time order (oldest first), i.e. the final state is the last w - 1 columns of
cat([initial_states, x], -1), zero-padded on the left when that is shorter than w - 1 (as in the
reference library). Feeding the final state back as `initial_states` continues the sequence exactly.
"""

from nestlm.ops.conv.ref import causal_conv1d_ref
from nestlm.ops.conv.shift import causal_conv1d

__all__ = ["causal_conv1d", "causal_conv1d_ref"]
