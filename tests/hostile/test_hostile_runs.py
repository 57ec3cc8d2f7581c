"""Run directories under mistakes: resuming another model, a fresh fit into another run's folder, a
kill during a save, checkpoints the callback lost track of, and the non-finite stop."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from hostile_helpers import TINY_YAML, assert_one_line, fit_args, make_shards, run

from nestlm.models.loading import read_checkpoint


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards):
    """A finished 3-step run (a checkpoint every step), copied by the tests that change it."""
    root = tmp_path_factory.mktemp("runs")
    run_dir = root / "base"
    from nestlm.cli import main

    main(fit_args(run_dir, shards, 3))
    return run_dir


def copy_run(trained, tmp_path, name="r"):
    dest = tmp_path / name
    shutil.copytree(trained, dest)
    shutil.copy(trained.parent / f"{trained.name}.callbacks.yaml", tmp_path / f"{name}.callbacks.yaml")
    return dest


def names(folder):
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def test_resume_with_another_model_is_refused(tmp_path, capfd, shards, trained):
    run_dir = copy_run(trained, tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    other_layers = TINY_YAML.replace("layers: [attn, swa]", "layers: [attn, attn]")
    other_size = TINY_YAML.replace("d_model: 32", "d_model: 64")
    for ck in (str(last), "last"):
        for overrides, field in ((other_layers, "layers"), (other_size, "d_model")):
            argv = fit_args(run_dir, shards, 5, "--ckpt_path", ck)
            argv[argv.index("--model.overrides") + 1] = overrides
            code, _, err = run(capfd, *argv)
            assert_one_line(code, err, "fit", "holds another model", str(run_dir), field, exit_code=2)
    assert torch.load(last, weights_only=True)["global_step"] == 3  # nothing trained


def test_fresh_fit_into_another_runs_folder(tmp_path, capfd, shards, trained):
    run_dir = copy_run(trained, tmp_path)
    before = (run_dir / "losses.jsonl").read_text()
    code, _, err = run(capfd, *fit_args(run_dir, shards, 2))
    assert_one_line(code, err, "fit", str(run_dir), "holds another run", "--force", exit_code=2)
    assert (run_dir / "losses.jsonl").read_text() == before and len(names(run_dir / "checkpoints")) == 4
    code, _, err = run(capfd, *fit_args(run_dir, shards, 2, "--force"))
    assert code == 0, err[-3000:]
    assert names(run_dir / "checkpoints") == ["last.ckpt", "step=000001.ckpt", "step=000002.ckpt"]
    assert len((run_dir / "losses.jsonl").read_text().splitlines()) == 2


def test_resume_by_another_spelling_of_the_path_keeps_last_and_prunes(tmp_path, capfd, monkeypatch, shards, trained):
    """The run was made with an absolute run-dir path; resume with a relative one and a top-k of 2:
    last.ckpt is overwritten (no last-v1.ckpt) and the step checkpoints are pruned to the newest 2."""
    run_dir = copy_run(trained, tmp_path)
    stale = run_dir / "checkpoints" / f".last.ckpt.tmp-{2**22 + 12345}"  # left by a save killed mid-write
    stale.write_bytes(b"partial")
    monkeypatch.chdir(tmp_path)
    argv = fit_args(run_dir, shards, 5, "--ckpt_path", "r/checkpoints/last.ckpt", top_k=2)
    argv[argv.index("--trainer.default_root_dir") + 1] = "r"
    code, _, err = run(capfd, *argv)
    assert code == 0, err[-3000:]
    assert names(run_dir / "checkpoints") == ["last.ckpt", "step=000004.ckpt", "step=000005.ckpt"]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    assert not stale.exists()


def test_checkpoints_the_callback_never_listed_are_pruned(tmp_path, capfd, shards, trained):
    """A kill between a step checkpoint and last.ckpt leaves a step file the restored state does not list
    (from a step the resumed run writes again); a save_top_k lower than before leaves too many listed."""
    run_dir = copy_run(trained, tmp_path)
    ck = run_dir / "checkpoints"
    shutil.copy(ck / "step=000002.ckpt", ck / "last.ckpt")  # last.ckpt from before step 3's save
    code, _, err = run(capfd, *fit_args(run_dir, shards, 4, "--ckpt_path", "last", top_k=2))
    assert code == 0, err[-3000:]
    assert names(ck) == ["last.ckpt", "step=000003.ckpt", "step=000004.ckpt"]


def test_nonfinite_stop_names_only_a_finite_checkpoint(tmp_path, capfd, shards):
    """With lr 1e6 the weights explode: the stop happens before a non-finite checkpoint is written, the
    checkpoints that lead straight to the non-finite value are moved aside, and the one named loads."""
    run_dir = tmp_path / "nan"
    code, _, err = run(capfd, *fit_args(run_dir, shards, 8, "--model.lr", "1e6"))
    line = assert_one_line(code, err, "fit", "stopped", "Last good checkpoint", exit_code=1)
    named = line.split("Last good checkpoint: ", 1)[1].split(" ", 1)[0]
    left = [p for p in (run_dir / "checkpoints").iterdir() if p.is_file()]
    for p in left:  # every checkpoint a resume could pick is finite
        read_checkpoint(p)
    moved = list((run_dir / "checkpoints" / "nonfinite").glob("*.ckpt"))
    if named != "none":
        assert any(os.path.samefile(named, p) for p in left)
        step = torch.load(named, weights_only=True)["global_step"]
        assert all(torch.load(p, weights_only=True)["global_step"] > step for p in moved)
