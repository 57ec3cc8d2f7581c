"""HybridLM on CUDA: streaming in fp32 and a bf16-autocast forward. Skipped without a GPU."""

import pytest
import torch

from nestlm.models import HybridConfig, HybridLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("preset", ["transformer", "swa-transformer", "samba", "hope-hybrid"])
def test_cuda_streaming_fp32_and_bf16(preset):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset(preset, "tiny")).cuda().eval()
    x = torch.randint(0, 512, (2, 300), device="cuda")
    with torch.no_grad():
        full = model(x).logits
        a = model(x[:, :131])
        b = model(x[:, 131:], a.state)
        streamed = torch.cat([a.logits, b.logits], 1)
        assert (streamed - full).norm() / full.norm() < 1e-4
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        assert torch.isfinite(out.logits).all()
        assert all(
            t.dtype in (torch.float32, torch.int64) for k, t in out.state.flat().items() if not k.endswith((".k", ".v"))
        ), "recurrent state must stay fp32 under autocast"
