"""GPU bring-up in one prepared run on one H100 / H200: every CUDA path of nestlm, time-boxed.

    python bench/gpu_check.py [--dry-run] [--out DIR] [--budget-s 420]

Steps, in this order, each in its own subprocess under its own timeout (a hang or a CUDA fault
ends that step only; the run's deadline `--budget-s` caps every step's timeout):

    env               GPU, driver, torch / CUDA versions, which optional backends import (mamba_ssm,
                      causal_conv1d, flash_attn, fla), device-to-device copy bandwidth, bf16 matmul rate
    csrc-build        the JIT build of the csrc/ memory-scan kernels (later steps load the cached build)
    pytest-gpu        `pytest -m gpu tests`: every test marked gpu, junit XML and pass/fail/skip counts
    memcheck          compute-sanitizer memcheck on two small kernel cases (fp32, and bf16 mid-chunk)
    kernels           bench/kernels.py at B=8, H=16, D in {64, 128}, L in {2k, 8k}, eager comparison
    kernels-compiled  the same at L=2k against the torch.compile'd PyTorch path
    train-*           30 steps of LitHybridLM under a Lightning Trainer (bf16-mixed, TokenThroughput
                      callback, FLOPs from nestlm/train/flops.py): transformer, samba, hope-hybrid 125m
                      at context 2k (batch 8), then 16k (batch 1): tokens/s, MFU, peak memory
    decode            peak GPU memory of hope-hybrid 125m streaming 2k vs 20k LEDGER steps

Everything is logged to the output directory (--out, default $OUT, else runs/gpu_check) as it
goes: gpu_check.log (each step's command and output), pytest-gpu.xml, kernels.json,
kernels-compiled.json and gpu-<gpu>.json, the results so far, rewritten after every step and
also written to bench/results/gpu-<gpu>.json. A short table is printed last.

`--dry-run` prints the plan (each step's budget and exact command) and exits 0 on any machine.
Without --dry-run and without CUDA it prints one line and exits 2, writing nothing.

Internally each in-process step runs as `python bench/gpu_check.py worker NAME ...`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SCRIPT = Path(__file__).resolve()
DEFAULT_BUDGET_S = 420
MIN_STEP_S = 5  # a step that would get less than this is skipped, not started
KILL_GRACE_S = 5  # between SIGTERM and SIGKILL of a step that ran out of time
OUTPUT_CAP = 4 << 20  # characters of a step's output kept in memory for parsing (all of it goes to the log)
BACKEND_MODULES = ("mamba_ssm", "causal_conv1d", "flash_attn", "fla")
# distributions nestlm needs (pyproject dependencies) and the test / benchmark extras used here
PACKAGES = ("torch", "numpy", "safetensors", "huggingface_hub", "PyYAML", "lightning", "jsonargparse", "wandb")
PACKAGES += ("tqdm", "psutil", "matplotlib", "einops", "triton", "pytest", "transformers", "titans-pytorch")
TRAIN_PRESETS = ("transformer", "samba", "hope-hybrid")
TRAIN_STEPS = 30
THROUGHPUT_WINDOW = 5  # steps per throughput reading; the last reading covers the last 5 steps
# (b, L, h, dk, dv, chunk size, offset, dtype): fp32 from a chunk boundary; bf16 starting mid-chunk
# (the W_anchor path) at dk = dv = 128; odd lengths, so the last segment is partial
MEMCHECK_CASES = ((2, 63, 3, 64, 64, 16, 0, "float32"), (1, 77, 2, 128, 128, 32, 5, "bfloat16"))
TRAIN_START_S = 10  # seconds a training step keeps for start-up, outside Lightning's max_time


# --------------------------------------------------------------------------------------------------
# running one step


@dataclass
class Finished:
    """How a step's process ended: status 'ok' | 'failed' | 'timeout', its exit code and output."""

    status: str
    rc: int | None
    seconds: float
    output: str


@dataclass
class Command:
    """One step's process: its argv, extra environment, and how to read figures from its outcome.

    parse(finished) returns the step's figures; `"ok": False` among them marks the step failed even
    at exit code 0. It is also called after a timeout, to keep what the process left behind.
    requires: steps that must have finished ok first; needs: an executable that must be on PATH.
    """

    argv: list[str]
    parse: Callable[[Finished], dict]
    env: dict[str, str] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    needs: str | None = None


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every step: this checkout first on PYTHONPATH, unbuffered, W&B offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true")
    env.update(extra or {})
    return env


