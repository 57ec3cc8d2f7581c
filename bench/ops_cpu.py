"""CPU benchmark: nestlm.ops fast paths against their token-loop references (and, when present, the
layers against transformers' mixers, from bench/ops_cpu_layers.py).

Ops section: forward + backward (loss = sum(out * w) + sum(state * w'), gradients for every input)
of each fast path and its `*_ref`, fp32, default torch threads, wall and process CPU time:
    selective_scan  b=2, d=256, n=16            (B, C [b, n, l]; D, z, delta_bias, softplus)
    ssd_scan        b=2, h=8, p=32, n=16, g=1, chunk_size 64 (D, z, dt_bias, softplus; the CPU
                    path tiles by min(chunk_size, nestlm.ops.ssd.chunk.CPU_MAX_CHUNK) = 32)
    causal_conv1d   b=2, d=256, w=4             (bias, silu)
at L in --lengths. The fast path is timed --repeats times (median and best stored); the reference
--ref-repeats times, once at L >= 4096 (it is slow). Both sides run on the same inputs.

    python bench/ops_cpu.py [--sections ops,layers] [--lengths 1024,4096] [--repeats 5] [--threads N]

Prints a table per section and writes bench/results/ops_cpu.json: top-level environment (device,
cpu model, threads, torch version, date) and one entry per section with its rows; sections not run
this time are kept from the existing file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nestlm.ops import (  # noqa: E402
    causal_conv1d,
    causal_conv1d_ref,
    selective_scan,
    selective_scan_ref,
    ssd_scan,
    ssd_scan_ref,
)

RESULTS = Path(__file__).parent / "results" / "ops_cpu.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    return {
        "device": f"cpu ({os.cpu_count()} cores)",
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------------------------------ ops


def _inputs_selective_scan(L: int, gen: torch.Generator) -> tuple[list[torch.Tensor], dict]:
    b, d, n = 2, 256, 16
    args = [
        torch.randn(b, d, L, generator=gen),  # u
        torch.randn(b, d, L, generator=gen) * 0.5 - 2.0,  # delta (pre-softplus)
        -torch.exp(torch.rand(d, n, generator=gen) * 2.7),  # A in [-15, -1]
        torch.randn(b, n, L, generator=gen),  # B
        torch.randn(b, n, L, generator=gen),  # C
        torch.randn(d, generator=gen),  # D
        torch.randn(b, d, L, generator=gen),  # z
        torch.randn(d, generator=gen) * 0.1,  # delta_bias
    ]
    return args, {"delta_softplus": True, "return_last_state": True}


def _call_selective_scan(fn: Callable, args: list[torch.Tensor], kw: dict):
    u, delta, A, B, C, D, z, bias = args
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=bias, **kw)


def _inputs_ssd(L: int, gen: torch.Generator) -> tuple[list[torch.Tensor], dict]:
    b, h, p, g, n = 2, 8, 32, 1, 16
    args = [
        torch.randn(b, L, h, p, generator=gen),  # x
        torch.randn(b, L, h, generator=gen) * 0.5 - 2.0,  # dt (pre-softplus)
        -torch.exp(torch.rand(h, generator=gen) * 2.7),  # A
        torch.randn(b, L, g, n, generator=gen),  # B
        torch.randn(b, L, g, n, generator=gen),  # C
        torch.randn(h, generator=gen),  # D
        torch.randn(b, L, h, p, generator=gen),  # z
        torch.randn(h, generator=gen) * 0.1,  # dt_bias
    ]
    return args, {"dt_softplus": True, "return_final_states": True}


def _call_ssd(fn: Callable, args: list[torch.Tensor], kw: dict):
    x, dt_, A, B, C, D, z, bias = args
    return fn(x, dt_, A, B, C, 64, D=D, z=z, dt_bias=bias, **kw)


def _inputs_conv(L: int, gen: torch.Generator) -> tuple[list[torch.Tensor], dict]:
    b, d, w = 2, 256, 4
    args = [torch.randn(b, d, L, generator=gen), torch.randn(d, w, generator=gen), torch.randn(d, generator=gen)]
    return args, {"return_final_states": True, "activation": "silu"}


def _call_conv(fn: Callable, args: list[torch.Tensor], kw: dict):
    x, w, bias = args
    return fn(x, w, bias, **kw)


OPS = {
    "selective_scan": (
        "b=2 d=256 n=16",
        _inputs_selective_scan,
        _call_selective_scan,
        selective_scan,
        selective_scan_ref,
    ),
    "ssd_scan": ("b=2 h=8 p=32 n=16 chunk_size=64", _inputs_ssd, _call_ssd, ssd_scan, ssd_scan_ref),
    "causal_conv1d": ("b=2 d=256 w=4", _inputs_conv, _call_conv, causal_conv1d, causal_conv1d_ref),
}


def fwd_bwd_seconds(call: Callable, fn: Callable, args: list[torch.Tensor], kw: dict) -> tuple[float, ...]:
    """(forward wall, backward wall, forward + backward process CPU) seconds.

    The loss weights every output and state so no gradient is trivial. CPU time (all threads of
    this process) is stored beside wall time: on a shared machine it shows the work done when
    wall time is dominated by waiting for cores.
    """
    for a in args:
        a.grad = None
    c0 = time.process_time()
    t0 = time.perf_counter()
    out, state = call(fn, args, kw)
    t1 = time.perf_counter()
    loss = (out * _weights(out)).sum() + (state * _weights(state)).sum()
    loss.backward()
    return t1 - t0, time.perf_counter() - t1, time.process_time() - c0


_weight_cache: dict[tuple, torch.Tensor] = {}


def _weights(t: torch.Tensor) -> torch.Tensor:
    key = (tuple(t.shape), t.dtype)
    if key not in _weight_cache:
        _weight_cache[key] = torch.randn(t.shape, generator=torch.Generator().manual_seed(7), dtype=t.dtype)
    return _weight_cache[key]


def bench_ops(lengths=(1024, 4096), repeats: int = 5, ref_repeats: int = 3, ops=tuple(OPS)) -> list[dict]:
    """Time each op's fast path and reference; one row per (op, L)."""
    rows = []
    for name in ops:
        shape, make, call, fast, ref = OPS[name]
        for L in lengths:
            args, kw = make(L, torch.Generator().manual_seed(L))
            args = [a.requires_grad_() for a in args]
            fwd_bwd_seconds(call, fast, args, kw)  # warm-up
            fast_t = [fwd_bwd_seconds(call, fast, args, kw) for _ in range(repeats)]
            n_ref = 1 if L >= 4096 else ref_repeats
            ref_t = [fwd_bwd_seconds(call, ref, args, kw) for _ in range(n_ref)]
            fast_tot, ref_tot = [t[0] + t[1] for t in fast_t], [t[0] + t[1] for t in ref_t]
            row = {
                "op": name,
                "shape": shape,
                "L": L,
                "fast_fwd_ms": 1e3 * statistics.median(t[0] for t in fast_t),
                "fast_bwd_ms": 1e3 * statistics.median(t[1] for t in fast_t),
                "fast_ms": 1e3 * statistics.median(fast_tot),
                "fast_best_ms": 1e3 * min(fast_tot),
                "ref_fwd_ms": 1e3 * statistics.median(t[0] for t in ref_t),
                "ref_bwd_ms": 1e3 * statistics.median(t[1] for t in ref_t),
                "ref_ms": 1e3 * statistics.median(ref_tot),
                "fast_cpu_ms": 1e3 * statistics.median(t[2] for t in fast_t),
                "ref_cpu_ms": 1e3 * statistics.median(t[2] for t in ref_t),
                "ref_runs": n_ref,
                "fast_runs": repeats,
                "loadavg_1m": os.getloadavg()[0],
            }
            row["speedup"] = row["ref_ms"] / row["fast_ms"]
            row["speedup_cpu"] = row["ref_cpu_ms"] / row["fast_cpu_ms"]
            rows.append(row)
            print_op_row(row)
    return rows


