"""Callbacks: training metrics, run information, non-finite guard, token throughput / MFU."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from importlib import metadata
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import Callback, ThroughputMonitor

PACKAGES = ("nestlm", "torch", "lightning", "numpy", "wandb", "safetensors", "jsonargparse")
MEMORY_MIXERS = ("memory", "hope")
LOSS_FILE = "losses.jsonl"


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/inf loss or gradient norm (the message names the step)."""


def batch_size_fn(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0])


def length_fn(batch: dict[str, torch.Tensor]) -> int:
    """Tokens in the batch (ThroughputMonitor's `length`, so it reports tokens/s)."""
    return int(batch["input_ids"].numel())


class TokenThroughput(ThroughputMonitor):
    """ThroughputMonitor counting tokens; `peak_flops` (per device, FLOP/s) enables MFU where
    Lightning has no table entry (CPUs, new GPUs)."""

    def __init__(self, window_size: int = 20, peak_flops: float | None = None) -> None:
        super().__init__(batch_size_fn=batch_size_fn, length_fn=length_fn, window_size=window_size)
        self.peak_flops = peak_flops

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops is not None:
            self.available_flops = int(self.peak_flops)
            for s in list(self._throughputs):
                self._throughputs[s] = Throughput(
                    available_flops=self.available_flops, world_size=trainer.world_size, **self.kwargs
                )


def git_sha(path: str | os.PathLike | None = None) -> str | None:
    """Commit of the source tree nestlm is imported from (None outside a git checkout)."""
    where = Path(path) if path is not None else Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) if sha else None


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            mod = sys.modules.get(p)
            out[p] = getattr(mod, "__version__", None)
    return out


