"""Mamba-2 state-space duality (SSD) scan: the chunked algorithm (chunk.py, with the public op, which
dispatches to mamba-ssm's kernel where it can) and the token-loop reference (ref.py).

Per head h with scalar decay A[h] < 0 and state S [p, n]:

    dt_t = softplus(dt_t + dt_bias)          (bias / softplus optional)
    S_t  = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T
    y_t  = S_t C_t + D * x_t,  then  y_t *= silu(z_t)   (z optional)

Same signature and semantics as mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined.
B and C are shared by the heads of a group: head i reads group i // (nheads // ngroups).

The chunked algorithm splits time into chunks of `chunk_size` tokens (on CPU at most
CPU_MAX_CHUNK, see there):
  1. inside a chunk, outputs are a masked "attention" (C B^T) * L with L[t, s] = exp(sum_{s<r<=t} dt_r A)
     built from within-chunk cumulative log decays (exp of non-positive numbers only);
  2. each chunk's own contribution to the state at its end, in one matmul;
  3. a short loop over chunks carries the state (decay of a whole chunk = exp of its log-decay sum);
  4. the carried-in state's contribution to every position of the chunk, in one matmul.
"""

from nestlm.ops.ssd.chunk import ssd_scan
from nestlm.ops.ssd.ref import ssd_scan_ref

__all__ = ["ssd_scan", "ssd_scan_ref"]
