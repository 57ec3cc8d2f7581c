"""The linear main memory of `dgd_scan` on flash-linear-attention's chunked gated delta rule (CUDA).

With retain a = 1 - decay and beta = lr / a, one DGD token of the linear main memory (momentum off,
D = W - rest) is

    D_t = a D_{t-1} (I - beta k k^T) + beta v'_t k^T,    v'_t = -a (e_t + rest k_t)

with e_t the error at the chunk anchor: fla's gated delta rule (S_t = a S_{t-1} (I - beta k k^T) +
beta v k^T, state [K, V] = D^T) with values that stay fixed within a chunk. They depend on the
anchor, so the kernel runs once per chunk, carrying its final state into the next call.
`chunk_gated_delta_rule` takes bf16/fp16 activations (not fp32), so this path trades the PyTorch
path's fp32 activations for the kernel; tests/ops/test_dgd_gpu.py compares the two.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from nestlm.ops.hope.common import mem_grads


def main_phase(
    kernel: Callable,
    D: Tensor,
    A: Tensor,
    rest: Tensor | None,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    log_retain: Tensor,
    sizes: list[int],
    fresh: list[bool],
    target: str,
    objective: str,
) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """Run the main memory over the pieces `sizes` (fresh: whether each starts a chunk).

    D, A [b, h, c, c]: deviation from rest and anchor; k, v [b, h, t, c]; lr (the layer's DGD step),
    log_retain [b, h, t]. Returns (D, A, the anchor of every piece as {"mem": [b, h, c, c]})."""
    anchors = []
    half = torch.bfloat16 if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else torch.float16
    pieces = zip(*(x.split(sizes, 2) for x in (k, v, lr, log_retain)))
    for (k_s, v_s, lr_s, lk_s), fresh_s in zip(pieces, fresh):
        if fresh_s:
            A = D if rest is None else D + rest
        anchors.append({"mem": A})
        ((_, _, e),) = mem_grads({"mem": A}, k_s, v_s, target, objective)
        if rest is not None:
            e = e + k_s @ rest.transpose(-1, -2)
        a = lk_s.exp()
        values = -a[..., None] * e
        # fla layout: [b, t, h, .] activations, [b, h, K, V] state
        k_f, v_f = (x.transpose(1, 2).to(half) for x in (k_s, values))
        _, final = kernel(
            k_f,
            k_f,
            v_f,
            lk_s.transpose(1, 2).float(),
            (lr_s / a).transpose(1, 2).to(half),
            initial_state=D.transpose(-1, -2).float().contiguous(),
            output_final_state=True,
        )
        D = final.transpose(-1, -2).to(D.dtype)
    return D, A, anchors
