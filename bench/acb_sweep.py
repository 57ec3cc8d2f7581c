"""Learning-rate sweep on the Agent Continuation Bench: `nestlm fit` per (arm, lr), one process at a
time, then `nestlm eval` of each run in distribution; one JSON of every run and the lr chosen per arm.

An arm is a model: `NAME=PRESET` or `NAME=PRESET:OVERRIDES` (OVERRIDES a YAML/JSON mapping of
HybridConfig fields, e.g. `attn2=transformer:{layers: [attn, attn]}`); every arm trains with the same
recipe (`--recipe`, a `nestlm fit` config) at each lr of `--lrs`, for `--steps` steps. The curve of
validation answer accuracy per env and probe kind is read from the run's output; the final numbers
come from `nestlm eval --split val` at `--horizons` with `--episodes auto` (a 95% CI half-width
<= 0.05 at H <= 200), beside chance and the in-context heuristic baseline. The chosen lr of an arm
maximises the mean chance-adjusted accuracy over the env/kind pairs at the first horizon.

    python bench/acb_sweep.py --recipe configs/experiment/mqar-zoology.yaml --envs mqar \\
        --arms attn2=transformer:{layers: [attn, attn]} --lrs 3e-4,1e-3,3e-3 --steps 3000 \\
        --out bench/results/acb_sweep/mqar.json [--write-configs configs/experiment/mqar] [--threads 1]

Runs already in the output JSON (same arm, lr, steps and recipe) are kept and not rerun, so an
interrupted sweep continues where it stopped. Record the load average: timings beside other work are
not comparable (the JSON stores the load at the start and end of every run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VAL_LINE = re.compile(r"nestlm: step (\d+) val answer accuracy: (.*)")


def parse_arm(text: str) -> dict:
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"acb_sweep: --arms entry {text!r} is invalid: expected NAME=PRESET[:OVERRIDES]")
    preset, _, over = rest.partition(":")
    overrides = yaml.safe_load(over) if over else {}
    if not isinstance(overrides, dict):
        raise SystemExit(f"acb_sweep: overrides of arm {name!r} are invalid: expected a mapping, got {over!r}")
    return {"name": name, "preset": preset, "overrides": overrides}


def split_arms(text: str) -> list[str]:
    """Arms are separated by `;` (overrides may contain commas)."""
    return [a.strip() for a in text.split(";") if a.strip()]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cmd: list[str], log: Path, threads: int) -> tuple[str, float, float]:
    """Run a command (output appended to `log`); returns (its output, wall seconds, CPU seconds)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(threads)}
    t0, c0 = time.perf_counter(), cpu_seconds()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n{res.stdout}{res.stderr}\n")
    if res.returncode != 0:
        raise SystemExit(f"acb_sweep: command failed ({res.returncode}), see {log}: {shlex.join(cmd)}")
    return res.stdout + res.stderr, time.perf_counter() - t0, cpu_seconds() - c0


def curve(output: str) -> list[dict]:
    """[{"step", "acc": {ENV/kind: accuracy}}] from the validation lines a fit prints."""
    out = []
    for m in VAL_LINE.finditer(output):
        accs = dict(item.rsplit(" ", 1) for item in m.group(2).split(", "))
        out.append({"step": int(m.group(1)), "acc": {k: float(v) for k, v in accs.items()}})
    return out


def summarise(report: dict, horizon: str) -> dict:
    """Per env/kind at `horizon`: accuracy, chance, baseline, chance-adjusted, probes; and the mean."""
    kinds = {}
    for env, r in report["envs"].items():
        h = r["horizons"][horizon]
        for kind, m in h["by_kind"].items():
            adjusted = (m["accuracy"] - m["chance"]) / (1 - m["chance"])
            kinds[f"{env}/{kind}"] = {**m, "adjusted": adjusted}
    mean = sum(k["adjusted"] for k in kinds.values()) / max(1, len(kinds))
    return {"kinds": kinds, "mean_adjusted": mean}


