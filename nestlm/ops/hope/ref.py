"""Token-loop reference of `dgd_scan`: the specification, fp64-able, one token at a time."""

from __future__ import annotations

import torch
from torch import Tensor

from nestlm.ops.hope.common import (
    AUX_LAYERS,
    aux_grads,
    check,
    expand_gate,
    keys_and_gates,
    layer_lr,
    layers,
    mem_grads,
    mem_read,
    options,
)


def dgd_update(
    W: Tensor,
    S: Tensor | None,
    key: Tensor,
    g: Tensor,
    lr: Tensor,
    log_retain: Tensor,
    log_momentum: Tensor | None,
    rest: Tensor | None,
    update: str = "dgd",
) -> tuple[Tensor, Tensor | None]:
    """One token's update of one layer W [..., r, c] whose inner gradient is g key^T.

    key [..., 1, c] (the layer's input), g [..., 1, r] (the gradient at its output, taken at the
    chunk anchor), lr, log_retain = log(1 - decay), log_momentum [..., 1]; rest: the resting point
    of the decay (None: zero, NL's alpha M; else the learned initial memory W0). With
    retain = 1 - decay, lr_x = layer_lr(lr, key) and u = -lr_x g key^T:

        momentum    S' = momentum S + u, and u is replaced by S'
        dgd         W' = W (retain I - lr_x key key^T) + (1 - retain) rest + u       (NL eq. 88 / 93)
        gd          W' = retain W + (1 - retain) rest + u                           (Titans eqs. 13-14)

    The key key^T term multiplies the running W, token by token, not the anchor.
    """
    lr_x = layer_lr(lr, key, update)[..., None]  # [..., 1, 1]
    retain = log_retain.exp()[..., None]
    u = -lr_x * (g.transpose(-1, -2) @ key)
    if S is not None:
        S = log_momentum.exp()[..., None] * S + u
        u = S
    new = retain * W + u if rest is None else rest + retain * (W - rest) + u
    if update == "dgd":
        new = new - lr_x * ((key @ W.transpose(-1, -2)).transpose(-1, -2) @ key)
    return new, S


def dgd_scan_ref(
    x: Tensor,
    q: Tensor,
    log_momentum: Tensor | None,
    lr_bias: Tensor,
    decay_bias: Tensor,
    init: dict[str, Tensor],
    max_lr: float,
    state: dict,
    chunk_size: int,
    aux_chunk_size: int,
    *,
    memory: str = "mlp",
    update: str = "dgd",
    target: str = "self",
    decay_to: str = "zero",
    normalize_v: bool = False,
    objective: str = "l2",
) -> tuple[Tensor, dict]:
    """Token loop of `dgd_scan` (same arguments and results); rows may be at different positions."""
    options(memory, update, target, decay_to, objective)
    c = check(x, q, log_momentum, lr_bias, decay_bias, init, max_lr, state, chunk_size, aux_chunk_size, memory, update)
    dt = state[f"{layers(memory)[0]}_W"].dtype
    x, q, lr_bias, decay_bias = (a.to(dt) for a in (x, q, lr_bias, decay_bias))
    init = {k: v.to(dt) for k, v in init.items()}
    b, t, h, _ = x.shape
    momentum = log_momentum is not None
    lms = log_momentum.to(dt).unbind(1) if momentum else [None] * t
    st = dict(state)
    outs = []
    # unbind, not indexing: the backward of every index would fill a full-length zero tensor
    for x_i, q_i, lm_i in zip(x.unbind(1), q.unbind(1), lms):
        pos = st["pos"]
        for layer in layers(memory):
            refresh = pos % (aux_chunk_size if layer in AUX_LAYERS[memory] else chunk_size) == 0
            if bool(refresh.all()):  # no copy when every row is at a chunk start (the usual case)
                st[f"{layer}_A"] = st[f"{layer}_W"]
            elif bool(refresh.any()):
                st[f"{layer}_A"] = torch.where(
                    refresh.view(-1, *[1] * (st[f"{layer}_W"].dim() - 1)), st[f"{layer}_W"], st[f"{layer}_A"]
                )
        anchor = {layer: st[f"{layer}_A"] for layer in layers(memory)}
        # k, v [b, h, 1, c]; lr, log_retain [b, h, 1]
        k, v, lr, log_retain = keys_and_gates(anchor, x_i[:, :, None], c, normalize_v, max_lr, lr_bias, decay_bias)
        outs.append(mem_read(anchor, q_i[:, :, None])[0][:, :, 0])
        lm = None if lm_i is None else lm_i[:, :, None]
        for layer, key, g in aux_grads(anchor, k, v, c, objective) + mem_grads(anchor, k, v, target, objective):
            rest = None if decay_to == "zero" else init[layer]
            st[f"{layer}_W"], S = dgd_update(
                st[f"{layer}_W"],
                st.get(f"{layer}_S"),
                key,
                g,
                expand_gate(lr, key),
                expand_gate(log_retain, key),
                None if lm is None else expand_gate(lm, key),
                rest,
                update,
            )
            if momentum:
                st[f"{layer}_S"] = S
        st["pos"] = pos + 1
    o = torch.stack(outs, 1) if outs else x.new_zeros(b, 0, h, c)
    return o, st