def run_command(argv: list[str], timeout: float, log, env: dict[str, str] | None = None) -> Finished:
    """Run argv in its own process group, copying its output line by line to `log` (a text file).

    After `timeout` seconds the whole group gets SIGTERM, then SIGKILL KILL_GRACE_S later, so that
    children (pytest's subprocesses, data-loader workers, nvcc) go too.
    """
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=child_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as err:
        log.write(f"could not start: {err}\n")
        return Finished("failed", None, 0.0, str(err))
    kept: list[str] = []
    size = [0]

    def copy() -> None:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if size[0] < OUTPUT_CAP:
                kept.append(line)
                size[0] += len(line)

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=KILL_GRACE_S)  # a grandchild that left the group may hold the pipe open
    seconds = time.perf_counter() - t0
    if timed_out:
        log.write(f"--- killed after {timeout:.0f} s\n")
        return Finished("timeout", proc.returncode, seconds, "".join(kept))
    return Finished("ok" if proc.returncode == 0 else "failed", proc.returncode, seconds, "".join(kept))


def run_step(name: str, budget: float, timeout: float, cmd: Command, steps: dict, log) -> dict:
    """Run one step under `timeout` seconds and return its record (status, seconds, command, figures)."""
    rec: dict = {"budget_s": budget, "command": shlex.join(cmd.argv)}
    not_ok = [r for r in cmd.requires if steps.get(r, {}).get("status") != "ok"]
    if not_ok:
        return {**rec, "status": "skipped", "reason": f"needs {', '.join(not_ok)} to pass first"}
    if cmd.needs and shutil.which(cmd.needs) is None:
        return {**rec, "status": "skipped", "reason": f"{cmd.needs} is not on PATH"}
    if timeout < MIN_STEP_S:
        return {**rec, "status": "skipped", "reason": f"out of time ({timeout:.0f} s of the run's budget left)"}
    log.write(f"\n=== {time.strftime('%H:%M:%S')} {name} (timeout {timeout:.0f} s): {rec['command']}\n")
    log.flush()
    fin = run_command(cmd.argv, timeout, log, cmd.env)
    rec.update(status=fin.status, rc=fin.rc, seconds=round(fin.seconds, 1), timeout_s=round(timeout))
    try:
        figures = cmd.parse(fin)
    except Exception as err:  # a malformed file from a broken step must not stop the run
        figures = {"parse_error": f"{type(err).__name__}: {err}"}
    if fin.status == "ok" and figures.get("ok") is False:
        rec["status"] = "failed"
    rec.update(figures)
    log.write(f"=== {name}: {rec['status']} in {fin.seconds:.1f} s (exit code {fin.rc})\n")
    log.flush()
    return rec


# --------------------------------------------------------------------------------------------------
# reading what the steps leave behind


def read_json(path: Path) -> dict:
    """A worker's result file ({} when the worker died before writing it)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def parse_junit(path: Path, output: str) -> dict:
    """Pass / fail / skip / error counts from pytest's junit XML, or from its `-v` result lines
    when the XML is missing (pytest was killed before writing it)."""
    if path.is_file():
        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        failed, uncollected = [], []
        for case in root.iter("testcase"):
            err = case.find("error")
            if err is not None and "collection failure" in (err.get("message") or ""):
                # a module that could not be imported (a package the machine lacks): not a test result
                why = [ln[1:].strip() for ln in (err.text or "").splitlines() if ln.startswith("E ")]
                uncollected.append(f"{case.get('name')}: {why[-1] if why else first_line(err.text or '')}")
            elif err is not None or case.find("failure") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
        return {
            "source": path.name,
            "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
            "failed": n["failures"],
            "errors": n["errors"] - len(uncollected),
            "skipped": n["skipped"],
            "failed_tests": failed,
            "collection_errors": uncollected,
        }
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    word = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped"}
    failed = []
    for m in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)\b", output, re.M):
        counts[word[m.group(2)]] += 1
        if m.group(2) in ("FAILED", "ERROR"):
            failed.append(m.group(1))
    return {"source": "output (no junit XML)", **counts, "failed_tests": failed}


def parse_sanitizer(output: str) -> dict:
    """compute-sanitizer's verdict: the error count of its summary and its first messages."""
    m = re.search(r"ERROR SUMMARY: (\d+) error", output)
    messages = [ln.strip() for ln in output.splitlines() if ln.startswith("========= ") and "SUMMARY" not in ln]
    return {"sanitizer_errors": int(m.group(1)) if m else None, "sanitizer_messages": messages[:8]}


def parse_kernels(path: Path, output: str) -> dict:
    """bench/kernels.py's JSON, or the per-shape JSON lines it printed before being stopped."""
    if path.is_file():
        d = json.loads(path.read_text())
        return {"copy_bandwidth_bytes_per_s": d.get("copy_bandwidth_bytes_per_s"), "rows": d.get("rows", [])}
    rows = []
    for line in output.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    m = re.search(r"copy bandwidth \(read \+ write\): ([0-9.]+) TB/s", output)
    return {"copy_bandwidth_bytes_per_s": float(m.group(1)) * 1e12 if m else None, "rows": rows, "partial": True}


