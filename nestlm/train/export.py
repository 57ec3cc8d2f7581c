"""`nestlm export CKPT OUT_DIR`: a training checkpoint -> a `HybridLM.from_pretrained` folder.

CKPT is a Lightning .ckpt written by `nestlm fit` or an FSDP-sharded checkpoint directory, read and
validated by nestlm.models.loading (no pickle in it runs; config, weight shapes and finiteness are
checked). OUT_DIR receives config.json + model.safetensors (written to a temp folder, then moved into
place, with the permissions the umask gives new files). An existing non-empty OUT_DIR is left alone
unless --force is given.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from nestlm.cli import ArgumentParser, UsageError, command
from nestlm.models.loading import load_model


def publish_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out` (replacing it), with umask permissions.

    mkdtemp makes folders 0700 and some writers make files 0600; an export or a data folder is
    meant to be read by others wherever the umask allows it, as any file the user writes.
    """
    mask = os.umask(0)
    os.umask(mask)
    for root, dirs, files in os.walk(tmp):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)
    os.chmod(tmp, 0o777 & ~mask)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def export(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Write the export folder for `ckpt_path`; returns its path."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out} exists and is not empty (pass --force to replace it)")
    model, _ = load_model(ckpt_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@command("export")
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="nestlm export", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="Lightning .ckpt file or FSDP-sharded checkpoint directory")
    p.add_argument("out_dir", help="export folder to write (config.json + model.safetensors)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    a = p.parse_args(argv)
    if not Path(a.ckpt).exists():
        raise UsageError(f"checkpoint {a.ckpt} does not exist")
    out = Path(a.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not a.force:
        raise UsageError(f"OUT_DIR {out} exists and is not empty (pass --force to replace it)")
    out = export(a.ckpt, a.out_dir, a.force)
    print(f"exported {a.ckpt} -> {out} (load with HybridLM.from_pretrained({str(out)!r}))")
