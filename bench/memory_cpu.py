"""CPU benchmark of the memory layers: chunked path vs token loop, and NeuralMemory vs titans-pytorch.

Every number is forward + backward of one layer on x [1, L, d_model] (fp32), loss = y.square().mean().
The `cms_scan op` rows time the CMS update alone (fixed random inputs at the CMS layer's shapes,
without the level MLPs that both CMS paths share), beside the CMS layer; the `dgd_scan op` rows do
the same for HOPE's recurrence (nestlm.ops.dgd_scan vs dgd_scan_ref). The HOPE layer runs in the
paper's setting and in nestlm's first setting ("v1", the layer before DGD) at the same shape; its
token loop is the layer with the scan replaced by the reference.
Prints a table and writes bench/results/memory_cpu.json.

    python bench/memory_cpu.py                       # the default set (several minutes)
    python bench/memory_cpu.py --quick               # small lengths, a smoke run

Timings: the chunked paths and titans-pytorch are run `--reps` times after one warm-up call and
the best (and median) wall time is reported, together with the process CPU time of that call; the
token loops run once. The run records the thread count and the load average: on a shared machine
the wall time of a multi-threaded run is dominated by other jobs (OpenMP threads wait for each
other), so the default is one thread.

Allocator: a token loop allocates a state-sized tensor per token while autograd keeps small
tensors alive between them; glibc's heap then cannot reuse the freed blocks, RSS grows by
~1.5 MB per token (CMS at d_model 256) and the loop's time per token grows with L.
`--mmap-threshold 262144` serves blocks of 256 KiB and more from mmap (mallopt), which keeps the
loops linear in L; the run records the setting. Without it the process runs with glibc's default.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nestlm.layers.cms  # noqa: E402
import nestlm.layers.memory  # noqa: E402
from nestlm.layers.memory import NeuralMemory  # noqa: E402
from nestlm.ops import cms_scan_ref, linear_memory_scan_ref, mlp_memory_scan_ref  # noqa: E402

D_MODEL, HEADS, HEAD_DIM, CHUNK = 256, 4, 64, 16


def set_mmap_threshold(nbytes: int) -> None:
    """glibc mallopt(M_MMAP_THRESHOLD, nbytes): allocations of at least nbytes come from mmap."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    if ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes) != 1:
        raise SystemExit(f"--mmap-threshold {nbytes}: mallopt failed (glibc only)")


def reference_ops() -> contextlib.ExitStack:
    """NeuralMemory and CMS on their token-loop reference ops, as a context (the layers call their
    op by its module-level name, so swapping that name swaps the path)."""
    stack = contextlib.ExitStack()
    for module, name, ref in (
        (nestlm.layers.memory, "linear_memory_scan", linear_memory_scan_ref),
        (nestlm.layers.memory, "mlp_memory_scan", mlp_memory_scan_ref),
        (nestlm.layers.cms, "cms_scan", cms_scan_ref),
    ):
        stack.enter_context(mock.patch.object(module, name, ref))
    return stack


def make_layers(impl: str) -> dict[str, torch.nn.Module]:
    """The layers compared chunked vs token loop, all at d_model=256. `impl` picks the HOPE mixer's
    path and the cms_scan op rows'; NeuralMemory and CMS run their token loops under reference_ops()."""
    layers = {
        "NeuralMemory(depth=2)": NeuralMemory(D_MODEL, HEADS, HEAD_DIM, depth=2, chunk_size=CHUNK),
        "NeuralMemory(depth=1)": NeuralMemory(D_MODEL, HEADS, HEAD_DIM, depth=1, chunk_size=CHUNK),
    }
    from nestlm.layers.cms import CMS

    layers["CMS(periods=(None,16,64))"] = CMS(D_MODEL, periods=(None, 16, 64))
    for period in (16, 64):  # the op without the MLPs that both CMS paths share
        layers[f"cms_scan op (n=704, d=256, C={period})"] = CMSScanOp(period, impl)
    try:
        from nestlm.layers.hope import HOPE, SETTINGS
    except ImportError:
        return layers
    for memory in ("mlp", "linear"):  # HOPE's recurrence without the projections around it
        layers[f"dgd_scan op ({HEADS}x{HEAD_DIM}, {memory}, C={CHUNK}/{CHUNK})"] = DGDScanOp(memory, impl)
    for setting in ("paper", "v1"):
        layer = HOPE(D_MODEL, HEADS, HEAD_DIM, chunk_size=CHUNK, aux_chunk_size=CHUNK, **SETTINGS[setting])
        layers[f"HOPE {setting} ({HEADS}x{HEAD_DIM}, chunks {CHUNK}/{CHUNK})"] = (
            WithTokenLoop(layer) if impl == "ref" else layer
        )
    return layers