def params_by_layer_type(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts of a HybridLM grouped by mixer / channel-mixer type (+ embedding, norms)."""
    counts: dict[str, int] = defaultdict(int)
    seen: set[int] = set()

    def add(key: str, module: torch.nn.Module) -> None:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                counts[key] += p.numel()

    cfg = model.config
    for i, blk in enumerate(model.blocks):
        add(f"mixer/{cfg.layers[i]}", blk.mixer)
        add(f"channel/{cfg.channel_mixer_of(i)}", blk.channel)
        add("norm", blk)
    add("embedding", model.embed)
    add("norm", model)  # final norm and untied head are what remains
    counts["total"] = sum(p.numel() for p in model.parameters())
    return dict(counts)


class TrainMetrics(Callback):
    """Per-step metrics the LightningModule does not log itself, and run information at start.

    Logged every `trainer.log_every_n_steps`: train/grad_norm (before clipping), train/tokens_per_sec
    (all ranks, from the wall time between consecutive batches), sys/data_time_s
    (time waiting for the batch), sys/peak_mem_mb (CUDA max allocated, or peak RSS on CPU), and for
    memory layers (Titans / HOPE mixers, CMS channel mixers) memory/<block>.<part>.<tensor>: the norm
    of the change of each memory tensor over the batch, per sequence (State.diff against a fresh state).

    Every step (rank 0): {"step", "loss"} appended to <run dir>/losses.jsonl (full precision).
    At fit start (rank 0): run_info.json in the run directory and in the logger's config: git SHA,
    package versions, parameter counts per layer type, the model config, world size, and for
    synthetic data the lag distribution of the probes that training covers (`trained_lags`).
    After each validation (rank 0): one line with the answer accuracy per env and probe kind.
    A non-finite loss or gradient norm raises NonFiniteLossError naming the step, before the
    optimizer step, so no checkpoint ever holds the damaged weights.
    """

    def __init__(self, memory_norms: bool = True) -> None:
        self.memory_norms = memory_norms
        self._t_end: float | None = None
        self._data_time = 0.0
        self._step_time: float | None = None

    # --- run information -----------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_end = None
        if not trainer.is_global_zero:
            return
        info = {
            "git_sha": git_sha(),
            "packages": package_versions(),
            "world_size": trainer.world_size,
            "params": params_by_layer_type(pl_module.model),
            "config": pl_module.model.config.to_dict(),
            "config_hash": pl_module.model.config.config_hash(),
            "precision": str(trainer.precision),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        dm = trainer.datamodule
        if hasattr(dm, "trained_lags"):  # which lags the answer-weighted windows actually train on
            info["trained_lags"] = dm.trained_lags()
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))
        for logger in trainer.loggers:
            logger.log_hyperparams({"run_info": {k: v for k, v in info.items() if k != "config"}})
        p = info["params"]
        print(
            f"nestlm: {p['total'] / 1e6:.2f}M parameters "
            f"({', '.join(f'{k} {v / 1e6:.2f}M' for k, v in p.items() if k != 'total')}); "
            f"git {info['git_sha']}; torch {info['packages']['torch']}",
            flush=True,
        )
        if "trained_lags" in info:
            lags = ", ".join(f"{k}: {v}" for k, v in info["trained_lags"].items())
            print(f"nestlm: probes trained on by lag (first 64 windows of each stage): {lags}", flush=True)

    # --- per step ------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._data_time = 0.0 if self._t_end is None else now - self._t_end

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        norms = [p.grad.detach().float().norm() for p in pl_module.parameters() if p.grad is not None]
        total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        loss = trainer.callback_metrics.get("train/loss")
        if not torch.isfinite(total):
            raise NonFiniteLossError(
                f"gradient norm is {float(total)} at step {trainer.global_step + 1} "
                f"(loss {float(loss) if loss is not None else 'n/a'}); stopped before the "
                "optimizer step"
            )
        pl_module.log("train/grad_norm", total, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._step_time = None if self._t_end is None else now - self._t_end
        self._t_end = now
        if trainer.is_global_zero and outputs is not None:
            # exact per-step losses of rank 0 (a resumed run appends; the newest entry of a step wins)
            with open(Path(trainer.default_root_dir) / LOSS_FILE, "a") as f:
                f.write(json.dumps({"step": trainer.global_step, "loss": float(outputs["loss"])}) + "\n")
        if not trainer._logger_connector.should_update_logs:
            return
        metrics: dict[str, float] = {"sys/data_time_s": self._data_time, "sys/peak_mem_mb": peak_memory_mb(pl_module)}
        if self._step_time:  # wall time from the previous batch's end: data + forward + backward + step
            metrics["train/tokens_per_sec"] = batch["input_ids"].numel() * trainer.world_size / self._step_time
        if self.memory_norms and pl_module.last_state is not None:
            metrics.update(memory_update_norms(pl_module.model, pl_module.last_state))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        accs = {
            k[4:-4]: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and k.endswith("/acc")
        }
        if accs:
            print(
                f"nestlm: step {trainer.global_step} val answer accuracy: "
                + ", ".join(f"{k} {v:.3f}" for k, v in sorted(accs.items())),
                flush=True,
            )

    def on_train_end(self, trainer, pl_module) -> None:
        self._t_end = None


def peak_memory_mb(pl_module: L.LightningModule) -> float:
    if pl_module.device.type == "cuda":
        return torch.cuda.max_memory_allocated(pl_module.device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


@torch.no_grad()
def memory_update_norms(model: torch.nn.Module, state) -> dict[str, float]:
    """Norm of the change of every memory tensor over the latest batch, per sequence.

    Keys: memory/blocks.<i>.<mixer|channel>.<tensor>. Only memory components (memory / hope mixers,
    cms channel mixers) are reported; SSM and attention caches are not memories that learn.
    """
    cfg = model.config
    batch = next((t.shape[0] for t in state.flat().values()), 1)
    fresh = model.init_state(batch_size=batch)
    keep = []
    for i, kind in enumerate(cfg.layers):
        if kind in MEMORY_MIXERS:
            keep.append(f"blocks.{i}.mixer.")
        if cfg.channel_mixer_of(i) == "cms":
            keep.append(f"blocks.{i}.channel.")
    if not keep:
        return {}
    floats = {k for k, t in state.flat().items() if t.is_floating_point()}
    d = fresh.diff(state.detach())
    return {
        f"memory/{k}": v / math.sqrt(batch)
        for k, v in d.items()
        if k in floats and any(k.startswith(p) for p in keep) and math.isfinite(v)
    }


def check_finite_loss(loss: torch.Tensor, step: int) -> None:
    """Raise NonFiniteLossError unless `loss` is finite; `step` is the 1-based step being computed."""
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"loss is {float(loss)} at step {step}; stopped before the optimizer step")
