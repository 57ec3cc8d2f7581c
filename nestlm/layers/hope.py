"""HOPE mixer: self-referential Titans (Nested Learning, Behrouz et al. 2025, sections 8.1-8.3).

The keys, values, step sizes and decays of the main memory are not static projections: they are
read from memories M_k, M_v, M_lr, M_decay that are themselves written in context, each towards its
own value of v ("self-generated targets", eq. 84), so the layer adapts its own projections and its
own learning rule to the sequence. Only the query is static. In a HybridLM block this mixer is
followed by a CMS channel mixer, which completes the HOPE block (eq. 97).

    x [b, t, d] --w_in--> (x_m, x_q) --ShortConv (4) + SiLU--> x_m, q = l2norm(x_q)
                 \\-----> momentum gate = sigmoid(x W_mu)                      (static, per head)
    per head:   k, v, lr, decay = aux memories at x_m     (aux chunk size)
                o = M_mem(q), every memory written by DGD  (main chunk size; nestlm.ops.dgd_scan)
    y = w_out(RMSNorm_per_head(o))

Switches (each reproduces one of the paper's ablations, Table 6, or a choice it leaves open):

    update     "dgd": M (retain I - lr k k^T) - lr grad (eqs. 88, 93); "gd": retain M - lr grad
    memory     "mlp": every square memory is M(x) = x + W_out silu(W_in x) (eq. 89); "linear": M x
    momentum   True: the inner gradient goes through momentum with a static per-head gate (the paper
               uses momentum, Table 6, although eqs. 88-96 omit it); False: no momentum state
    target     "self": the main memory is trained on M_mem(v) like every other memory (eq. 87);
               "value": on v itself
    decay_to   "zero": retain * M (the paper's alpha M); "init": the decay pulls towards the learned
               initial memory instead
    normalize_v  L2-normalise v like q and k (the paper normalises q and k only; the presets do, as
               a raw v lets the self-generated targets M(v) grow without bound: docs/architecture.md)

`SETTINGS["paper"]` is the paper's HOPE; `SETTINGS["v1"]` is nestlm's first HOPE (GD, linear,
value target, decay towards the initial memories, normalised v), which runs through its own
recurrence (nestlm.ops.selfmod_scan, equal to dgd_scan with these switches) so models trained with it
load and give the same logits; the first layer's parameter names (b_eta, b_alpha, conv_weight,
conv_bias) load into the current ones.

Choices the paper leaves open: M_lr and M_decay produce scalars, so they are linear rows in both
memory kinds (a residual MLP needs equal input and output widths); lr = max_lr * sigmoid(M_lr(x) +
lr_bias), 1 - decay = sigmoid(-(M_decay(x) + decay_bias)); the MLP hidden width is head_dim; the
output goes through a per-head RMSNorm so the memory's scale does not leak into the residual stream.

State (all with the batch first): conv [b, 2 h c, d_conv - 1] (ShortConv's), and per memory layer
(nestlm.ops.hope.common.state_keys) the current weights, the chunk anchor and the momentum, plus pos
(int64 [b], tokens since the fresh state). Fresh memories are the learned initial memories, trained
by the outer loop through the inner updates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nestlm.layers.conv import ShortConv
from nestlm.ops.dtypes import state_dtype
from nestlm.ops.hope import dgd_scan, l2norm, selfmod_scan
from nestlm.ops.hope.common import DECAY_TO, MEMORIES, TARGETS, UPDATES, init_shapes, state_keys

SETTINGS = {
    "paper": dict(update="dgd", memory="mlp", momentum=True, target="self", decay_to="zero", normalize_v=False),
    "v1": dict(update="gd", memory="linear", momentum=True, target="value", decay_to="init", normalize_v=True),
}
# parameter names of the first HOPE layer -> current names (the conv weight also gains a channel dim)
_RENAMED = {"b_eta": "lr_bias", "b_alpha": "decay_bias", "conv_weight": "conv.weight", "conv_bias": "conv.bias"}


class HOPE(nn.Module):
    """Self-referential Titans mixer. x: [b, t, d_model] -> y: [b, t, d_model].

    n_heads x head_dim: memory heads; chunk_size: chunk of the main memory; aux_chunk_size: chunk of
    the memories producing k, v, lr, decay; max_lr: bound of the inner step lr (< 1 for DGD);
    update, memory, momentum, target, decay_to, normalize_v: see the module docstring.

    Stability. With DGD each token multiplies the running memory by (retain I - lr k k^T), whose
    eigenvalues are retain and retain - lr for a unit key, and the chunk's gradient steps are taken
    at the anchor; the decay gate and max_lr bound what the self-generated targets can feed back.
    tests/layers/test_hope.py runs 20,000 fp32 tokens at the presets' settings with the inner step
    pinned at max_lr and checks every memory stays bounded.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        chunk_size: int = 16,
        aux_chunk_size: int = 16,
        max_lr: float = 0.1,
        d_conv: int = 4,
        update: str = "dgd",
        memory: str = "mlp",
        momentum: bool = True,
        target: str = "self",
        decay_to: str = "zero",
        normalize_v: bool = False,
        norm_eps: float = 1e-5,
        init_std: float = 0.02,
        out_std: float | None = None,
    ):
        super().__init__()
        for name, val in (
            ("n_heads", n_heads),
            ("head_dim", head_dim),
            ("chunk_size", chunk_size),
            ("aux_chunk_size", aux_chunk_size),
            ("d_conv", d_conv),
        ):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"HOPE: {name}={val!r} must be a positive int")
        for name, val, allowed in (
            ("update", update, UPDATES),
            ("memory", memory, MEMORIES),
            ("target", target, TARGETS),
            ("decay_to", decay_to, DECAY_TO),
        ):
            if val not in allowed:
                raise ValueError(f"HOPE: {name}={val!r} must be one of {allowed}")
        for name, val in (("momentum", momentum), ("normalize_v", normalize_v)):
            if not isinstance(val, bool):
                raise ValueError(f"HOPE: {name}={val!r} must be True or False")
        hi = 1.0 if update == "dgd" else float("inf")
        if not (isinstance(max_lr, (int, float)) and 0 < max_lr < hi):
            raise ValueError(f"HOPE: max_lr={max_lr!r} must be in (0, {hi}) for update={update!r}")
        h, c = n_heads, head_dim
        self.n_heads, self.head_dim, self.d_conv = h, c, d_conv
        self.chunk_size, self.aux_chunk_size, self.max_lr, self.norm_eps = chunk_size, aux_chunk_size, max_lr, norm_eps
        self.switches = dict(
            update=update, memory=memory, momentum=momentum, target=target, decay_to=decay_to, normalize_v=normalize_v
        )
        self.v1 = self.switches == SETTINGS["v1"]
        # memory input, query, and (with momentum) the momentum gate
        self.w_in = nn.Linear(d_model, 2 * h * c + (h if momentum else 0), bias=False)
        self.conv = ShortConv(2 * h * c, d_conv, activation="silu")
        for layer, shape in self._shapes():  # aux_init, mem_init (linear); aux_in_init, ... (mlp)
            self.register_parameter(f"{layer}_init", nn.Parameter(self._initial(layer, shape, init_std)))
        self.lr_bias = nn.Parameter(torch.zeros(h))  # lr starts at max_lr / 2
        # decay at the start: ~2% per token towards W0; towards zero only ~0.03% (time constant ~3,000
        # tokens): an MLP memory at W_in = W_out = 0 (M = identity) gets no inner gradient (each
        # layer's gradient goes through the other), so a fast decay towards zero leaves it dead
        self.decay_bias = nn.Parameter(torch.full((h,), -4.0 if decay_to == "init" else -8.0))
        self.out_norm = nn.Parameter(torch.ones(h * c))
        self.w_out = nn.Linear(h * c, d_model, bias=False)
        nn.init.normal_(self.w_in.weight, std=init_std)
        nn.init.normal_(self.w_out.weight, std=out_std or init_std)
        with torch.no_grad():  # the first layer's conv init: N(0, 1/d_conv), no bias
            self.conv.weight.normal_(0, d_conv**-0.5)
            self.conv.bias.zero_()
        self.register_load_state_dict_pre_hook(_load_v1_names)

    def _shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return list(init_shapes(self.switches["memory"], self.n_heads, self.head_dim).items())

    def _initial(self, layer: str, shape: tuple[int, ...], init_std: float) -> torch.Tensor:
        """Initial memories: input layers read at unit scale, the lr / decay rows and the output
        layers (the residual MLPs then start near the identity) and the linear main memory small."""
        c = self.head_dim
        if layer in ("aux", "aux_in"):
            return torch.cat([torch.randn(shape[0], 2 * c, c) / c**0.5, torch.randn(shape[0], 2, c) * init_std], 1)
        if layer == "mem_in":
            return torch.randn(shape) / c**0.5
        return torch.randn(shape) * init_std

    def memory_inits(self) -> dict[str, torch.Tensor]:
        """The learned initial memories by layer (nestlm.ops.hope.common.init_shapes)."""
        return {layer: getattr(self, f"{layer}_init") for layer, _ in self._shapes()}

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        dt = state_dtype(dtype)
        state = {"conv": self.conv.init_state(batch_size, device, dt)["conv"]}
        for layer, w in self.memory_inits().items():
            w = w.to(device=device, dtype=dt).expand(batch_size, *w.shape)
            state[f"{layer}_W"], state[f"{layer}_A"] = w, w
            if self.switches["momentum"]:
                state[f"{layer}_S"] = torch.zeros_like(w)
        state["pos"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        return state

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        b, t, _ = x.shape
        h, c = self.n_heads, self.head_dim
        if state is None:
            state = self.init_state(b, x.device, x.dtype)
        if "conv" not in state:
            raise ValueError("HOPE: state lacks 'conv' (expected a state made by HOPE.init_state)")
        proj = self.w_in(x)
        u, gate = proj.split((2 * h * c, proj.shape[-1] - 2 * h * c), -1)
        u, conv_state = self.conv(u, {"conv": state["conv"]})
        xm, q = u.unflatten(-1, (2, h, c)).unbind(2)
        q = l2norm(q)
        mem_state = {k: state[k] for k in state_keys(self.switches["memory"], self.switches["momentum"])}
        with torch.autocast(x.device.type, enabled=False):
            sd = state["mem_W" if self.switches["memory"] == "linear" else "mem_in_W"].dtype
            log_mu = F.logsigmoid(gate.to(sd)) if self.switches["momentum"] else None
            args = (xm, q, log_mu, self.lr_bias, self.decay_bias)
            if self.v1:
                inits = self.memory_inits()
                o, new = selfmod_scan(
                    *args, inits["aux"], inits["mem"], self.max_lr, mem_state, self.chunk_size, self.aux_chunk_size
                )
            else:
                sw = {k: v for k, v in self.switches.items() if k != "momentum"}
                o, new = dgd_scan(
                    *args, self.memory_inits(), self.max_lr, mem_state, self.chunk_size, self.aux_chunk_size, **sw
                )
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        o = o.reshape(b, t, h * c).to(x.dtype) * self.out_norm.to(x.dtype)
        return self.w_out(o), {"conv": conv_state["conv"], **new}

    def extra_repr(self) -> str:
        sw = ", ".join(f"{k}={v!r}" for k, v in self.switches.items())
        return f"heads={self.n_heads}x{self.head_dim}, chunks={self.chunk_size}/{self.aux_chunk_size}, {sw}"


def upgrade_state_dict(state_dict: dict, prefix: str = "") -> dict:
    """Rename the first HOPE layer's parameters under `prefix` to the current names, in place
    (the conv weight [C, w] becomes ShortConv's [C, 1, w]); returns the dict."""
    for old, new in _RENAMED.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            value = state_dict.pop(prefix + old)
            state_dict[prefix + new] = value[:, None] if old == "conv_weight" else value
    return state_dict


def _load_v1_names(module, state_dict, prefix, *args) -> None:
    upgrade_state_dict(state_dict, prefix)
