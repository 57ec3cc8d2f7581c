"""Every public name that ../DESIGN.md's contracts rely on imports from where DESIGN.md says it lives."""

import importlib
import inspect

import pytest

PUBLIC = {
    "nestlm.models": ["HybridConfig", "HybridLM", "State"],
    "nestlm.layers": ["Attention", "Mamba", "Mamba2", "NeuralMemory", "CMS", "HOPE", "MLP", "RMSNorm", "ShortConv"],
    "nestlm.ops": [
        "selective_scan",
        "selective_scan_ref",
        "ssd_scan",
        "ssd_scan_ref",
        "causal_conv1d",
        "causal_conv1d_ref",
    ],
    "nestlm.envs": ["generate_episode", "config_hash", "GENERATOR_VERSION", "ENVS", "Episode", "Probe"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_import_and_are_listed(module):
    mod = importlib.import_module(module)
    for name in PUBLIC[module]:
        assert hasattr(mod, name), f"{module}.{name} is missing"
        assert name in mod.__all__, f"{module}.__all__ does not list {name}"
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.__all__ lists {name}, which does not exist"


def test_layer_constructors_follow_mamba_ssm_names():
    from nestlm.layers import Attention, Mamba, Mamba2, NeuralMemory

    expect = {
        Mamba: ["d_model", "d_state", "d_conv", "expand"],
        Mamba2: ["d_model", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"],
        Attention: ["d_model", "n_heads", "n_kv_heads", "window"],
        NeuralMemory: ["d_model", "n_heads", "head_dim", "depth", "chunk_size"],
    }
    for cls, names in expect.items():
        params = inspect.signature(cls).parameters
        assert [n for n in params if n in names] == names, cls.__name__
    assert inspect.signature(Mamba).parameters["d_state"].default == 16
    assert inspect.signature(Mamba2).parameters["d_state"].default == 64
    assert inspect.signature(Mamba2).parameters["headdim"].default == 64
    assert inspect.signature(NeuralMemory).parameters["depth"].default == 2
    assert inspect.signature(NeuralMemory).parameters["chunk_size"].default == 16


def test_ops_follow_mamba_ssm_signatures():
    from nestlm import ops

    sig = {
        ops.selective_scan: "u delta A B C D z delta_bias delta_softplus return_last_state",
        ops.ssd_scan: "x dt A B C chunk_size D z dt_bias initial_states dt_softplus return_final_states",
        ops.causal_conv1d: "x weight bias initial_states return_final_states activation",
    }
    for fn, names in sig.items():
        params = list(inspect.signature(fn).parameters)
        assert params[: len(names.split())] == names.split(), fn.__name__
