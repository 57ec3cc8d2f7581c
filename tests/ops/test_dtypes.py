"""The one state-precision rule: recurrent state in fp32, fp64 stays fp64."""

import torch

from nestlm.ops.dtypes import state_dtype


def test_state_dtype_is_fp32_unless_something_is_fp64():
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        assert state_dtype(dt) == torch.float32
        assert state_dtype(torch.zeros(1, dtype=dt)) == torch.float32
    assert state_dtype(torch.float64) == torch.float64
    assert state_dtype(torch.zeros(1, dtype=torch.bfloat16), None, torch.zeros(1, dtype=torch.float64)) == torch.float64
    assert state_dtype(None) == torch.float32
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert state_dtype() == torch.float64 and state_dtype(torch.float32) == torch.float32
    finally:
        torch.set_default_dtype(prev)
