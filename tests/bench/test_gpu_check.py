"""bench/gpu_check.py on the CPU: the plan and its budgets, the exit without CUDA, the step runner
(timeouts, failures, skips, incremental results), the parsers, the results file and table, and
the training, decode and memcheck steps at toy size."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bench_scripts import load_bench

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
ORDER = ["env", "csrc-build", "pytest-gpu", "memcheck", "kernels", "kernels-compiled"]
ORDER += [f"train-{p}-{k}" for k in ("2k", "16k") for p in ("transformer", "samba", "hope-hybrid")] + ["decode"]


gc = load_bench("gpu_check")


def no_cuda_env(**extra) -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run_script(*args, **env):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=no_cuda_env(**env), capture_output=True, text=True
    )


def results_files() -> set[str]:
    return {p.name for p in (ROOT / "bench" / "results").glob("gpu-*.json")}


# --- plan, dry run, exit without CUDA -----------------------------------------------------------


def test_dry_run_prints_every_step_with_budget_and_command(tmp_path):
    before = results_files()
    p = run_script("--dry-run", "--out", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    rows = re.findall(r"^\s*(\d+) (\S+)\s+(\d+) s  (.+)$", p.stdout, re.M)
    assert [r[1] for r in rows] == ORDER
    assert [int(r[0]) for r in rows] == list(range(1, len(ORDER) + 1))
    budgets = [int(r[2]) for r in rows]
    assert sum(budgets) <= 420 and min(budgets) >= gc.MIN_STEP_S
    assert "past the deadline" not in p.stdout
    cmd = {r[1]: r[3] for r in rows}
    assert f"{sys.executable} -m pytest -m gpu tests -v" in cmd["pytest-gpu"]
    assert f"--junitxml={tmp_path / 'out' / 'pytest-gpu.xml'}" in cmd["pytest-gpu"]
    assert "compute-sanitizer --tool memcheck" in cmd["memcheck"] and "worker memcheck" in cmd["memcheck"]
    assert "bench/kernels.py --dims 64,128 --lengths 2048,8192" in cmd["kernels"]
    assert "--lengths 2048 " in cmd["kernels-compiled"] and "--compile-max-len 2048" in cmd["kernels-compiled"]
    for name in ORDER[6:12]:
        preset, k = re.match(r"train-(.+)-(\d+)k", name).groups()
        want = f"--preset {preset} --size 125m --seq-len {int(k) * 1024} --batch-size {8 if k == '2' else 1}"
        assert want in cmd[name] and "--precision bf16-mixed" in cmd[name] and "--steps 30" in cmd[name]
    assert "worker decode" in cmd["decode"] and "--preset hope-hybrid --size 125m" in cmd["decode"]
    assert "--episode-steps 2000,20000" in cmd["decode"]
    assert not (tmp_path / "out").exists() and results_files() == before  # a dry run writes nothing


def test_dry_run_with_a_short_deadline_marks_the_steps_that_would_be_skipped(tmp_path):
    p = run_script("--dry-run", "--out", str(tmp_path), "--budget-s", "200")
    assert p.returncode == 0, p.stderr
    late = [ln.split()[1] for ln in p.stdout.splitlines() if "past the deadline" in ln]
    assert late and late[-1] == "decode" and "env" not in late


def test_without_cuda_one_line_exit_2_and_nothing_written(tmp_path):
    before = results_files()
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    p = run_script("--budget-s", "30", OUT=str(out), TMPDIR=str(tmp))  # TMPDIR: where the scratch folder would go
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "CUDA" in p.stderr and p.stdout == ""
    assert not out.exists() and not any(tmp.iterdir()) and results_files() == before


def test_plan_order_budgets_and_commands(tmp_path):
    ctx = gc.Ctx(out=tmp_path / "out", work=tmp_path / "work")
    steps = gc.plan()
    assert [s.name for s in steps] == ORDER
    assert sum(s.budget_s for s in steps) <= gc.DEFAULT_BUDGET_S == 420
    cmds = {s.name: s.build(ctx, s.budget_s) for s in steps}
    for name in ("memcheck", "kernels", "kernels-compiled"):
        assert cmds[name].requires == ("csrc-build",)
    assert cmds["memcheck"].env == {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    # the files that come back from the output folder: at most 8, none nested
    outputs = {a.split("=", 1)[-1] for c in cmds.values() for a in c.argv if str(ctx.out) in a}
    assert all(Path(o).parent == ctx.out for o in outputs) and len(outputs) + 2 <= 8  # + results JSON and log
    train = cmds["train-hope-hybrid-2k"].argv
    assert train[train.index("--max-seconds") + 1] == str(30 - gc.TRAIN_START_S)


@pytest.mark.parametrize(
    "left,budget,reserved,want",
    [
        (420, 20, 399, 21),  # slack of one second from the deadline goes to the first step
        (300, 20, 250, 40),  # earlier steps finished early: the slack is this step's too, up to 2x
        (300, 20, 270, 30),
        (100, 20, 200, 20),  # behind schedule: the step still gets its own budget
        (10, 20, 0, 10),  # never past the deadline
        (-3, 20, 0, 0),
    ],
)
def test_step_timeout(left, budget, reserved, want):
    assert gc.step_timeout(left, budget, reserved) == want


def test_find_tool_falls_back_to_the_cuda_toolkit(tmp_path, monkeypatch):
    tool = tmp_path / "cuda" / "bin" / "compute-sanitizer"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert gc.find_tool("compute-sanitizer") == str(tool)
    monkeypatch.setenv("PATH", str(tool.parent))
    assert gc.find_tool("compute-sanitizer") == str(tool)
    assert gc.find_tool("no-such-tool-xyz") == "no-such-tool-xyz"


def test_backend_imports_record_each_backend(tmp_path, monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "fla", types.SimpleNamespace(__version__="9.9"))
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # an import that fails
    res = gc.Result(tmp_path / "env.json")
    gc.backend_imports(res)
    got = json.loads((tmp_path / "env.json").read_text())["backends"]
    assert list(got) == list(gc.BACKEND_MODULES)
    assert got["fla"] == "9.9" and got["flash_attn"].startswith("absent (ModuleNotFoundError")
    versions = gc.package_versions()
    assert list(versions) == list(gc.PACKAGES) and versions["torch"] != "absent"


def test_datasheet_peak_of_the_hopper_parts():
    assert gc.datasheet_bf16_flops("NVIDIA H200") == gc.datasheet_bf16_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gc.datasheet_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert gc.datasheet_bf16_flops("NVIDIA H200 NVL") is None and gc.datasheet_bf16_flops("Tesla T4") is None


# --- the step runner ----------------------------------------------------------------------------


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_command_kills_the_whole_group_after_the_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "KILL_GRACE_S", 1)
    pid_file = tmp_path / "child.pid"
    # a parent that ignores SIGTERM and a child that sleeps: both must be gone when the step ends
    code = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(60)"
    )
    with open(tmp_path / "log", "w") as log:
        t0 = time.monotonic()
        fin = gc.run_command(py(code), 1.5, log)
        took = time.monotonic() - t0
    assert fin.status == "timeout" and "started" in fin.output
    assert took < 1.5 + 2 * gc.KILL_GRACE_S + 2
    log_text = (tmp_path / "log").read_text()
    assert "started" in log_text and "killed after" in log_text
    assert gone_soon(int(pid_file.read_text()))


def gone_soon(pid: int, within_s: float = 3.0) -> bool:
    # SIGKILL is delivered asynchronously: on a loaded machine the child can still be exiting
    end = time.monotonic() + within_s
    while running(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie left for an init that does not reap counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_run_step_records_ok_failed_parse_errors_and_skips(tmp_path):
    log = open(tmp_path / "log", "w")
    ok = gc.Command(py("print('x = 3')"), lambda fin: {"x": int(fin.output.split("=")[1])})
    rec = gc.run_step("a", 10, 10, ok, {}, log)
    assert rec["status"] == "ok" and rec["x"] == 3 and rec["rc"] == 0 and rec["budget_s"] == 10

    failed = gc.Command(py("import sys; print('half done'); sys.exit(3)"), lambda fin: {"seen": "half" in fin.output})
    rec = gc.run_step("b", 10, 10, failed, {}, log)
    assert rec["status"] == "failed" and rec["rc"] == 3 and rec["seen"] is True

    judged = gc.Command(py("pass"), lambda fin: {"ok": False})
    assert gc.run_step("c", 10, 10, judged, {}, log)["status"] == "failed"

    broken = gc.Command(py("pass"), lambda fin: json.loads("not json"))
    rec = gc.run_step("d", 10, 10, broken, {}, log)
    assert rec["status"] == "ok" and rec["parse_error"].startswith("JSONDecodeError")

    steps = {"build": {"status": "failed"}}
    needs_build = gc.Command(py("pass"), lambda fin: {}, requires=("build",))
    rec = gc.run_step("e", 10, 10, needs_build, steps, log)
    assert rec["status"] == "skipped" and "build" in rec["reason"]
    rec = gc.run_step("f", 10, 10, gc.Command(py("pass"), lambda fin: {}, needs="no-such-tool-xyz"), {}, log)
    assert rec["status"] == "skipped" and "no-such-tool-xyz" in rec["reason"]
    rec = gc.run_step("g", 10, gc.MIN_STEP_S - 1, ok, {}, log)
    assert rec["status"] == "skipped" and "out of time" in rec["reason"]
    log.close()
    text = (tmp_path / "log").read_text()
    assert "=== a: ok" in text and "half done" in text and "=== e" not in text


def test_run_plan_runs_in_order_under_one_deadline_and_rewrites_results_each_step(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "KILL_GRACE_S", 1)
    monkeypatch.setattr(gc, "MIN_STEP_S", 1)
    ctx = gc.Ctx(out=tmp_path / "out", work=tmp_path / "work")
    results_dir = tmp_path / "results"
    seen = []

    def step(code, figures=None):
        def build(c, timeout):
            def parse(fin):
                # the previous steps' records are already on disk when this step ends
                seen.append(sorted(json.loads((c.out / "gpu-nvidia-h200.json").read_text())["steps"]))
                return figures or {}

            return gc.Command(py(code), parse)

        return build

    steps = [
        gc.Step("first", 2, step("print('one')", {"n": 1})),
        gc.Step("hangs", 2, step("import time; time.sleep(60)")),
        gc.Step("late", 2, step("print('late')")),
    ]
    ctx.out.mkdir(parents=True)
    (ctx.out / "gpu-nvidia-h200.json").write_text(json.dumps({"steps": {}}))  # what the first parse reads
    results = {"gpu": "NVIDIA H200", "steps": {}}
    gc.run_plan(steps, ctx, 3, results, results_dir)
    st = results["steps"]
    assert list(st) == ["first", "hangs", "late"]
    assert st["first"]["status"] == "ok" and st["first"]["n"] == 1
    assert st["hangs"]["status"] == "timeout" and st["hangs"]["timeout_s"] == 2
    assert st["late"]["status"] == "skipped"  # the hang used the run's remaining time
    assert seen == [[], ["first"]]
    for d in (ctx.out, results_dir):
        assert json.loads((d / "gpu-nvidia-h200.json").read_text())["steps"] == st
    log = (ctx.out / "gpu_check.log").read_text()
    assert log.index("=== first: ok") < log.index("hangs (timeout") < log.index("killed after")


# --- parsers ------------------------------------------------------------------------------------

TOY_TESTS = """
import pytest

