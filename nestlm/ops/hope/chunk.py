"""Chunked `dgd_scan`: every chunk's updates of a layer in closed form (the UT transform).

One layer W [r, c] over a segment of s tokens (a chunk, or the part of one inside a call), with
keys k_j [c], output gradients e_j [r] fixed at the chunk anchor, step sizes lr_j, retentions
a_j = 1 - decay_j and momenta m_j; D = W - rest (rest = 0, or W0 for decay_to="init"):

    S_j = m_j S_{j-1} - lr_j e_j k_j^T                       (momentum; without it S_j = -lr_j e_j k_j^T)
    D_j = a_j D_{j-1} - lr_j y_j k_j^T + S_j,   y_j = W_{j-1} k_j = (D_{j-1} + rest) k_j     (dgd)

The delta term makes y_j depend on the earlier y_l through k_l^T k_j. With the log-space cumulative
sums G_j = sum_{i<=j} log a_i and M_j = sum_{i<=j} log m_i (G_0 = M_0 = 0), the factors
g(j, i) = exp(G_j - G_i) and m(j, i) = exp(M_j - M_i) (i <= j, so never above 1), and with
Gm[j, i] = g(j-1, i) for i < j and C = Gm @ Mu, Mu[i', i] = m(i', i) (i' >= i, the identity
without momentum), the y_j solve one unit lower-triangular system per segment:

    (I + L) Y = K rest^T + diag(g(j-1, 0)) K D_s^T + diag(bS) K S_s^T - (C * K K^T) diag(lr) E
    L = (Gm * K K^T) diag(lr),   bS_j = sum_{i<j} g(j-1, i) exp(M_i)

and the segment end is

    D_n = g(n, 0) D_s + b_n S_s + E^T diag(wE) K - Y^T diag(lr g(n, .)) K
    S_n = exp(M_n) S_s - E^T diag(lr m(n, .)) K
    wE_i = -lr_i sum_{j>=i} g(n, j) m(j, i),   b_n = sum_j g(n, j) exp(M_j).

T = (I + L)^-1 (torch.linalg.solve_triangular) depends on the keys and gates only, so the whole
update folds into D_n = D_s A_D + S_s A_S + rest A_R + E^T F with [c, c] transitions A_* and F
[s, c] that need no state: for a layer whose keys are known before the loop (the main memory's
input layer, keyed by k) they are built for every chunk in one batch, and the loop applies them
with one matmul per chunk, cat(D_s, S_s, E^T) @ [A_D; A_S; F]. Without the delta term
(update="gd") A_D and A_S are scalars. Autograd runs through the solve, so the outer gradient
includes the inner updates' second-order terms.

The aux memories produce the keys, so their chunks run one after another (each chunk's keys are read
at its anchor); the main memory's reads all use anchors and run in one batched read after its loop.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from nestlm.ops import backends
from nestlm.ops._chunks import chunk_pieces
from nestlm.ops.hope import fla
from nestlm.ops.hope.common import (
    AUX_LAYERS,
    MEM_LAYERS,
    aux_grads,
    check,
    expand_gate,
    keys_and_gates,
    layer_lr,
    layers,
    mem_grads,
    mem_read,
    options,
    piece_groups,
)

# (B, cD, cS_D, FS, cS, const): the segment end is D_n = cat(D_s, S_s, E^T) @ B + const for dgd, where
# B stacks [A_D; A_S; F] ([2c + s, c], [c + s, c] without momentum), and cD D_s + cS_D S_s + E^T B
# (B = F, cD and cS_D scalars) for gd; S_n = cS S_s + E^T FS. Unused entries are None.
Transition = tuple


@functools.lru_cache(maxsize=64)
def _masks(s: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """[s, s] masks of i < j (strictly lower) and i <= j, built once per segment length."""
    lower = torch.ones(s, s, dtype=torch.bool, device=device).tril()
    return lower.tril(-1), lower


@functools.lru_cache(maxsize=64)
def _eye(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.eye(n, dtype=dtype, device=device)


def _gate_coeffs(log_retain: Tensor, log_momentum: Tensor | None, delta: bool) -> dict[str, Tensor]:
    """What a segment's closed form needs from the gates alone (log_retain, log_momentum [..., s]):
    shared by every layer the gates drive, whatever its keys and step sizes."""
    s = log_retain.shape[-1]
    strict, lower = _masks(s, log_retain.device)
    G = log_retain.cumsum(-1)
    co = {"g_end": torch.exp(G[..., -1:] - G), "a_end": torch.exp(G[..., -1:])[..., None]}  # g(n, j), g(n, 0)
    if log_momentum is not None:
        Mc = log_momentum.cumsum(-1)
        Mu = torch.exp((Mc[..., :, None] - Mc[..., None, :]).masked_fill(~lower, float("-inf")))  # m(j, i)
        m_acc = torch.exp(Mc)
        co.update(
            gMu=(co["g_end"][..., None, :] @ Mu)[..., 0, :],  # sum_j g(n, j) m(j, i)
            b_end=(co["g_end"] * m_acc).sum(-1, keepdim=True)[..., None],
            m_end=torch.exp(Mc[..., -1:] - Mc),
            cS=m_acc[..., -1:, None],
        )
    else:
        co["gMu"] = co["g_end"]
    if delta:
        G_prev = G - log_retain
        Gm = torch.exp((G_prev[..., :, None] - G[..., None, :]).masked_fill(~strict, float("-inf")))  # g(j-1, i)
        co.update(Gm=Gm, C=Gm @ Mu if log_momentum is not None else Gm, g_prev=torch.exp(G_prev))
        if log_momentum is not None:
            co["bS"] = (Gm * m_acc[..., None, :]).sum(-1)
    return co


def _transition(K: Tensor, lr: Tensor, co: dict[str, Tensor], delta: bool, rest: Tensor | None) -> Transition:
    """The segment's closed-form update (module docstring). K [..., s, c]; lr [..., s]; co: the
    `_gate_coeffs` of the segment (broadcastable); rest broadcastable to [..., r, c] or None."""
    s, c = K.shape[-2:]
    momentum = "m_end" in co
    wE = -lr * co["gMu"]
    FS = (-lr * co["m_end"])[..., None] * K if momentum else None
    if not delta:
        return wE[..., None] * K, co["a_end"], co.get("b_end"), FS, co.get("cS"), None
    KK = K @ K.transpose(-1, -2)
    eye_s = _eye(s, K.dtype, K.device)
    KKlr = KK * lr[..., None, :]
    T = torch.linalg.solve_triangular(co["Gm"] * KKlr + eye_s, eye_s.expand(KK.shape), upper=False, unitriangular=True)
    WYK = (-lr * co["g_end"])[..., None] * K  # the weights of the y_l in D_n, times k_l
    # every product with T and with WYK in one matmul each: columns for A_D, A_S, A_R and F
    cols = [co["g_prev"][..., None] * K]
    if momentum:
        cols.append(co["bS"][..., None] * K)
    if rest is not None:
        cols.append(K)
    cols.append(co["C"] * KKlr)
    cols = [x.expand(KK.shape[:-2] + x.shape[-2:]) for x in cols]
    parts = list(((T @ torch.cat(cols, -1)).transpose(-1, -2) @ WYK).split([c] * (len(cols) - 1) + [s], -2))
    eye_c = _eye(c, K.dtype, K.device)
    blocks = [co["a_end"] * eye_c + parts.pop(0)]
    if momentum:
        blocks.append(co["b_end"] * eye_c + parts.pop(0))
    const = None if rest is None else rest @ parts.pop(0)
    blocks.append(wE[..., None] * K - parts.pop(0))
    return torch.cat(blocks, -2), None, None, FS, co.get("cS"), const


def _apply(D: Tensor, S: Tensor | None, E: Tensor, tr: Transition, delta: bool) -> tuple[Tensor, Tensor | None]:
    """A segment's end state from its start D, S [..., r, c] and errors E [..., s, r]."""
    B, cD, cSD, FS, cS, const = tr
    Et = E.transpose(-1, -2)
    if delta:
        new = torch.cat([D, Et] if S is None else [D, S, Et], -1) @ B
        if const is not None:
            new = new + const
    else:
        new = torch.addcmul(Et @ B, cD, D)
        if S is not None:
            new = torch.addcmul(new, cSD, S)
    if S is not None:
        S = torch.addcmul(Et @ FS, cS, S)
    return new, S


