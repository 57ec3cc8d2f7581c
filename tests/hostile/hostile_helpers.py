"""Shared pieces of the hostile-input tests: in-process CLI runs, tiny shards, models and checkpoints."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import shards
import torch

from nestlm.cli import main as nestlm_main
from nestlm.models import HybridConfig, HybridLM

# a 2-block byte-level model that trains in a fraction of a second per step
TINY = {"vocab_size": 257, "d_model": 32, "n_heads": 2, "layers": ["attn", "swa"], "window": 8}
TINY_YAML = "{vocab_size: 257, d_model: 32, n_heads: 2, layers: [attn, swa], window: 8}"


def run(capfd, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `nestlm ARGV` run in this process."""
    # log handlers made while an earlier test captured stderr keep that (closed) stream: give them this one
    loggers = [
        logging.getLogger(),
        *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger)),
    ]
    for lg in loggers:
        for h in lg.handlers:
            if type(h) is logging.StreamHandler and getattr(h.stream, "closed", False):
                h.stream = sys.stderr  # (not setStream: it would flush the closed one)
    capfd.readouterr()
    try:
        nestlm_main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capfd.readouterr()
    return code, out, err


def error_lines(err: str, command: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith(f"nestlm {command}:")]


def assert_one_line(code: int, err: str, command: str, *needles: str, exit_code: int | None = None) -> str:
    """The command failed with one `nestlm <command>:` line holding every needle, and no traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = error_lines(err, command)
    assert len(lines) == 1, err[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert code == (exit_code if exit_code is not None else code) and code != 0, (code, lines[0])
    return lines[0]


def tiny_model(seed: int = 0, **overrides) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(HybridConfig(**{**TINY, **overrides}))


def lightning_ckpt(path: Path, model: HybridLM, **extra) -> Path:
    """A .ckpt laid out as LitHybridLM writes it (state_dict under `model.`, nestlm_config, primitives)."""
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "nestlm_config": model.config.to_dict(),
        "hyper_parameters": {"preset": None, "config": model.config.to_dict()},
        "global_step": 0,
        **extra,
    }
    torch.save(ckpt, path)
    return path


def make_shards(root: Path, n_docs: int = 24, seed: int = 0) -> Path:
    """Byte-level shards of random word documents (via prepare-data)."""
    return shards.make_shards(root, n_docs, max_words=80, val_fraction=0.25, seed=seed)


CALLBACKS = """
trainer:
  callbacks:
    - class_path: nestlm.train.checkpoint.RunCheckpoint
      init_args: {{filename: "step={{step:06d}}", auto_insert_metric_name: false, every_n_train_steps: {every},
                  save_last: true, save_top_k: {top_k}, monitor: step, mode: max}}
    - class_path: nestlm.train.callbacks.TrainMetrics
"""


def fit_args(run_dir: Path, data: Path, steps: int, *extra: str, every: int = 1, top_k: int = -1) -> list[str]:
    """`nestlm fit` arguments of a tiny transformer on `data`, a checkpoint every `every` steps."""
    cfg = run_dir.parent / f"{run_dir.name}.callbacks.yaml"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(CALLBACKS.format(every=every, top_k=top_k))
    return [
        "fit",
        "--config",
        str(cfg),
        "--model.preset",
        "transformer",
        "--model.overrides",
        TINY_YAML,
        "--model.warmup_steps",
        "0",
        "--data.class_path",
        "nestlm.train.data.TokenShards",
        "--data.init_args.data_dir",
        str(data),
        "--data.batch_size",
        "2",
        "--data.seq_len",
        "16",
        "--data.val_batches_n",
        "1",
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        "100",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(run_dir),
        *extra,
    ]


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path