@pytest.mark.gpu
def test_pass():
    assert sum([1, 1]) == 2

@pytest.mark.gpu
def test_fail():
    assert False

@pytest.mark.gpu
def test_skip():
    pytest.skip("no device")

def test_not_selected():
    assert False
"""


def test_pytest_step_command_and_junit_counts_on_toy_tests(tmp_path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "test_toy_gpu.py").write_text(TOY_TESTS)
    (tmp_path / "toy" / "test_toy_broken.py").write_text("import no_such_package_xyz\n")
    ctx = gc.Ctx(out=tmp_path / "out", work=tmp_path / "work")
    ctx.out.mkdir()
    with open(tmp_path / "log", "w") as log:
        fin = gc.run_command(gc.pytest_command(ctx, (str(tmp_path / "toy"),)), 120, log)
    assert fin.status == "failed" and fin.rc == 1
    xml = ctx.out / "pytest-gpu.xml"
    got = gc.parse_junit(xml, fin.output)
    assert (got["passed"], got["failed"], got["skipped"], got["errors"]) == (1, 1, 1, 0)
    assert got["failed_tests"] == ["test_toy_gpu::test_fail"]
    assert len(got["collection_errors"]) == 1 and "no_such_package_xyz" in got["collection_errors"][0]
    # pytest killed before writing the XML: the same counts from its -v lines
    got = gc.parse_junit(tmp_path / "missing.xml", fin.output)
    assert (got["passed"], got["failed"], got["skipped"], got["errors"]) == (1, 1, 1, 0)
    assert got["failed_tests"][0].endswith("test_toy_gpu.py::test_fail")


def test_parse_sanitizer():
    clean = "========= COMPUTE-SANITIZER\nok\n========= ERROR SUMMARY: 0 errors\n"
    assert gc.parse_sanitizer(clean)["sanitizer_errors"] == 0
    bad = (
        "========= COMPUTE-SANITIZER\n========= Invalid __global__ write of size 4 bytes\n"
        "=========     at memory_scan_fwd_kernel+0x1c0\n========= ERROR SUMMARY: 2 errors\n"
    )
    got = gc.parse_sanitizer(bad)
    assert got["sanitizer_errors"] == 2 and "Invalid __global__ write" in got["sanitizer_messages"][1]
    assert gc.parse_sanitizer("========= Error: Device not supported\n")["sanitizer_errors"] is None


def test_parse_kernels_from_json_or_from_printed_rows(tmp_path):
    rows = [{"D": 64, "L": 2048, "kernel_fwdbwd_ms": 1.5}, {"D": 128, "L": 2048, "kernel_fwdbwd_ms": 4.0}]
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({"copy_bandwidth_bytes_per_s": 4.3e12, "rows": rows}))
    assert gc.parse_kernels(path, "") == {"copy_bandwidth_bytes_per_s": 4.3e12, "rows": rows}
    printed = "device: NVIDIA H200, copy bandwidth (read + write): 4.25 TB/s\n" + json.dumps(rows[0]) + "\n{trunc"
    got = gc.parse_kernels(tmp_path / "none.json", printed)
    assert got["rows"] == rows[:1] and got["partial"] and got["copy_bandwidth_bytes_per_s"] == pytest.approx(4.25e12)


# --- results file and table ---------------------------------------------------------------------


def toy_results() -> dict:
    steps = {
        "env": {
            "status": "ok",
            "budget_s": 20,
            "seconds": 9.0,
            "device": {"name": "NVIDIA H200", "driver": "580.1"},
            "versions": {"torch": "2.11.0+cu130", "cuda": "13.0"},
            "copy_bandwidth_bytes_per_s": 4.3e12,
            "bf16_matmul_flops_per_s": 7.9e14,
            "backends": {"mamba_ssm": "absent (ModuleNotFoundError: x)", "fla": "0.6.0"},
        },
        "pytest-gpu": {"status": "failed", "budget_s": 70, "seconds": 50.0, "passed": 30, "failed": 1}
        | {"errors": 0, "skipped": 3, "failed_tests": ["tests/test_gpu_x.py::test_y"]},
        "memcheck": {"status": "skipped", "budget_s": 30, "reason": "compute-sanitizer is not on PATH"},
        "kernels": {"status": "ok", "budget_s": 40, "seconds": 30.0, "rows": [{"D": 64, "L": 2048}]},
        "kernels-compiled": {"status": "timeout", "budget_s": 25, "seconds": 25.0, "rows": []},
        "train-transformer-2k": {"status": "ok", "budget_s": 22, "seconds": 20.0, "preset": "transformer"}
        | {"seq_len": 2048, "batch_size": 8, "tokens_per_s": 400000.0, "flops_per_s": 4e14, "mfu": 0.4},
        "train-hope-hybrid-2k": {"status": "ok", "budget_s": 26, "seconds": 25.0, "preset": "hope-hybrid"}
        | {"seq_len": 2048, "batch_size": 8, "tokens_per_s": 100000.0, "flops_per_s": 1e14},
        "decode": {"status": "ok", "budget_s": 20, "seconds": 12.0, "preset": "hope-hybrid", "size": "125m"}
        | {"runs": [{"steps": 2000, "tokens": 19687, "seconds": 1.5, "peak_mem_bytes": 412 * 2**20}]},
    }
    steps["kernels"]["rows"][0] |= {"kernel_fwd_ms": 0.5, "kernel_fwdbwd_ms": 2.0, "fwdbwd_io_bw_fraction": 0.55}
    steps["kernels"]["rows"][0] |= {"speedup_vs_torch": 12.0}
    return {"gpu": "NVIDIA H200", "steps": steps}


def test_ratios_table_and_results_files(tmp_path):
    results = toy_results()
    gc.add_ratios(results["steps"])
    hope = results["steps"]["train-hope-hybrid-2k"]
    assert hope["tokens_per_s_vs_transformer"] == pytest.approx(0.25)
    assert hope["mfu_vs_measured_matmul"] == pytest.approx(1e14 / 7.9e14)
    text = gc.table(results)
    assert "NVIDIA H200, driver 580.1, torch 2.11.0+cu130 (CUDA 13.0); copy 4.30 TB/s, bf16 matmul 790 TFLOP/s" in text
    assert "backends: mamba_ssm absent, fla 0.6.0" in text
    assert "pytest -m gpu: 30 passed, 1 failed, 0 errors, 3 skipped; failing: tests/test_gpu_x.py::test_y" in text
    assert re.search(r"memcheck\s+skipped\s+-\s+30  compute-sanitizer is not on PATH", text)
    assert re.search(r"^\s+64\s+2048\s+0\.50\s+2\.00\s+55\.0\s+12\.00\s+-$", text, re.M)
    assert re.search(r"^transformer\s+2048\s+8\s+400000\s+1\.00\s+0\.400\s+-$", text, re.M)
    assert re.search(r"^hope-hybrid\s+2048\s+8\s+100000\s+0\.25\s+-\s+-$", text, re.M)
    assert "2000 LEDGER steps (19687 tokens) in 1.5 s, peak 412 MiB above the weights" in text
    paths = gc.write_results(results, tmp_path / "out", tmp_path / "results")
    assert [p.name for p in paths] == ["gpu-nvidia-h200.json"] * 2
    for p in paths:
        assert json.loads(p.read_text()) == json.loads(json.dumps(results))
    assert sorted(os.listdir(tmp_path / "out")) == ["gpu-nvidia-h200.json"]  # no temporary file left


# --- steps at toy size on the CPU ---------------------------------------------------------------


def test_train_step_at_toy_size_on_cpu(tmp_path):
    ctx = gc.Ctx(out=tmp_path / "out", work=tmp_path / "work")
    cmd = gc.train_step(
        ctx, 120, "transformer", 64, 2, size="tiny", steps=7, accelerator="cpu", precision="32-true", num_workers=0
    )
    with open(tmp_path / "log", "w") as log:
        rec = gc.run_step("train-transformer-0k", 120, 120, cmd, {}, log)
    assert rec["status"] == "ok", (tmp_path / "log").read_text()[-3000:]
    assert rec["steps"] == 7 and rec["throughput_at_step"] == 7 and rec["tokens_per_s"] > 0
    assert rec["flops_per_token"] > 0 and rec["flops_per_s"] > 0 and rec["peak_mem_bytes"] > 0
    assert (rec["preset"], rec["seq_len"], rec["batch_size"]) == ("transformer", 64, 2)


def test_decode_worker_at_toy_size_on_cpu(tmp_path):
    res = tmp_path / "decode.json"
    args = ["--size", "tiny", "--episode-steps", "5,40", "--chunk-size", "64", "--device", "cpu"]
    p = run_script("worker", "decode", "--result", str(res), *args)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(res.read_text())
    assert got["preset"] == "hope-hybrid" and [r["steps"] for r in got["runs"]] == [5, 40]
    assert got["runs"][0]["tokens"] < got["runs"][1]["tokens"]


@pytest.mark.parametrize("case", range(len(gc.MEMCHECK_CASES)))
def test_memcheck_cases_match_the_token_loop_on_cpu(case):
    # on the CPU the fused algorithm runs in its PyTorch form: this checks the driver's inputs,
    # gradients and comparison, which the sanitizer run then repeats through the kernels
    got = gc.memcheck_case(*gc.MEMCHECK_CASES[case], device="cpu")
    assert got["ok"] and not got["kernel"], got
    n_inputs = 9 if gc.MEMCHECK_CASES[case][6] % gc.MEMCHECK_CASES[case][5] else 8
    assert len(got["rel_err"]) == 4 + n_inputs
