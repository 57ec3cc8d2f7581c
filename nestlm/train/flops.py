"""FLOPs of a HybridLM, per token and per training batch, for throughput and MFU.

A multiply-add counts as 2 FLOPs. Per token, the forward pass of block i costs

    dense     2 * (numel of every >=2-D parameter of the block)   projections, convs, MLPs, A
    attn      4 * d_model * ctx          QK^T and AV; ctx = mean attended length over the T positions
              (full causal: (T+1)/2; swa: the same capped at the window)
    mamba     8 * d_inner * d_state      selective scan: exp(dt*A), dt*B*u, state update, C.h
    mamba2    4 * d_inner * N + (Q+1) * (d_inner + ngroups * N)
              SSD with chunk Q: chunk states and their read-out (4 d_inner N) plus the masked
              quadratic form inside a chunk (on average (Q+1)/2 partners per token)
    memory,   10 * S                     fast-weight memories (Titans, HOPE, CMS levels), S = floats
    hope, cms                            of the block's memory state per sequence: read-out (2S), the
                                         inner gradient (forward 2S + backward 4S) and the update (2S)

plus the output head, 2 * d_model * vocab_size. Training costs 3x the forward (backward = 2x), 4x
with activation checkpointing (the forward runs twice).
"""

from __future__ import annotations

from typing import Any

import torch

FAST_WEIGHT_MIXERS = ("memory", "hope")


def mean_context(seq_len: int, window: int | None = None) -> float:
    """Mean number of keys a causal query attends to over positions 1..seq_len (capped at `window`)."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} is invalid: expected an int >= 1")
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    w = window
    # positions 1..w see t keys, the remaining seq_len - w see w keys
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def _state_floats(part: dict[str, torch.Tensor]) -> int:
    """Floats per sequence held in one block part of a State (batch dim excluded)."""
    return sum(t[0].numel() for t in part.values() if t.is_floating_point() and t.dim() >= 2)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> dict[str, Any]:
    """Forward FLOPs per token of `model` (a HybridLM) on sequences of `seq_len` tokens.

    Returns {"total": float, "head": float, "blocks": [{"type", "dense", "mixer", "channel"}, ...]}.
    """
    cfg = model.config
    state = model.init_state(batch_size=1)
    d = cfg.d_model
    blocks = []
    for i, (blk, kind) in enumerate(zip(model.blocks, cfg.layers)):
        dense = 2.0 * sum(p.numel() for p in blk.parameters() if p.dim() >= 2)
        d_inner = cfg.expand * d
        if kind == "attn":
            mixer = 4.0 * d * mean_context(seq_len)
        elif kind == "swa":
            mixer = 4.0 * d * mean_context(seq_len, cfg.window)
        elif kind == "mamba":
            mixer = 8.0 * d_inner * cfg.d_state
        elif kind == "mamba2":
            q = min(cfg.ssm_chunk_size, seq_len)
            mixer = 4.0 * d_inner * cfg.ssm_d_state + (q + 1) * (d_inner + cfg.ssm_ngroups * cfg.ssm_d_state)
        elif kind in FAST_WEIGHT_MIXERS:
            mixer = 10.0 * _state_floats(state.blocks[i]["mixer"])
        else:  # a mixer type added later without a formula: count its dense part only
            mixer = 0.0
        channel = 10.0 * _state_floats(state.blocks[i]["channel"]) if cfg.channel_mixer_of(i) == "cms" else 0.0
        blocks.append({"type": kind, "dense": dense, "mixer": mixer, "channel": channel})
    head = 2.0 * d * cfg.vocab_size
    total = head + sum(b["dense"] + b["mixer"] + b["channel"] for b in blocks)
    return {"total": total, "head": head, "blocks": blocks}


def training_flops_per_batch(
    model: torch.nn.Module, batch_size: int, seq_len: int, activation_checkpointing: bool = False
) -> float:
    """FLOPs of one training step (forward + backward) on a [batch_size, seq_len] batch."""
    factor = 4.0 if activation_checkpointing else 3.0
    return factor * batch_size * seq_len * flops_per_token(model, seq_len)["total"]
