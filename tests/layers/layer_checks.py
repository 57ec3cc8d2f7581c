"""Checks every memory layer's tests make: streaming in pieces, causality and batch independence."""

from __future__ import annotations

import torch


def run_in_pieces(layer, x: torch.Tensor, cuts, state=None) -> tuple[torch.Tensor, dict]:
    """The layer fed x [b, t, d] piece by piece (cuts: consecutive (start, end) pairs), the state
    carried; returns the concatenated outputs [b, t, d] and the state after the last piece."""
    ys = []
    for a, b in cuts:
        y, state = layer(x[:, a:b], state)
        ys.append(y)
    return torch.cat(ys, 1), state


def assert_streaming_equals_one_call(layer, x: torch.Tensor, cuts, tol: float) -> tuple[dict, dict]:
    """The outputs of x [b, t, d] fed in pieces (cuts) equal one call's (norm-relative error <= tol);
    returns the states after the one call and after the pieces, for the caller to compare."""
    with torch.no_grad():
        y, whole = layer(x)
        ys, streamed = run_in_pieces(layer, x, cuts)
    assert (ys - y).norm() / y.norm() <= tol
    return whole, streamed


def assert_causal_and_batch_independent(layer, x: torch.Tensor, row: int, t: int) -> None:
    """Changing token t of batch row `row` of x [b, T, d] changes that row's outputs from t on and
    nothing else: not its earlier outputs, not the other rows."""
    z = x.clone()
    z[row, t] += 1.0
    with torch.no_grad():
        a, b = layer(x)[0], layer(z)[0]
    assert torch.equal(a[row, :t], b[row, :t])
    assert not torch.allclose(a[row, t:], b[row, t:])
    others = [i for i in range(x.shape[0]) if i != row]
    assert torch.equal(a[others], b[others])
