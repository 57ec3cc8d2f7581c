"""configs/ parse with the CLI; model config files; FSDP-sharded checkpoints export; synthetic data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from nestlm.models import HybridConfig, HybridLM
from nestlm.train.cli import DEFAULT_CONFIG, run_lightning
from nestlm.train.export import export
from nestlm.train.module import LitHybridLM

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def _print_config(capsys, *argv: str) -> dict:
    with pytest.raises(SystemExit) as e:
        run_lightning(["fit", *argv, "--print_config"])
    out = capsys.readouterr().out
    assert e.value.code in (0, None), out
    return yaml.safe_load(out)


def test_default_config_is_a_tiny_preset_on_the_level_1_curriculum(capsys):
    cfg = _print_config(capsys)
    assert cfg["model"]["size"] == "tiny"
    assert cfg["data"]["class_path"].endswith("SyntheticTrajectories")
    data = cfg["data"]["init_args"]
    assert data["loss"] == "weighted" and 0 < data["other_weight"] < 1 and len(data["curriculum"]) >= 2
    assert data["curriculum"][0]["envs"] == ["ledger:1"]
    assert all(env.endswith(":1") for stage in data["curriculum"] for env in stage["envs"])
    ck = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("RunCheckpoint")]
    assert ck and ck[0]["init_args"]["every_n_train_steps"] <= 50 and ck[0]["init_args"]["save_last"]
    assert cfg["trainer"]["logger"]["class_path"].endswith("WandbRun")
    assert DEFAULT_CONFIG.is_file() and DEFAULT_CONFIG.is_relative_to(ROOT / "nestlm")


@pytest.mark.parametrize(
    "files",
    [
        ["trainer/cpu.yaml", "data/synthetic.yaml"],
        ["trainer/gpu.yaml", "data/shards.yaml"],
        ["trainer/ddp.yaml", "cluster/slurm.yaml", "experiment/hope-hybrid-125m-shards.yaml"],
        ["trainer/fsdp.yaml", "experiment/hope-hybrid-tiny-long.yaml"],
        ["experiment/samba-tiny-synthetic.yaml"],
        ["experiment/mqar-zoology.yaml", "experiment/mqar-arms/attn2.yaml"],
        ["experiment/mqar-zoology.yaml", "experiment/mqar-arms/mamba2.yaml"],
        ["experiment/mqar-zoology.yaml", "experiment/mqar-arms/swa16.yaml"],
        ["experiment/mqar-zoology.yaml", "experiment/mqar-arms/attn2.yaml", "experiment/mqar-layout-curriculum.yaml"],
        ["experiment/hope-ablation-mqar.yaml"],
        ["experiment/level1-weighted.yaml"],
        ["experiment/level1-length.yaml"],
    ],
)
def test_config_files_parse(capsys, files):
    argv = [a for f in files for a in ("--config", str(CONFIGS / f))]
    cfg = _print_config(capsys, *argv)
    want: dict[tuple[str, str], tuple[str, object]] = {}  # a later file overrides an earlier one
    for f in files:
        for section, values in yaml.safe_load((CONFIGS / f).read_text()).items():
            if isinstance(values, dict) and "class_path" not in values and section != "data":
                want |= {(section, k): (f, v) for k, v in values.items() if not isinstance(v, (dict, list))}
    for (section, k), (f, v) in want.items():
        assert cfg[section][k] == v, (f, section, k)


def test_model_yaml_files_match_presets_and_load_by_path():
    for f in sorted((CONFIGS / "model").glob("*-tiny.yaml")):
        name = f.stem[: -len("-tiny")]
        assert HybridConfig(**yaml.safe_load(f.read_text())) == HybridConfig.preset(name, "tiny"), f.name
    module = LitHybridLM(
        config=str(CONFIGS / "model" / "transformer-tiny.yaml"), overrides={"d_model": 64, "n_heads": 2}
    )
    assert module.cfg.d_model == 64 and module.cfg.layers == HybridConfig.preset("transformer", "tiny").layers
    assert isinstance(module.hparams["config"], dict)  # the file's contents, not its path
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        LitHybridLM(config="no_such.yaml")


def test_export_of_an_fsdp_sharded_checkpoint_directory(tmp_path):
    """Lightning's FSDP sharded layout: DCP files of {"model": state_dict, ...} plus meta.pt."""
    import torch.distributed.checkpoint as dcp

    module = LitHybridLM(
        preset="transformer",
        overrides={"vocab_size": 61, "d_model": 32, "n_heads": 2, "layers": ["attn", "swa"], "window": 4},
    )
    ckpt_dir = tmp_path / "step=10.ckpt"
    # FSDP-wrapped names as they can appear in a sharded state dict
    sd = {
        k.replace("model.blocks.0.", "model.blocks.0._fsdp_wrapped_module."): v.clone()
        for k, v in module.state_dict().items()
    }
    dcp.save({"model": sd}, checkpoint_id=str(ckpt_dir))
    torch.save(
        {"nestlm_config": module.cfg.to_dict(), "global_step": 10, "hyper_parameters": dict(module.hparams)},
        ckpt_dir / "meta.pt",
    )
    out = export(ckpt_dir, tmp_path / "export")
    loaded = HybridLM.from_pretrained(out)
    ids = torch.randint(0, 61, (2, 9))
    torch.testing.assert_close(loaded(ids).logits, module.model(ids).logits, rtol=0, atol=0)
    (tmp_path / "broken").mkdir()
    with pytest.raises(ValueError, match="broken"):
        export(tmp_path / "broken", tmp_path / "e2")


def test_synthetic_trajectories_are_seeded_episodes():
    envs = pytest.importorskip("nestlm.envs")
    from nestlm.train.data import IGNORE, SyntheticTrajectories

    dm = SyntheticTrajectories(batch_size=3, seq_len=64, min_steps=20, max_steps=40, seed=3)
    a, b = (
        dm.window_batch(4, 0),
        SyntheticTrajectories(batch_size=3, seq_len=64, min_steps=20, max_steps=40, seed=3).window_batch(4, 0),
    )
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], dm.window_batch(4, 1)["input_ids"])
    assert int(a["input_ids"].max()) < dm.vocab_size <= 512
    # every row is the start of the episode its spec names; targets are the next tokens or masked
    from nestlm.train.data import batch_rng

    for spec, x, y in zip(dm.episode_specs(batch_rng(3, 4, 0), dm.stages[0], 3), a["input_ids"], a["labels"]):
        tokens = envs.generate_episode(spec[0], n_steps=spec[1], seed=spec[2], split="train").tokens
        n = min(len(tokens), 65)
        assert x[: n - 1].tolist() == tokens[: n - 1] and y[: n - 1].tolist() == tokens[1:n]
        assert (y[n - 1 :] == IGNORE).all()
    kinds = {env for k in range(8) for env, _, _ in dm.episode_specs(batch_rng(3, k, 0), dm.stages[0], 3)}
    assert kinds == {"ledger", "shell", "courier"}
    val = dm.val_batches()
    assert len(val) == 3 * dm.val_batches_n and torch.equal(val[0]["input_ids"], dm.val_batches()[0]["input_ids"])
    with pytest.raises(ValueError, match="envs"):
        SyntheticTrajectories(envs=["chess"])
