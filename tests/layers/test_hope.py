"""HOPE self-referential Titans mixer: the layer against the token loop (fp64), streaming, causality,
the switches, loading the first layer's checkpoints, and long-stream stability at the presets' settings."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch
from layer_checks import assert_causal_and_batch_independent, assert_streaming_equals_one_call
from pieces import random_pieces
from safetensors.torch import load_file

import nestlm.layers.hope as hope_module
from nestlm.layers.hope import HOPE, SETTINGS
from nestlm.models import HybridConfig, HybridLM
from nestlm.models.config import HOPE_SETTINGS
from nestlm.ops import dgd_scan_ref, selfmod_scan_ref

DATA = Path(__file__).parents[1] / "data"


def make_hope(setting="paper", chunk=5, aux_chunk=3, d=16, heads=2, head_dim=4, max_lr=None, seed=0, **kw) -> HOPE:
    """A small fp64 HOPE whose memories move visibly; max_lr defaults to a stable step for the
    chunks (a chunk sums its steps at one anchor: lr * chunk well below 2)."""
    torch.manual_seed(seed)
    max_lr = max_lr or min(0.4, 1.2 / max(chunk, aux_chunk))
    m = HOPE(
        d, heads, head_dim, chunk_size=chunk, aux_chunk_size=aux_chunk, max_lr=max_lr, **{**SETTINGS[setting], **kw}
    )
    m = m.double()
    with torch.no_grad():  # larger projections than the init so the memories move visibly
        m.w_in.weight.normal_(0, 0.5)
        m.decay_bias.fill_(-2.0)
        for name, p in m.named_parameters():
            if name.endswith("_init"):
                p.add_(0.1 * torch.randn_like(p))
    return m


def rel_close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Norm-relative agreement (the streaming contract's measure): ||a - b|| <= tol * ||b||."""
    return bool((a - b).double().norm() <= tol * b.double().norm() + 1e-300)


def pieces(t: int, rng: random.Random) -> list[tuple[int, int]]:
    return random_pieces(t, rng, lengths=(1, 1, 2, 4, 6, 11))


@pytest.mark.parametrize(
    "setting,kw",
    [("paper", {}), ("paper", dict(memory="linear", momentum=False)), ("paper", dict(update="gd")), ("v1", {})],
)
@pytest.mark.parametrize("t,chunk,aux_chunk", [(1, 5, 3), (40, 1, 1), (63, 16, 7)])
def test_layer_equals_its_token_loop(monkeypatch, setting, kw, t, chunk, aux_chunk):
    """The layer with its scan replaced by the token-loop reference gives the same outputs, state
    and gradient of every parameter (fp64)."""
    m = make_hope(setting, chunk, aux_chunk, **kw)
    x = torch.randn(2, t, 16, dtype=torch.float64, requires_grad=True)
    y1, s1 = m(x)
    monkeypatch.setattr(hope_module, "dgd_scan", dgd_scan_ref)
    monkeypatch.setattr(hope_module, "selfmod_scan", selfmod_scan_ref)
    y2, s2 = m(x)
    assert rel_close(y1, y2, 1e-10)
    assert s1.keys() == s2.keys()
    for k in s1:
        assert rel_close(s1[k], s2[k], 1e-10), k
    w = torch.randn_like(y1)
    fin = {k: torch.randn_like(v) for k, v in s1.items() if v.is_floating_point()}

    def loss(y, s):
        return (y * w).sum() + sum((s[k] * fin[k]).sum() for k in fin)

    params = [x] + list(m.parameters())
    g1 = torch.autograd.grad(loss(y1, s1), params)
    g2 = torch.autograd.grad(loss(y2, s2), params)
    for name, a, b in zip(["x"] + [n for n, _ in m.named_parameters()], g1, g2):
        assert rel_close(a, b, 1e-9), name
        if t > 1:
            assert a.abs().sum() > 0, name  # every parameter is reached (incl. through the inner updates)


@pytest.mark.parametrize("setting", ["paper", "v1"])
def test_streaming_equals_one_call(setting):
    m = make_hope(setting, chunk=5, aux_chunk=3)
    x = torch.randn(2, 61, 16, dtype=torch.float64)
    s, state = assert_streaming_equals_one_call(m, x, pieces(61, random.Random(7)), 1e-12)
    for k in s:
        assert rel_close(state[k], s[k], 1e-10), k


