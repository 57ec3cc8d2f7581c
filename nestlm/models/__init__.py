"""Model configuration, the hybrid language model and its recurrent state."""

from nestlm.models.config import HybridConfig
from nestlm.models.hybrid import HybridLM, LMOutput
from nestlm.models.state import State

__all__ = ["HybridConfig", "HybridLM", "LMOutput", "State"]
