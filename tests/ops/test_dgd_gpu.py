"""On CUDA with flash-linear-attention: dgd_scan's linear main memory on fla's chunk_gated_delta_rule
against the PyTorch path (skipped without a GPU or fla)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from nestlm.ops import backends, dgd_scan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs flash-linear-attention"),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / (b.norm() + 1e-300))


@pytest.mark.parametrize("target,decay_to", [("self", "zero"), ("value", "init")])
def test_fla_path_matches_torch_path(monkeypatch, target, decay_to):
    from tests.ops.test_dgd import make

    args, state = make("linear", False, b=2, t=203, h=4, c=64, seed=0, dtype=torch.float32, grad=True)
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    args[5] = {k: v.detach().cuda().requires_grad_() for k, v in args[5].items()}
    for a in args[:5]:
        a.retain_grad()
    state = {k: v.detach().cuda() for k, v in state.items()}
    x, q, lm, lrb, db, init = args
    kw = dict(memory="linear", target=target, decay_to=decay_to)
    results = []
    for forced in ("", "torch"):
        monkeypatch.setenv("NESTLM_BACKEND", forced)
        backends.reset()
        o, s = dgd_scan(x, q, lm, lrb, db, init, 0.1, state, 16, 16, **kw)
        g = torch.autograd.grad(o.square().sum() + s["mem_W"].square().sum(), [x, q, *init.values()])
        results.append((o, s, g))
    assert backends.choose("dgd_scan", "cuda") == "torch"  # the last run forced the PyTorch path
    (o1, s1, g1), (o2, s2, g2) = results
    assert rel(o1, o2) <= 2e-2
    for k in s2:
        assert rel(s1[k], s2[k]) <= 2e-2, k
    for a, b in zip(g1, g2):
        assert rel(a, b) <= 5e-2
