"""Fast-weight update of one Continuum Memory System level (see nestlm.layers.cms).

Per batch row, a level holds fast weights W [n, d] (the level's down projection) that tokens read as

    y_t = u_t W                                           u_t: the level's hidden features [n]

and that are written once every `period` tokens by one step of gradient descent on a local
associative loss, summed over the period and taken at the period-start weights W_p:

    G   = sum_{t in period} lr_t * k_t^T (k_t W_p - v_t)     k_t [n]: key features, v_t [d]: target
    W  <- W_p - G / period                                   at the period's last token

lr_t is the per-token inner step size. Periods are fixed on absolute positions [jC, (j+1)C)
counted from the fresh state. A token reads the weights as of its period start (it never sees its
own period's writes). A period that is cut by the end of a call stays open in the state: G holds
the gradient accumulated so far and `pos` the number of tokens consumed, so feeding a sequence in
pieces equals one call.

`cms_scan` (chunk.py) is the chunked path: one batched computation per period, a Python loop over
periods, and a hand-written backward. `cms_scan_ref` (ref.py) is the plain token loop applying the
same rule, the oracle for tests. Both are differentiable in every input (the inner gradient is
written out, so the outer gradient flows through it: second order).

Arithmetic happens in the dtype of W (keep it fp32 under bf16 autocast, fp64 in tests).
"""

from nestlm.ops.cms.chunk import cms_scan
from nestlm.ops.cms.ref import cms_scan_ref

__all__ = ["cms_scan", "cms_scan_ref"]
