"""Kill -9 a CPU run at a random step, resume with `--ckpt_path last`: the per-step losses equal
those of an uninterrupted run (|delta| <= 1e-6, fp32), and the W&B run id is kept."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import TINY_OVERRIDES, cli_env, fit_argv, losses, make_shards, run_cli

from nestlm.train.checkpoint import AtomicCheckpointIO

STEPS, EVERY = 14, 3


def _raw_steps(run_dir) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run_dir / "losses.jsonl").read_text().splitlines() if ln.strip()]


# synthetic episodes with a step stage, a gate (min_accuracy 0: it passes at its first check, step 2)
# and 32-token windows fed as 16-token segments with the recurrent state carried
CURRICULUM = """data:
  class_path: nestlm.train.data.SyntheticTrajectories
  init_args:
    loss: answers
    segment_len: 16
    envs: [ledger:1, mqar, shell:1]
    curriculum:
      - {envs: [mqar], min_steps: 4, max_steps: 6, gate: {min_accuracy: 0.0, every: 2, episodes: 2}}
      - {envs: [ledger:1], min_steps: 3, max_steps: 5, until_step: 8}
      - {envs: [mqar, shell:1], min_steps: 3, max_steps: 6}
"""


@pytest.mark.parametrize("data_kind", ["shards", "curriculum"])
def test_kill9_then_resume_gives_identical_losses(tmp_path, data_kind):
    data = make_shards(tmp_path)
    kw = {}
    if data_kind == "curriculum":
        (tmp_path / "curriculum.yaml").write_text(CURRICULUM)
        kw = dict(data=["--config", str(tmp_path / "curriculum.yaml")], overrides=TINY_OVERRIDES.replace("257", "512"))
    ref = tmp_path / "runs" / "ref"
    run_cli(fit_argv(ref, data, STEPS, logger=False, ckpt_every=EVERY, **kw), cwd=tmp_path)

    run = tmp_path / "runs" / "killed"
    kill_at = random.Random().randint(EVERY + 1, STEPS - 3)
    print(f"killing at step {kill_at}")
    argv = fit_argv(run, data, STEPS, ckpt_every=EVERY, **kw)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nestlm", *argv],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            f = run / "losses.jsonl"
            if f.is_file() and max(_raw_steps(run), default=0) >= kill_at:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        proc.kill()  # SIGKILL: no handler, no final save
        proc.wait()
    killed_at = max(_raw_steps(run))
    run_id = (run / "wandb_run_id").read_text()

    run_cli(fit_argv(run, data, STEPS, "--ckpt_path", "last", ckpt_every=EVERY, **kw), cwd=tmp_path)

    steps = _raw_steps(run)
    first_resumed = steps[killed_at]  # the first entry written by the resumed process
    # it resumes after the last checkpoint: at or before the last logged step, or right after it
    # when the kill landed after that step's checkpoint had been written
    assert first_resumed <= killed_at + 1 and (first_resumed - 1) % EVERY == 0, (steps, killed_at)
    a, b = losses(ref), losses(run)
    assert sorted(b) == list(range(1, STEPS + 1))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= 1e-6, (worst, a, b)
    assert (run / "wandb_run_id").read_text() == run_id
    if data_kind == "curriculum":  # the gate passed at its first check, and the checkpoint kept that
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["SyntheticTrajectories"] == {"gate_passed": {"0": 2}}
    assert len(list(run.glob(f"wandb/offline-run-*/run-{run_id.strip()}.wandb"))) == 2


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("simulated crash in the middle of a save")


def test_atomic_save_never_leaves_a_partial_file(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(5.0)}, target)
    try:
        io.save_checkpoint({"step": 2, "w": torch.zeros(10**6), "bad": _Unpicklable()}, target)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the save should have failed")
    ckpt = torch.load(target, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.arange(5.0))
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]