def _unbind(tr: Transition, dim: int) -> list[Transition]:
    parts = [x.unbind(dim) if x is not None else None for x in tr]
    n = len(next(p for p in parts if p is not None))
    return [tuple(p[i] if p is not None else None for p in parts) for i in range(n)]


def _batched_transitions(
    sizes: list[int], C: int, K: Tensor, lr: Tensor, log_retain: Tensor, log_momentum: Tensor | None, delta, rest
) -> list[Transition]:
    """`_transition` of every piece of a segment cut by `chunk_pieces` (inputs [b, h, t, ...]): the
    whole chunks in one batched call, a leading or trailing partial piece on its own."""
    out: list[Transition] = []
    groups = piece_groups(sizes, C)
    lms = log_momentum.split(groups, 2) if log_momentum is not None else [None] * len(groups)
    for g, k, lr_g, lk, lm in zip(groups, K.split(groups, 2), lr.split(groups, 2), log_retain.split(groups, 2), lms):
        if sizes[len(out)] == C:  # the whole chunks: [b, h, n, C, ...]
            n = g // C
            k, lr_g, lk, lm = (x.unflatten(2, (n, C)) if x is not None else None for x in (k, lr_g, lk, lm))
            co = _gate_coeffs(lk, lm, delta)
            out += _unbind(_transition(k, lr_g, co, delta, None if rest is None else rest[:, None]), 2)
        else:
            out.append(_transition(k, lr_g, _gate_coeffs(lk, lm, delta), delta, rest))
    return out


