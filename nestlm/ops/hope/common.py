"""What the token loop (ref.py) and the chunked path (chunk.py) of `dgd_scan` share: the options,
the memories' forward passes and closed-form inner gradients, the gates and the argument checks.

Memories (per batch row and head; c = head dim, the MLP hidden width is c as well):

    linear  aux [2c+2, c]     rows M_k (c), M_v (c), M_lr (1), M_decay (1), read at x: z = aux x
            mem [c, c]        the main memory, read at the query: o = mem q
    mlp     aux_in [2c+2, c]  input layers of M_k and M_v (c rows each) and the rows M_lr, M_decay
            aux_out [2, c, c] output layers of M_k and M_v:  M_k(x) = x + aux_out[0] silu(aux_in[:c] x)
            mem_in, mem_out   the main memory M(x) = x + mem_out silu(mem_in x)         (NL eq. 89)

M_lr and M_decay produce scalars, so they stay linear rows in both kinds (a residual MLP needs equal
input and output widths). Every row block is its own memory: the DGD product and the gradients act
on each row independently, so stacking them changes nothing but the number of matmuls.

A "layer" below is one weight matrix written by the inner optimiser: `linear` has the layers aux and
mem, `mlp` has aux_in, aux_out, mem_in and mem_out. Each layer's inner gradient at its input x (the
layer's "key") is g x^T, g the gradient of the loss at the layer's output; `aux_grads` and `mem_grads` return
those (key, g) pairs in closed form, so the token loop and the chunked path share no autograd call
inside the inner loop, and the outer backward differentiates through them (second order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

MEMORIES = ("linear", "mlp")
UPDATES = ("dgd", "gd")
TARGETS = ("self", "value")
DECAY_TO = ("zero", "init")
OBJECTIVES = ("l2", "dot")

AUX_LAYERS = {"linear": ("aux",), "mlp": ("aux_in", "aux_out")}
MEM_LAYERS = {"linear": ("mem",), "mlp": ("mem_in", "mem_out")}


def l2norm(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1, eps=1e-6)


def layers(memory: str) -> tuple[str, ...]:
    return AUX_LAYERS[memory] + MEM_LAYERS[memory]


def init_shapes(memory: str, h: int, c: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the learned initial memories (no batch dim), by layer."""
    if memory == "linear":
        return {"aux": (h, 2 * c + 2, c), "mem": (h, c, c)}
    return {"aux_in": (h, 2 * c + 2, c), "aux_out": (h, 2, c, c), "mem_in": (h, c, c), "mem_out": (h, c, c)}


def state_keys(memory: str, momentum: bool) -> tuple[str, ...]:
    """Per layer: current weights W, chunk anchor A, momentum S (when on); then the position."""
    suffixes = ("W", "A", "S") if momentum else ("W", "A")
    return tuple(f"{layer}_{s}" for layer in layers(memory) for s in suffixes) + ("pos",)


def silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def gates(z: Tensor, max_lr: float, lr_bias: Tensor, decay_bias: Tensor) -> tuple[Tensor, Tensor]:
    """Inner step size and log retention from the rows M_lr, M_decay: z [b, h, s, 2] ->
    lr = max_lr * sigmoid(z_lr + lr_bias), log(1 - decay) = logsigmoid(-(z_decay + decay_bias)), [b, h, s].
    lr_bias, decay_bias: [h]."""
    z_lr, z_decay = z.unbind(-1)
    lr = max_lr * torch.sigmoid(z_lr + lr_bias[:, None])
    return lr, F.logsigmoid(-(z_decay + decay_bias[:, None]))


def aux_read(A: dict[str, Tensor], x: Tensor, c: int) -> tuple[Tensor, Tensor, Tensor, tuple | None]:
    """The aux memories at inputs x [b, h, s, c]: raw k, v [b, h, s, c], gate pre-activations
    [b, h, s, 2], and (mlp) the hidden pre-activation and activation [b, h, 2, s, c] for gradients."""
    if "aux" in A:
        kv, zg = (x @ A["aux"].transpose(-1, -2)).split((2 * c, 2), -1)
        k, v = kv.unflatten(-1, (2, c)).unbind(-2)
        return k, v, zg, None
    zkv, zg = (x @ A["aux_in"].transpose(-1, -2)).split((2 * c, 2), -1)
    zkv = rearrange(zkv, "b h s (j m) -> b h j s m", j=2)
    hid = F.silu(zkv)
    k, v = (x.unsqueeze(2) + hid @ A["aux_out"].transpose(-1, -2)).unbind(2)
    return k, v, zg, (zkv, hid)


