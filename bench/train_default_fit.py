"""Time the embedded default run (`nestlm fit` with no arguments) end to end.

    python bench/train_default_fit.py [--threads N] [--workdir DIR] [--out JSON] [-- extra args]

Runs `nestlm fit` in a fresh temp directory (or in DIR, kept, so the `nestlm eval` command the run
prints can be run next), prints a table (wall time, CPU time, steps, s/step, first / last train
loss, the printed eval command, load average) and writes it as JSON with device, torch version and date.
The target: at most 10 minutes wall time on a 2-core CPU machine.
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
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the run (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_default_fit.json"))
    p.add_argument("--workdir", default=None, help="run here (kept: runs/default/) instead of in a temp folder")
    p.add_argument("extra", nargs="*", help="extra `nestlm fit` arguments (after --)")
    a = p.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = a.workdir or scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "nestlm", "fit", *a.extra], cwd=tmp, env=env, capture_output=True, text=True
        )
        wall = time.perf_counter() - t0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            sys.exit(f"nestlm fit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        run = Path(tmp) / "runs" / "default"
        losses = [json.loads(x) for x in (run / "losses.jsonl").read_text().splitlines() if x.strip()]
        exported = (run / "export" / "model.safetensors").is_file()
        out = proc.stdout.splitlines() + proc.stderr.splitlines()
        printed = [x[x.index("nestlm eval") :].strip() for x in out if "nestlm eval" in x]
    row = {
        "command": "nestlm fit " + " ".join(a.extra),
        "wall_s": round(wall, 1),
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 1),
        "steps": len(losses),
        "s_per_step": round(wall / max(len(losses), 1), 3),
        "first_loss": losses[0]["loss"] if losses else None,
        "last_loss": losses[-1]["loss"] if losses else None,
        "exported": exported,
        "eval_command": printed[-1] if printed else None,
        "workdir": a.workdir,
        "threads": a.threads or torch.get_num_threads(),
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "device": f"cpu x{os.cpu_count()} ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    for k, v in row.items():
        print(f"{k:16s} {v}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
