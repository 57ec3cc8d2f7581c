"""Checkpoints of a run directory: atomic writes, the checkpoint callback, the non-finite stop.

Lightning writes a local checkpoint through an fsspec transaction whose temp file lives in the
system temp dir; when that is another filesystem than the run directory (node-local /tmp, run dir
on a shared filesystem) the final move is a copy, and a kill during it leaves a truncated file.
AtomicCheckpointIO writes beside the target, fsyncs, and renames, so `last.ckpt` is always either
the previous complete checkpoint or the new complete one. Reading and validating checkpoints is
nestlm.models.loading's job (the one loader, shared with export and eval).
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from nestlm.models.loading import META_FILE, CheckpointError, read_checkpoint
from nestlm.train.callbacks import NonFiniteLossError

NONFINITE_DIR = "nonfinite"  # where the checkpoints that lead straight to a non-finite loss are moved
_TMP = re.compile(r"^\..+\.tmp-(\d+)$")  # atomic_torch_save's temp files: .<name>.tmp-<pid>


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

    - `dirpath` defaults to `<trainer.default_root_dir>/checkpoints` (kept as an absolute path);
    - local saves are atomic (installs AtomicCheckpointIO on the strategy when it uses the default IO);
      temp files left by a killed save are removed at setup;
    - only finite weights are saved: a save with a NaN/inf weight raises NonFiniteLossError instead;
    - `ckpt_path="last"` also considers SLURM pre-emption checkpoints (`hpc_ckpt_*.ckpt` in the run
      directory), newest file wins, so a requeued job resumes from whatever was saved last;
    - on resume the callback's state is kept however the folder was spelled (relative / absolute),
      so `last.ckpt` is overwritten rather than joined by `last-v1.ckpt`, and with `save_top_k` > 0
      checkpoints of this callback that its state does not list (written just before a kill, or by
      a run whose state was not restored) are ranked with the others and pruned to the top k.
    """

    def _run_dirpath(self, trainer) -> str:
        return self.dirpath if self.dirpath is not None else os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = self._run_dirpath(trainer)
        if _is_local(self.dirpath):
            self.dirpath = os.path.abspath(str(self.dirpath).removeprefix("file://"))
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero:
            for folder in (self.dirpath, str(trainer.default_root_dir)):
                remove_stale_temp_files(folder)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        # local shards of sharded parameters: every rank checks its own, the decision is reduced
        params = [p.to_local() if hasattr(p, "to_local") else p for p in trainer.lightning_module.parameters()]
        finite = bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLossError(
                f"the weights hold NaN/inf values after step {trainer.global_step}; {filepath} was not written"
            )
        super()._save_checkpoint(trainer, filepath)

    # --- resume ---------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if saved is not None and self.dirpath is not None and saved != self.dirpath and self._same_folder(state_dict):
            state_dict = self._rerooted(state_dict)
        super().load_state_dict(state_dict)

    def _same_folder(self, state_dict: dict[str, Any]) -> bool:
        """Whether a saved state's dirpath is this folder (spelled otherwise, or the run folder moved)."""
        saved = str(state_dict["dirpath"])
        if _is_local(saved) and os.path.realpath(saved) == os.path.realpath(self.dirpath):
            return True
        named = [p for p in (state_dict.get("last_model_path"), *(state_dict.get("best_k_models") or {})) if p]
        return bool(named) and all(os.path.exists(os.path.join(self.dirpath, os.path.basename(p))) for p in named)

    def _rerooted(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        here = lambda p: os.path.join(self.dirpath, os.path.basename(p)) if p else p  # noqa: E731
        out = dict(state_dict, dirpath=self.dirpath)
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if key in out:
                out[key] = here(out[key])
        out["best_k_models"] = {here(p): v for p, v in (state_dict.get("best_k_models") or {}).items()}
        return out

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self.save_top_k > 0 and self.monitor is not None and _is_local(self.dirpath):
            self._adopt_untracked(trainer)

    def _own_names(self) -> re.Pattern:
        """File names this callback's `filename` template produces (any values, any version suffix)."""
        template = self.filename or "{epoch}" + self.CHECKPOINT_JOIN_CHAR + "{step}"
        literal = [re.escape(t) for t in re.split(r"\{[^}]*\}", template)]
        return re.compile(".+?".join(literal) + r"(-v\d+)?" + re.escape(self.FILE_EXTENSION) + "$")

    def _adopt_untracked(self, trainer) -> None:
        """Rank the untracked checkpoints of this callback with the tracked ones and keep the top k; an
        untracked one from after the resumed step is removed (the resumed run writes that step again,
        which would otherwise become `<name>-v1.ckpt` beside it)."""
        own, tracked = self._own_names(), {os.path.abspath(p) for p in self.best_k_models}
        last = re.compile(rf"^{self.CHECKPOINT_NAME_LAST}(-v\d+)?{re.escape(self.FILE_EXTENSION)}$")
        if not os.path.isdir(self.dirpath):
            return
        for name in sorted(os.listdir(self.dirpath)):
            path = os.path.join(self.dirpath, name)
            if last.match(name) or not own.match(name) or os.path.abspath(path) in tracked:
                continue
            ck = _load_meta(path)
            score = saved_score(ck, self.state_key)
            if score is None:
                continue  # not this callback's (or unreadable): left alone
            if isinstance(ck.get("global_step"), int) and ck["global_step"] > trainer.global_step:
                self._remove_checkpoint(trainer, path)
            else:
                self.best_k_models[path] = score
        if not self.best_k_models:
            return
        ranked = sorted(self.best_k_models, key=lambda p: float(self.best_k_models[p]), reverse=self.mode == "max")
        for path in ranked[self.save_top_k :]:
            self.best_k_models.pop(path)
            self._remove_checkpoint(trainer, path)
        kept = ranked[: self.save_top_k]
        self.best_model_path, self.best_model_score = kept[0], self.best_k_models[kept[0]]
        if len(kept) == self.save_top_k:
            self.kth_best_model_path, self.kth_value = kept[-1], self.best_k_models[kept[-1]]

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


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove atomic_torch_save temp files (`.<name>.tmp-<pid>`) whose writing process is gone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for f in folder.iterdir():
        m = _TMP.match(f.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))) and f.is_file():
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _load_meta(path: str) -> dict[str, Any] | None:
    """A checkpoint's dict without reading its tensors (memory-mapped), or None if unreadable."""
    try:
        if os.path.isdir(path):
            ck = torch.load(os.path.join(path, META_FILE), map_location="cpu", weights_only=True)
        else:
            ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 — unreadable files are simply not candidates
        return None
    return ck if isinstance(ck, dict) else None