def last_csv_row(path: Path, key: str) -> dict:
    """The last row of a Lightning CSVLogger metrics.csv that has a value for `key`."""
    import csv

    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(key)]
    return rows[-1] if rows else {}


def parse_train(run_dir: Path) -> dict:
    """Figures of one training run: the worker's result, and the last throughput reading of its
    CSV log (written every step, so a run stopped early still has one after THROUGHPUT_WINDOW steps)."""
    res = read_json(run_dir / "result.json")
    row = last_csv_row(run_dir / "metrics.csv", "train/device/items_per_sec")
    if row:
        res["throughput_at_step"] = int(float(row["step"])) + 1
        res["tokens_per_s"] = float(row["train/device/items_per_sec"])
        if row.get("train/device/flops_per_sec"):
            res["flops_per_s"] = float(row["train/device/flops_per_sec"])
        if row.get("train/device/mfu"):
            res["mfu"] = float(row["train/device/mfu"])
    else:  # fewer steps than one throughput window: TrainMetrics' wall-clock reading of the last step
        row = last_csv_row(run_dir / "metrics.csv", "train/tokens_per_sec")
        if row:
            res["throughput_at_step"] = int(float(row["step"]))
            res["tokens_per_s"] = float(row["train/tokens_per_sec"])
            res["tokens_per_s_source"] = "one step (TrainMetrics), fewer than a throughput window"
    mem = last_csv_row(run_dir / "metrics.csv", "sys/peak_mem_mb")
    if mem and "peak_mem_bytes" not in res:
        res["peak_mem_bytes"] = float(mem["sys/peak_mem_mb"]) * 2**20
    if "error" in res:
        res["ok"] = False
    return res


# --------------------------------------------------------------------------------------------------
# the steps


@dataclass
class Ctx:
    """Where a run writes: `out` the few files that matter (logs, XML, JSON), `work` scratch space."""

    out: Path
    work: Path
    python: str = sys.executable


def worker(ctx: Ctx, name: str, *args: str) -> list[str]:
    return [ctx.python, str(SCRIPT), "worker", name, "--result", str(ctx.work / f"{name}.json"), *args]


# Each step: (ctx, timeout) -> Command; timeout is what the step will get (its budget, or more when
# earlier steps finished early), which only the training steps need.


def env_step(ctx: Ctx, timeout: float) -> Command:
    return Command(worker(ctx, "env"), lambda fin: read_json(ctx.work / "env.json"))


def build_step(ctx: Ctx, timeout: float) -> Command:
    def parse(fin: Finished) -> dict:
        res = read_json(ctx.work / "build.json")
        return {**res, "ok": bool(res.get("loaded"))}

    return Command(worker(ctx, "build"), parse, env={"NESTLM_CSRC_VERBOSE": "1"})


def pytest_command(ctx: Ctx, paths: tuple[str, ...] = ("tests",)) -> list[str]:
    xml = ctx.out / "pytest-gpu.xml"
    # -v prints each result as it happens: a killed run's output still gives the counts so far
    return [ctx.python, "-m", "pytest", "-m", "gpu", *paths, "-v", "-rfE", "-p", "no:cacheprovider"] + [
        "--continue-on-collection-errors",  # a module importing a package the device lacks skips itself only
        f"--junitxml={xml}",
    ]


def pytest_step(ctx: Ctx, timeout: float) -> Command:
    return Command(pytest_command(ctx), lambda fin: parse_junit(ctx.out / "pytest-gpu.xml", fin.output))


