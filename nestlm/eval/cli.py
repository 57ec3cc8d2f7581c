"""`nestlm eval`: run the Agent Continuation Bench on a checkpoint and write the JSON report.

    nestlm eval --ckpt PATH --envs ledger,shell,courier --horizons 20,200,2000,20000 \\
                --episodes N --seed S --out report.json [--plot report.png] [--wandb] [--closed-loop]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from nestlm.cli import ArgumentParser, UsageError, command
from nestlm.credentials import has_wandb_credentials
from nestlm.envs import parse_envs
from nestlm.eval.bench import AUTO


def _ints(flag: str, text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag}={text!r} is invalid: expected comma-separated positive ints") from None
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"{flag}={text!r} is invalid: expected comma-separated positive ints")
    return vals


def parse_episodes(text: str, horizons: list[int]) -> dict[int, int]:
    """`auto`, `N` (every horizon) or one count per horizon (`64,64,16,2`); auto is 0 (bench.AUTO)."""
    if text.strip() == "auto":
        return dict.fromkeys(horizons, AUTO)
    vals = _ints("--episodes", text)
    if len(vals) == 1:
        return {h: vals[0] for h in horizons}
    if len(vals) != len(horizons):
        raise UsageError(f"--episodes={text!r} is invalid: expected one count or one per horizon ({len(horizons)})")
    return dict(zip(horizons, vals))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="nestlm eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="Lightning .ckpt or export folder (config.json + model.safetensors)")
    p.add_argument(
        "--envs", default="ledger,shell,courier", help="comma-separated environments, ENV or ENV:LEVEL (ledger:1,mqar)"
    )
    p.add_argument("--horizons", default="20,200,2000,20000", help="comma-separated episode lengths in agent steps")
    p.add_argument(
        "--episodes",
        default="auto",
        help="episodes per horizon: auto (enough for a 95%% CI half-width <= 0.05 up to H=200; 8 at 2000, 2 at "
        "20000), N, or one count per horizon",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out episodes")
    p.add_argument(
        "--split",
        default="test",
        choices=["test", "val", "train"],
        help="episode distribution (test: held-out names, templates, parameters)",
    )
    p.add_argument("--out", required=True, help="report JSON path")
    p.add_argument("--plot", default=None, help="PNG of accuracy vs horizon per env")
    p.add_argument(
        "--closed-loop",
        action="store_true",
        help="also run the closed loop (own answers fed back) on the longest horizon's episodes",
    )
    p.add_argument(
        "--attn-window",
        default="auto",
        help="sliding window for full-attention layers: auto (training context, only for episodes "
        "longer than it), none, or a number of tokens",
    )
    p.add_argument("--chunk-size", type=int, default=2048, help="tokens per forward call while streaming")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--wandb",
        action="store_true",
        help="log the results as an eval run in the training run's W&B group (offline without credentials)",
    )
    p.add_argument("--wandb-project", default="nestlm")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out / --plot")
    return p


def log_wandb(report: dict, info: dict, args: argparse.Namespace) -> str:
    """Log `report` as a W&B eval run grouped with the training run; returns the run's local folder."""
    import wandb

    group = info.get("wandb_run_id") or Path(args.ckpt).resolve().parent.name
    mode = os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")
    out_dir = Path(args.out).resolve().parent
    run = wandb.init(
        project=args.wandb_project,
        group=group,
        job_type="eval",
        mode=mode,
        dir=str(out_dir),
        name=f"acb-{Path(args.ckpt).name}",
        config={
            "ckpt": args.ckpt,
            "seed": args.seed,
            "horizons": args.horizons,
            "envs": args.envs,
            "split": args.split,
            "generator_version": report["generator_version"],
            "config_hash": report["config_hash"],
        },
    )
    summary = {"acb/coherence_horizon": report["coherence_horizon"], "acb/seconds": report["seconds"]}
    table = wandb.Table(columns=["env", "H", "accuracy", "ci_lo", "ci_hi", "chance", "n_probes"])
    for env, r in report["envs"].items():
        summary[f"acb/{env}/coherence_horizon"] = r["coherence_horizon"]
        for h, m in r["horizons"].items():
            summary[f"acb/{env}/acc@{h}"] = m["accuracy"]
            table.add_data(env, int(h), m["accuracy"], m["ci95"][0], m["ci95"][1], m["chance"], m["n_probes"])
    run.log({"acb/table": table, **summary})
    run.summary.update(summary)
    path = run.dir
    run.finish()
    return path


def check_args(args: argparse.Namespace) -> tuple[list[int], dict[int, int], list[str]]:
    """(horizons, episodes, envs) from the command line, or a UsageError naming the flag."""
    horizons = _ints("--horizons", args.horizons)
    episodes = parse_episodes(args.episodes, horizons)
    try:
        envs = parse_envs(args.envs, "--envs")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.attn_window not in ("auto", "none"):
        args.attn_window = _ints("--attn-window", args.attn_window)[0]
    if not Path(args.ckpt).exists():
        raise UsageError(f"--ckpt {args.ckpt} does not exist")
    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path and Path(path).is_dir():
            raise UsageError(f"{flag} {path} is a folder; expected a file path")
        if path and Path(path).exists() and not args.force:
            raise UsageError(f"{flag} {path} exists; pass --force to overwrite it")
    if args.split != "test" and max(horizons) > 200:
        raise UsageError(f"--split={args.split} episodes are capped at 200 steps; use --split test")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads={args.threads} is invalid: expected an int >= 1")
    if args.chunk_size < 1:
        raise UsageError(f"--chunk-size={args.chunk_size} is invalid: expected an int >= 1")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device!r} is invalid ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: this torch ({torch.__version__}) has no usable CUDA device")
    return horizons, episodes, envs


@command("eval")
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    horizons, episodes, envs = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from nestlm.eval.bench import run_benchmark
    from nestlm.models.loading import load_model

    model, info = load_model(args.ckpt, args.device)
    report = run_benchmark(
        model,
        envs,
        horizons,
        episodes,
        seed=args.seed,
        split=args.split,
        chunk_size=args.chunk_size,
        attn_window=args.attn_window,
        trained_context=info["trained_context"],
        closed_loop_eval=args.closed_loop,
        device=args.device,
        checkpoint=str(args.ckpt),
        progress=not args.no_progress,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    if args.plot:
        from nestlm.eval.report import plot_report

        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_report(report, args.plot)
    if args.wandb:
        report_dir = log_wandb(report, info, args)
        print(f"wandb: logged to {report_dir}", file=sys.stderr)
    for env, r in report["envs"].items():
        accs = "  ".join(
            f"H={h}: {m['accuracy']:.3f} (chance {m['chance']:.3f}, baseline {m['baseline']:.3f})"
            if m["accuracy"] is not None
            else f"H={h}: -"
            for h, m in r["horizons"].items()
        )
        print(f"{env:8s} CH0.9={r['coherence_horizon']:<6d} {accs}")
    print(
        f"overall CH0.9={report['coherence_horizon']}  seconds={report['seconds']:.1f}  "
        f"peak_rss_mb={report['peak_rss_mb']:.0f}  -> {out}"
    )
