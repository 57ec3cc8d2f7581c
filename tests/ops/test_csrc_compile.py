"""Compile-only check of csrc/: every .cu with nvcc, the torch binding against torch's headers.

Runs on CPU machines; a syntax or template error in the kernels fails here. Skipped only when the
compiler is absent.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("c++")


def _binding_cmd():
    # The binding needs only ATen / dispatcher headers (no CUDA or Python headers: the stream arrives
    # as an integer), which the CPU wheel ships, so a syntax-only pass checks it completely.
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()]
    return [CXX, "-std=c++20", "-fsyntax-only", *includes, str(CSRC / "memory_scan_bind.cpp")]


@pytest.fixture(scope="module")
def compiles(tmp_path_factory):
    """Start every compile at once (they are independent); each test waits for its own."""
    out = tmp_path_factory.mktemp("csrc_obj")
    jobs = {}
    if NVCC is not None:
        for src in CU_FILES:
            cmd = [
                NVCC,
                "-c",
                "-arch=sm_90",
                "-std=c++17",
                "-O1",
                "-Werror",
                "all-warnings",
                str(src),
                "-o",
                str(out / (src.stem + ".o")),
            ]
            jobs[src.name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if CXX is not None:
        jobs["bind"] = subprocess.Popen(_binding_cmd(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield jobs
    for job in jobs.values():
        if job.poll() is None:
            job.kill()


def _wait(job):
    out, _ = job.communicate(timeout=900)
    return job.returncode, out


def test_csrc_has_kernels_and_binding():
    assert {p.name for p in CU_FILES} >= {"memory_scan_fwd.cu", "memory_scan_bwd.cu"}
    assert (CSRC / "memory_scan_bind.cpp").exists()
    for path in CU_FILES:
        text = path.read_text()
        assert "torch/" not in text and "ATen/" not in text, f"{path.name} must not include torch headers"


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: CUDA sources cannot be compile-checked")
def test_cuda_sources_compile(compiles):
    failed = []
    for src in CU_FILES:
        rc, out = _wait(compiles[src.name])
        if rc != 0:
            failed.append(f"{src.name}:\n{out}")
    assert not failed, "\n".join(failed)


@pytest.mark.skipif(CXX is None, reason="no C++ compiler on PATH")
def test_binding_compiles_against_torch_headers(compiles):
    rc, out = _wait(compiles["bind"])
    assert rc == 0, out


def test_python_side_never_builds_without_cuda(monkeypatch):
    import torch

    from nestlm.ops import backends
    from nestlm.ops.memory import csrc
    from nestlm.ops.memory.chunk import backend
    from nestlm.ops.memory.common import Scan, linear_memory

    q, gate, W = torch.zeros(1, 3, 1, 64), torch.zeros(1, 3, 1), torch.zeros(1, 1, 64, 64)
    _, x = linear_memory(Scan(q, q, q, gate, gate, gate, W, W, None, 16, 0, False, None))
    assert backend(x) == "torch"
    if not torch.cuda.is_available():
        csrc.load.cache_clear()
        assert csrc.load() is None
        backends.reset()
        assert backends.choose("linear_memory_scan", "cuda") == "torch"  # nothing built, nothing to run
    monkeypatch.setenv("NESTLM_BACKEND", "torch")
    assert backends.forced() == "torch"
