"""Shared pieces of the training tests: tiny shards, a tiny model, CLI runs, W&B history reading."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import shards
import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[2]
# a 2-block model that trains in well under a second per step on one CPU core
TINY_OVERRIDES = "{vocab_size: 257, d_model: 64, n_heads: 2, layers: [attn, swa], window: 24}"


def make_shards(root: Path, n_docs: int = 30, seed: int = 0) -> Path:
    """Byte-level shards of random word documents (via `nestlm prepare-data`)."""
    return shards.make_shards(root, n_docs, max_words=120, val_fraction=0.2, seed=seed)


CALLBACKS = """
trainer:
  callbacks:
    - class_path: nestlm.train.checkpoint.RunCheckpoint
      init_args: {{filename: "step={{step:06d}}", auto_insert_metric_name: false, every_n_train_steps: {every},
                  save_last: true, save_top_k: -1}}
    - class_path: lightning.pytorch.callbacks.LearningRateMonitor
      init_args: {{logging_interval: step}}
    - class_path: nestlm.train.callbacks.TokenThroughput
      init_args: {{window_size: 3, peak_flops: 1.0e+12}}
    - class_path: nestlm.train.callbacks.TrainMetrics
{extra}"""


def fit_argv(
    run_dir: Path,
    data_dir: Path,
    steps: int,
    *extra: str,
    logger: bool = True,
    ckpt_every: int = 4,
    poison_step: int | None = None,
    data: list[str] | None = None,
    overrides: str = TINY_OVERRIDES,
) -> list[str]:
    """Arguments of a tiny `nestlm fit` on shards; checkpoints every `ckpt_every` steps (all kept)."""
    more = (
        ""
        if poison_step is None
        else (f"    - class_path: train_helpers.PoisonAt\n      init_args: {{step: {poison_step}}}\n")
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = run_dir.parent / f"{run_dir.name}.callbacks.yaml"
    cfg.write_text(CALLBACKS.format(every=ckpt_every, extra=more))
    argv = [
        "fit",
        "--config",
        str(cfg),
        "--model.preset",
        "transformer",
        "--model.overrides",
        overrides,
        "--model.warmup_steps",
        "3",
        *(data or ["--data.class_path", "nestlm.train.data.TokenShards", "--data.init_args.data_dir", str(data_dir)]),
        "--data.batch_size",
        "2",
        "--data.seq_len",
        "32",
        "--data.val_batches_n",
        "2",
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        "4",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.default_root_dir",
        str(run_dir),
    ]
    if not logger:
        argv += ["--trainer.logger", "false"]
    return argv + list(extra)


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(ROOT), str(here), str(here.parent), env.get("PYTHONPATH", "")])
    env.update(PYTHONPATH=path, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    return env


def run_cli(argv: list[str], cwd: Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, "-m", "nestlm", *argv], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"nestlm {' '.join(argv[:1])} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from losses.jsonl (a resumed run's newer entry for a step wins)."""
    out: dict[int, float] = {}
    for line in (run_dir / "losses.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out[r["step"]] = r["loss"]
    return out


def wandb_records(path: Path) -> list:
    """Records of a .wandb file: a LevelDB-style log (32 KiB blocks, 7-byte record headers) of
    protobuf `Record`s after a 7-byte ':W&B' file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, pos, out, parts = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        parts += chunk
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
            parts = b""
    return out


def wandb_history(run_dir: Path) -> list[dict]:
    rows = []
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for rec in wandb_records(f):
            if rec.WhichOneof("record_type") == "history":
                row = {}
                for item in rec.history.item:
                    key = item.key or "/".join(item.nested_key)
                    row[key] = json.loads(item.value_json)
                rows.append(row)
    return rows


class PoisonAt(Callback):
    """Turns the weights into NaN right before training step `step` (1-based), to test the guard."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))
