"""Named architectures at named sizes: the one source of the presets.

`HybridConfig.preset(name, size)` reads this table. The files configs/model/<name>-<size>.yaml are
generated from it (a test fails when they differ):

    python -m nestlm.models.presets --write configs/model
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from nestlm.models.config import HOPE_SETTINGS

HOPE_PRESET = {**HOPE_SETTINGS["paper"], "hope_normalize_v": True}

SIZES: dict[str, dict[str, Any]] = {
    # ~1-3M parameters: trains on a laptop CPU in minutes.
    "tiny": dict(
        vocab_size=512,
        d_model=128,
        n_heads=4,
        window=128,
        ssm_headdim=32,
        ssm_d_state=32,
        ssm_chunk_size=64,
        mem_heads=4,
        mem_head_dim=32,
        mem_chunk_size=16,
        hope_chunk_size=16,
        cms_periods=[None, 16, 64],
    ),
    # ~125M parameters (GPT-2 small scale).
    "125m": dict(
        vocab_size=50304,
        d_model=768,
        n_heads=12,
        window=2048,
        ssm_headdim=64,
        ssm_d_state=128,
        ssm_chunk_size=256,
        mem_heads=12,
        mem_head_dim=64,
        mem_chunk_size=64,
        hope_chunk_size=16,
        cms_periods=[None, 512, 2048],
    ),
}

N_BLOCKS = {"tiny": 6, "125m": 12}

# The hope presets use the paper's HOPE (HOPE_SETTINGS["paper"]: DGD, residual-MLP memories,
# momentum, self-generated targets, decay towards zero) with v L2-normalised like q and k (HOPE_PRESET):
# with a raw v the self-generated targets M(v) grow with v, and training the MQAR ablation model at
# lr 3e-3 blew a memory up to ~1e4 within one chunk and the loss to NaN at step 53
# (docs/results/hope-ablation.md). HybridConfig.preset(name, size, **HOPE_SETTINGS["v1"]) gives
# nestlm's first HOPE layer, **HOPE_SETTINGS["paper"] the paper's setting exactly.
# Per (preset, size) departures from SIZES / N_BLOCKS. HOPE presets keep the main-memory chunk at 16
# (max_lr 0.1 x 16 tokens summed at one anchor stays inside the mini-batch GD bound of 2) and the
# all-HOPE 125m stack uses fewer blocks: a HOPE block (mixer + CMS with its learned views) is larger
# than an attention + MLP block.
OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    ("hope", "125m"): dict(mem_chunk_size=16, n_blocks=10),
    ("hope-hybrid", "125m"): dict(mem_chunk_size=16),
}


def _layers(name: str, n: int) -> tuple[list[str], str | list[str]]:
    """Mixer list and channel mixer(s) of preset `name` with n blocks."""
    rep = lambda group: (group * n)[:n]  # noqa: E731 — repeat a group to n blocks
    if name == "transformer":
        return rep(["attn"]), "mlp"
    if name == "swa-transformer":
        return rep(["swa"]), "mlp"
    if name == "mamba":
        return rep(["mamba"]), "mlp"
    if name == "mamba2":
        return rep(["mamba2"]), "mlp"
    if name == "samba":  # Mamba + SWA interleaved (Ren et al. 2024)
        return rep(["mamba", "swa"]), "mlp"
    if name == "titans":  # memory-as-layer: neural memory followed by sliding-window attention
        return rep(["memory", "swa"]), "mlp"
    if name == "hope":  # self-modifying Titans + CMS in every block
        return rep(["hope"]), "cms"
    if name == "hope-hybrid":  # the flagship: SSM for running state, SWA for exact local copy, HOPE memory
        layers = rep(["mamba2", "swa", "hope"])
        return layers, ["cms" if m == "hope" else "mlp" for m in layers]
    raise ValueError(f"HybridConfig.preset name={name!r} is invalid: expected one of {PRESETS}")


PRESETS = ("transformer", "swa-transformer", "mamba", "mamba2", "samba", "titans", "hope", "hope-hybrid")


def preset_dict(name: str, size: str = "tiny") -> dict[str, Any]:
    if size not in SIZES:
        raise ValueError(f"HybridConfig.preset size={size!r} is invalid: expected one of {tuple(SIZES)}")
    if name not in PRESETS:
        raise ValueError(f"HybridConfig.preset name={name!r} is invalid: expected one of {PRESETS}")
    d = dict(SIZES[size])
    if name in ("hope", "hope-hybrid"):
        d.update(HOPE_PRESET)
    d.update(OVERRIDES.get((name, size), {}))
    layers, ch = _layers(name, d.pop("n_blocks", N_BLOCKS[size]))
    d["layers"] = layers
    if isinstance(ch, list):
        d["channel_mixers"] = ch
    else:
        d["channel_mixer"] = ch
    return d


def preset_yaml(name: str, size: str) -> str:
    """The text of configs/model/<name>-<size>.yaml: the preset's fields, in table order."""
    head = f"# HybridConfig preset {name!r} at size {size!r}, generated from nestlm/models/presets.py\n"
    head += "# by `python -m nestlm.models.presets --write configs/model`: edit the table there, not this file.\n"
    return head + yaml.safe_dump(preset_dict(name, size), sort_keys=False, default_flow_style=None, width=1000)


def preset_files() -> dict[str, str]:
    """File name -> text of every preset at every size."""
    return {f"{name}-{size}.yaml": preset_yaml(name, size) for name in PRESETS for size in SIZES}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nestlm.models.presets", description=__doc__.splitlines()[0])
    p.add_argument("--write", metavar="DIR", required=True, help="folder for the <name>-<size>.yaml files")
    args = p.parse_args(argv)
    out = Path(args.write)
    out.mkdir(parents=True, exist_ok=True)
    for fname, text in preset_files().items():
        (out / fname).write_text(text)
    print(f"wrote {len(preset_files())} preset files to {out}")


if __name__ == "__main__":
    main()
