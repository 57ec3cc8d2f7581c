"""CPU benchmark of the Mamba / Mamba2 layers against Hugging Face transformers' mixers.

What a CPU user would otherwise run: transformers' `MambaMixer` (token loop over the sequence) and
`Mamba2Mixer` (chunked SSD in PyTorch), both on their pure-PyTorch path. Both sides get the same
weights (our layers load the transformers state dicts), so the table also reports how far the
outputs agree. Timed: forward + backward of one layer, fp32, batch 2, d_model 128, expand 2,
d_state 16; Mamba2 headdim 32, chunk 64; best of --repeats runs (median stored too), the two sides
interleaved.

    python bench/ops_cpu_layers.py [--lengths 1024,4096] [--layers mamba,mamba2] [--repeats 3]
                                   [--hf-mamba-max-len 1024]

Prints a table and stores the rows under "layers" in bench/results/ops_cpu.json (other sections of
that file are kept). `bench/ops_cpu.py` runs the same section via `layer_section()`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nestlm.layers.mamba import Mamba  # noqa: E402
from nestlm.layers.mamba2 import Mamba2  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "ops_cpu.json"
BATCH, D_MODEL, EXPAND, D_STATE, HEADDIM, CHUNK = 2, 128, 2, 16, 32, 64


def fwd_bwd(layer, x: torch.Tensor, w: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Wall seconds of one forward + backward (loss = sum(y * w)), and the output."""
    layer.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_(True)
    t0 = time.perf_counter()
    y = layer(xi)
    y = y[0] if isinstance(y, tuple) else y
    (y * w).sum().backward()
    return time.perf_counter() - t0, y.detach()


def time_pair(ours, theirs, x: torch.Tensor, repeats: int, theirs_repeats: int | None):
    """Best-of-`repeats` fwd+bwd seconds of both layers, runs interleaved (ours, theirs, ours, ...)
    so that load from other processes hits both alike. theirs_repeats=None skips `theirs`; a slow
    `theirs` gets fewer runs and no warm-up."""
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    fwd_bwd(ours, x, w)  # warm-up
    if theirs_repeats is not None and theirs_repeats >= repeats:
        fwd_bwd(theirs, x, w)
    t_ours, t_theirs, y_ours, y_theirs = [], [], None, None
    for i in range(repeats):
        t, y_ours = fwd_bwd(ours, x, w)
        t_ours.append(t)
        if theirs_repeats is not None and i < theirs_repeats:
            t, y_theirs = fwd_bwd(theirs, x, w)
            t_theirs.append(t)
    return t_ours, t_theirs, y_ours, y_theirs


def make_pair(kind: str):
    """(ours, theirs) with identical weights."""
    import transformers
    from transformers.models.mamba.modeling_mamba import MambaMixer
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    torch.manual_seed(0)
    if kind == "mamba":
        cfg = transformers.MambaConfig(hidden_size=D_MODEL, state_size=D_STATE, expand=EXPAND, num_hidden_layers=1)
        theirs = MambaMixer(cfg, 0)
        ours = Mamba(D_MODEL, d_state=D_STATE, expand=EXPAND)
    else:
        cfg = transformers.Mamba2Config(
            hidden_size=D_MODEL,
            state_size=D_STATE,
            expand=EXPAND,
            head_dim=HEADDIM,
            num_heads=EXPAND * D_MODEL // HEADDIM,
            n_groups=1,
            chunk_size=CHUNK,
            num_hidden_layers=1,
            layer_norm_epsilon=1e-5,
        )
        theirs = Mamba2Mixer(cfg, 0)
        ours = Mamba2(D_MODEL, d_state=D_STATE, expand=EXPAND, headdim=HEADDIM, chunk_size=CHUNK)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def layer_section(
    lengths=(1024, 4096), repeats: int = 3, hf_mamba_max_len: int = 1024, layers=("mamba", "mamba2")
) -> list[dict]:
    """Time our layers and the transformers mixers; one row per (layer, L)."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    rows = []
    for kind, hf_name in (("mamba", "MambaMixer"), ("mamba2", "Mamba2Mixer")):
        if kind not in layers:
            continue
        ours, theirs = make_pair(kind)
        for L in lengths:
            x = torch.randn(BATCH, L, D_MODEL, generator=torch.Generator().manual_seed(L))
            # The transformers Mamba-1 token loop takes minutes per call: one run, no warm-up.
            hf_repeats = repeats if kind == "mamba2" else 1 if L <= hf_mamba_max_len else None
            t_ours, t_hf, y_ours, y_hf = time_pair(ours, theirs, x, repeats, hf_repeats)
            best = min(t_ours)
            row = {
                "layer": kind,
                "L": L,
                "batch": BATCH,
                "ours_s": best,
                "ours_s_median": statistics.median(t_ours),
                "ours_tok_s": BATCH * L / best,
                "hf": hf_name,
            }
            if not t_hf:
                row.update({k: None for k in ("hf_s", "hf_s_median", "hf_tok_s", "speedup", "max_rel_diff")})
            else:
                row.update(
                    hf_s=min(t_hf),
                    hf_s_median=statistics.median(t_hf),
                    hf_tok_s=BATCH * L / min(t_hf),
                    speedup=min(t_hf) / best,
                    max_rel_diff=((y_ours - y_hf).abs().max() / y_hf.abs().max()).item(),
                )
            rows.append(row)
            print_row(row)
    return rows


def print_header() -> None:
    print(
        f"{'layer':<8}{'L':>6}{'ours s':>10}{'ours tok/s':>12}{'HF mixer':>13}{'HF s':>10}{'HF tok/s':>10}"
        f"{'speedup':>9}{'rel diff':>10}"
    )


def print_row(r: dict) -> None:
    hf = (
        f"{r['hf_s']:>10.3f}{r['hf_tok_s']:>10.0f}{r['speedup']:>8.1f}x{r['max_rel_diff']:>10.1e}"
        if r["hf_s"] is not None
        else f"{'(not run)':>10}{'':>10}{'':>9}{'':>10}"
    )
    ours = f"{r['layer']:<8}{r['L']:>6}{r['ours_s']:>10.3f}{r['ours_tok_s']:>12.0f}{r['hf']:>13}"
    print(ours + hf, flush=True)


def environment() -> dict:
    import transformers

    return {
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def store(section: str, payload: dict, path: Path = RESULTS) -> None:
    """Write `payload` under `section` of the results JSON, keeping the other sections."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data[section] = payload
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--layers", default="mamba,mamba2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--hf-mamba-max-len",
        type=int,
        default=1024,
        help="longest L at which transformers' MambaMixer token loop is timed",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    lengths = [int(v) for v in args.lengths.split(",")]
    env = environment()
    print(
        f"layers fwd+bwd, fp32, batch {BATCH}, d_model {D_MODEL}; {env['device']}, {env['threads']} "
        f"threads, torch {env['torch']}, transformers {env['transformers']}"
    )
    print_header()
    rows = layer_section(lengths, args.repeats, args.hf_mamba_max_len, args.layers.split(","))
    config = {
        "batch": BATCH,
        "d_model": D_MODEL,
        "expand": EXPAND,
        "d_state": D_STATE,
        "mamba2_headdim": HEADDIM,
        "mamba2_chunk": CHUNK,
        "dtype": "float32",
        "repeats": args.repeats,
    }
    store("layers", {**env, "config": config, "rows": rows}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
