"""Self-modifying Titans recurrence of the HOPE mixer (see nestlm.layers.hope).

Per batch row and head there are two linear memories, both written in context:

    aux  A [R, c], R = 2c + 2: four memories stacked by rows - M_k (c rows), M_v (c rows), M_eta (1),
         M_alpha (1). Read at the input x_t [c] they produce the keys, values, step sizes and decays:
             z = A x_t;  k_t = l2norm(z[:c]);  v_t = l2norm(z[c:2c])
             eta_t = max_lr * sigmoid(z[2c] + b_eta);  1 - alpha_t = sigmoid(-(z[2c+1] + b_alpha))
    mem  M [c, c]: the main memory, read with the static query q_t: o_t = M q_t.

Both are written by gradient descent with momentum and decay on an L2 associative loss
l(W; k, target) = 1/2 ||W k - target||^2, at the anchor W_a of the token's chunk (mini-batch GD):

    g_t = (W_a k_t - target_t) k_t^T
    S_t = mu_t S_{t-1} - eta_t g_t
    W_t = W_0 + (1 - alpha_t) (W_{t-1} - W_0) + S_t

The decay pulls a memory back towards its learned initial state W_0 (the "slow" part, a
parameter), not towards zero. With self-generated targets the aux update is homogeneous in A, so a
decay towards zero would drive every aux memory (and with it k, v, eta, alpha) to the fixed point
A = 0 over a long stream; decaying only the in-context change keeps the meta-learned projections
as the resting point (the role the residual connection of the paper's MLP memories plays).

Targets are self-generated for the aux memories (each memory's own value of v: target = A_a v_t, so
each of M_k, M_v, M_eta, M_alpha is pulled towards mapping k_t where it maps v_t; Nested Learning
eqs. 83-89) and the values themselves for the main memory (target = v_t). eta and alpha are shared by
all memories of a head; mu_t is the momentum gate of a static projection.

Chunks are fixed on absolute positions from the fresh state, with one chunk size for the main memory
(`chunk_size`) and one for the aux memories (`aux_chunk_size`). The anchor of a chunk is the memory
at its start ("the last state of the previous chunk": the causal reading of NL eq. 90), and a token
both reads and takes its gradient at that anchor - no token sees its own chunk's writes.

Chunked path. Inside a chunk the gradients depend only on the anchor, so the momentum and decay
recurrences are linear and the segment-end memory has a closed form. With log-space cumulative sums
from the segment start, La_t = sum_{j<=t} log(1 - alpha_j), Lm_t = sum_{j<=t} log mu_j, and D = W - W_0:

    S_n = exp(Lm_n) S_s - sum_i eta_i exp(Lm_n - Lm_i) g_i
    D_n = exp(La_n) D_s + [sum_t exp(La_n - La_t + Lm_t)] S_s
          - sum_i eta_i [sum_{t>=i} exp(La_n - La_t + Lm_t - Lm_i)] g_i

Every exponent is a sum of logs of factors in (0, 1), hence <= 0: no overflow for long chunks. Each
g_i is an outer product, so a sum over the segment is one matmul. A segment is a chunk cut by the
start or end of a call; the state (anchor, current W, S, position) continues a chunk exactly.
The aux phase runs first (a loop over aux chunks), producing k, v, eta, alpha for every token; the
main-memory phase (a loop over main chunks) then only needs those.

`selfmod_scan_ref` is the token loop applying the same rule (oracle for tests). Both paths are
differentiable in every input, including through the inner gradients (second order).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from nestlm.ops._chunks import chunk_pieces
from nestlm.ops.hope.common import l2norm, piece_groups

STATE_KEYS = ("aux_W", "aux_A", "aux_S", "mem_W", "mem_A", "mem_S", "pos")


def _aux_outputs(z: Tensor, c: int, max_lr: float, b_eta: Tensor, b_alpha: Tensor):
    """z [..., 2c+2] -> k, v [..., c], eta [...], log(1 - alpha) [...]; b_eta, b_alpha broadcast to [...]."""
    # split, not slices: the backward of every slice fills a zero tensor of z's size
    kv, z_eta, z_alpha = z.split((2 * c, 1, 1), -1)
    k, v = l2norm(kv.unflatten(-1, (2, c))).unbind(-2)  # one pass for both
    eta = max_lr * torch.sigmoid(z_eta.squeeze(-1) + b_eta)
    log_keep = F.logsigmoid(-(z_alpha.squeeze(-1) + b_alpha))
    return k, v, eta, log_keep


@functools.lru_cache(maxsize=64)
def _strictly_lower(s: int, device: torch.device) -> Tensor:
    """[s, s] mask of i > t (the entries of D that are zero), cached: built once per chunk size."""
    return torch.ones(s, s, dtype=torch.bool, device=device).tril(-1)


def _read(M: Tensor, x: Tensor) -> Tensor:
    """M x for every token of a segment: M [b, h, r, c], x [b, h, s, c] -> [b, h, s, r]."""
    return x @ M.transpose(-1, -2)


def _segment_coeffs(eta: Tensor, log_keep: Tensor, log_mu: Tensor) -> tuple[Tensor, ...]:
    """The closed form's coefficients for segments along the last dim: eta, log_keep, log_mu [..., s].

    Returns m_W, m_S [..., s] (minus the weights of each token's gradient in the end D and S) and
    cD, cSD, cS [..., 1, 1] (factors of the start D, of the start S in D, and of the start S in S).
    They depend only on the gates, so a whole stream's chunks can be done in one call.
    """
    La, Lm = log_keep.cumsum(-1), log_mu.cumsum(-1)  # [..., s]
    La_n, Lm_n = La[..., -1:], Lm[..., -1:]
    X = La_n - La + Lm  # log of the factor carrying S_t to the segment end
    s = eta.shape[-1]
    # D[i, t] = exp(X_t - Lm_i) for t >= i
    logD = X[..., None, :] - Lm[..., :, None]  # [..., s(i), s(t)]
    D = torch.exp(logD.masked_fill(_strictly_lower(s, eta.device), float("-inf")))
    m_W = -eta * D.sum(-1)
    m_S = -eta * torch.exp(Lm_n - Lm)
    return m_W, m_S, torch.exp(La_n)[..., None], torch.exp(X).sum(-1)[..., None, None], torch.exp(Lm_n)[..., None]


def _segment_apply(D: Tensor, S: Tensor, E: Tensor, K: Tensor, coeffs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """Apply a segment's updates in closed form (see the module docstring).

    D = W - W0, S: [b, h, r, c]; E (errors at the anchor): [b, h, s, r]; K: [b, h, s, c]; coeffs:
    `_segment_coeffs` of the segment. Returns (D, S) after the segment.

    The deviation D, not W, is carried through the loop, the token weights scale K (c <= r
    columns) and carry their sign: the update is then fused multiply-adds on the state (two for
    D, one for S) after the two matmuls.
    """
    m_W, m_S, cD, cSD, cS = coeffs
    Et = E.transpose(-1, -2)  # [b, h, r, s]
    D_new = torch.addcmul(torch.addcmul(Et @ (K * m_W[..., None]), cD, D), cSD, S)
    S_new = torch.addcmul(Et @ (K * m_S[..., None]), cS, S)
    return D_new, S_new


def _piece_coeffs(sizes: list[int], C: int, eta: Tensor, log_keep: Tensor, log_mu: Tensor) -> list[tuple]:
    """`_segment_coeffs` of every piece of a segment cut by `chunk_pieces` (gates [b, h, t]): the whole
    chunks in one batched call, a leading or trailing partial piece on its own."""
    out: list[tuple] = []
    groups = piece_groups(sizes, C)
    for g, e, lk, lm in zip(groups, *(x.split(groups, -1) for x in (eta, log_keep, log_mu))):
        if sizes[len(out)] == C:  # the whole chunks: [b, h, n, C]
            full = _segment_coeffs(*(x.unflatten(-1, (g // C, C)) for x in (e, lk, lm)))
            out += list(zip(*(c.unbind(2) for c in full)))
        else:
            out.append(_segment_coeffs(e, lk, lm))
    return out


def _read_pieces(anchors: list[Tensor], q: Tensor, sizes: list[int], C: int) -> Tensor:
    """Every piece's read (anchor of its chunk times q_t), whole chunks in one batched matmul.

    anchors: one [b, h, r, c] per piece; q: [b, h, t, c] -> [b, h, t, r]."""
    outs, i = [], 0
    groups = piece_groups(sizes, C)
    for g, q_g in zip(groups, q.split(groups, 2)):
        if sizes[i] == C:  # the whole chunks
            n = g // C
            A = torch.stack(anchors[i : i + n], 2)  # [b, h, n, r, c]
            y = q_g.unflatten(2, (n, C)) @ A.transpose(-1, -2)  # [b, h, n, C, r]
            outs.append(y.flatten(2, 3))
            i += n
        else:
            outs.append(_read(anchors[i], q_g))
            i += 1
    return torch.cat(outs, 2)


def _check(xh: Tensor, q: Tensor, log_mu: Tensor, state: dict, chunk_size: int, aux_chunk_size: int) -> int:
    b, t, h, c = xh.shape
    if tuple(q.shape) != (b, t, h, c):
        raise ValueError(f"selfmod_scan: q must have shape {(b, t, h, c)}, got {tuple(q.shape)}")
    if tuple(log_mu.shape) != (b, t, h):
        raise ValueError(f"selfmod_scan: log_mu must have shape {(b, t, h)}, got {tuple(log_mu.shape)}")
    shapes = {
        "aux_W": (b, h, 2 * c + 2, c),
        "aux_A": (b, h, 2 * c + 2, c),
        "aux_S": (b, h, 2 * c + 2, c),
        "mem_W": (b, h, c, c),
        "mem_A": (b, h, c, c),
        "mem_S": (b, h, c, c),
        "pos": (b,),
    }
    for key, shape in shapes.items():
        if key not in state:
            raise ValueError(f"selfmod_scan: state lacks {key!r}")
        if tuple(state[key].shape) != shape:
            raise ValueError(f"selfmod_scan: state[{key!r}] must have shape {shape}, got {tuple(state[key].shape)}")
    for name, cs in (("chunk_size", chunk_size), ("aux_chunk_size", aux_chunk_size)):
        if not isinstance(cs, int) or cs < 1:
            raise ValueError(f"selfmod_scan: {name} must be a positive int, got {cs!r}")
    return c


def selfmod_scan(
    xh: Tensor,
    q: Tensor,
    log_mu: Tensor,
    b_eta: Tensor,
    b_alpha: Tensor,
    aux_init: Tensor,
    mem_init: Tensor,
    max_lr: float,
    state: dict,
    chunk_size: int,
    aux_chunk_size: int,
) -> tuple[Tensor, dict]:
    """Chunked self-modifying Titans.

    xh: [b, t, h, c] memory inputs; q: [b, t, h, c] queries (normalised by the caller);
    log_mu: [b, t, h] log momentum; b_eta, b_alpha: [h] static biases of the step size / decay;
    aux_init [h, 2c+2, c], mem_init [h, c, c]: learned initial memories (resting points of the decay);
    state: dict with STATE_KEYS (see module docstring; all rows at the same position).
    Returns (o [b, t, h, c], new state).
    """
    c = _check(xh, q, log_mu, state, chunk_size, aux_chunk_size)
    b, t = xh.shape[:2]
    pos = state["pos"]
    p0 = int(pos[0]) if b else 0
    if b and not bool((pos == p0).all()):
        raise ValueError("selfmod_scan: state['pos'] must be equal across the batch")
    dt = state["mem_W"].dtype
    xh, q, log_mu, b_eta, b_alpha, aux_init, mem_init = (
        x.to(dt) for x in (xh, q, log_mu, b_eta, b_alpha, aux_init, mem_init)
    )
    # head-major inside ([b, h, t, .]): every read is then one matmul with a contiguous result, and
    # the coefficients run along the last dim; the layout changes once per call, not per chunk
    xh, q, log_mu = (x.transpose(1, 2).contiguous() for x in (xh, q, log_mu))
    # the loops carry D = W - W0 (see _segment_apply); a chunk's anchor is W0 + D at its start
    D, A, S = state["aux_W"] - aux_init, state["aux_A"], state["aux_S"]
    ks, vs, etas, lks = [], [], [], []
    sizes, fresh = chunk_pieces(p0, t, aux_chunk_size)
    for x_s, lmu_s, fresh_s in zip(xh.split(sizes, 2), log_mu.split(sizes, 2), fresh):
        if fresh_s:
            A = D + aux_init
        z = _read(A, x_s)
        k, v, eta, lk = _aux_outputs(z, c, max_lr, b_eta[:, None], b_alpha[:, None])
        E = _read(A, k - v)  # A k - A v: error against the self-generated target
        D, S = _segment_apply(D, S, E, k, _segment_coeffs(eta, lk, lmu_s))
        ks.append(k), vs.append(v), etas.append(eta), lks.append(lk)
    new = {"aux_W": D + aux_init, "aux_A": A, "aux_S": S}
    if t:
        k, v, eta, lk = (torch.cat(x, 2) for x in (ks, vs, etas, lks))
    D, A, S = state["mem_W"] - mem_init, state["mem_A"], state["mem_S"]
    anchors = []
    sizes, fresh = chunk_pieces(p0, t, chunk_size)
    # the main memory's gates are all known here: every chunk's coefficients at once
    coeffs = _piece_coeffs(sizes, chunk_size, eta, lk, log_mu) if t else []
    pieces = (x.split(sizes, 2) for x in (k, v)) if t else ()
    for (k_s, v_s), co, fresh_s in zip(zip(*pieces), coeffs, fresh):
        if fresh_s:
            A = D + mem_init
        anchors.append(A)
        E = _read(A, k_s) - v_s
        D, S = _segment_apply(D, S, E, k_s, co)
    new.update(mem_W=D + mem_init, mem_A=A, mem_S=S, pos=pos + t)
    # reads after the loop: every chunk reads its anchor, so whole chunks batch into one matmul
    if not t:
        return q.new_zeros(b, 0, q.shape[1], c), new
    return _read_pieces(anchors, q, sizes, chunk_size).transpose(1, 2).contiguous(), new


def _apply(M: Tensor, x: Tensor) -> Tensor:
    """M x per batch row and head: M [b, h, r, c], x [b, h, c] -> [b, h, r].

    matmul, not einsum: einsum copies M into its own layout on every call.
    """
    return (M @ x[..., None])[..., 0]


def selfmod_scan_ref(
    xh: Tensor,
    q: Tensor,
    log_mu: Tensor,
    b_eta: Tensor,
    b_alpha: Tensor,
    aux_init: Tensor,
    mem_init: Tensor,
    max_lr: float,
    state: dict,
    chunk_size: int,
    aux_chunk_size: int,
) -> tuple[Tensor, dict]:
    """Token-loop reference of `selfmod_scan` (same arguments and results; rows may be at any position)."""
    c = _check(xh, q, log_mu, state, chunk_size, aux_chunk_size)
    dt = state["mem_W"].dtype
    xh, q, log_mu, b_eta, b_alpha, aux_init, mem_init = (
        x.to(dt) for x in (xh, q, log_mu, b_eta, b_alpha, aux_init, mem_init)
    )
    init = {"aux": aux_init, "mem": mem_init}
    st = dict(state)
    outs = []
    # unbind, not indexing: the backward of every index would fill a full-length zero tensor
    for x_i, q_i, lmu_i in zip(xh.unbind(1), q.unbind(1), log_mu.unbind(1)):
        pos = st["pos"]
        for name, C in (("aux", aux_chunk_size), ("mem", chunk_size)):
            refresh = pos % C == 0
            if bool(refresh.all()):  # no copy when every row is at a chunk start (the usual case)
                st[f"{name}_A"] = st[f"{name}_W"]
            elif bool(refresh.any()):
                st[f"{name}_A"] = torch.where(refresh[:, None, None, None], st[f"{name}_W"], st[f"{name}_A"])
        mu = lmu_i.exp()[..., None, None]  # [b, h, 1, 1]
        Aa, Am = st["aux_A"], st["mem_A"]
        z = _apply(Aa, x_i)
        k, v, eta, lk = _aux_outputs(z, c, max_lr, b_eta, b_alpha)
        keep, eta = lk.exp()[..., None, None], eta[..., None, None]
        outs.append(_apply(Am, q_i))
        targets = {"aux": _apply(Aa, v), "mem": v}
        for name, A in (("aux", Aa), ("mem", Am)):
            err = _apply(A, k) - targets[name]
            g = err[..., :, None] * k[..., None, :]
            st[f"{name}_S"] = mu * st[f"{name}_S"] - eta * g
            st[f"{name}_W"] = init[name] + keep * (st[f"{name}_W"] - init[name]) + st[f"{name}_S"]
        st["pos"] = pos + 1
    o = torch.stack(outs, 1) if outs else q.new_zeros(q.shape)
    return o, st
