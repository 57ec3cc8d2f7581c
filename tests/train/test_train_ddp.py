"""2-process DDP on CPU (gloo): a few steps, checkpoints, then the checkpoint reloads in one process."""

from __future__ import annotations

import torch
from train_helpers import fit_argv, losses, make_shards, run_cli

from nestlm.models import HybridLM
from nestlm.models.loading import model_state_dict, read_checkpoint


def test_ddp_cpu_two_processes_then_single_process_resume(tmp_path):
    data = make_shards(tmp_path)
    run = tmp_path / "runs" / "ddp"
    run_cli(
        fit_argv(
            run,
            data,
            4,
            "--trainer.strategy",
            "ddp",
            "--trainer.devices",
            "2",
            "--trainer.accelerator",
            "cpu",
            logger=False,
            ckpt_every=2,
        ),
        cwd=tmp_path,
        timeout=400,
    )
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4
    info = (run / "run_info.json").read_text()
    assert '"world_size": 2' in info

    # the same checkpoint continues in a single process (world size 1) and exports
    run_cli(fit_argv(run, data, 6, "--ckpt_path", "last", logger=False, ckpt_every=2), cwd=tmp_path)
    after = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 6 and sorted(losses(run)) == list(range(1, 7))
    model = HybridLM.from_pretrained(run / "export")
    want = model_state_dict(after)
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
