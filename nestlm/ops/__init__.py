"""Numerics with no nn.Module: scans, convolutions and memory updates, one folder per op.

Each folder holds the op's one chunked PyTorch path with the public op (`chunk.py`; `shift.py` for
the conv), its one token-loop reference `<op>_ref` (`ref.py`), the kernel binding where nestlm has
its own (`memory/csrc.py`), and what those share (`common.py`). Signatures and semantics follow
mamba-ssm / causal-conv1d so either can be swapped in:

    selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, initial_state=None)
    ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
             dt_softplus=False, return_final_states=False)
    causal_conv1d(x, weight, bias=None, initial_states=None, return_final_states=False,
                  activation=None)

The backend (own kernel, vendor CUDA kernel or PyTorch) is chosen by `nestlm.ops.backends.choose`;
the recurrent-state precision by `nestlm.ops.dtypes.state_dtype`; chunks are cut at absolute
positions by `nestlm.ops._chunks.chunk_pieces`.
"""

from nestlm.ops.cms import cms_scan, cms_scan_ref
from nestlm.ops.conv import causal_conv1d, causal_conv1d_ref
from nestlm.ops.hope import dgd_scan, dgd_scan_ref, selfmod_scan, selfmod_scan_ref
from nestlm.ops.memory import linear_memory_scan, linear_memory_scan_ref, mlp_memory_scan, mlp_memory_scan_ref
from nestlm.ops.selective_scan import selective_scan, selective_scan_ref
from nestlm.ops.ssd import ssd_scan, ssd_scan_ref

__all__ = [
    "causal_conv1d",
    "causal_conv1d_ref",
    "cms_scan",
    "cms_scan_ref",
    "dgd_scan",
    "dgd_scan_ref",
    "linear_memory_scan",
    "linear_memory_scan_ref",
    "mlp_memory_scan",
    "mlp_memory_scan_ref",
    "selective_scan",
    "selective_scan_ref",
    "selfmod_scan",
    "selfmod_scan_ref",
    "ssd_scan",
    "ssd_scan_ref",
]