class WithTokenLoop(torch.nn.Module):
    """A HOPE layer run with its scan replaced by the token-loop reference (the layer itself always
    runs the chunked path)."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor):
        import nestlm.layers.hope as hope
        from nestlm.ops import dgd_scan_ref, selfmod_scan_ref

        with contextlib.ExitStack() as stack:
            stack.enter_context(_patched(hope, "dgd_scan", dgd_scan_ref))
            stack.enter_context(_patched(hope, "selfmod_scan", selfmod_scan_ref))
            return self.layer(x)


@contextlib.contextmanager
def _patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


class DGDScanOp(torch.nn.Module):
    """`dgd_scan` (or its token loop) alone, in the paper's setting (DGD, momentum, self targets,
    decay to zero) at the HOPE layer's shapes: fixed random leaves, forward(x) reads only x's length."""

    def __init__(self, memory: str, impl: str, h: int = HEADS, c: int = HEAD_DIM):
        super().__init__()
        from nestlm.ops import dgd_scan, dgd_scan_ref
        from nestlm.ops.hope.common import init_shapes

        self.memory, self.h, self.c = memory, h, c
        self.scan = dgd_scan_ref if impl == "ref" else dgd_scan
        g = torch.Generator().manual_seed(2)
        shapes = init_shapes(memory, h, c)
        self.init = torch.nn.ParameterDict(
            {
                k: torch.nn.Parameter(
                    torch.randn(*s, generator=g) * (c**-0.5 if k.endswith("in") or k == "aux" else 0.02)
                )
                for k, s in shapes.items()
            }
        )
        self.biases = torch.nn.Parameter(torch.stack([torch.zeros(h), torch.full((h,), -8.0)]))
        self.inputs = torch.nn.ParameterDict()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        L, h, c = x.shape[1], self.h, self.c
        if str(L) not in self.inputs:
            g = torch.Generator().manual_seed(L)
            self.inputs[str(L)] = torch.nn.Parameter(torch.randn(1, L, h, 2 * c + 1, generator=g))
        xm, q, gate = self.inputs[str(L)].split((c, c, 1), -1)
        q = torch.nn.functional.normalize(q, dim=-1)
        state = {}
        for layer, w in self.init.items():
            state[f"{layer}_W"] = state[f"{layer}_A"] = w.expand(1, *w.shape)
            state[f"{layer}_S"] = torch.zeros(1, *w.shape)
        state["pos"] = torch.zeros(1, dtype=torch.long)
        log_mu = torch.nn.functional.logsigmoid(gate[..., 0])
        lr_bias, decay_bias = self.biases
        y, _ = self.scan(
            xm, q, log_mu, lr_bias, decay_bias, dict(self.init), 0.1, state, CHUNK, CHUNK, memory=self.memory
        )
        return y.flatten(2), None


class CMSScanOp(torch.nn.Module):
    """`cms_scan` (or its token loop) alone, without the level MLPs around it: the op-level side of
    the CMS comparison. Its inputs are fixed random leaves at the CMS layer's shapes (n = 704, the
    level width at d_model 256); forward(x) reads only x's length."""

    def __init__(self, period: int, impl: str, n: int = 704, d: int = D_MODEL):
        super().__init__()
        from nestlm.ops.cms import cms_scan, cms_scan_ref

        self.period, self.n, self.d = period, n, d
        self.scan = cms_scan_ref if impl == "ref" else cms_scan
        self.W = torch.nn.Parameter(0.02 * torch.randn(1, n, d, generator=torch.Generator().manual_seed(1)))
        self.inputs = torch.nn.ParameterDict()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        L = x.shape[1]
        if str(L) not in self.inputs:
            g = torch.Generator().manual_seed(L)
            u = torch.randn(1, L, self.n, generator=g)
            k = torch.nn.functional.normalize(torch.randn(1, L, self.n, generator=g), dim=-1)
            self.inputs[str(L)] = torch.nn.Parameter(torch.cat((u, k, torch.randn(1, L, self.d, generator=g)), -1))
        u, k, v = self.inputs[str(L)].split((self.n, self.n, self.d), -1)
        lr = torch.full((1, L), 0.5)
        y, *_ = self.scan(u, k, v, lr, self.W, torch.zeros_like(self.W), torch.zeros(1, dtype=torch.long), self.period)
        return y, None