def one_run(arm: dict, lr: float, a: argparse.Namespace, work: Path) -> dict:
    run_dir = work / f"{arm['name']}-lr{lr:g}"
    log = work / f"{arm['name']}-lr{lr:g}.log"
    py = [sys.executable, "-m", "nestlm"]
    fit = py + ["fit", "--config", a.recipe, "--model.preset", arm["preset"], "--model.lr", str(lr)]
    if arm["overrides"]:
        fit += ["--model.overrides", json.dumps(arm["overrides"])]
    fit += [
        "--trainer.max_steps",
        str(a.steps),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--seed_everything",
        str(a.seed),
        "--force",  # a run that is not in the results JSON (interrupted) starts over
        *shlex.split(a.fit_args),
    ]
    load0 = os.getloadavg()
    out, fit_wall, fit_cpu = run(fit, log, a.threads)
    report_path = run_dir / "eval.json"
    ev = py + [
        "eval",
        "--ckpt",
        str(run_dir / "export"),
        "--envs",
        a.envs,
        "--split",
        "val",
        "--horizons",
        a.horizons,
        "--episodes",
        "auto",
        "--seed",
        "0",
        "--out",
        str(report_path),
        "--no-progress",
        "--force",
    ]
    _, eval_wall, eval_cpu = run(ev, log, a.threads)
    report = json.loads(report_path.read_text())
    losses = [json.loads(ln)["loss"] for ln in (run_dir / "losses.jsonl").read_text().splitlines() if ln.strip()]
    return {
        "arm": arm["name"],
        "preset": arm["preset"],
        "overrides": arm["overrides"],
        "lr": lr,
        "steps": a.steps,
        "recipe": a.recipe,
        "fit_args": a.fit_args,
        "fit_command": "python -m nestlm " + shlex.join(fit[3:]),
        "eval_command": "python -m nestlm " + shlex.join(ev[3:]),
        "fit_wall_s": fit_wall,
        "fit_cpu_s": fit_cpu,
        "eval_cpu_s": eval_cpu,
        "load_avg_start": load0,
        "load_avg_end": os.getloadavg(),
        "final_train_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "curve": curve(out),
        "eval": {h: summarise(report, h) for h in a.horizons.split(",")},
        "report": report,
    }


def run_key(row: dict) -> tuple:
    return row["arm"], row["lr"], row["steps"], row["recipe"], row.get("fit_args", "")


def table(rows: list[dict], horizon: str) -> str:
    keys = sorted({k for r in rows for k in r["eval"][horizon]["kinds"]})
    head = ["arm", "lr", "CPU min"] + [f"{k} acc (base)" for k in keys] + ["mean adj."]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        ev = r["eval"][horizon]
        cells = [r["arm"], f"{r['lr']:g}", f"{r['fit_cpu_s'] / 60:.1f}"]
        for k in keys:
            m = ev["kinds"].get(k)
            cells.append("-" if m is None else f"{m['accuracy']:.3f} ({m['baseline']:.3f})")
        cells.append(f"{ev['mean_adjusted']:.3f}")
        lines.append(" | ".join(cells))
    return "\n".join("| " + ln + " |" for ln in lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True, help="nestlm fit config of the training recipe")
    p.add_argument("--arms", required=True, help="NAME=PRESET[:OVERRIDES] entries separated by ';'")
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--envs", required=True, help="envs to evaluate (ENV or ENV:LEVEL, comma-separated)")
    p.add_argument("--horizons", default="20")
    p.add_argument("--fit-args", default="", help="more `nestlm fit` arguments for every run (quoted)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="results JSON (bench/results/acb_sweep/NAME.json)")
    p.add_argument("--work", default="runs/acb-sweep", help="run directories")
    p.add_argument("--write-configs", default=None, help="write DIR/<arm>.yaml with each arm's chosen lr")
    a = p.parse_args(argv)
    arms = [parse_arm(t) for t in split_arms(a.arms)]
    lrs = [float(x) for x in a.lrs.split(",")]
    out = Path(a.out)
    done = json.loads(out.read_text())["rows"] if out.is_file() else []
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for arm in arms:
        for lr in lrs:
            key = (arm["name"], lr, a.steps, a.recipe, a.fit_args)
            row = next((r for r in done if run_key(r) == key), None)
            if row is None:
                print(f"acb_sweep: {arm['name']} lr={lr:g} ({a.steps} steps)", flush=True)
                row = one_run(arm, lr, a, work)
            rows.append(row)
            done = [r for r in done if run_key(r) != key] + [row]
            write(out, a, done)
    h = a.horizons.split(",")[0]
    print(table(rows, h))
    if a.write_configs:
        chosen = chosen_lrs(rows, h)
        d = Path(a.write_configs)
        d.mkdir(parents=True, exist_ok=True)
        for arm in arms:
            model = {"preset": arm["preset"], "size": "tiny", "lr": chosen[arm["name"]]}
            if arm["overrides"]:
                model["overrides"] = arm["overrides"]
            text = (
                f"# lr chosen by `python bench/acb_sweep.py` ({out}): best mean chance-adjusted accuracy at H={h}\n"
                f"# over lrs {a.lrs}; combine with --config {a.recipe}\n" + yaml.safe_dump({"model": model})
            )
            (d / f"{arm['name']}.yaml").write_text(text)


def chosen_lrs(rows: list[dict], horizon: str) -> dict[str, float]:
    best: dict[str, dict] = {}
    for r in rows:
        score = r["eval"][horizon]["mean_adjusted"]
        if r["arm"] not in best or score > best[r["arm"]]["eval"][horizon]["mean_adjusted"]:
            best[r["arm"]] = r
    return {k: v["lr"] for k, v in best.items()}


def write(out: Path, a: argparse.Namespace, rows: list[dict]) -> None:
    h = a.horizons.split(",")[0]
    doc = {
        "command": "python bench/acb_sweep.py " + shlex.join(sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "threads": a.threads,
        "chosen_lr": chosen_lrs(rows, h),
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