def find_tool(name: str) -> str:
    """`name` from PATH, else from the CUDA toolkit's bin/ ($CUDA_HOME, /usr/local/cuda); else bare."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if shutil.which(name) is None and home and (Path(home) / "bin" / name).is_file():
            return str(Path(home) / "bin" / name)
    return shutil.which(name) or name


def memcheck_step(ctx: Ctx, timeout: float) -> Command:
    argv = [find_tool("compute-sanitizer"), "--tool", "memcheck", "--error-exitcode", "9", "--print-limit", "20"]

    def parse(fin: Finished) -> dict:
        res = {**read_json(ctx.work / "memcheck.json"), **parse_sanitizer(fin.output)}
        return {**res, "ok": res["sanitizer_errors"] == 0 and res.get("ok", False)}

    # without the caching allocator every tensor is its own allocation, so an overrun past a tensor's
    # end is outside any allocation and memcheck sees it
    env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    return Command(argv + worker(ctx, "memcheck"), parse, env=env, requires=("csrc-build",), needs=argv[0])


def kernels_command(ctx: Ctx, out_name: str, *args: str) -> Command:
    path = ctx.out / out_name
    argv = [ctx.python, str(ROOT / "bench" / "kernels.py"), *args, "--out", str(path)]
    return Command(argv, lambda fin: parse_kernels(path, fin.output), requires=("csrc-build",))


def kernels_step(ctx: Ctx, timeout: float) -> Command:
    # no fla / mamba-ssm baselines: their first calls compile Triton kernels for longer than this step has
    grid = ("--dims", "64,128", "--lengths", "2048,8192", "--repeats", "10", "--torch-repeats", "2")
    return kernels_command(ctx, "kernels.json", *grid, "--compile-max-len", "0", "--no-baselines")


def kernels_compiled_step(ctx: Ctx, timeout: float) -> Command:
    # torch.compile unrolls the PyTorch path's chunk loop, so it is timed at 2k only, in its own step
    grid = ("--dims", "64,128", "--lengths", "2048", "--repeats", "5", "--torch-repeats", "2")
    return kernels_command(ctx, "kernels-compiled.json", *grid, "--compile-max-len", "2048", "--no-baselines")


def train_step(
    ctx: Ctx,
    timeout: float,
    preset: str,
    seq_len: int,
    batch_size: int,
    size: str = "125m",
    steps: int = TRAIN_STEPS,
    accelerator: str = "gpu",
    precision: str = "bf16-mixed",
    num_workers: int = 4,
) -> Command:
    run_dir = ctx.work / f"train-{preset}-{seq_len // 1024}k"
    # Lightning's max_time ends the fit cleanly before the timeout; the margin covers the interpreter,
    # imports, model build and data-loader start, which max_time does not count
    max_seconds = max(int(timeout) - TRAIN_START_S, 1)
    args = ["--preset", preset, "--size", size, "--seq-len", str(seq_len), "--batch-size", str(batch_size)]
    args += ["--steps", str(steps), "--max-seconds", str(max_seconds), "--run-dir", str(run_dir)]
    args += ["--accelerator", accelerator, "--precision", precision, "--num-workers", str(num_workers)]
    argv = [ctx.python, str(SCRIPT), "worker", "train", "--result", str(run_dir / "result.json"), *args]
    return Command(argv, lambda fin: parse_train(run_dir))


def decode_step(ctx: Ctx, timeout: float) -> Command:
    args = ("--preset", "hope-hybrid", "--size", "125m", "--episode-steps", "2000,20000", "--chunk-size", "2048")
    return Command(worker(ctx, "decode", *args), lambda fin: read_json(ctx.work / "decode.json"))


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: int
    build: Callable[[Ctx, float], Command]


def plan() -> list[Step]:
    """The steps in the order they run, each with its budget in seconds (together <= 7 minutes)."""
    steps = [
        Step("env", 15, env_step),
        Step("csrc-build", 80, build_step),
        Step("pytest-gpu", 65, pytest_step),
        Step("memcheck", 30, memcheck_step),
        Step("kernels", 35, kernels_step),
        Step("kernels-compiled", 25, kernels_compiled_step),
    ]
    for seq_len, batch_size, budgets in ((2048, 8, (25, 25, 30)), (16384, 1, (20, 20, 20))):
        for preset, budget in zip(TRAIN_PRESETS, budgets):
            build = functools.partial(train_step, preset=preset, seq_len=seq_len, batch_size=batch_size)
            steps.append(Step(f"train-{preset}-{seq_len // 1024}k", budget, build))
    steps.append(Step("decode", 30, decode_step))
    return steps


def step_timeout(left: float, budget: float, reserved: float) -> float:
    """Seconds a step may run: its budget plus what earlier steps left unused, up to twice its
    budget, never eating into the budgets of the steps after it (`reserved`) and never past the
    run's deadline (`left`)."""
    return max(0.0, min(left, 2 * budget, max(budget, left - reserved)))


# --------------------------------------------------------------------------------------------------
# the workers (each runs inside one step's subprocess)


