"""bench/acb_sweep.py: arms, the validation curve read from a fit's output, the per-kind summary of
an eval report, the chosen lr, and one real (tiny) sweep run end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from bench_scripts import load_bench

ROOT = Path(__file__).resolve().parents[2]


def load():
    return load_bench("acb_sweep")


def test_arms_and_curve():
    sw = load()
    assert sw.parse_arm("attn2=transformer:{layers: [attn, attn], window: 16}") == {
        "name": "attn2",
        "preset": "transformer",
        "overrides": {"layers": ["attn", "attn"], "window": 16},
    }
    assert sw.split_arms("a=transformer; b=mamba2:{d_model: 64, n_heads: 2}") == [
        "a=transformer",
        "b=mamba2:{d_model: 64, n_heads: 2}",
    ]
    with pytest.raises(SystemExit, match="NAME=PRESET"):
        sw.parse_arm("transformer")
    out = (
        "noise\nnestlm: step 100 val answer accuracy: ledger:1/query 0.250, mqar/recall 0.125\n"
        "nestlm: step 200 val answer accuracy: ledger:1/query 0.500, mqar/recall 0.875\n"
    )
    assert sw.curve(out) == [
        {"step": 100, "acc": {"ledger:1/query": 0.25, "mqar/recall": 0.125}},
        {"step": 200, "acc": {"ledger:1/query": 0.5, "mqar/recall": 0.875}},
    ]


def test_summary_and_chosen_lr():
    sw = load()

    def report(acc):
        kind = {"accuracy": acc, "n_probes": 500, "chance": 0.2, "baseline": 0.4}
        return {"envs": {"shell:1": {"horizons": {"20": {"by_kind": {"where": kind}}}}}}

    s = sw.summarise(report(0.6), "20")
    assert s["kinds"]["shell:1/where"]["adjusted"] == pytest.approx(0.5) and s["mean_adjusted"] == pytest.approx(0.5)
    rows = [
        {"arm": "a", "lr": lr, "eval": {"20": sw.summarise(report(acc), "20")}}
        for lr, acc in ((1e-3, 0.6), (3e-3, 0.9))
    ]
    assert sw.chosen_lrs(rows, "20") == {"a": 3e-3}


@pytest.mark.slow
def test_one_tiny_sweep_end_to_end(tmp_path):
    sw = load()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "trainer: {max_steps: 4, val_check_interval: 2, enable_model_summary: false}\n"
        "model: {preset: transformer, size: tiny, warmup_steps: 1}\n"
        "data:\n  class_path: nestlm.train.data.SyntheticTrajectories\n"
        "  init_args: {envs: [mqar], batch_size: 2, seq_len: 64, min_steps: 4, max_steps: 6, loss: answers,"
        " curriculum: null,"
        " val_batches_n: 1}\n"
    )
    out = tmp_path / "sweep.json"
    argv = ["--recipe", str(recipe), "--arms", "t=transformer:{d_model: 32, n_heads: 2, layers: [attn]}"]
    argv += ["--lrs", "1e-3", "--steps", "4", "--envs", "mqar", "--horizons", "8", "--out", str(out)]
    argv += ["--work", str(tmp_path / "runs"), "--write-configs", str(tmp_path / "configs")]
    sys.argv = ["acb_sweep.py", *argv]
    sw.main(argv)
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert row["arm"] == "t" and row["lr"] == 1e-3 and row["fit_cpu_s"] > 0
    assert [c["step"] for c in row["curve"]] == [2, 4] and "mqar/recall" in row["curve"][0]["acc"]
    kind = row["eval"]["8"]["kinds"]["mqar/recall"]
    assert kind["n_probes"] >= 500 and 0 <= kind["accuracy"] <= 1 and kind["baseline"] >= kind["chance"]
    assert doc["chosen_lr"] == {"t": 1e-3}
    assert "lr: 0.001" in (tmp_path / "configs" / "t.yaml").read_text()
    sw.main(argv)  # a rerun keeps the finished run
    assert json.loads(out.read_text())["rows"][0]["fit_cpu_s"] == row["fit_cpu_s"]