def _read_pieces(anchors: list[dict[str, Tensor]], q: Tensor, sizes: list[int], C: int) -> Tensor:
    """Every piece's read (the main memory's anchor at q_t), whole chunks in one batched read.

    anchors: one {layer: [b, h, ...]} per piece; q: [b, h, t, c] -> [b, h, t, c]."""
    outs, i = [], 0
    groups = piece_groups(sizes, C)
    for g, q_g in zip(groups, q.split(groups, 2)):
        if sizes[i] == C:
            n = g // C
            M = {layer: torch.stack([a[layer] for a in anchors[i : i + n]], 2) for layer in anchors[i]}
            outs.append(mem_read(M, q_g.unflatten(2, (n, C)))[0].flatten(2, 3))
            i += n
        else:
            outs.append(mem_read(anchors[i], q_g)[0])
            i += 1
    return torch.cat(outs, 2)


def dgd_scan(
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
    """Self-referential Titans with Delta Gradient Descent (Nested Learning, Behrouz et al. 2025,
    eqs. 86-93), chunked.

    x [b, t, h, c]: memory inputs; q [b, t, h, c]: queries (normalised by the caller);
    log_momentum [b, t, h]: log of the momentum gate, or None (no momentum, no S in the state);
    lr_bias, decay_bias [h]: static biases of the step size and the decay; init: learned initial
    memories by layer (common.init_shapes), also the resting point for decay_to="init";
    max_lr: bound of the step size (< 1 for dgd); state: dict with common.state_keys (all rows at
    the same position); chunk_size: chunk of the main memory; aux_chunk_size: chunk of M_k, M_v,
    M_lr, M_decay.

    Per token t, with every memory at the anchor of its chunk (the memory at the chunk's start):
        k, v = l2norm(M_k(x_t)), M_v(x_t) (l2norm'ed when normalize_v); lr, decay from M_lr, M_decay
        o_t = M_mem(q_t)
        every memory M is written by `update` on L(M; k_t, target): target = M(v_t) for the aux
        memories and, with target="self", for the main memory (v_t with target="value").
    Returns (o [b, t, h, c], new state); streaming at any split equals one call.
    """
    options(memory, update, target, decay_to, objective)
    c = check(x, q, log_momentum, lr_bias, decay_bias, init, max_lr, state, chunk_size, aux_chunk_size, memory, update)
    b, t, h, _ = x.shape
    pos = state["pos"]
    p0 = int(pos[0]) if b else 0
    if b and not bool((pos == p0).all()):
        raise ValueError("dgd_scan: state['pos'] must be equal across the batch")
    dt = state[f"{layers(memory)[0]}_W"].dtype
    x, q, lr_bias, decay_bias = (a.to(dt) for a in (x, q, lr_bias, decay_bias))
    init = {k: v.to(dt) for k, v in init.items()}
    momentum = log_momentum is not None
    delta = update == "dgd"
    # head-major inside ([b, h, t, .]): reads are single matmuls, gates run along the last dim
    x, q = (a.transpose(1, 2).contiguous() for a in (x, q))
    lmu = log_momentum.to(dt).transpose(1, 2).contiguous() if momentum else None
    rest = {layer: (init[layer] if decay_to == "init" else None) for layer in layers(memory)}
    D = {layer: state[f"{layer}_W"] - (0 if rest[layer] is None else rest[layer]) for layer in layers(memory)}
    S = {layer: state.get(f"{layer}_S") for layer in layers(memory)}
    A = {layer: state[f"{layer}_A"] for layer in layers(memory)}

    def anchor(layer: str) -> Tensor:
        return D[layer] if rest[layer] is None else D[layer] + rest[layer]

    def step(layer: str, key: Tensor, g: Tensor, lr: Tensor, co: dict | None, tr=None):
        """One segment of `layer`'s updates: lr [b, h, s] and the gate coefficients co are the head's,
        broadcast here to the layer's key [b, h, ..., s, c]."""
        if tr is None:
            extra = key.dim() - 1 - lr.dim()
            co = {n: x.reshape(x.shape[:2] + (1,) * extra + x.shape[2:]) for n, x in co.items()} if extra else co
            tr = _transition(key, layer_lr(expand_gate(lr, key), key, update), co, delta, rest[layer])
        D[layer], S[layer] = _apply(D[layer], S[layer], g, tr, delta)

    # aux phase: each chunk's keys, values and gates are read at its anchor, so chunks run in order
    outs = []
    sizes, fresh = chunk_pieces(p0, t, aux_chunk_size)
    lms = lmu.split(sizes, 2) if momentum else [None] * len(sizes)
    for x_s, lm_s, fresh_s in zip(x.split(sizes, 2), lms, fresh):
        if fresh_s:
            A.update({layer: anchor(layer) for layer in AUX_LAYERS[memory]})
        k, v, lr, log_retain = keys_and_gates(A, x_s, c, normalize_v, max_lr, lr_bias, decay_bias)
        co = _gate_coeffs(log_retain, lm_s, delta)
        for layer, key, g in aux_grads(A, k, v, c, objective):
            step(layer, key, g, lr, co)
        outs.append((k, v, lr, log_retain))
    if not t:
        return q.new_zeros(b, 0, h, c), _new_state(state, memory, momentum, D, S, A, rest, pos)
    k, v, lr, log_retain = (torch.cat(z, 2) for z in zip(*outs))

    # main phase: the input layer's keys (k) and every gate are known, so its transitions for all
    # chunks are built in one batch; the output layer of an MLP memory is keyed by its hidden
    # activation at the anchor, so its transitions are built chunk by chunk
    first = MEM_LAYERS[memory][0]
    sizes, fresh = chunk_pieces(p0, t, chunk_size)
    lr_k = layer_lr(lr, k, update)
    if _main_backend(x, memory, momentum, delta) == "vendor":
        D["mem"], A["mem"], anchors = fla.main_phase(
            backends.kernel("dgd_scan", "vendor"),
            D["mem"],
            A["mem"],
            rest["mem"],
            k,
            v,
            lr_k,
            log_retain,
            sizes,
            fresh,
            target,
            objective,
        )
    else:
        trs = _batched_transitions(sizes, chunk_size, k, lr_k, log_retain, lmu, delta, rest[first])
        anchors = []
        lms = lmu.split(sizes, 2) if momentum else [None] * len(sizes)
        pieces = zip(k.split(sizes, 2), v.split(sizes, 2), lr.split(sizes, 2), log_retain.split(sizes, 2), lms)
        for (k_s, v_s, lr_s, lk_s, lm_s), tr, fresh_s in zip(pieces, trs, fresh):
            if fresh_s:
                A.update({layer: anchor(layer) for layer in MEM_LAYERS[memory]})
            M = {layer: A[layer] for layer in MEM_LAYERS[memory]}
            anchors.append(M)
            grads = mem_grads(M, k_s, v_s, target, objective)
            co = _gate_coeffs(lk_s, lm_s, delta) if len(grads) > 1 else None  # the MLP's output layer
            for layer, key, g in grads:
                step(layer, key, g, lr_s, co, tr if layer == first else None)
    o = _read_pieces(anchors, q, sizes, chunk_size)
    return o.transpose(1, 2).contiguous(), _new_state(state, memory, momentum, D, S, A, rest, pos + t)


def _main_backend(x: Tensor, memory: str, momentum: bool, delta: bool) -> str:
    """The main memory's backend: "vendor" (fla's gated delta rule, for a linear memory written by
    DGD without momentum, on CUDA, in fp32 or lower) or "torch"."""
    why = None
    if x.dtype == torch.float64:
        why = "fp64 inputs"
    elif memory != "linear" or momentum or not delta:
        why = "fla's gated delta rule covers the linear memory with DGD and no momentum only"
    return backends.choose("dgd_scan", x.device, unsupported=why)


def _new_state(state, memory, momentum, D, S, A, rest, pos) -> dict:
    new = {}
    for layer in layers(memory):
        new[f"{layer}_W"] = D[layer] if rest[layer] is None else D[layer] + rest[layer]
        new[f"{layer}_A"] = A[layer]
        if momentum:
            new[f"{layer}_S"] = S[layer]
    new["pos"] = pos
    return new