def titans_layer() -> torch.nn.Module | None:
    try:
        from titans_pytorch import NeuralMemory as TitansNeuralMemory
    except ImportError:
        return None
    return TitansNeuralMemory(dim=D_MODEL, chunk_size=CHUNK, heads=HEADS, dim_head=HEAD_DIM)


def fwd_bwd(layer: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward + backward."""
    layer.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.process_time()
    y = layer(x)[0]
    y.square().mean().backward()
    return time.perf_counter() - t0, time.process_time() - c0


def measure(layer: torch.nn.Module, L: int, reps: int, warmup: bool, seed: int = 0) -> dict:
    x = torch.randn(1, L, D_MODEL, generator=torch.Generator().manual_seed(seed))
    if warmup:
        fwd_bwd(layer, x)
    runs = [fwd_bwd(layer, x) for _ in range(reps)]
    best = min(runs)
    return {
        "L": L,
        "seconds": best[0],
        "seconds_median": statistics.median(r[0] for r in runs),
        "cpu_seconds": best[1],
        "tokens_per_s": L / best[0],
        "reps": reps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096", help="lengths for chunked vs token loop")
    ap.add_argument("--titans-lengths", default="1024,2048,4096", help="lengths for NeuralMemory vs titans-pytorch")
    ap.add_argument("--ref-max-len", type=int, default=4096, help="skip NeuralMemory token loops above this length")
    ap.add_argument("--other-ref-max-len", type=int, default=4096, help="the same for the CMS and HOPE token loops")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", default="", help="comma-separated name prefixes to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="lengths 256,512, one rep (smoke run)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_cpu.json"))
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        metavar="BYTES",
        help="glibc mallopt(M_MMAP_THRESHOLD) for this process (see the module doc)",
    )
    ap.add_argument("--summarize", metavar="JSON", help="recompute the summary of an earlier result file and exit")
    args = ap.parse_args()
    if args.summarize:
        result = json.loads(Path(args.summarize).read_text())
        result["summary"] = summarize(result["results"])
        Path(args.summarize).write_text(json.dumps(result, indent=2) + "\n")
        print_summary(result["summary"])
        return
    if args.quick:
        args.lengths, args.titans_lengths, args.reps = "256,512", "256,512", 1
    lengths = [int(s) for s in args.lengths.split(",") if s]
    titans_lengths = [int(s) for s in args.titans_lengths.split(",") if s]
    if args.mmap_threshold is not None:
        set_mmap_threshold(args.mmap_threshold)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()

    rows = []
    fast_layers, ref_layers = make_layers("chunked"), make_layers("ref")
    wanted = [s.strip() for s in args.layers.split(",") if s.strip()]
    for name, fast in fast_layers.items():
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        ref = ref_layers[name]
        (ref.layer if isinstance(ref, WithTokenLoop) else ref).load_state_dict(fast.state_dict())
        for L in lengths:
            r = measure(fast, L, args.reps, warmup=True)
            rows.append({"layer": name, "impl": "chunked", **r})
            print(f"{name:28s} chunked     L={L:5d} {r['seconds']:8.3f} s {r['tokens_per_s']:9.0f} tok/s", flush=True)
            if L <= (args.ref_max_len if name.startswith("NeuralMemory") else args.other_ref_max_len):
                with reference_ops():
                    r = measure(ref, L, 1, warmup=False)
                rows.append({"layer": name, "impl": "token-loop", **r})
                print(
                    f"{name:28s} token-loop  L={L:5d} {r['seconds']:8.3f} s {r['tokens_per_s']:9.0f} tok/s", flush=True
                )

    titans = titans_layer()
    ours = fast_layers["NeuralMemory(depth=2)"]
    if titans is not None and (
        not wanted or any("titans".startswith(w) or "NeuralMemory".startswith(w) for w in wanted)
    ):
        for L in titans_lengths:
            for label, layer in (("NeuralMemory(depth=2)", ours), ("titans-pytorch NeuralMemory", titans)):
                r = measure(layer, L, args.reps, warmup=True)
                rows.append({"layer": label, "impl": "vs-titans", **r})
                print(
                    f"{label:28s} vs-titans   L={L:5d} {r['seconds']:8.3f} s {r['tokens_per_s']:9.0f} tok/s", flush=True
                )

    summary = summarize(rows)
    print_summary(summary)
    result = {
        "benchmark": "memory_cpu",
        "what": "forward+backward of one layer, x [1, L, 256] fp32, loss = mean(y^2)",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "malloc_mmap_threshold": args.mmap_threshold,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "results": rows,
        "summary": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


def print_summary(summary: list[dict]) -> None:
    print()
    print(f"{'comparison (speed-up = slow / fast)':66s} {'L':>5s} {'wall':>8s} {'cpu':>8s}")
    for s in summary:
        print(f"{s['comparison']:66s} {s['L']:5d} {s['speedup_wall']:7.2f}x {s['speedup_cpu']:7.2f}x")


def summarize(rows: list[dict]) -> list[dict]:
    """Speed-ups of the chunked paths and of NeuralMemory over titans-pytorch, as ratios of wall time
    and of process CPU time (the CPU ratio is the steadier one on a shared machine)."""
    by = {(r["layer"], r["impl"], r["L"]): r for r in rows}

    def ratio(comparison, L, slow, fast):
        return {
            "comparison": comparison,
            "L": L,
            "speedup_wall": slow["seconds"] / fast["seconds"],
            "speedup_cpu": slow["cpu_seconds"] / fast["cpu_seconds"],
        }

    out = []
    for (layer, impl, L), r in by.items():
        if impl == "chunked" and (layer, "token-loop", L) in by:
            out.append(ratio(f"{layer}: chunked vs token loop", L, by[(layer, "token-loop", L)], r))
        v1 = layer.replace("HOPE paper", "HOPE v1")
        if impl == "chunked" and layer.startswith("HOPE paper") and (v1, "chunked", L) in by:
            # a ratio above 1: the paper's HOPE is that much slower than the first layer
            out.append(ratio(f"{layer} time / {v1} time", L, r, by[(v1, "chunked", L)]))
        titans = by.get(("titans-pytorch NeuralMemory", "vs-titans", L))
        if impl == "vs-titans" and layer.startswith("NeuralMemory") and titans is not None:
            out.append(ratio("NeuralMemory(256,4,64,depth=2,C=16) vs titans-pytorch", L, titans, r))
    for name in ("NeuralMemory(depth=2)", "titans-pytorch NeuralMemory"):
        runs = sorted((r["L"], r) for r in rows if r["impl"] == "vs-titans" and r["layer"] == name)
        if len(runs) >= 2:
            (l0, r0), (l1, r1) = runs[0], runs[-1]
            # time per token at the longest length over that at the shortest: 1 means linear in L
            out.append(
                {
                    "comparison": f"{name}: time per token, L={l1} / L={l0} (1 = linear)",
                    "L": l1,
                    "speedup_wall": (r1["seconds"] / l1) / (r0["seconds"] / l0),
                    "speedup_cpu": (r1["cpu_seconds"] / l1) / (r0["cpu_seconds"] / l0),
                }
            )
    return out


if __name__ == "__main__":
    main()
