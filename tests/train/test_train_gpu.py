"""GPU training paths (skipped without CUDA): bf16-mixed by default, FSDP per block with sharded
checkpoints that `nestlm export` consolidates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import fit_argv, make_shards, run_cli

from nestlm.models import HybridLM
from nestlm.models.loading import model_state_dict, read_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_gpu_fit_defaults_to_bf16_mixed(tmp_path):
    data = make_shards(tmp_path)
    run = tmp_path / "runs" / "gpu"
    run_cli(fit_argv(run, data, 4, "--trainer.accelerator", "gpu", logger=False, ckpt_every=2), cwd=tmp_path)
    info = json.loads((run / "run_info.json").read_text())
    assert info["precision"] == "bf16-mixed"
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_fsdp_per_block_sharded_checkpoint_exports(tmp_path):
    data = make_shards(tmp_path)
    run = tmp_path / "runs" / "fsdp"
    run_cli(
        fit_argv(
            run,
            data,
            4,
            "--config",
            str(CONFIGS / "trainer" / "fsdp.yaml"),
            "--trainer.devices",
            "1",
            logger=False,
            ckpt_every=2,
        ),
        cwd=tmp_path,
    )
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "meta.pt").is_file()
    model = HybridLM.from_pretrained(run / "export")
    want = model_state_dict(read_checkpoint(last))
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k].to(v.dtype)), k
