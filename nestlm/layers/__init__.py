"""nn.Modules, one concept per file.

Every sequence mixer and channel mixer follows one protocol:

    y, state = layer(x, state=None)      # x, y: [batch, time, d_model]
    state = layer.init_state(batch_size, device, dtype)

`state` is a flat dict of tensors whose first dimension is the batch (an empty dict for stateless
layers); `state=None` means `init_state(...)`. Feeding a sequence in consecutive pieces with the state
carried gives the same outputs as one call on the whole sequence.
"""

from nestlm.layers.attention import Attention
from nestlm.layers.cms import CMS, CMSLevel
from nestlm.layers.conv import ShortConv
from nestlm.layers.hope import HOPE
from nestlm.layers.mamba import Mamba
from nestlm.layers.mamba2 import GatedRMSNorm, Mamba2
from nestlm.layers.memory import NeuralMemory
from nestlm.layers.mlp import MLP
from nestlm.layers.norm import RMSNorm

__all__ = [
    "CMS",
    "HOPE",
    "MLP",
    "Attention",
    "CMSLevel",
    "GatedRMSNorm",
    "Mamba",
    "Mamba2",
    "NeuralMemory",
    "RMSNorm",
    "ShortConv",
]
