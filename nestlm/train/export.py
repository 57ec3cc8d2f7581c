"""`nestlm export CKPT OUT_DIR`: a training checkpoint -> a `HybridLM.from_pretrained` folder.

CKPT is a Lightning .ckpt written by `nestlm fit` or an FSDP-sharded checkpoint directory.
OUT_DIR receives config.json + model.safetensors (written to a temp folder, then moved into
place). An existing non-empty OUT_DIR is left alone unless --force is given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from nestlm.models import HybridConfig, HybridLM
from nestlm.train.checkpoint import model_state_dict, read_checkpoint


def export(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Write the export folder for `ckpt_path`; returns its path."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"export: {out} exists and is not empty (pass --force to replace it)")
    ckpt = read_checkpoint(ckpt_path)
    cfg = HybridConfig.from_dict(ckpt["nestlm_config"])
    model = HybridLM(cfg)
    weights = model_state_dict(ckpt)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # a tied head is one tensor under two names; the checkpoint may hold either
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"export: {ckpt_path} does not match its config: missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nestlm export", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="Lightning .ckpt file or FSDP-sharded checkpoint directory")
    p.add_argument("out_dir", help="export folder to write (config.json + model.safetensors)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    a = p.parse_args(argv)
    try:
        out = export(a.ckpt, a.out_dir, a.force)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"nestlm export: {e}") from None
    print(f"exported {a.ckpt} -> {out} (load with HybridLM.from_pretrained({str(out)!r}))")
