"""Model configuration, the hybrid language model and its recurrent state."""

from nestlm.models.config import HybridConfig
from nestlm.models.hybrid import HybridLM, LMOutput, next_token_loss
from nestlm.models.state import State

__all__ = ["HybridConfig", "HybridLM", "LMOutput", "State", "next_token_loss"]
