"""Checkpoints: atomic writes, the run directory's checkpoint callback, and safe reading.

Lightning writes a local checkpoint through an fsspec transaction whose temp file lives in the
system temp dir; when that is another filesystem than the run directory (node-local /tmp, run dir
on a shared filesystem) the final move is a copy, and a kill during it leaves a truncated file.
AtomicCheckpointIO writes beside the target, fsyncs, and renames, so `last.ckpt` is always either
the previous complete checkpoint or the new complete one.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

META_FILE = "meta.pt"  # Lightning's metadata file inside an FSDP-sharded checkpoint directory


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to `path` via a temp file in the same directory + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic (remote paths keep Lightning's behaviour)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint for a run directory.

    - `dirpath` defaults to `<trainer.default_root_dir>/checkpoints`;
    - local saves are atomic (installs AtomicCheckpointIO on the strategy when it uses the default IO);
    - `ckpt_path="last"` also considers SLURM pre-emption checkpoints (`hpc_ckpt_*.ckpt` in the run
      directory), newest file wins, so a requeued job resumes from whatever was saved last.
    """

    def _run_dirpath(self, trainer) -> str:
        return self.dirpath if self.dirpath is not None else os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = self._run_dirpath(trainer)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer) -> set[str]:
        dirpath = self._run_dirpath(trainer)
        last = re.compile(rf"^{self.CHECKPOINT_NAME_LAST}(-v\d+)?{re.escape(self.FILE_EXTENSION)}$")
        hpc = re.compile(rf"^hpc_ckpt_\d+{re.escape(self.FILE_EXTENSION)}$")
        found = set()
        for folder, pattern in ((dirpath, last), (str(trainer.default_root_dir), hpc)):
            fs = get_filesystem(folder)
            if fs.exists(folder):
                found |= {os.path.normpath(p) for p in fs.ls(folder, detail=False) if pattern.match(Path(p).name)}
        return found


def newest_last_checkpoint(trainer) -> str | None:
    """What `ckpt_path="last"` resolves to for `trainer` (None when there is none yet)."""
    candidates: set[str] = set()
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            candidates |= cb._find_last_checkpoints(trainer)
    existing = [p for p in candidates if os.path.exists(p)]
    return max(existing, key=os.path.getmtime) if existing else None


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a Lightning .ckpt written by nestlm with weights_only=True, or raise a one-line error.

    FileNotFoundError: no such file. ValueError: truncated / not a torch file / not a nestlm checkpoint.
    An FSDP-sharded checkpoint directory is consolidated in memory.
    """
    path = Path(path)
    if path.is_dir():
        ckpt = _read_sharded(path)
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"checkpoint {path} is truncated or not a torch checkpoint ({first[:160]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict)")
    if "nestlm_config" not in ckpt:
        raise ValueError(f"checkpoint {path} was not written by nestlm (no nestlm_config)")
    return ckpt


def _read_sharded(path: Path) -> dict[str, Any]:
    """Consolidate Lightning's FSDP sharded layout: DCP files {"model": state_dict, ...} + meta.pt."""
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise ValueError(f"checkpoint {path} is a directory but not a sharded Lightning checkpoint (no {META_FILE})")
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    try:
        meta = torch.load(meta_file, map_location="cpu", weights_only=True)
        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(path), os.path.join(tmp, "full.pt"))
            full = torch.load(os.path.join(tmp, "full.pt"), map_location="cpu", weights_only=True)
    except Exception as e:  # DCP raises many types for missing / damaged shards
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path}: cannot read the sharded checkpoint ({first[:160]})") from None
    if "model" not in full:
        raise ValueError(f"checkpoint {path}: sharded checkpoint has no 'model' entry")
    meta["state_dict"] = full["model"]
    return meta


_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def model_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The HybridLM weights inside a LitHybridLM checkpoint (prefix `model.` dropped, wrapper names removed)."""
    out = {}
    for k, v in ckpt["state_dict"].items():
        for w in _WRAPPERS:
            k = k.replace(w, "")
        if k.startswith("model."):
            out[k[len("model.") :]] = v
    if not out:
        raise ValueError("checkpoint holds no `model.*` weights (not a nestlm training checkpoint)")
    return out
