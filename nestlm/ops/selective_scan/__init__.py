"""Mamba-1 selective scan: the chunked PyTorch path (chunk.py, with the public op, which dispatches to
mamba-ssm's kernel where it can) and the token-loop reference (ref.py).

Per channel d with diagonal state h [n] and real A[d, n] (normally negative):

    delta_t = softplus(delta_t + delta_bias)     (bias / softplus optional)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t
    y_t     = C_t . h_t + D * u_t,  then  y_t *= silu(z_t)   (z optional)

Same signature and semantics as mamba_ssm's selective_scan_fn, plus `initial_state` ([b, d, n],
zeros when None) so a layer can stream. B and C are [b, n, l] (shared by all channels) or grouped
[b, g, n, l] (channel i reads group i // (d // g)). `A` must be real.

Fast path (`_ChunkedScan`): time is cut into chunks. For each chunk the decays exp(delta * A), the
inputs delta * u * B and the read-out C . h are computed as whole-chunk tensor ops; only the
elementwise recurrence h_t = a_t * h_{t-1} + x_t runs step by step, as one fused multiply-add per
step with no autograd graph. Only the state at each chunk start is kept; the backward pass
recomputes a chunk's states from it and runs the adjoint recurrence g_t = C_t gy_t + a_{t+1} g_{t+1}
in reverse, so memory is O(b d n (l / chunk + chunk)) instead of O(b d n l). Decays are exp of
delta * A (never of a positive sum when A <= 0), in fp32 (fp64 for fp64 inputs).

Why not a closed form inside the chunk, as in SSD: Mamba-1's decay differs per (channel, state)
pair, so there is no shared [chunk, chunk] decay matrix to fold into a matmul. The factored form
exp(cs_t) * cumsum(exp(-cs_s) x_s) overflows once a chunk's log decay passes ~-88 (fp32), which
strong channels reach within a few tokens; the stable pairwise form exp(cs_t - cs_s) costs chunk
times the work of the scan. The fused step does one pass over the state per token.
"""

from nestlm.ops.selective_scan.chunk import selective_scan
from nestlm.ops.selective_scan.ref import selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref"]
