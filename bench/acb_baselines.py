"""ACB CPU baselines: train five tiny presets with one recipe, evaluate each at H = 20 ... 20,000.

Recipe (identical for every preset): the `nestlm fit` embedded default (synthetic `train`
trajectories of 20-200 steps, 256-token windows, batch 8, AdamW lr 3e-3, weight decay 0.1, warmup
then cosine, seed 1234) with `--trainer.max_steps STEPS --model.warmup_steps WARMUP`, no logger.
Then `nestlm eval` on the last checkpoint: held-out episodes at the short horizons for every env,
and at the long horizons for the envs in --long-envs (a 20,000-step episode is 150-200k tokens:
on a shared 2-core CPU it is the budget). Results are written per preset as they finish (finished
presets are skipped on a rerun) and docs/results/acb-cpu.md is regenerated from them.

    python bench/acb_baselines.py [--presets transformer,swa-transformer,mamba2,samba,hope-hybrid]
        [--steps 8] [--warmup 2] [--episodes 2,1,1] [--long-horizons 20000] [--long-envs shell] [--long-episodes 1]
        [--jobs 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
PRESETS = "transformer,swa-transformer,mamba2,samba,hope-hybrid"
DEFAULT_PATHS = {
    "runs": "runs/acb-baselines",
    "results": "bench/results/acb_baselines",
    "md": "docs/results/acb-cpu.md",
}


def run(cmd: list[str], log: Path, threads: int) -> float:
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        res = subprocess.run(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(threads)},
        )
    if res.returncode != 0:
        raise RuntimeError(f"command failed ({res.returncode}), see {log}: {shlex.join(cmd)}")
    return time.perf_counter() - t0


def one_preset(preset: str, a: argparse.Namespace) -> dict:
    res_dir = Path(a.results)
    out = res_dir / f"{preset}.json"
    if out.exists() and not a.force:
        return json.loads(out.read_text())
    run_dir = Path(a.runs) / preset
    log = Path(a.runs) / f"{preset}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "nestlm"]
    train_cmd = py + [
        "fit",
        "--model.preset",
        preset,
        "--model.size",
        "tiny",
        "--trainer.max_steps",
        str(a.steps),
        "--model.warmup_steps",
        str(a.warmup),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.logger",
        "false",
        "--trainer.val_check_interval",
        str(a.steps),
        "--trainer.enable_progress_bar",
        "false",
        "--seed_everything",
        "1234",
    ]
    env_threads = ["--threads", str(a.threads)]
    t_train = 0.0
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.exists() or a.force:
        t_train = run(train_cmd, log, a.threads)
    short = res_dir / f"{preset}.short.json"
    eval_short = (
        py
        + [
            "eval",
            "--ckpt",
            str(ckpt),
            "--envs",
            a.envs,
            "--horizons",
            a.horizons,
            "--episodes",
            a.episodes,
            "--seed",
            str(a.seed),
            "--out",
            str(short),
            "--force",
            "--no-progress",
        ]
        + env_threads
    )
    t_short = run(eval_short, log, a.threads)
    reports = [json.loads(short.read_text())]
    cmds = [train_cmd, eval_short]
    t_long = 0.0
    if a.long_horizons:
        long = res_dir / f"{preset}.long.json"
        eval_long = (
            py
            + [
                "eval",
                "--ckpt",
                str(ckpt),
                "--envs",
                a.long_envs,
                "--horizons",
                a.long_horizons,
                "--episodes",
                str(a.long_episodes),
                "--seed",
                str(a.seed),
                "--out",
                str(long),
                "--force",
                "--no-progress",
            ]
            + env_threads
        )
        t_long = run(eval_long, log, a.threads)
        reports.append(json.loads(long.read_text()))
        cmds.append(eval_long)
    losses = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines() if line.strip()]
    result = {
        "preset": preset,
        "steps": a.steps,
        "train_seconds": t_train,
        "eval_seconds": t_short + t_long,
        "final_loss": losses[-1]["loss"] if losses else None,
        "reports": reports,
        # recorded as `python -m nestlm ...`: the interpreter path is this machine's, not the recipe
        "commands": [shlex.join(["python", *c[1:]]) for c in cmds],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _cell(m: dict | None) -> str:
    if not m or m.get("accuracy") is None:
        return "–"
    lo, hi = m["ci95"]
    return f"{m['accuracy']:.3f} [{lo:.2f}, {hi:.2f}]"


def write_markdown(results: list[dict], a: argparse.Namespace, path: Path) -> None:
    import torch

    from nestlm.eval.report import coherence_horizon

    horizons = [int(h) for h in a.horizons.split(",")] + (
        [int(h) for h in a.long_horizons.split(",")] if a.long_horizons else []
    )
    envs = a.envs.split(",")
    lines = [
        "# Agent Continuation Bench: tiny presets on CPU",
        "",
        f"Generated by `bench/acb_baselines.py` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"CPU ({os.cpu_count()} cores, shared with other jobs), torch {torch.__version__}, "
        f"Python {platform.python_version()}. Expected outcome (written before the run): "
        "[../benchmark.md](../benchmark.md#expected-outcome-of-the-cpu-baselines-written-before-running-them).",
        "",
        f"Recipe, identical for every preset: `nestlm fit` default (synthetic train trajectories of 20-200 steps, "
        f"256-token windows, batch 8, AdamW lr 3e-3, warmup {a.warmup} + cosine, seed 1234), "
        f"{a.steps} optimizer steps "
        f"(= {a.steps * 8 * 256:,} training tokens). Evaluation: held-out `test` episodes, seed {a.seed}; "
        f"episodes per horizon {a.episodes} at H = {a.horizons} (envs {a.envs})"
        + (
            f", {a.long_episodes} at H = {a.long_horizons} ({a.long_envs} only: a 20,000-step episode is "
            "150-200k tokens)"
            if a.long_horizons
            else ""
        )
        + ".",
        "",
        "Cells: accuracy on the probes of the last 10% of each episode [episode-bootstrap 95% CI]. "
        "CH0.9 uses the horizons evaluated for that env.",
        "",
    ]
    summary = [
        "| preset | params | train steps | final train loss | train s | eval s | "
        + " | ".join(f"CH0.9 {e}" for e in envs)
        + " | CH0.9 overall |",
        "|---" * (7 + len(envs)) + "|",
    ]
    for r in results:
        rep = r["reports"][0]
        ch = {e: rep["envs"][e]["coherence_horizon"] for e in envs if e in rep["envs"]}
        for extra in r["reports"][1:]:  # long horizons: CH can only grow if the short ones all passed
            for e, er in extra["envs"].items():
                hs = {**rep["envs"][e]["horizons"], **er["horizons"]}
                ch[e] = coherence_horizon({int(h): (m["accuracy"], m["chance"] or 0.0) for h, m in hs.items()})
        params = r.get("params", "")
        summary.append(
            f"| {r['preset']} | {params} | {r['steps']} | {r['final_loss']:.3f} | "
            f"{r['train_seconds']:.0f} | "
            f"{r['eval_seconds']:.0f} | "
            + " | ".join(str(ch.get(e, "–")) for e in envs)
            + f" | {min(ch.values()) if ch else '–'} |"
        )
    lines += summary + [""]
    for e in envs:
        lines += [
            f"## {e.upper()}",
            "",
            "| preset | chance | " + " | ".join(f"H={h}" for h in horizons) + " |",
            "|---" * (2 + len(horizons)) + "|",
        ]
        for r in results:
            cells, chance = [], None
            for h in horizons:
                m = None
                for rep in r["reports"]:
                    m = m or rep["envs"].get(e, {}).get("horizons", {}).get(str(h))
                cells.append(_cell(m))
                chance = chance or (m or {}).get("chance")
            lines.append(f"| {r['preset']} | {chance:.3f} | " if chance is not None else f"| {r['preset']} | – | ")
            lines[-1] += " | ".join(cells) + " |"
        lines += [""]
    lines += [
        "## By probe kind (all evaluated horizons pooled)",
        "",
        "| preset | env | kind | accuracy | probes |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for e in envs:
            pooled: dict[str, list[float]] = {}
            for rep in r["reports"]:
                for m in rep["envs"].get(e, {}).get("horizons", {}).values():
                    for k, v in m.get("by_kind", {}).items():
                        c, n = pooled.get(k, (0.0, 0))
                        pooled[k] = (c + v["accuracy"] * v["n_probes"], n + v["n_probes"])
            for k, (c, n) in sorted(pooled.items()):
                lines.append(f"| {r['preset']} | {e} | {k} | {c / n:.3f} | {n} |")
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        f"python bench/acb_baselines.py --presets {a.presets} --steps {a.steps} --warmup {a.warmup} "
        f"--episodes {a.episodes} --horizons {a.horizons}"
        + (
            f" --long-horizons {a.long_horizons} --long-envs {a.long_envs} --long-episodes {a.long_episodes}"
            if a.long_horizons
            else ""
        )
        + "".join(
            f" --{k} {v}" for k, v in (("runs", a.runs), ("results", a.results), ("md", a.md)) if v != DEFAULT_PATHS[k]
        ),
        "```",
        "",
        "Per preset, that runs:",
        "",
    ]
    for r in results:
        lines += ["```bash", *r["commands"], "```"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=PRESETS)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--envs", default="ledger,shell,courier")
    p.add_argument("--horizons", default="20,200,2000")
    p.add_argument("--episodes", default="2,1,1")
    p.add_argument("--long-horizons", default="20000")
    p.add_argument("--long-envs", default="shell")
    p.add_argument("--long-episodes", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="presets run at the same time")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads of each training and eval process")
    # paths are relative to the repository root (the commands run there)
    p.add_argument("--runs", default=DEFAULT_PATHS["runs"])
    p.add_argument("--results", default=DEFAULT_PATHS["results"])
    p.add_argument("--md", default=DEFAULT_PATHS["md"])
    p.add_argument("--force", action="store_true", help="retrain and re-evaluate finished presets")
    a = p.parse_args()
    os.chdir(ROOT)
    Path(a.results).mkdir(parents=True, exist_ok=True)
    presets = [x.strip() for x in a.presets.split(",") if x.strip()]
    done: dict[str, dict] = {}
    lock = threading.Lock()

    def work(preset: str) -> None:
        t0 = time.perf_counter()
        try:
            r = one_preset(preset, a)
        except Exception as e:  # noqa: BLE001 — report and go on with the other presets
            print(f"{preset}: FAILED after {time.perf_counter() - t0:.0f}s: {e}", flush=True)
            return
        from nestlm.models import HybridConfig, HybridLM

        r["params"] = f"{HybridLM(HybridConfig.preset(preset, 'tiny')).num_params() / 1e6:.2f}M"
        with lock:
            done[preset] = r
            write_markdown([done[q] for q in presets if q in done], a, Path(a.md))
        ch = {e: v["coherence_horizon"] for e, v in r["reports"][0]["envs"].items()}
        print(f"{preset}: done in {time.perf_counter() - t0:.0f}s  loss={r['final_loss']:.3f}  CH0.9={ch}", flush=True)

    with ThreadPoolExecutor(max_workers=a.jobs) as ex:
        list(ex.map(work, presets))
    print(f"-> {a.md}")


if __name__ == "__main__":
    main()