class Result(dict):
    """A worker's figures, rewritten to its file after every update, so a killed worker leaves
    what it had measured."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def put(self, **figures) -> None:
        self.update(figures)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str))
        os.replace(tmp, self.path)


def bench_kernels():
    """bench/kernels.py as a module (its CUDA-event timer and copy-bandwidth measurement)."""
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:200]


def tool_output(argv: list[str]) -> str | None:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def package_versions() -> dict[str, str]:
    """Installed version of each distribution in PACKAGES, or 'absent'."""
    out = {}
    for dist in PACKAGES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def backend_imports(res: Result) -> None:
    """Import each optional backend; its version, or 'absent (why)'. Saved after each import, since
    a broken CUDA extension can take the process down."""
    found: dict[str, str] = {}
    for mod in BACKEND_MODULES:
        try:
            found[mod] = str(getattr(importlib.import_module(mod), "__version__", "imported"))
        except Exception as err:
            found[mod] = f"absent ({type(err).__name__}: {first_line(str(err))})"
        res.put(backends=found)


def worker_env(res: Result, args) -> int:
    import torch

    props = torch.cuda.get_device_properties(0)
    nvcc = (tool_output(["nvcc", "--version"]) or "").splitlines()
    res.put(
        device={
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_bytes": props.total_memory,
            "driver": tool_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        },
        versions={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "nvcc": next((ln for ln in nvcc if "release" in ln), None),
        },
    )
    kernels = bench_kernels()
    res.put(copy_bandwidth_bytes_per_s=kernels.copy_bandwidth(repeats=10))
    n = 8192
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)  # random: a product of zeros runs faster
    w = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = kernels.cuda_time(lambda: x @ w, repeats=10)
    res.put(bf16_matmul_flops_per_s=2 * n**3 / (ms * 1e-3))
    res.put(packages=package_versions())
    backend_imports(res)  # last: the ceilings above are saved whatever an import does
    from nestlm.ops import backends

    vendor = [op for op, kernels in backends.KERNELS.items() if "vendor" in dict(kernels)]
    res.put(vendor_ops={op: backends.kernel(op, "vendor") is not None for op in vendor})
    return 0


def worker_build(res: Result, args) -> int:
    from nestlm.ops.memory import csrc

    t0 = time.perf_counter()
    ext = csrc.load()
    res.put(loaded=ext is not None, seconds=round(time.perf_counter() - t0, 1))
    return 0 if ext is not None else 1


def memcheck_case(b, L, h, dk, dv, C, offset, dtype: str, seed: int | None = None, device: str = "cuda") -> dict:
    """One fused-kernel forward + backward on fresh random inputs (seed recorded), against the fp64
    token loop. On a CPU device the op's PyTorch path runs instead (no kernel there)."""
    import torch

    from nestlm.ops.memory import linear_memory_scan, linear_memory_scan_ref
    from nestlm.ops.memory.csrc import linear_memory_scan_csrc

    seed = time.time_ns() % 2**31 if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype)

    def rand(*shape, lo=None, hi=None):
        if lo is None:
            return torch.randn(*shape, generator=g, dtype=torch.float64)
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)

    q = torch.nn.functional.normalize(rand(b, L, h, dk), dim=-1)
    k = torch.nn.functional.normalize(rand(b, L, h, dk), dim=-1)
    xs = [q, k, rand(b, L, h, dv), rand(b, L, h, lo=0.01, hi=0.3), rand(b, L, h, lo=0.5, hi=0.99)]
    xs += [rand(b, L, h, lo=0.0, hi=0.1)] + [0.1 * rand(b, h, dv, dk) for _ in range(2)]
    if offset % C:  # starting mid-chunk: the anchor of the chunk in progress is an input too
        xs.append(0.1 * rand(b, h, dv, dk))
    for i in range(3):  # the reference sees exactly the inputs the kernel sees
        xs[i] = xs[i].to(dtype).double()
    ref_in = [x.clone().requires_grad_(True) for x in xs]
    dev_in = [x.to(device, dtype if i < 3 else torch.float32).requires_grad_(True) for i, x in enumerate(xs)]
    kernel = torch.device(device).type == "cuda"
    y_r, st_r = linear_memory_scan_ref(*ref_in, chunk_size=C, offset=offset)
    y, st = (linear_memory_scan_csrc if kernel else linear_memory_scan)(*dev_in, chunk_size=C, offset=offset)
    cot = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (y_r, *st_r)]
    grads_r = torch.autograd.grad(sum((c * t).sum() for c, t in zip(cot, (y_r, *st_r))), ref_in)
    loss = sum((c.to(device, t.dtype) * t).float().sum() for c, t in zip(cot, (y, *st)))
    grads = torch.autograd.grad(loss, dev_in)
    if kernel:
        torch.cuda.synchronize()
    inputs = ("q", "k", "v", "lr", "momentum", "decay", "W", "S", "W_anchor")[: len(xs)]
    names = ["y", "W_end", "S_end", "A_end"] + ["d" + n for n in inputs]
    errs = {}
    for n, o, r in zip(names, (y, *st, *grads), (y_r, *st_r, *grads_r)):
        o = o.detach().double().cpu()
        errs[n] = float("nan") if torch.isnan(o).any() else ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
    tol = 2e-4 if dtype == torch.float32 else 1e-2
    shape = {"b": b, "L": L, "h": h, "dk": dk, "dv": dv, "chunk_size": C, "offset": offset, "dtype": str(dtype)}
    shape["seed"] = seed
    return {**shape, "kernel": kernel, "rel_err": errs, "tol": tol, "ok": all(e <= tol for e in errs.values())}


def worker_memcheck(res: Result, args) -> int:
    from nestlm.ops.memory import csrc

    ext = csrc.load()
    if ext is None:
        res.put(ok=False, error="the csrc extension did not load")
        return 1
    ext.set_poison(True)  # every kernel output starts as NaN: an unwritten element shows
    cases = []
    for shape in MEMCHECK_CASES:
        cases.append(memcheck_case(*shape))
        res.put(cases=cases)
    res.put(ok=all(c["ok"] for c in cases))
    return 0 if res["ok"] else 1