def saved_score(ck: dict[str, Any] | None, state_key: str) -> torch.Tensor | None:
    """The monitored score a ModelCheckpoint (state key `state_key`) recorded when it saved checkpoint `ck`."""
    state = ((ck or {}).get("callbacks") or {}).get(state_key) or {}
    score = state.get("current_score")
    if isinstance(score, torch.Tensor) and score.numel() == 1:
        return score.detach().cpu()
    if isinstance(score, (int, float)) and not isinstance(score, bool):
        return torch.tensor(float(score))
    return None


def newest_last_checkpoint(trainer) -> str | None:
    """What `ckpt_path="last"` resolves to for `trainer` (None when there is none yet)."""
    candidates: set[str] = set()
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            candidates |= cb._find_last_checkpoints(trainer)
    existing = [p for p in candidates if os.path.exists(p)]
    return max(existing, key=os.path.getmtime) if existing else None


def after_nonfinite_stop(trainer) -> tuple[str | None, list[str]]:
    """Clean up after training stopped on a non-finite loss, gradient or weight; returns (the newest
    checkpoint left whose weights are finite, or None; the checkpoints moved aside).

    The stop happens at step s = trainer.global_step + 1. When the weights in memory are still finite,
    the non-finite value came from them (or from that step's batch): a checkpoint of step s - 1 holds
    exactly those weights, so resuming from it fails again at once. Such checkpoints are moved to
    `<checkpoints>/nonfinite/`; when `last.ckpt` was one of them it becomes a copy of the good one, so
    `--ckpt_path last` resumes from there. Runs on rank 0.
    """
    params = list(trainer.lightning_module.parameters())
    weights_finite = all(bool(torch.isfinite(p).all()) for p in params)
    cb = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    folders = [f for f in (getattr(cb, "dirpath", None), str(trainer.default_root_dir)) if f and os.path.isdir(f)]
    found: dict[str, int] = {}
    for folder in folders:
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if name.endswith(ModelCheckpoint.FILE_EXTENSION) and (ck := _load_meta(path)) is not None:
                step = ck.get("global_step")
                if isinstance(step, int):
                    found[path] = step
    moved = []
    if weights_finite:
        for path, step in sorted(found.items()):
            if step == trainer.global_step:
                dest = Path(os.path.dirname(path)) / NONFINITE_DIR / os.path.basename(path)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest)
                moved.append(str(dest))
                del found[path]
    good = None
    for path in sorted(found, key=lambda p: (found[p], os.path.getmtime(p)), reverse=True):
        if found[path] > trainer.global_step:
            continue  # from another timeline of this run folder (resumed from an older checkpoint)
        try:
            read_checkpoint(path, model_only=True)
        except (CheckpointError, OSError):
            continue
        good = path
        break
    last = os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION) if cb is not None else None
    if good is not None and last is not None and any(os.path.basename(m) == os.path.basename(last) for m in moved):
        if os.path.isdir(good):
            shutil.copytree(good, last)
        else:
            shutil.copy2(good, last)
    return good, moved