def print_op_header() -> None:
    print(
        f"{'op':<15}{'shape':<27}{'L':>6}{'fast fwd':>10}{'fast bwd':>10}{'fast ms':>10}"
        f"{'ref fwd':>10}{'ref bwd':>10}{'ref ms':>10}{'speedup':>9}{'fast cpu':>10}{'ref cpu':>10}{'cpu x':>8}"
        f"{'load':>6}"
    )


def print_op_row(r: dict) -> None:
    print(
        f"{r['op']:<15}{r['shape']:<27}{r['L']:>6}{r['fast_fwd_ms']:>10.1f}{r['fast_bwd_ms']:>10.1f}"
        f"{r['fast_ms']:>10.1f}{r['ref_fwd_ms']:>10.1f}{r['ref_bwd_ms']:>10.1f}{r['ref_ms']:>10.1f}"
        f"{r['speedup']:>8.1f}x{r['fast_cpu_ms']:>10.1f}{r['ref_cpu_ms']:>10.1f}{r['speedup_cpu']:>7.1f}x"
        f"{r['loadavg_1m']:>6.1f}",
        flush=True,
    )


def ops_section(args) -> dict:
    print("ops fwd+bwd, fp32, milliseconds (median; wall unless 'cpu' = process CPU time); speedup = ref / fast")
    print_op_header()
    rows = bench_ops(args.lengths, args.repeats, args.ref_repeats)
    return {"config": {"dtype": "float32", "repeats": args.repeats, "ref_repeats": args.ref_repeats}, "rows": rows}


def layers_section(args) -> dict | None:
    """The layer-vs-transformers section, when bench/ops_cpu_layers.py is present."""
    try:
        sys.path.insert(0, str(Path(__file__).parent))
        import ops_cpu_layers as layers
    except ImportError as e:
        print(f"layers section skipped: {e}")
        return None
    print("\nlayers fwd+bwd, fp32 (bench/ops_cpu_layers.py)")
    layers.print_header()
    rows = layers.layer_section(args.lengths, args.repeats)
    return {"rows": rows}


SECTIONS: dict[str, Callable] = {"ops": ops_section, "layers": layers_section}


def store(sections: dict, env: dict, path: Path = RESULTS) -> None:
    """Write the results JSON: environment at top level, one key per section (others kept)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(env)
    for name, payload in sections.items():
        data[name] = {**env, **payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="ops,layers", help=f"comma list of {','.join(SECTIONS)}")
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ref-repeats", type=int, default=3, help="reference runs below L=4096 (one at and above)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.lengths = [int(v) for v in args.lengths.split(",")]
    names = [s for s in args.sections.split(",") if s]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise ValueError(f"--sections: unknown {unknown}; expected a comma list of {list(SECTIONS)}")
    env = environment()
    print(f"{env['device']}, {env['cpu_model']}, {env['threads']} threads, torch {env['torch']}, {env['date']}")
    results = {}
    for name in names:
        payload = SECTIONS[name](args)
        if payload is not None:
            results[name] = payload
    store(results, env, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
