"""End-to-end `nestlm fit` on a tiny model: checkpoints, offline W&B history, export, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from train_helpers import cli_env, fit_argv, losses, make_shards, run_cli, wandb_history

from nestlm.models import HybridLM
from nestlm.train.module import LitHybridLM

STEPS = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    data = make_shards(root)
    run_dir = root / "runs" / "r"
    p = run_cli(fit_argv(run_dir, data, STEPS), cwd=root)
    return {"root": root, "data": data, "run_dir": run_dir, "out": p.stdout + p.stderr}


def test_fit_writes_checkpoints_and_reports(run):
    ck = run["run_dir"] / "checkpoints"
    names = {p.name for p in ck.iterdir()}
    assert "last.ckpt" in names
    assert {"step=000004.ckpt", "step=000008.ckpt"} <= names, names
    for f in ("config.yaml", "run_info.json", "wandb_run_id", "export/config.json", "export/model.safetensors"):
        assert (run["run_dir"] / f).is_file(), f
    info = json.loads((run["run_dir"] / "run_info.json").read_text())
    assert info["params"]["total"] == sum(v for k, v in info["params"].items() if k != "total")
    assert set(info["params"]) >= {"mixer/attn", "mixer/swa", "channel/mlp", "embedding"}
    assert info["packages"]["torch"] and info["config"]["d_model"] == 64
    assert info["precision"] == "32-true"  # precision unset: fp32 on CPU
    assert "nestlm eval --ckpt" in run["out"] and "W&B run" in run["out"]
    assert sorted(losses(run["run_dir"])) == list(range(1, STEPS + 1))


def test_offline_wandb_history_has_metrics(run):
    rows = wandb_history(run["run_dir"])
    keys = set().union(*rows)
    for k in (
        "train/loss",
        "train/ppl",
        "train/grad_norm",
        "lr-AdamW/decay",
        "lr-AdamW/no_decay",
        "train/tokens_per_sec",
        "train/device/flops_per_sec",
        "train/device/mfu",
        "sys/peak_mem_mb",
        "sys/data_time_s",
        "val/loss",
    ):
        assert k in keys, (k, sorted(keys))
    logged = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(logged) >= STEPS - 1 and all(math.isfinite(v) for v in logged)
    rid = (run["run_dir"] / "wandb_run_id").read_text().strip()
    assert list(run["run_dir"].glob(f"wandb/offline-run-*/run-{rid}.wandb"))


def test_checkpoint_is_weights_only_loadable(run):
    ckpt = torch.load(run["run_dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    assert ckpt["hyper_parameters"]["preset"] == "transformer"
    assert ckpt["nestlm_config"]["layers"] == ["attn", "swa"]
    module = LitHybridLM.load_from_checkpoint(run["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert module.cfg.to_dict() == ckpt["nestlm_config"]


def test_export_loads_in_fresh_process_with_same_logits(run, tmp_path):
    module = LitHybridLM.load_from_checkpoint(run["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True).eval()
    ids = torch.randint(0, 257, (2, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = module(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch; from nestlm.models import HybridLM; "
        "m = HybridLM.from_pretrained(sys.argv[1]).eval(); ids = torch.load(sys.argv[2]); "
        "torch.save(m(ids).logits.detach(), sys.argv[3])"
    )
    for export_dir in (run["run_dir"] / "export", tmp_path / "exp"):
        if export_dir != run["run_dir"] / "export":
            run_cli(["export", str(run["run_dir"] / "checkpoints" / "last.ckpt"), str(export_dir)], cwd=tmp_path)
        subprocess.run(
            [sys.executable, "-c", script, str(export_dir), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
            check=True,
            env=cli_env(),
            cwd=tmp_path,
            timeout=120,
        )
        got = torch.load(tmp_path / "out.pt", weights_only=True)
        assert torch.equal(got, want)
    assert isinstance(HybridLM.from_pretrained(tmp_path / "exp"), HybridLM)


def test_export_refuses_bad_input_and_overwrite(run, tmp_path):
    last = run["run_dir"] / "checkpoints" / "last.ckpt"
    trunc = tmp_path / "trunc.ckpt"
    trunc.write_bytes(last.read_bytes()[:5000])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    for bad, needle in (
        (tmp_path / "missing.ckpt", "does not exist"),
        (trunc, "truncated"),
        (foreign, "not a Lightning checkpoint"),
    ):
        p = run_cli(["export", str(bad), str(tmp_path / "out")], cwd=tmp_path, check=False)
        assert p.returncode != 0
        err = p.stderr.strip().splitlines()
        assert len(err) == 1 and str(bad) in err[0] and needle in err[0], p.stderr
        assert not (tmp_path / "out").exists()
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    p = run_cli(["export", str(last), str(keep)], cwd=tmp_path, check=False)
    assert p.returncode != 0 and "not empty" in p.stderr
    assert (keep / "notes.txt").read_text() == "mine" and len(list(keep.iterdir())) == 1


def test_fit_bad_ckpt_path_and_unknown_key(run, tmp_path):
    trunc = tmp_path / "trunc.ckpt"
    trunc.write_bytes((run["run_dir"] / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    run_dir = tmp_path / "runs" / "bad"
    for bad, needle in ((tmp_path / "nope.ckpt", "does not exist"), (trunc, "truncated")):
        p = run_cli(fit_argv(run_dir, run["data"], 2, "--ckpt_path", str(bad), logger=False), cwd=tmp_path, check=False)
        assert p.returncode != 0
        err = [ln for ln in p.stderr.splitlines() if ln.startswith("nestlm fit")]
        assert len(err) == 1 and str(bad) in err[0] and needle in err[0], p.stderr[-2000:]
        assert not (run_dir / "checkpoints").exists()
    p = run_cli(fit_argv(run_dir, run["data"], 2, "--model.no_such_key", "1", logger=False), cwd=tmp_path, check=False)
    assert p.returncode == 2 and "no_such_key" in p.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(run, tmp_path):
    run_dir = tmp_path / "runs" / "nan"
    p = run_cli(
        fit_argv(run_dir, run["data"], 10, logger=False, ckpt_every=2, poison_step=5), cwd=tmp_path, check=False
    )
    assert p.returncode == 1, p.stderr[-2000:]
    msg = [ln for ln in p.stderr.splitlines() if ln.startswith("nestlm fit: stopped")]
    assert len(msg) == 1 and "at step 5" in msg[0] and "last.ckpt" in msg[0], p.stderr[-2000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