def test_causality_and_batch_independence():
    m = make_hope()
    assert_causal_and_batch_independent(m, torch.randn(3, 30, 16, dtype=torch.float64), row=1, t=17)


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_every_memory_is_written_in_context(memory):
    """M_k, M_v, M_lr, M_decay (row blocks of the aux input layer), the aux output layers and the
    main memory all change within one call."""
    m = make_hope(memory=memory)
    c = m.head_dim
    with torch.no_grad():
        _, s = m(torch.randn(1, 20, 16, dtype=torch.float64))
    inits = m.memory_inits()
    first = "aux" if memory == "linear" else "aux_in"
    delta = (s[f"{first}_W"][0] - inits[first]).abs()
    for lo, hi in ((0, c), (c, 2 * c), (2 * c, 2 * c + 1), (2 * c + 1, 2 * c + 2)):
        assert delta[:, lo:hi].sum() > 1e-8
    for layer, w in inits.items():
        assert (s[f"{layer}_W"][0] - w).abs().sum() > 1e-8, layer


@pytest.mark.parametrize(
    "switch,value",
    [
        ("update", "gd"),
        ("memory", "linear"),
        ("momentum", False),
        ("target", "value"),
        ("decay_to", "init"),
        ("normalize_v", True),
    ],
)
def test_each_switch_changes_the_layer(switch, value):
    """Each switch is wired: flipping it alone (same weights where they exist) changes the output."""
    x = torch.randn(2, 25, 16, dtype=torch.float64)
    base, other = make_hope(), make_hope(**{switch: value})
    if switch == "momentum":  # the same weights but the momentum gate's rows of w_in
        sd = dict(base.state_dict(), **{"w_in.weight": base.w_in.weight[: other.w_in.weight.shape[0]]})
        other.load_state_dict(sd)
    elif switch != "memory":
        other.load_state_dict(base.state_dict())
    with torch.no_grad():
        assert not torch.allclose(base(x)[0], other(x)[0])


def test_checkpoint_of_the_first_hope_layer_loads_and_gives_its_logits():
    """tests/data/hope_v1 was exported by the first HOPE layer (before DGD, ShortConv and the
    renamed parameters): it loads into the current code with the same config hash and logits."""
    model = HybridLM.from_pretrained(DATA / "hope_v1").eval()
    expected = load_file(DATA / "hope_v1" / "expected.safetensors")
    assert model.config.config_hash() == "9f99c754a6f4b5de"
    assert model.blocks[1].mixer.v1
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    assert rel_close(logits, expected["logits"], 1e-5)
    # the layer's own load_state_dict (Lightning's resume path) renames the first layer's names too
    prefix = "blocks.1.mixer."
    saved = load_file(DATA / "hope_v1" / "model.safetensors")
    old = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
    assert {"b_eta", "b_alpha", "conv_weight", "conv_bias"} <= set(old)
    layer = make_hope("v1", d=32, heads=2, head_dim=8)
    layer.float().load_state_dict(old)
    for name, p in model.blocks[1].mixer.state_dict().items():
        assert torch.equal(layer.state_dict()[name], p), name


