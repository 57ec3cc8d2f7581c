"""`nestlm fit|validate|test`: LightningCLI over LitHybridLM and the nestlm DataModules.

With no arguments `nestlm fit` runs the embedded default (nestlm/configs/default.yaml): the
flagship tiny preset on synthetic agent trajectories, on CPU in a few minutes. Everything is a
standard LightningCLI option: `--config FILE` (repeatable), `--print_config`, `--trainer.max_steps`,
`--seed_everything`, `--ckpt_path last`, ...

What this CLI adds to LightningCLI:
- the run directory `trainer.default_root_dir` (default runs/default) is the one place a run lives:
  checkpoints, W&B files, config.yaml, run_info.json, losses.jsonl, export/;
- `trainer.precision` unset means bf16-mixed on a GPU and fp32 on CPU;
- `--ckpt_path` is validated before anything runs (nestlm.models.loading: a missing, truncated,
  foreign or non-finite checkpoint is a one-line error naming the path); `last` also finds SLURM
  pre-emption checkpoints. The command decides the model: a checkpoint of another model config than
  the one the command asks for is refused (pass the run's options, e.g. `--config <run dir>/config.yaml`),
  and the module's other hyperparameters (lr, ...) are the command's, for an explicit path as for `last`;
- a fresh `fit` into a run directory that holds another run (checkpoints or losses) is refused
  unless `--force` is given, which removes that run's checkpoints, export and logs first;
- after `fit`: the last checkpoint is exported to <run dir>/export and the locations of checkpoint,
  export and W&B run are printed with the `nestlm eval` command to run next;
- a non-finite loss, gradient or weight stops the run naming the newest checkpoint with finite
  weights (checkpoints that lead straight to the non-finite value are moved aside);
- a bad option or value is one line on stderr and exit code 2 (NESTLM_DEBUG=1: jsonargparse's full
  message and the traceback).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from jsonargparse import ActionYesNo, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only

from nestlm.cli import CommandExit, UsageError, command, debug
from nestlm.models.loading import checkpoint_config, read_checkpoint
from nestlm.train.callbacks import LOSS_FILE, NonFiniteLossError
from nestlm.train.checkpoint import after_nonfinite_stop, newest_last_checkpoint
from nestlm.train.module import LitHybridLM, build_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test")


class RunConfig(SaveConfigCallback):
    """Writes the resolved config to <run dir>/config.yaml and into the logger's run config."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": resolved})


# what a run leaves in its directory; a fresh fit with --force removes these before it starts
RUN_FILES = ("checkpoints", "export", LOSS_FILE, "run_info.json", "config.yaml", "wandb_run_id", "eval.json")
_NOISE = re.compile(
    r"^(- )?(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value type:|"
    r"Given value:|Expected a <class 'NoneType'>|Problem with given class_path)"
)


def condense(message: str) -> str:
    """jsonargparse's multi-line parse error as one line: `--data.seq_len: Expected a int. Got value: abc`."""
    keys = [k for k in re.findall(r'Parser key "([^"]+)"', message) if k not in ("init_args", "dict_kwargs")]
    reasons = []
    for line in message.splitlines():
        line = line.strip()
        if line and not _NOISE.match(line) and not line.startswith("Parser key"):
            reasons.append(line.removeprefix("- "))
    text = re.sub(r"Expected a <class '([\w.]+)'>", r"expected \1", "; ".join(reasons) or message)
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    while m := re.match(r"--([\w.]+): ", text):  # a nested parser's message, condensed already
        keys.append(m.group(1))
        text = text[m.end() :]
    return f"--{'.'.join(keys)}: {text}" if keys else text


class OneLineParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one-line UsageErrors instead of the usage text."""

    def error(self, message: str, ex: Exception | None = None):
        if debug():
            return super().error(message, ex)
        raise UsageError(condense(message)) from None


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run that trained: checkpoints or logged losses."""
    ck, losses = run_dir / "checkpoints", run_dir / LOSS_FILE
    return (ck.is_dir() and any(ck.iterdir())) or (losses.is_file() and losses.stat().st_size > 0)


def clear_run(run_dir: Path) -> None:
    for name in RUN_FILES:
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for p in run_dir.glob("hpc_ckpt_*.ckpt"):
        p.unlink()


