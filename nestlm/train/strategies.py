"""Distributed strategies with nestlm's wrapping unit: one HybridLM block."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.strategies import FSDPStrategy

from nestlm.models.hybrid import Block


class BlockFSDP(FSDPStrategy):
    """FSDPStrategy that shards each HybridLM `Block` as its own unit (auto-wrap per block).

    Args:
        activation_checkpointing: recompute each block in the backward pass (FSDP's own wrapper;
            leave LitHybridLM.activation_checkpointing off when using this).
        sharding_strategy: FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD or NO_SHARD.
        state_dict_type: "sharded" (one file per rank, fast; `nestlm export` consolidates it) or "full".
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "sharded",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            auto_wrap_policy={Block},
            activation_checkpointing_policy={Block} if activation_checkpointing else None,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            use_orig_params=True,
            **kwargs,
        )