def test_long_fp32_stream_at_the_presets_settings_stays_bounded():
    """20,000 tokens in fp32 through the HOPE layer of the tiny presets (hope and hope-hybrid share
    its settings), with every inner step at max_lr and the decay gate at its init: outputs finite
    and every memory bounded (measured: the largest weight ~1.1 after 20,000 tokens, from <= 0.66).

    Checks the memories, not only the outputs: the output norm keeps y finite long after a memory
    has diverged."""
    cfg = HybridConfig.preset("hope", "tiny")
    hybrid = HybridConfig.preset("hope-hybrid", "tiny")
    fields = ("d_model", "mem_heads", "mem_head_dim", "mem_chunk_size", "hope_chunk_size", "mem_max_lr", "d_conv")
    assert all(getattr(cfg, f) == getattr(hybrid, f) for f in fields + tuple(HOPE_SETTINGS["paper"]))
    assert cfg.hope_update == "dgd" and cfg.hope_memory == "mlp"
    torch.manual_seed(0)
    m = HybridLM(cfg).blocks[0].mixer
    with torch.no_grad():
        m.lr_bias.fill_(30.0)  # lr = max_lr for every token
        state, top = None, 0.0
        g = torch.Generator().manual_seed(0)
        for _ in range(10):  # 20,000 tokens
            y, state = m(torch.randn(1, 2000, cfg.d_model, generator=g), state)
            top = max(top, float(y.abs().max()))
            assert torch.isfinite(y).all()
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    assert top < 1e3
    for layer, w0 in m.memory_inits().items():  # written, and bounded
        w = state[f"{layer}_W"]
        assert float(w.abs().max()) < 5, layer
        assert (w[0] - w0).abs().max() > 0.05, layer


def test_presets_use_the_papers_hope_and_v1_is_reachable():
    """The presets: the paper's switches with v normalised; v1 and the exact paper setting by name."""
    for name in ("hope", "hope-hybrid"):
        cfg = HybridConfig.preset(name, "tiny")
        assert {k: getattr(cfg, k) for k in HOPE_SETTINGS["paper"]} == {
            **HOPE_SETTINGS["paper"],
            "hope_normalize_v": True,
        }
        exact = HybridConfig.preset(name, "tiny", **HOPE_SETTINGS["paper"])
        assert not exact.hope_normalize_v and exact.config_hash() != cfg.config_hash()
        v1 = HybridConfig.preset(name, "tiny", **HOPE_SETTINGS["v1"])
        assert v1.config_hash() != cfg.config_hash()
        blk = HybridLM(v1).blocks[v1.layers.index("hope")].mixer
        assert blk.v1 and blk.switches == SETTINGS["v1"]
    # the switches are config fields: validated and part of the hash
    with pytest.raises(ValueError, match="hope_update"):
        HybridConfig(layers=["hope"], hope_update="adam")
    with pytest.raises(ValueError, match="hope_momentum"):
        HybridConfig(layers=["hope"], hope_momentum="yes")
    with pytest.raises(ValueError, match="mem_max_lr"):
        HybridConfig(layers=["hope"], hope_update="dgd", mem_max_lr=1.5)
    assert HybridConfig(hope_target="self").config_hash() != HybridConfig().config_hash()


def test_bad_input():
    with pytest.raises(ValueError, match="chunk_size"):
        HOPE(16, 2, 4, chunk_size=0)
    with pytest.raises(ValueError, match="max_lr"):
        HOPE(16, 2, 4, max_lr=0.0)
    with pytest.raises(ValueError, match="max_lr"):
        HOPE(16, 2, 4, max_lr=1.0)  # DGD needs max_lr < 1
    with pytest.raises(ValueError, match="update"):
        HOPE(16, 2, 4, update="adam")
    with pytest.raises(ValueError, match="momentum"):
        HOPE(16, 2, 4, momentum="on")
    m = make_hope()
    s = m.init_state(2, dtype=torch.float64)
    s["mem_in_W"] = s["mem_in_W"][:, :1]
    with pytest.raises(ValueError, match="mem_in_W"):
        m(torch.randn(2, 3, 16, dtype=torch.float64), s)
    s = m.init_state(2, dtype=torch.float64)
    s["pos"] = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="pos"):
        m(torch.randn(2, 3, 16, dtype=torch.float64), s)


@pytest.mark.parametrize("name", ["hope", "hope-hybrid", "titans"])
def test_memory_preset_sizes(name):
    needs = {"hope-hybrid": "nestlm.layers.mamba2", "titans": "nestlm.layers.memory"}.get(name)
    if needs and importlib.util.find_spec(needs) is None:
        pytest.skip(f"needs {needs}")
    counts = {}
    for size in ("tiny", "125m"):
        with torch.device("meta"):  # count without allocating
            counts[size] = HybridLM(HybridConfig.preset(name, size)).num_params()
    assert 1e6 <= counts["tiny"] <= 5e6, counts
    assert 110e6 <= counts["125m"] <= 140e6, counts
