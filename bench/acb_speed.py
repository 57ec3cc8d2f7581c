"""ACB speed and memory: one teacher-forced episode of the tiny flagship at H=20,000 and at H=2,000.

Each horizon runs in a fresh subprocess (so peak RSS is that run's alone): build
HybridLM(HybridConfig.preset("hope-hybrid", "tiny")) (or load --ckpt), generate one held-out LEDGER
episode (the env with the most tokens per step), stream it in chunks with the state carried and score
it. Targets: H=20,000 in <= 120 s wall time on 2 CPU cores, peak RSS at H=20,000 within 10% of H=2,000.
Both wall time and the process's CPU time (user + sys) are recorded: on a machine shared with other
jobs the wall time measures the contention, the CPU time what the run itself needed.

    python bench/acb_speed.py [--env ledger] [--ckpt PATH] [--chunk-size 2048] [--threads 2]

Prints a table and writes bench/results/acb_speed.json (device, torch version, date, load average).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout


def worker(args: argparse.Namespace) -> None:
    import torch

    from nestlm.envs import generate_episode
    from nestlm.eval.report import peak_rss_mb
    from nestlm.eval.scoring import score_episode

    torch.set_num_threads(args.threads)
    if args.ckpt:
        from nestlm.models.loading import load_model

        model, _ = load_model(args.ckpt)
    else:
        from nestlm.models import HybridConfig, HybridLM

        torch.manual_seed(0)
        model = HybridLM(HybridConfig.preset(args.preset, "tiny")).eval()
    rss_model = peak_rss_mb()

    def cpu_s() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    c0, t0 = cpu_s(), time.perf_counter()
    ep = generate_episode(args.env, args.horizon, 0, "test")
    t_gen = time.perf_counter() - t0
    with torch.inference_mode():
        s = score_episode(model, ep, chunk_size=args.chunk_size)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    print(
        json.dumps(
            {
                "horizon": args.horizon,
                "env": args.env,
                "tokens": len(ep.tokens),
                "wall_s": wall,
                "cpu_s": cpu,
                "generate_s": t_gen,
                "score_s": s.seconds,
                "tokens_per_s": len(ep.tokens) / s.seconds,
                "peak_rss_mb": peak_rss_mb(),
                "rss_after_model_mb": rss_model,
                "n_scored_probes": len(s.correct),
                "params": sum(p.numel() for p in model.parameters()),
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="ledger")
    p.add_argument("--preset", default="hope-hybrid")
    p.add_argument("--ckpt", default=None, help="evaluate a trained checkpoint instead of a fresh model")
    p.add_argument("--horizons", default="2000,20000")
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "acb_speed.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--horizon", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch

    rows = []
    for h in [int(x) for x in args.horizons.split(",")]:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--horizon",
            str(h),
            "--env",
            args.env,
            "--preset",
            args.preset,
            "--chunk-size",
            str(args.chunk_size),
            "--threads",
            str(args.threads),
        ]
        if args.ckpt:
            cmd += ["--ckpt", args.ckpt]
        load0 = os.getloadavg()[0]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if res.returncode != 0:
            sys.exit(f"acb_speed: H={h} failed:\n{res.stderr[-2000:]}")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["loadavg_1m_start"], row["loadavg_1m_end"] = load0, os.getloadavg()[0]
        rows.append(row)
        print(
            f"H={h:>6}  tokens={row['tokens']:>7}  wall={row['wall_s']:7.1f}s  cpu={row['cpu_s']:6.1f}s  "
            f"tok/s={row['tokens_per_s']:7.0f}  "
            f"peak_rss={row['peak_rss_mb']:7.1f} MB  load={load0:.1f}",
            flush=True,
        )
    by_h = {r["horizon"]: r for r in rows}
    out = {
        "bench": "acb_speed",
        "preset": args.preset if not args.ckpt else None,
        "ckpt": args.ckpt,
        "env": args.env,
        "chunk_size": args.chunk_size,
        "threads": args.threads,
        "runs": rows,
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if 20000 in by_h and 2000 in by_h:
        ratio = by_h[20000]["peak_rss_mb"] / by_h[2000]["peak_rss_mb"]
        out["rss_ratio_20000_vs_2000"] = ratio
        out["targets"] = {
            "wall_20000_le_120s": by_h[20000]["wall_s"] <= 120,
            "cpu_20000_le_240s (2 cores x 120 s)": by_h[20000]["cpu_s"] <= 240,
            "rss_within_10pct": abs(ratio - 1) <= 0.10,
        }
        print(f"peak RSS ratio H=20000 / H=2000 = {ratio:.3f}   targets: {out['targets']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
