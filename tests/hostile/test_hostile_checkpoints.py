"""Hostile and mistaken checkpoints, sharded folders and export folders: no pickle runs, nothing
non-finite or mis-shaped loads, every refusal is one line naming the file and what is wrong."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import stat
import warnings

import pytest
import torch
from hostile_helpers import assert_one_line, lightning_ckpt, run, tiny_model

from nestlm.models import HybridLM
from nestlm.models.loading import CheckpointError, load_model, read_checkpoint


class CreatesFile:
    """Unpickling this calls open(path, "w"): it creates `path` if any plain pickle.load reads it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def sharded_folder(tmp_path, model, name="step=4.ckpt", extra=None):
    """Lightning's FSDP sharded layout: DCP files of {"model", "optimizer_0", ...} + meta.pt."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / name
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 257, (1, 5))).logits.sum().backward()
    opt.step()
    state = {"model": {f"model.{k}": v for k, v in model.state_dict().items()}, "optimizer_0": opt.state_dict()}
    state.update(extra or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    torch.save({"nestlm_config": model.config.to_dict(), "global_step": 4}, folder / "meta.pt")
    return folder


def test_sharded_folder_with_optimizer_bytes_still_loads(tmp_path):
    model = tiny_model()
    folder = sharded_folder(tmp_path, model)
    ckpt = read_checkpoint(folder)  # every entry, the optimizer's byte entries (lr, betas, ...) included
    assert ckpt["global_step"] == 4 and "model.embed.weight" in ckpt["state_dict"]
    loaded, info = load_model(folder)
    ids = torch.randint(0, 257, (2, 7))
    assert info["kind"] == "ckpt" and torch.equal(loaded(ids).logits, model.eval()(ids).logits)


def test_crafted_dcp_metadata_never_runs(tmp_path, capfd):
    folder = sharded_folder(tmp_path, tiny_model())
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(CreatesFile(marker)))
    code, _, err = run(capfd, "export", folder, tmp_path / "out")
    assert_one_line(
        code, err, "export", str(folder), "open is not a torch.distributed.checkpoint metadata type", exit_code=1
    )
    code, _, err = run(capfd, "eval", "--ckpt", folder, "--envs", "shell", "--horizons", "5", "--out", tmp_path / "r")
    assert_one_line(
        code, err, "eval", str(folder), "open is not a torch.distributed.checkpoint metadata type", exit_code=1
    )
    code, _, err = run(capfd, "fit", "--ckpt_path", folder, "--trainer.default_root_dir", tmp_path / "run")
    assert_one_line(
        code, err, "fit", str(folder), "open is not a torch.distributed.checkpoint metadata type", exit_code=1
    )
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_crafted_dcp_byte_entry_never_runs(tmp_path, capfd):
    marker = tmp_path / "pwned"
    folder = sharded_folder(tmp_path, tiny_model(), extra={"note": CreatesFile(marker)})
    assert not marker.exists()
    code, _, err = run(capfd, "fit", "--ckpt_path", folder, "--trainer.default_root_dir", tmp_path / "run")
    assert_one_line(code, err, "fit", str(folder), "Weights only load failed", exit_code=1)
    assert not marker.exists()


def test_damaged_shards_are_one_line(tmp_path, capfd):
    """torch raises its BaseException-derived CheckpointException for a damaged shard."""
    folder = sharded_folder(tmp_path, tiny_model())
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    code, _, err = run(capfd, "export", folder, tmp_path / "out")
    assert_one_line(code, err, "export", str(folder), "cannot read the sharded checkpoint", exit_code=1)


def test_non_finite_weights_are_refused_everywhere(tmp_path, capfd):
    model = tiny_model()
    name = next(n for n, p in model.named_parameters() if n.startswith("blocks.1.") and p.dim() == 2)
    with torch.no_grad():
        dict(model.named_parameters())[name][0, 0] = float("nan")
    model.save_pretrained(tmp_path / "export")
    with pytest.raises(CheckpointError, match=name):
        HybridLM.from_pretrained(tmp_path / "export")
    code, _, err = run(
        capfd, "eval", "--ckpt", tmp_path / "export", "--envs", "shell", "--horizons", "5", "--out", tmp_path / "r.json"
    )
    assert_one_line(code, err, "eval", name, "non-finite", exit_code=1)
    assert not (tmp_path / "r.json").exists()

    nan = tiny_model()
    with torch.no_grad():
        for p in nan.parameters():
            p.fill_(float("nan"))
    ckpt = lightning_ckpt(tmp_path / "nan.ckpt", nan)
    for argv, cmd in (
        (("export", ckpt, tmp_path / "out"), "export"),
        (("eval", "--ckpt", ckpt, "--envs", "shell", "--horizons", "5", "--out", tmp_path / "r.json"), "eval"),
    ):
        code, _, err = run(capfd, *argv)
        assert_one_line(code, err, cmd, str(ckpt), "non-finite", exit_code=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "field,value",
    [
        ("rope_theta", -1),
        ("rope_theta", float("inf")),
        ("cms_periods", None),
        ("init_std", "abc"),
        ("tie_embeddings", "no"),
        ("norm_eps", float("nan")),
        ("d_modle", 32),
    ],
)
def test_bad_config_json_fields_name_the_field(tmp_path, capfd, field, value):
    tiny_model().save_pretrained(tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "e" / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(
        capfd, "eval", "--ckpt", tmp_path / "e", "--envs", "shell", "--horizons", "5", "--out", tmp_path / "r.json"
    )
    line = assert_one_line(code, err, "eval", "config.json", field, exit_code=1)
    if field == "d_modle":
        assert "did you mean 'd_model'" in line


def test_config_that_is_not_a_mapping(tmp_path, capfd):
    tiny_model().save_pretrained(tmp_path / "e")
    (tmp_path / "e" / "config.json").write_text("[1, 2]")
    code, _, err = run(
        capfd, "eval", "--ckpt", tmp_path / "e", "--envs", "shell", "--horizons", "5", "--out", tmp_path / "r.json"
    )
    assert_one_line(code, err, "eval", "config.json", "list", exit_code=1)
    ckpt = lightning_ckpt(tmp_path / "s.ckpt", tiny_model(), nestlm_config="hope-hybrid")
    code, _, err = run(capfd, "export", ckpt, tmp_path / "out")
    assert_one_line(code, err, "export", str(ckpt), "nestlm_config", "str", exit_code=1)


def test_shape_mismatch_is_one_line_naming_the_tensor(tmp_path, capfd):
    small, big = tiny_model(), tiny_model(d_model=64)
    ckpt = lightning_ckpt(tmp_path / "m.ckpt", big)
    torch.save({**torch.load(ckpt, weights_only=True), "nestlm_config": small.config.to_dict()}, ckpt)
    code, _, err = run(capfd, "export", ckpt, tmp_path / "out")
    line = assert_one_line(code, err, "export", str(ckpt), "embed.weight", "(257, 64)", "(257, 32)", exit_code=1)
    assert "export: export" not in line  # no doubled prefix


def test_unreadable_checkpoint_reason_is_kept_whole(tmp_path, capfd):
    good = lightning_ckpt(tmp_path / "g.ckpt", tiny_model())
    trunc = tmp_path / "t.ckpt"
    trunc.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(trunc)
    reason = str(e.value).split("(", 1)[1]
    assert len(reason) > 30 and "\n" not in str(e.value)
    pickled = tmp_path / "p.ckpt"
    torch.save({"state_dict": {}, "x": CreatesFile(tmp_path / "pwned")}, pickled)
    code, _, err = run(capfd, "export", pickled, tmp_path / "out")
    line = assert_one_line(code, err, "export", str(pickled), exit_code=1)
    assert "GLOBAL io.open" in line and not (tmp_path / "pwned").exists()  # the end of torch's reason survives


def test_export_honours_the_umask(tmp_path, capfd):
    ckpt = lightning_ckpt(tmp_path / "g.ckpt", tiny_model())
    old = os.umask(0o022)
    try:
        code, _, err = run(capfd, "export", ckpt, tmp_path / "out")
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    for f in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_expected_shapes_are_those_of_the_built_model():
    """The loader checks weights against a model built on the meta device; it must be the real one."""
    from nestlm.models import HybridConfig
    from nestlm.models.loading import expected_shapes
    from nestlm.models.presets import PRESETS

    for name in PRESETS:
        cfg = HybridConfig.preset(name, "tiny")
        assert expected_shapes(cfg) == {k: tuple(v.shape) for k, v in HybridLM(cfg).state_dict().items()}, name
