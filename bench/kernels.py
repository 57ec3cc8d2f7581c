"""GPU benchmark of the fused linear-memory scan kernels (csrc/) against the PyTorch chunked path.

For B=8, H=16, head dim D in {64, 128} (dk = dv = D), L in {2048, 8192, 32768}, chunk size 16,
bf16 q/k/v with fp32 gates and state:
  - median forward time (no grad: nothing saved) and forward+backward time (all gradients), CUDA
    events after warm-up;
  - bytes that must move: `io` = every input read once and every output written once; `design` =
    io plus the traffic of this design (segment-start states written in forward and read in
    backward, per-slice partial dq / dk / gate gradients written and summed);
  - those bytes over the time, as a fraction of the measured device-to-device copy bandwidth
    (bytes read + bytes written of a large tensor copy);
  - speed-up over nestlm.ops.memory.linear_memory_scan's PyTorch path, eager and torch.compile'd;
  - for context, the same shapes through fla's chunk_gated_delta_rule and mamba-ssm's SSD
    (mamba_chunk_scan_combined, d_state = D) when those packages import.

    python bench/kernels.py [--dims 64,128] [--lengths 2048,8192,32768] [--chunk-size 16]
                            [--repeats 20] [--compile-max-len 8192] [--no-baselines]

Prints a table and writes bench/results/kernels-<gpu>.json (device, torch, CUDA, date, rows).
Needs a CUDA device; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nestlm.ops.memory import csrc, linear_memory_scan  # noqa: E402

RESULTS = Path(__file__).parent / "results"
B, H = 8, 16


def cuda_time(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() over `repeats` runs, timed with CUDA events after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(repeats: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = 1 << 29  # 512 Mi floats = 2 GiB, far above L2
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src), repeats)
    return 2 * n * 4 / (ms * 1e-3)


def make_inputs(D: int, L: int, dtype: torch.dtype, requires_grad: bool):
    g = torch.Generator(device="cuda").manual_seed(L * 1000 + D)
    dev = "cuda"
    q = torch.nn.functional.normalize(torch.randn(B, L, H, D, device=dev, generator=g), dim=-1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(B, L, H, D, device=dev, generator=g), dim=-1).to(dtype)
    v = torch.randn(B, L, H, D, device=dev, generator=g).to(dtype)
    lr = 0.01 + 0.2 * torch.rand(B, L, H, device=dev, generator=g)
    mom = 0.5 + 0.49 * torch.rand(B, L, H, device=dev, generator=g)
    dec = 0.1 * torch.rand(B, L, H, device=dev, generator=g)
    W = 0.1 * torch.randn(B, H, D, D, device=dev, generator=g)
    S = torch.zeros(B, H, D, D, device=dev)
    xs = [q, k, v, lr, mom, dec, W, S]
    return [x.requires_grad_(requires_grad) for x in xs]


def byte_counts(D: int, L: int, C: int, in_bytes: int) -> dict:
    """Bytes that must move for forward (no grad), and for forward + backward."""
    tok = B * L * H
    state = B * H * D * D * 4
    n_seg = -(-L // C)
    gates = 3 * tok * 4
    qkv = 3 * tok * D * in_bytes
    y = tok * D * 4  # y is returned in the state dtype (fp32)
    fwd_io = qkv + gates + 2 * state + y + 3 * state
    # backward: reads q, k, v, gates, dy and the end-state grads; writes dq, dk, dv, gate grads, dW0, dS0
    bwd_io = qkv + gates + y + 3 * state + qkv + gates + 3 * state
    ckpt = 2 * n_seg * state  # W and S at every segment start
    n_split = D // 32
    partial = (2 * tok * D * 4 + 3 * tok * 4) * n_split * 2  # written by the kernel, read by the sum
    return {
        "fwd_io": fwd_io,
        "fwdbwd_io": fwd_io + bwd_io,
        "fwdbwd_design": fwd_io + bwd_io + 2 * ckpt + partial,
    }


def flops(D: int, L: int) -> dict:
    tok = B * L * H
    # forward: r and y (two [D, D] mat-vecs), the two rank-n updates of S and W: 8 D^2 per token;
    # backward: r again, m1 and m2, dA (two rank-n products), dq, dk (three mat-vecs): 18 D^2
    return {"fwd": 8 * tok * D * D, "fwdbwd": 26 * tok * D * D}


def run_kernel(xs, C, backward: bool):
    y, (W1, S1, A1) = csrc.linear_memory_scan_csrc(*xs, chunk_size=C)
    if backward:
        (y.sum() + W1.sum() + S1.sum()).backward()
    return y


def run_torch_path(xs, C, backward: bool):
    y, (W1, S1, A1) = linear_memory_scan(*xs, chunk_size=C)
    if backward:
        (y.sum() + W1.sum() + S1.sum()).backward()
    return y


def try_time(label: str, fn, repeats: int) -> tuple[float | None, str]:
    try:
        return cuda_time(fn, repeats), ""
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "out of memory"
    except Exception as err:  # a baseline that fails must not stop the run
        torch.cuda.empty_cache()
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"


def fla_baseline(D, L, dtype, repeats):
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as err:
        return {"error": f"fla not importable ({type(err).__name__})"}
    g = torch.Generator(device="cuda").manual_seed(7)
    q = torch.nn.functional.normalize(torch.randn(B, L, H, D, device="cuda", generator=g), dim=-1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(B, L, H, D, device="cuda", generator=g), dim=-1).to(dtype)
    v = torch.randn(B, L, H, D, device="cuda", generator=g).to(dtype)
    gl = torch.nn.functional.logsigmoid(torch.randn(B, L, H, device="cuda", generator=g)).float()
    beta = torch.rand(B, L, H, device="cuda", generator=g).to(dtype)
    xs = [t.requires_grad_(True) for t in (q, k, v, gl, beta)]

    def fwd():
        with torch.no_grad():
            chunk_gated_delta_rule(*xs, output_final_state=True)

    def fwdbwd():
        o, st = chunk_gated_delta_rule(*xs, output_final_state=True)
        (o.float().sum() + st.sum()).backward()

    f, fe = try_time("fla fwd", fwd, repeats)
    fb, fbe = try_time("fla fwdbwd", fwdbwd, repeats)
    return {"fwd_ms": f, "fwdbwd_ms": fb, "error": fe or fbe}


def ssd_baseline(D, L, dtype, repeats):
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as err:
        return {"error": f"mamba-ssm not importable ({type(err).__name__})"}
    g = torch.Generator(device="cuda").manual_seed(8)
    x = torch.randn(B, L, H, D, device="cuda", generator=g).to(dtype)
    dtt = torch.nn.functional.softplus(torch.randn(B, L, H, device="cuda", generator=g)).float()
    A = -torch.rand(H, device="cuda", generator=g).float() - 0.5
    Bm = torch.randn(B, L, 1, D, device="cuda", generator=g).to(dtype)
    Cm = torch.randn(B, L, 1, D, device="cuda", generator=g).to(dtype)
    xs = [t.requires_grad_(True) for t in (x, dtt, A, Bm, Cm)]

    def fwd():
        with torch.no_grad():
            mamba_chunk_scan_combined(*xs, chunk_size=64, return_final_states=True)

    def fwdbwd():
        y, st = mamba_chunk_scan_combined(*xs, chunk_size=64, return_final_states=True)
        (y.float().sum() + st.sum()).backward()

    f, fe = try_time("ssd fwd", fwd, repeats)
    fb, fbe = try_time("ssd fwdbwd", fwdbwd, repeats)
    return {"fwd_ms": f, "fwdbwd_ms": fb, "error": fe or fbe}


def measure(D: int, L: int, args, dtype: torch.dtype, in_bytes: int, bw: float) -> dict:
    """Kernel and PyTorch-path timings of one shape."""
    C = args.chunk_size
    row = {"B": B, "H": H, "D": D, "L": L, "chunk_size": C, "dtype": args.dtype}
    xs = make_inputs(D, L, dtype, requires_grad=False)
    with torch.no_grad():
        row["kernel_fwd_ms"], err_f = try_time("kernel fwd", lambda: run_kernel(xs, C, False), args.repeats)
    xs = make_inputs(D, L, dtype, requires_grad=True)
    row["kernel_fwdbwd_ms"], err_b = try_time("kernel fwdbwd", lambda: run_kernel(xs, C, True), args.repeats)
    row["kernel_error"] = err_f or err_b
    nbytes = byte_counts(D, L, C, in_bytes)
    row.update({f"bytes_{k}": v for k, v in nbytes.items()})
    row.update({f"flop_{k}": v for k, v in flops(D, L).items()})
    if row["kernel_fwd_ms"]:
        row["fwd_io_bw_fraction"] = nbytes["fwd_io"] / (row["kernel_fwd_ms"] * 1e-3) / bw
    if row["kernel_fwdbwd_ms"]:
        t = row["kernel_fwdbwd_ms"] * 1e-3
        row["fwdbwd_io_bw_fraction"] = nbytes["fwdbwd_io"] / t / bw
        row["fwdbwd_design_bw_fraction"] = nbytes["fwdbwd_design"] / t / bw

    os.environ["NESTLM_BACKEND"] = "torch"
    try:
        row["torch_fwdbwd_ms"], row["torch_error"] = try_time(
            "torch eager", lambda: run_torch_path(xs, C, True), args.torch_repeats
        )
        if L <= args.compile_max_len:
            compiled = torch.compile(lambda: run_torch_path(xs, C, True))
            t0 = time.perf_counter()
            try:
                compiled()
                row["compile_s"] = time.perf_counter() - t0
                row["compiled_fwdbwd_ms"], row["compiled_error"] = try_time(
                    "torch compiled", compiled, args.torch_repeats
                )
            except Exception as err:
                row["compiled_fwdbwd_ms"], row["compiled_error"] = None, f"{type(err).__name__}"
        else:
            row["compiled_fwdbwd_ms"], row["compiled_error"] = None, "skipped (--compile-max-len)"
    finally:
        os.environ.pop("NESTLM_BACKEND", None)
    for base in ("torch", "compiled"):
        t = row.get(f"{base}_fwdbwd_ms")
        if t and row["kernel_fwdbwd_ms"]:
            row[f"speedup_vs_{base}"] = t / row["kernel_fwdbwd_ms"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--lengths", default="2048,8192,32768")
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--torch-repeats", type=int, default=3)
    ap.add_argument(
        "--compile-max-len",
        type=int,
        default=8192,
        help="torch.compile unrolls the chunk loop: skip it above this length",
    )
    ap.add_argument("--no-baselines", action="store_true", help="skip fla and mamba-ssm")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print(
            "bench/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.", file=sys.stderr
        )
        return 2
    if csrc.load() is None:
        print("the csrc extension could not be built or loaded (see the log above); nothing measured.", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    in_bytes = torch.tensor([], dtype=dtype).element_size()
    props = torch.cuda.get_device_properties(0)
    gpu = re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-")
    bw = copy_bandwidth(args.repeats)
    print(f"device: {props.name}, copy bandwidth (read + write): {bw / 1e12:.2f} TB/s")

    rows = []
    for D in [int(x) for x in args.dims.split(",")]:
        for L in [int(x) for x in args.lengths.split(",")]:
            row = measure(D, L, args, dtype, in_bytes, bw)
            torch.cuda.empty_cache()
            if not args.no_baselines:
                row["fla_chunk_gated_delta_rule"] = fla_baseline(D, L, dtype, args.repeats)
                row["mamba_ssd"] = ssd_baseline(D, L, dtype, args.repeats)
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.startswith(("bytes_", "flop_"))}))

    def fmt(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    print(
        f"\n{'D':>4} {'L':>6} {'fwd ms':>8} {'fwd+bwd ms':>10} {'io BW%':>7} {'design BW%':>10} "
        f"{'torch ms':>9} {'x eager':>8} {'compiled ms':>11} {'x compiled':>10} {'fla ms':>8} {'ssd ms':>8}"
    )
    for r in rows:
        fla = r.get("fla_chunk_gated_delta_rule", {}).get("fwdbwd_ms")
        ssd = r.get("mamba_ssd", {}).get("fwdbwd_ms")
        io = r.get("fwdbwd_io_bw_fraction")
        design = r.get("fwdbwd_design_bw_fraction")
        print(
            f"{r['D']:>4} {r['L']:>6} {fmt(r['kernel_fwd_ms']):>8} {fmt(r['kernel_fwdbwd_ms']):>10} "
            f"{fmt(io and 100 * io, '.1f'):>7} {fmt(design and 100 * design, '.1f'):>10} "
            f"{fmt(r.get('torch_fwdbwd_ms')):>9} {fmt(r.get('speedup_vs_torch')):>8} "
            f"{fmt(r.get('compiled_fwdbwd_ms')):>11} {fmt(r.get('speedup_vs_compiled')):>10} "
            f"{fmt(fla):>8} {fmt(ssd):>8}"
        )

    result = {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_bytes_per_s": bw,
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    out = Path(args.out) if args.out else RESULTS / f"kernels-{gpu}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