def datasheet_bf16_flops(gpu_name: str) -> float | None:
    """Dense bf16 tensor-core peak (FLOP/s, vendor datasheet) of the GPUs this check is meant for.

    Lightning's own table misses the plain 'NVIDIA H200' name and lists its sparse rate, so MFU
    is computed against this number instead (and against the measured matmul rate as well).
    """
    name = gpu_name.lower()
    if "h100" in name and ("pcie" in name or "hbm2e" in name):
        return 756e12
    if ("h100" in name or "h200" in name) and "nvl" not in name:
        return 989.4e12  # SXM parts: the H200 has the H100's arithmetic
    return None


def worker_train(res: Result, args) -> int:
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from nestlm.envs import MAX_TRAIN_STEPS
    from nestlm.train.callbacks import NonFiniteLossError, TokenThroughput, TrainMetrics
    from nestlm.train.data import SyntheticTrajectories
    from nestlm.train.flops import flops_per_token
    from nestlm.train.module import LitHybridLM

    run = Path(args.run_dir)
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    res.put(preset=args.preset, size=args.size, seq_len=args.seq_len, batch_size=args.batch_size)
    res.put(precision=args.precision, max_steps=args.steps)
    cuda = torch.cuda.is_available() and args.accelerator in ("gpu", "cuda")
    peak = datasheet_bf16_flops(torch.cuda.get_device_name(0)) if cuda else None
    res.put(peak_flops_datasheet=peak)
    L.seed_everything(0, verbose=False)
    module = LitHybridLM(preset=args.preset, size=args.size, lr=6e-4, warmup_steps=10)
    res.put(params=sum(p.numel() for p in module.parameters()))
    res.put(flops_per_token=flops_per_token(module.model, args.seq_len)["total"])
    # full-length train episodes, so a 2k window is mostly tokens rather than padding
    data = SyntheticTrajectories(
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        min_steps=MAX_TRAIN_STEPS,
        max_steps=MAX_TRAIN_STEPS,
        num_workers=args.num_workers,
    )
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_steps=args.steps,
        max_time={"seconds": args.max_seconds},
        logger=CSVLogger(run, name="", version="", flush_logs_every_n_steps=1),
        callbacks=[TokenThroughput(window_size=THROUGHPUT_WINDOW, peak_flops=peak), TrainMetrics(memory_norms=False)],
        log_every_n_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        default_root_dir=run,
    )
    t0 = time.perf_counter()
    try:
        trainer.fit(module, datamodule=data)
    except torch.cuda.OutOfMemoryError:
        res.put(error="out of memory", steps=trainer.global_step)
        return 3
    except NonFiniteLossError as err:
        res.put(error=str(err), steps=trainer.global_step)
        return 3
    res.put(steps=trainer.global_step, fit_seconds=round(time.perf_counter() - t0, 1))
    if cuda:
        res.put(peak_mem_bytes=torch.cuda.max_memory_allocated())
    return 0


def worker_decode(res: Result, args) -> int:
    import torch

    from nestlm.envs import generate_episode
    from nestlm.eval.scoring import stream_argmax
    from nestlm.models import HybridConfig, HybridLM

    device = args.device
    model = HybridLM(HybridConfig.preset(args.preset, args.size)).to(device).eval()
    cuda = torch.device(device).type == "cuda"
    res.put(preset=args.preset, size=args.size, env="ledger", chunk_size=args.chunk_size, dtype="float32", runs=[])
    for n_steps in [int(x) for x in args.episode_steps.split(",")]:
        ep = generate_episode("ledger", n_steps=n_steps, seed=0, split="test")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        with torch.inference_mode():  # as nestlm eval scores episodes
            stream_argmax(model, ep.tokens, chunk_size=args.chunk_size, device=device)
        if cuda:
            torch.cuda.synchronize()
        row = {"steps": n_steps, "tokens": len(ep.tokens), "seconds": round(time.perf_counter() - t0, 2)}
        if cuda:
            row["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base  # above the weights
        res.put(runs=[*res["runs"], row])
    return 0


WORKERS = {
    "env": worker_env,
    "build": worker_build,
    "memcheck": worker_memcheck,
    "train": worker_train,
    "decode": worker_decode,
}


def worker_main(argv: list[str]) -> int:
    import logging

    ap = argparse.ArgumentParser(prog="gpu_check.py worker")
    ap.add_argument("name", choices=sorted(WORKERS))
    ap.add_argument("--result", required=True)
    ap.add_argument("--preset", default="hope-hybrid")
    ap.add_argument("--size", default="125m")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=TRAIN_STEPS, help="train: optimizer steps")
    ap.add_argument("--episode-steps", default="2000,20000", help="decode: LEDGER episode lengths, in steps")
    ap.add_argument("--max-seconds", type=float, default=60)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--accelerator", default="gpu")
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--num-workers", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--chunk-size", type=int, default=2048)
    args = ap.parse_args(argv)
    # nestlm's INFO lines (backend choices, the csrc build) into the step's log; Lightning logs its own
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("nestlm").addHandler(handler)
    logging.getLogger("nestlm").setLevel(logging.INFO)
    return WORKERS[args.name](Result(Path(args.result)), args)