def check_same_model(ckpt: dict[str, Any], path: str, requested: dict[str, Any]) -> None:
    """A UsageError unless the checkpoint at `path` holds the model config the command asks for."""
    held = checkpoint_config(ckpt, f"checkpoint {path}").to_dict()
    diff = sorted(k for k in set(held) | set(requested) if held.get(k) != requested.get(k))
    if diff:
        shown = ", ".join(f"{k}: {held.get(k)!r} in the checkpoint, {requested.get(k)!r} asked for" for k in diff[:3])
        more = f" and {len(diff) - 3} more field(s)" if len(diff) > 3 else ""
        raise UsageError(
            f"--ckpt_path {path} holds another model than the command asks for ({shown}{more}); "
            "give the options of the run that wrote it (e.g. --config <run dir>/config.yaml) or start a new run"
        )


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
            parser_class=OneLineParser,
            parser_kwargs={c: {"default_config_files": [str(DEFAULT_CONFIG)]} for c in SUBCOMMANDS},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--force",
            action=ActionYesNo,
            default=False,
            help="fit: start afresh in a run directory that holds another run (its checkpoints and logs are removed)",
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
        self._check_explicit_ckpt(cfg)
        if self.subcommand == "fit" and cfg.get("ckpt_path") is None and rank_zero_only.rank == 0:
            run_dir = Path(tr.default_root_dir)
            if holds_run(run_dir):
                if not cfg.get("force"):
                    raise UsageError(
                        f"--trainer.default_root_dir {run_dir} holds another run (checkpoints or losses); resume it "
                        "with --ckpt_path last, choose another directory, or pass --force to start over there"
                    )
                clear_run(run_dir)

    def instantiate_classes(self) -> None:
        # jsonargparse wraps a constructor's ValueError in a multi-line union error: report the cause
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, OSError, MisconfigurationException) as e:
            if debug():
                raise
            cause = _root_cause(e)
            raise UsageError(" ".join(str(cause).split()) or type(cause).__name__) from e

    # --- checkpoint to start from -----------------------------------------------------------
    def _requested_model(self, cfg) -> dict[str, Any]:
        m = cfg.model
        config = m.get("config")
        config = dict(config) if isinstance(config, (dict, Namespace)) else config
        try:
            return build_config(m.get("preset"), m.get("size", "tiny"), m.get("overrides"), config).to_dict()
        except (ValueError, TypeError, OSError) as e:
            raise UsageError(" ".join(str(e).split())) from None

    def _check_explicit_ckpt(self, cfg) -> None:
        """Validate an explicit --ckpt_path and its model before anything is built or written."""
        ck = cfg.get("ckpt_path")
        if not ck or ck in ("last", "best", "hpc"):
            return
        try:
            ckpt = read_checkpoint(ck)
        except FileNotFoundError as e:
            raise UsageError(f"--ckpt_path: {e}") from None
        except ValueError as e:
            raise ValueError(f"--ckpt_path: {e}") from None
        check_same_model(ckpt, ck, self._requested_model(cfg))

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would replace the command's model options by the checkpoint's hyperparameters;
        # here the command decides, and a checkpoint of another model is refused (_check_explicit_ckpt)
        return

    def _resolve_ckpt_path(self) -> None:
        init = self.config_init[self.subcommand]
        ck = init.get("ckpt_path")
        if ck != "last":
            return
        found = newest_last_checkpoint(self.trainer)
        if found is None:
            if self.subcommand != "fit":
                raise UsageError(f"--ckpt_path last: no checkpoint under {self.trainer.default_root_dir}")
            print(f"nestlm fit: no checkpoint under {self.trainer.default_root_dir} yet; starting fresh", flush=True)
            init.ckpt_path = None
            return
        init.ckpt_path = found
        try:
            ckpt = read_checkpoint(found)
        except ValueError as e:
            raise ValueError(f"--ckpt_path last: {e}") from None
        check_same_model(ckpt, found, self.model.cfg.to_dict())

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
            _finish_wandb()
            if not self.trainer.is_global_zero:
                raise SystemExit(1) from None
            good, moved = after_nonfinite_stop(self.trainer)
            msg = f"nestlm fit: stopped: {e}. Last good checkpoint: {good or 'none'}"
            if moved:
                where = os.path.dirname(moved[0])
                msg += (
                    f" ({len(moved)} checkpoint(s) of step {self.trainer.global_step}, whose weights lead straight to "
                    f"the non-finite value, moved to {where}"
                    + ("; last.ckpt is now a copy of the good one)" if good else ")")
                )
            print(msg, file=sys.stderr, flush=True)
            raise CommandExit(msg, 1) from None

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


@command()
def run_lightning(argv: list[str] | None = None) -> None:
    """Entry point of `nestlm fit|validate|test ...` (argv includes the sub-command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # the process's own arguments are read by LightningCLI itself (and reused by the DDP launcher,
    # which re-runs this command line in each new process)
    try:
        NestCLI(args=None if argv == sys.argv[1:] else argv)
    finally:
        _finish_wandb()