def keys_and_gates(
    A: dict[str, Tensor], x: Tensor, c: int, normalize_v: bool, max_lr: float, lr_bias: Tensor, decay_bias: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What the aux memories at anchor A write the memories with, at inputs x [b, h, s, c]:
    L2-normalised keys k and values v (normalised when normalize_v) [b, h, s, c], step sizes lr and
    log retention [b, h, s] (see `gates`)."""
    k, v, zg, _ = aux_read(A, x, c)
    v = l2norm(v) if normalize_v else v
    return l2norm(k), v, *gates(zg, max_lr, lr_bias, decay_bias)


def mem_read(M: dict[str, Tensor], x: Tensor) -> tuple[Tensor, tuple | None]:
    """The main memory at inputs x [..., s, c] -> ([..., s, c], (mlp) hidden pre-activation and activation)."""
    if "mem" in M:
        return x @ M["mem"].transpose(-1, -2), None
    z = x @ M["mem_in"].transpose(-1, -2)
    hid = F.silu(z)
    return x + hid @ M["mem_out"].transpose(-1, -2), (z, hid)


def aux_grads(A: dict[str, Tensor], k: Tensor, v: Tensor, c: int, objective: str) -> list[tuple[str, Tensor, Tensor]]:
    """Closed-form inner gradients of the aux layers at their anchor A, as (layer, key, g): the
    layer's gradient is g^T key (key [..., s, c_in], g [..., s, c_out]).

    k, v [b, h, s, c]: keys and values. Each aux memory's target is its own value of v (self-generated,
    NL eq. 84). Objective "l2": L = 1/2 ||M(k) - target||^2, so g = M(k) - target at the output;
    "dot": L = -<M(k), target> (eq. 92), so g = -target.
    """
    s = k.shape[-2]
    *outs, cache = aux_read(A, torch.cat((k, v), -2), c)  # one read at the keys and the values together
    (kk, kv), (vk, vv), (zk, zv) = (y.split(s, -2) for y in outs)
    if objective == "l2":
        g_kv, g_gate = torch.stack((kk - kv, vk - vv), 2), zk - zv  # [b, h, 2, s, c], [b, h, s, 2]
    else:
        g_kv, g_gate = -torch.stack((kv, vv), 2), -zv
    if "aux" in A:
        return [("aux", k, torch.cat((rearrange(g_kv, "b h j s c -> b h s (j c)"), g_gate), -1))]
    zkv, hid = (y[..., :s, :] for y in cache)  # the hidden layer at the keys: the output layers' inputs
    delta = silu_grad(zkv) * (g_kv @ A["aux_out"])  # back through the output layers: [b, h, 2, s, c]
    g_in = torch.cat((rearrange(delta, "b h j s m -> b h s (j m)"), g_gate), -1)
    return [("aux_in", k, g_in), ("aux_out", hid, g_kv)]


def mem_grads(
    M: dict[str, Tensor], k: Tensor, v: Tensor, target: str, objective: str
) -> list[tuple[str, Tensor, Tensor]]:
    """The same for the main memory's layers at their anchor M, trained to map k to its own value
    of v (target="self") or to v (target="value")."""
    s = k.shape[-2]
    if target == "self":
        out, cache = mem_read(M, torch.cat((k, v), -2))
        mk, tgt = out.split(s, -2)
        cache = None if cache is None else tuple(y[..., :s, :] for y in cache)
    else:
        (mk, cache), tgt = mem_read(M, k), v
    g = mk - tgt if objective == "l2" else -tgt
    if "mem" in M:
        return [("mem", k, g)]
    z, hid = cache
    return [("mem_in", k, silu_grad(z) * (g @ M["mem_out"])), ("mem_out", hid, g)]


def piece_groups(sizes: list[int], C: int) -> list[int]:
    """Lengths of [leading partial piece, all whole chunks, trailing partial piece] (zeros dropped)
    of a segment cut by `chunk_pieces`: the parts that batch together."""
    first = sizes[0] if sizes and sizes[0] != C else 0
    full = C * sum(1 for x in sizes[1 if first else 0 :] if x == C)
    return [g for g in (first, full, sum(sizes) - first - full) if g]


def layer_lr(lr: Tensor, key: Tensor, update: str) -> Tensor:
    """The step size of one layer's DGD update at inputs key [..., s, c] (lr [..., s]).

    Every DGD layer takes the exact proximal step of NL eq. 56 (argmin 1/2 ||W x - u||^2 +
    1/(2 lr') ||W - W_t||^2) with lr' = lr / (1 - lr), the proximal step for which a unit input gets
    exactly eq. 88's coefficient lr. For an input of any norm the step is lr / (1 + lr (||x||^2 - 1)):
    lr for the L2-normalised keys, about 1 / ||x||^2 (normalised LMS) for a large hidden activation,
    and lr / (1 - lr) (plain GD) as x -> 0, where a bare 1 / ||x||^2 would blow up. Inputs are not
    normalised (that would change the memory function). GD layers use lr as it is.
    """
    if update == "gd":
        return lr
    return lr / (1 + lr * (key.square().sum(-1) - 1))


def expand_gate(g: Tensor, key: Tensor) -> Tensor:
    """A per-head gate [b, h, ..., s] broadcast against a layer's key [b, h, *extra, ..., s, c]."""
    missing = key.dim() - 1 - g.dim()
    return g.reshape(g.shape[:2] + (1,) * missing + g.shape[2:]) if missing > 0 else g


def options(memory: str, update: str, target: str, decay_to: str, objective: str) -> None:
    for name, val, allowed in (
        ("memory", memory, MEMORIES),
        ("update", update, UPDATES),
        ("target", target, TARGETS),
        ("decay_to", decay_to, DECAY_TO),
        ("objective", objective, OBJECTIVES),
    ):
        if val not in allowed:
            raise ValueError(f"dgd_scan: {name}={val!r} is invalid: expected one of {allowed}")


def check(
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
    memory: str,
    update: str,
) -> int:
    """Validate every argument of dgd_scan / dgd_scan_ref (one-line errors); returns the head dim c."""
    if x.dim() != 4:
        raise ValueError(f"dgd_scan: x must be [batch, time, heads, head_dim], got shape {tuple(x.shape)}")
    b, t, h, c = x.shape
    if tuple(q.shape) != (b, t, h, c):
        raise ValueError(f"dgd_scan: q must have shape {(b, t, h, c)}, got {tuple(q.shape)}")
    if log_momentum is not None and tuple(log_momentum.shape) != (b, t, h):
        raise ValueError(
            f"dgd_scan: log_momentum must have shape {(b, t, h)} or be None, got {tuple(log_momentum.shape)}"
        )
    for name, bias in (("lr_bias", lr_bias), ("decay_bias", decay_bias)):
        if tuple(bias.shape) != (h,):
            raise ValueError(f"dgd_scan: {name} must have shape {(h,)}, got {tuple(bias.shape)}")
    shapes = init_shapes(memory, h, c)
    if set(init) != set(shapes):
        raise ValueError(f"dgd_scan: init must hold {sorted(shapes)} for memory={memory!r}, got {sorted(init)}")
    for layer, shape in shapes.items():
        if tuple(init[layer].shape) != shape:
            raise ValueError(f"dgd_scan: init[{layer!r}] must have shape {shape}, got {tuple(init[layer].shape)}")
    for key in state_keys(memory, log_momentum is not None):
        if key not in state:
            raise ValueError(f"dgd_scan: state lacks {key!r} (memory={memory!r}, momentum={log_momentum is not None})")
        want = (b,) if key == "pos" else (b,) + shapes[key.rsplit("_", 1)[0]]
        if tuple(state[key].shape) != want:
            raise ValueError(f"dgd_scan: state[{key!r}] must have shape {want}, got {tuple(state[key].shape)}")
    for name, cs in (("chunk_size", chunk_size), ("aux_chunk_size", aux_chunk_size)):
        if not isinstance(cs, int) or isinstance(cs, bool) or cs < 1:
            raise ValueError(f"dgd_scan: {name} must be a positive int, got {cs!r}")
    hi = 1.0 if update == "dgd" else float("inf")
    if not 0 < max_lr < hi:
        raise ValueError(f"dgd_scan: max_lr={max_lr!r} must be in (0, {hi}) for update={update!r}")
    return c