# --------------------------------------------------------------------------------------------------
# results file and table


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def write_results(results: dict, out: Path, results_dir: Path = RESULTS) -> list[Path]:
    """Write the results to <out>/gpu-<gpu>.json and <results_dir>/gpu-<gpu>.json (atomically)."""
    name = f"gpu-{gpu_slug(results.get('gpu', ''))}.json"
    paths = []
    for d in (out, results_dir):
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{name}.tmp"
        tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
        os.replace(tmp, d / name)
        paths.append(d / name)
    return paths


def add_ratios(steps: dict) -> None:
    """Per training run: tokens/s over the transformer's at the same context, MFU against the
    measured bf16 matmul rate (the env step's), next to Lightning's datasheet MFU."""
    matmul = steps.get("env", {}).get("bf16_matmul_flops_per_s")
    for name, rec in steps.items():
        if not name.startswith("train-") or "tokens_per_s" not in rec:
            continue
        base = steps.get(f"train-transformer-{rec['seq_len'] // 1024}k", {}).get("tokens_per_s")
        if base:
            rec["tokens_per_s_vs_transformer"] = rec["tokens_per_s"] / base
        if matmul and rec.get("flops_per_s"):
            rec["mfu_vs_measured_matmul"] = rec["flops_per_s"] / matmul


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict) -> str:
    """The short summary printed last."""
    steps = results.get("steps", {})
    lines = [f"{'step':<24}{'status':<9}{'s':>6}{'budget':>8}  note"]
    for name, r in steps.items():
        note = r.get("reason") or r.get("error") or r.get("parse_error") or ""
        lines.append(f"{name:<24}{r['status']:<9}{fmt(r.get('seconds'), '.1f'):>6}{r['budget_s']:>8}  {note}")
    env = steps.get("env", {})
    if env.get("device"):
        d, v = env["device"], env.get("versions", {})
        lines.append(
            f"\n{d['name']}, driver {d.get('driver')}, torch {v.get('torch')} (CUDA {v.get('cuda')}); copy "
            f"{fmt(env.get('copy_bandwidth_bytes_per_s') and env['copy_bandwidth_bytes_per_s'] / 1e12)} TB/s, "
            f"bf16 matmul {fmt(env.get('bf16_matmul_flops_per_s') and env['bf16_matmul_flops_per_s'] / 1e12, '.0f')}"
            " TFLOP/s"
        )
    if env.get("backends"):
        lines.append("backends: " + ", ".join(f"{k} {v.split(' (')[0]}" for k, v in env["backends"].items()))
    pt = steps.get("pytest-gpu", {})
    if "passed" in pt:
        lines.append(
            f"pytest -m gpu: {pt['passed']} passed, {pt['failed']} failed, {pt['errors']} errors, "
            f"{pt['skipped']} skipped"
            + (f"; failing: {', '.join(pt['failed_tests'][:6])}" if pt["failed_tests"] else "")
        )
    mc = steps.get("memcheck", {})
    if "sanitizer_errors" in mc:
        lines.append(f"memcheck: {mc['sanitizer_errors']} errors over {len(mc.get('cases', []))} kernel cases")
    compiled = {(r["D"], r["L"]): r for r in steps.get("kernels-compiled", {}).get("rows", [])}
    rows = steps.get("kernels", {}).get("rows", [])
    if rows:
        lines.append(f"\n{'D':>4}{'L':>7}{'fwd ms':>9}{'fwd+bwd ms':>12}{'io BW%':>8}{'x eager':>9}{'x compiled':>12}")
        for r in rows:
            io = r.get("fwdbwd_io_bw_fraction")
            xc = compiled.get((r["D"], r["L"]), {}).get("speedup_vs_compiled")
            lines.append(
                f"{r['D']:>4}{r['L']:>7}{fmt(r.get('kernel_fwd_ms')):>9}{fmt(r.get('kernel_fwdbwd_ms')):>12}"
                f"{fmt(io and 100 * io, '.1f'):>8}{fmt(r.get('speedup_vs_torch')):>9}{fmt(xc):>12}"
            )
    train = {k: v for k, v in steps.items() if k.startswith("train-") and v.get("preset")}
    if train:
        lines.append(f"\n{'training':<24}{'ctx':>6}{'batch':>6}{'tokens/s':>11}{'x tfm':>7}{'MFU':>7}{'peak GiB':>9}")
        for r in train.values():
            peak = r.get("peak_mem_bytes")
            lines.append(
                f"{r['preset']:<24}{r['seq_len']:>6}{r['batch_size']:>6}{fmt(r.get('tokens_per_s'), '.0f'):>11}"
                f"{fmt(r.get('tokens_per_s_vs_transformer')):>7}{fmt(r.get('mfu'), '.3f'):>7}"
                f"{fmt(peak and peak / 2**30, '.1f'):>9}" + (f"  {r['error'][:40]}" if r.get("error") else "")
            )
    dec = steps.get("decode", {})
    for r in dec.get("runs", []):
        peak = r.get("peak_mem_bytes")
        lines.append(
            f"decode {dec['preset']} {dec['size']}: {r['steps']} LEDGER steps ({r['tokens']} tokens) in "
            f"{r['seconds']} s, peak {fmt(peak and peak / 2**20, '.0f')} MiB above the weights"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# main


def print_plan(steps: list[Step], ctx: Ctx, budget_s: float) -> None:
    total = sum(st.budget_s for st in steps)
    print(f"nestlm GPU check: {len(steps)} steps, budgets summing to {total} s; run deadline {budget_s:.0f} s")
    print("(a step may also use time earlier steps left unused, up to twice its budget; one that would")
    print(f"start with less than {MIN_STEP_S} s left is skipped)")
    print(f"out: {ctx.out}   scratch: {ctx.work}   results: {RESULTS}/gpu-<gpu>.json\n")
    start = 0
    for i, st in enumerate(steps, 1):
        timeout = step_timeout(budget_s - start, st.budget_s, sum(s.budget_s for s in steps[i:]))
        cmd = st.build(ctx, timeout)
        late = "   (past the deadline: skipped)" if timeout < MIN_STEP_S else ""
        env = "".join(f"{k}={v} " for k, v in cmd.env.items())
        needs = f"   [after {', '.join(cmd.requires)}]" if cmd.requires else ""
        if cmd.needs and shutil.which(cmd.needs) is None:
            needs += f"   [{cmd.needs} not found here]"
        print(f"{i:>2} {st.name:<24}{st.budget_s:>4} s  {env}{shlex.join(cmd.argv)}{needs}{late}")
        start += st.budget_s


def run_plan(steps: list[Step], ctx: Ctx, budget_s: float, results: dict, results_dir: Path = RESULTS) -> dict:
    """Run the steps in order under one deadline; the results files are rewritten after each step."""
    t_start = time.monotonic()
    deadline = t_start + budget_s
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.work.mkdir(parents=True, exist_ok=True)
    with open(ctx.out / "gpu_check.log", "a") as log:
        log.write(f"\n##### {results.get('date')} {results.get('command')} (git {results.get('git_sha')})\n")
        for i, st in enumerate(steps):
            timeout = step_timeout(deadline - time.monotonic(), st.budget_s, sum(s.budget_s for s in steps[i + 1 :]))
            rec = run_step(st.name, st.budget_s, timeout, st.build(ctx, timeout), results["steps"], log)
            results["steps"][st.name] = rec
            add_ratios(results["steps"])
            results["seconds"] = round(time.monotonic() - t_start, 1)
            write_results(results, ctx.out, results_dir)
            print(f"{st.name}: {rec['status']}" + (f" ({rec['reason']})" if rec.get("reason") else ""), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    ap.add_argument("--out", default=None, help="output directory (default: $OUT, else runs/gpu_check)")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="the whole run's deadline in seconds")
    args = ap.parse_args(argv)
    if not args.budget_s > 0:
        ap.error(f"--budget-s {args.budget_s:g} is invalid: expected a number of seconds > 0")
    out = Path(args.out or os.environ.get("OUT") or ROOT / "runs" / "gpu_check")
    ctx = Ctx(out=out, work=Path(tempfile.gettempdir()) / "nestlm-gpu-check")
    if args.dry_run:
        print_plan(plan(), ctx, args.budget_s)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing run.", file=sys.stderr)
        return 2
    from nestlm.train.callbacks import git_sha

    results = {
        "gpu": torch.cuda.get_device_name(0),
        "command": shlex.join(["python", *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(ROOT),
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "budget_s": args.budget_s,
        "steps": {},
    }
    run_plan(plan(), ctx, args.budget_s, results)
    env = results["steps"].get("env", {})
    results.update(device=env.get("device"), versions=env.get("versions"))
    results["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    paths = write_results(results, ctx.out)
    summary = table(results)
    with open(ctx.out / "gpu_check.log", "a") as log:
        log.write("\n" + summary + "\n")
    print("\n" + summary)
    print(f"\nwrote {', '.join(map(str, paths))}; log {ctx.out / 'gpu_check.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
