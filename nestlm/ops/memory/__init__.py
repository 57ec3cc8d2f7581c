"""Titans neural-memory update: chunk-anchored mini-batch gradient descent with momentum and decay.

Per batch row and head, a memory M_W (weights W) is written by gradient descent on the associative
loss l(W; k, v) = ||M_W(k) - v||^2 (summed over the value dims) while the sequence runs:

    u_t = grad_W l(W_a; k_t, v_t)                   gradient at the chunk's anchor W_a
    S_t = momentum_t * S_{t-1} - lr_t * u_t         momentum ("surprise"), S starts at 0
    W_t = (1 - decay_t) * W_{t-1} + S_t             forget gate, then the step
    y_t = M_{W_a}(q_t)                              boundary read

lr, momentum and decay are per token and head (the papers' symbols: docs/architecture.md).
Chunks are fixed on absolute positions: [jC, (j+1)C) counted from the fresh state. The anchor W_a of
chunk j is the memory at the start of chunk j; every gradient inside the chunk is taken at W_a
(mini-batch GD, as in TTT / Titans section 3.2), and a token reads W_a too, so it never sees its
own chunk's writes. chunk_size=1 is plain online GD with momentum (y_t = M_{W_{t-1}}(q_t)).
The state (W_a, W, S, position) is enough to continue exactly in the middle of a chunk: `offset`
is the number of tokens of the current chunk that earlier calls already consumed, and then the
caller passes that chunk's anchor as `W_anchor`.

Two memories:
  depth 1 (linear):  M_W(x) = W x,                       W [dv, dk]
  depth 2 (MLP):     M_W(x) = x + LN(W2 gelu(W1 x)),     W1 [hidden, dk], W2 [dv, hidden], dv = dk
  LN is a layer norm over dv with a per-head affine (ln_weight, ln_bias) that is an ordinary
  parameter: it is not written by the inner loop. gelu is the exact (erf) GELU.

Outer gradients: the update is a differentiable expression of the anchor, so the outer loss
differentiates through the inner gradients (second order) into W0, q/k/v, the gates and the LN.
`first_order=True` computes the inner gradients u with the anchor detached: u stays differentiable
in k, v, lr (and the LN affine) but no gradient flows through u into the anchor (the memory path
through the decay and momentum terms is kept).

State dtype: all arithmetic happens in the dtype of W (keep it fp32 under bf16 autocast, fp64 in
tests); q, k, v and the gates are cast to it.

The folder: `chunk.py` the chunked PyTorch path (and the public ops, which dispatch), `ref.py` the
token-loop references (the oracle for tests), `csrc.py` the binding of the CUDA kernel of the
linear memory (csrc/), `common.py` the memory functions and argument checks they share.
"""

from nestlm.ops.memory.chunk import linear_memory_scan, mlp_memory_scan
from nestlm.ops.memory.common import mlp_memory_read
from nestlm.ops.memory.ref import linear_memory_scan_ref, mlp_memory_scan_ref

__all__ = [
    "linear_memory_scan",
    "linear_memory_scan_ref",
    "mlp_memory_read",
    "mlp_memory_scan",
    "mlp_memory_scan_ref",
]
