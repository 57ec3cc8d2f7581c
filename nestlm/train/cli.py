"""`nestlm fit|validate|test`: LightningCLI over LitHybridLM and the nestlm DataModules.

With no arguments `nestlm fit` runs the embedded default (nestlm/configs/default.yaml): the
flagship tiny preset on synthetic agent trajectories, on CPU in a few minutes. Everything is a
standard LightningCLI option: `--config FILE` (repeatable), `--print_config`, `--trainer.max_steps`,
`--seed_everything`, `--ckpt_path last`, ...

What this CLI adds to LightningCLI:
- the run directory `trainer.default_root_dir` (default runs/default) is the one place a run lives:
  checkpoints, W&B files, config.yaml, run_info.json, losses.jsonl, export/;
- `trainer.precision` unset means bf16-mixed on a GPU and fp32 on CPU;
- `--ckpt_path` is checked before anything runs (missing / truncated / foreign checkpoint -> a
  one-line error naming the path); `last` also finds SLURM pre-emption checkpoints;
- after `fit`: the last checkpoint is exported to <run dir>/export and the locations of checkpoint,
  export and W&B run are printed with the `nestlm eval` command to run next.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from nestlm.train.callbacks import NonFiniteLossError
from nestlm.train.checkpoint import newest_last_checkpoint, read_checkpoint
from nestlm.train.module import LitHybridLM

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test")


class RunConfig(SaveConfigCallback):
    """Writes the resolved config to <run dir>/config.yaml and into the logger's run config."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": resolved})


def _class_paths(node) -> list[Namespace]:
    if isinstance(node, list):
        return [n for n in node if isinstance(n, Namespace)]
    return [node] if isinstance(node, Namespace) else []


class NestCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self._t0 = time.time()
        super().__init__(
            LitHybridLM,
            L.LightningDataModule,
            subclass_mode_data=True,
            save_config_callback=RunConfig,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={c: {"default_config_files": [str(DEFAULT_CONFIG)]} for c in SUBCOMMANDS},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        tr = cfg.trainer
        tr.default_root_dir = str(tr.default_root_dir or os.path.join("runs", "default"))
        if tr.precision is None:
            gpu = torch.cuda.is_available() and tr.accelerator in ("auto", "gpu", "cuda")
            tr.precision = "bf16-mixed" if gpu else "32-true"
        if tr.logger in (False, None) and isinstance(tr.callbacks, list):
            # LearningRateMonitor refuses to run without a logger; `--trainer.logger false` should just work
            tr.callbacks = [
                c
                for c in tr.callbacks
                if not (isinstance(c, Namespace) and str(c.class_path).endswith("LearningRateMonitor"))
            ]
        for lg in _class_paths(tr.logger):
            if str(lg.class_path).endswith("WandbRun") and lg.init_args.get("save_dir") is None:
                lg.init_args.save_dir = tr.default_root_dir

    # --- checkpoint to start from -----------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyperparameters of an explicit --ckpt_path file while parsing; check
        # the file first so a missing / truncated / foreign one is a one-line error, not a traceback
        sub = self.config.get("subcommand")
        ck = self.config[sub].get("ckpt_path") if sub else None
        if ck and ck not in ("last", "best", "hpc"):
            try:
                read_checkpoint(ck)
            except (FileNotFoundError, ValueError) as e:
                raise SystemExit(f"nestlm {sub}: --ckpt_path: {e}") from None
        super()._parse_ckpt_path()

    def _resolve_ckpt_path(self) -> None:
        init = self.config_init[self.subcommand]
        ck = init.get("ckpt_path")
        if ck is None or ck in ("best", "hpc"):
            return
        if ck == "last":
            found = newest_last_checkpoint(self.trainer)
            if found is None:
                if self.subcommand != "fit":
                    raise SystemExit(
                        f"nestlm {self.subcommand}: --ckpt_path last: no checkpoint under "
                        f"{self.trainer.default_root_dir}"
                    )
                print(
                    f"nestlm fit: no checkpoint under {self.trainer.default_root_dir} yet; starting fresh", flush=True
                )
                init.ckpt_path = None
                return
            init.ckpt_path = found
            try:
                read_checkpoint(found)
            except (FileNotFoundError, ValueError) as e:
                raise SystemExit(f"nestlm {self.subcommand}: --ckpt_path last: {e}") from None

    def before_fit(self) -> None:
        self._resolve_ckpt_path()

    def before_validate(self) -> None:
        self._resolve_ckpt_path()

    def before_test(self) -> None:
        self._resolve_ckpt_path()

    def fit(self, **kwargs) -> None:
        try:
            self.trainer.fit(**kwargs)
        except NonFiniteLossError as e:
            cb = self.trainer.checkpoint_callback
            last = getattr(cb, "last_model_path", "") or newest_last_checkpoint(self.trainer) or "none saved yet"
            _finish_wandb()
            raise SystemExit(f"nestlm fit: stopped: {e}. Last good checkpoint: {last}") from None

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        from nestlm.train.export import export

        run_dir = Path(self.trainer.default_root_dir).resolve()
        ckpt = newest_last_checkpoint(self.trainer)
        lines = [f"nestlm fit: finished at step {self.trainer.global_step} in {time.time() - self._t0:.0f} s"]
        target = None
        if ckpt is not None:
            target = export(ckpt, run_dir / "export", force=True)
            lines += [f"  checkpoint  {ckpt}", f"  export      {target}"]
        else:
            lines.append("  checkpoint  none (no RunCheckpoint/ModelCheckpoint with save_last in trainer.callbacks)")
        for lg in self.trainer.loggers:
            path = getattr(lg, "run_path", None)
            if path is not None:
                mode = "offline: `wandb sync " + path + "` uploads it" if lg._offline else "online"
                lines.append(f"  W&B run     {path} ({mode})")
        if target is not None:
            lines.append(f"  next        {eval_command(self.datamodule, target, run_dir)}")
        print("\n".join(lines), flush=True)


def eval_command(datamodule, target: Path, run_dir: Path) -> str:
    """The `nestlm eval` command for a finished run: in distribution (val episodes) on the envs and
    levels it trained on, or the held-out benchmark for a run on token shards."""
    envs = datamodule.val_envs() if hasattr(datamodule, "val_envs") else ["ledger", "shell", "courier"]
    split = "val --horizons 20,200" if hasattr(datamodule, "val_envs") else "test --horizons 20,200,2000"
    return f"nestlm eval --ckpt {target} --envs {','.join(envs)} --split {split} --seed 0 --out {run_dir / 'eval.json'}"


def _finish_wandb() -> None:
    """Close the W&B run of this process (so a later run in the same process starts its own)."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def run_lightning(argv: list[str] | None = None) -> None:
    """Entry point of `nestlm fit|validate|test ...` (argv includes the sub-command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # the process's own arguments are read by LightningCLI itself (and reused by the DDP launcher,
    # which re-runs this command line in each new process)
    try:
        NestCLI(args=None if argv == sys.argv[1:] else argv)
    finally:
        _finish_wandb()
