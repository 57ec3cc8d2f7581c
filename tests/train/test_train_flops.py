"""The FLOP formula against brute force and torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nestlm.models import HybridConfig, HybridLM
from nestlm.train.flops import flops_per_token, mean_context, training_flops_per_batch


@pytest.mark.parametrize("t", [1, 7, 63, 257])
@pytest.mark.parametrize("window", [None, 1, 16, 300])
def test_mean_context_is_the_mean_attended_length(t, window):
    brute = sum(min(i + 1, window or t) for i in range(t)) / t
    assert mean_context(t, window) == pytest.approx(brute, rel=1e-12)


def test_dense_and_attention_terms_match_torch_flop_counter():
    cfg = HybridConfig.preset("transformer", "tiny", d_model=64, n_heads=2, layers=["attn"] * 3, vocab_size=101)
    model = HybridLM(cfg)
    b, t = 3, 37
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randint(0, 101, (b, t)))
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    sdpa = sum(v for k, v in counts.items() if "attention" in k)
    matmul = counter.get_total_flops() - sdpa
    f = flops_per_token(model, t)
    dense = sum(blk["dense"] for blk in f["blocks"]) + f["head"]
    assert matmul == b * t * dense
    attn = sum(blk["mixer"] for blk in f["blocks"])
    if sdpa:  # kernels the counter knows charge the full t x t scores; the formula the causal half + diagonal
        assert sdpa == pytest.approx(b * t * attn * 2 * t / (t + 1), rel=1e-12)
    assert attn == pytest.approx(3 * 4 * 64 * mean_context(t))
    assert f["total"] == pytest.approx(dense + attn)


def test_training_flops_and_scaling():
    cfg = HybridConfig.preset(
        "swa-transformer", "tiny", d_model=64, n_heads=2, window=16, vocab_size=101, layers=["swa", "attn"]
    )
    model = HybridLM(cfg)
    short, long = flops_per_token(model, 16), flops_per_token(model, 1024)
    # sliding window: constant per token beyond the window; full attention: grows with the length
    assert short["blocks"][0]["mixer"] < long["blocks"][0]["mixer"] <= 4 * 64 * 16
    assert long["blocks"][1]["mixer"] == pytest.approx(4 * 64 * 1025 / 2)
    assert short["blocks"][0]["dense"] == long["blocks"][0]["dense"] > 0
    per_tok = flops_per_token(model, 50)["total"]
    assert training_flops_per_batch(model, 4, 50) == pytest.approx(3 * 4 * 50 * per_tok)
    assert training_flops_per_batch(model, 4, 50, activation_checkpointing=True) == pytest.approx(4 * 4 * 50 * per_tok)


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "memory", "hope"])
def test_recurrent_and_memory_terms(kind):
    """Each recurrent mixer adds its scan / fast-weight cost on top of its parameters."""
    pytest.importorskip(f"nestlm.layers.{kind}")
    cfg = HybridConfig.preset("transformer", "tiny", layers=[kind], channel_mixer="mlp")
    model = HybridLM(cfg)
    f = flops_per_token(model, 128)["blocks"][0]
    d_inner = cfg.expand * cfg.d_model
    if kind == "mamba":
        assert f["mixer"] == 8 * d_inner * cfg.d_state
    elif kind == "mamba2":
        q = cfg.ssm_chunk_size
        assert f["mixer"] == 4 * d_inner * cfg.ssm_d_state + (q + 1) * (d_inner + cfg.ssm_ngroups * cfg.ssm_d_state)
    else:
        state = model.init_state(1).blocks[0]["mixer"]
        floats = sum(v[0].numel() for v in state.values() if v.is_floating_point() and v.dim() >= 2)
        assert floats > 0 and f["mixer"] == 10 * floats
