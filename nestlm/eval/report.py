"""Aggregation of scored episodes: accuracy, bootstrap CI, chance, Coherence Horizon, plots.

Report keys (DESIGN.md): {"nestlm_version", "checkpoint", "generator_version", "config_hash",
"envs": {ENV: {"horizons": {"H": {"accuracy", "ci95", "n_probes", "chance", "baseline"}},
"by_lag": {"1-10": {"accuracy", "n_probes", "baseline"}, ...}, "coherence_horizon",
"tokens_per_step"}}, "coherence_horizon", "seconds", "peak_rss_mb"}, plus extra keys.
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Sequence

import numpy as np

from nestlm.envs.base import lag_bucket
from nestlm.envs.baselines import best_baseline
from nestlm.eval.scoring import EpisodeScore


def adjusted(accuracy: float, chance: float) -> float:
    """Chance-normalised accuracy (A - c) / (1 - c): 0 at chance, 1 at perfect."""
    return (accuracy - chance) / (1.0 - chance)


def coherence_horizon(horizons: dict[int, tuple[float | None, float]], threshold: float = 0.9) -> int:
    """CH: the largest evaluated H whose chance-adjusted accuracy is >= threshold at H and at every
    smaller evaluated H (0 if none). `horizons` maps H -> (accuracy or None if no probes, chance)."""
    ch = 0
    for h in sorted(horizons):
        acc, chance = horizons[h]
        if acc is None or adjusted(acc, chance) < threshold:
            break
        ch = h
    return ch


def bootstrap_ci(
    correct: Sequence[int], totals: Sequence[int], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Episode-level percentile bootstrap of pooled accuracy sum(correct) / sum(totals).

    Probes of one episode are correlated, so whole episodes are resampled.
    """
    c, t = np.asarray(correct, dtype=np.float64), np.asarray(totals, dtype=np.float64)
    if len(t) == 0 or t.sum() == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(t), size=(n_boot, len(t)))
    tot = t[idx].sum(1)
    acc = np.where(tot > 0, c[idx].sum(1) / np.maximum(tot, 1), np.nan)
    lo, hi = np.nanquantile(acc, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def grouped(labels: Sequence[str], scores: list[EpisodeScore]) -> dict[str, dict]:
    """Accuracy, probe count, mean chance and best heuristic baseline per label (one label per probe)."""
    correct = [c for s in scores for c in s.correct]
    chance = [c for s in scores for c in s.chance]
    kinds = [k for s in scores for k in s.kinds]
    base = [b for s in scores for b in s.baselines]
    groups: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, []).append(i)
    return {
        lab: {
            "accuracy": sum(correct[i] for i in idx) / len(idx),
            "n_probes": len(idx),
            "chance": sum(chance[i] for i in idx) / len(idx),
            "baseline": best_baseline([kinds[i] for i in idx], [base[i] for i in idx]),
        }
        for lab, idx in sorted(groups.items(), key=lambda kv: _label_order(kv[0]))
    }


def _label_order(label: str) -> tuple:
    head = label.split("-")[0].rstrip("+")
    return (0, int(head), label) if head.isdigit() else (1, 0, label)


def horizon_summary(scores: list[EpisodeScore], seed: int = 0) -> dict:
    """Accuracy at one horizon over episodes (probes of the final 10% of each episode)."""
    win = [s.window() for s in scores]
    per_ep_c = [sum(s.correct) for s in win]
    per_ep_n = [len(s.correct) for s in win]
    n = sum(per_ep_n)
    chance = [c for s in win for c in s.chance]
    acc = sum(per_ep_c) / n if n else None
    ci = bootstrap_ci(per_ep_c, per_ep_n, seed=seed) if n else (None, None)
    kinds = [k for s in win for k in s.kinds]
    out = {
        "accuracy": acc,
        "ci95": list(ci),
        "n_probes": n,
        "chance": float(np.mean(chance)) if chance else None,
        "baseline": best_baseline(kinds, [b for s in win for b in s.baselines]),
        "n_episodes": len(scores),
    }
    out["accuracy_adjusted"] = adjusted(acc, out["chance"]) if n else None
    out["by_kind"] = grouped(kinds, win)
    out["by_lag"] = grouped([lag_bucket(g) for s in win for g in s.lags], win)
    errs = [s.first_error - 1 if s.first_error is not None else s.n_steps for s in scores]
    out["steps_without_error_median"] = float(np.median(errs)) if errs else None
    out["episodes_error_free"] = float(np.mean([s.first_error is None for s in scores])) if scores else None
    out["tokens"] = int(sum(s.n_tokens for s in scores))
    out["seconds"] = float(sum(s.seconds for s in scores))
    return out


def lag_summary(scores: list[EpisodeScore]) -> dict[str, dict]:
    """`by_lag` over every probe of every episode (not only the final windows), with baselines."""
    return grouped([lag_bucket(g) for s in scores for g in s.lags], scores)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def plot_report(report: dict, path: str) -> None:
    """PNG: accuracy vs horizon (log x) per env, with the 95% CI and the chance level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (env, r) in enumerate(sorted(report["envs"].items())):
        hs = sorted(r["horizons"], key=int)
        xs = [int(h) for h in hs if r["horizons"][h]["accuracy"] is not None]
        ys = [r["horizons"][str(h)]["accuracy"] for h in xs]
        lo = [r["horizons"][str(h)]["ci95"][0] for h in xs]
        hi = [r["horizons"][str(h)]["ci95"][1] for h in xs]
        color = f"C{i}"
        ax.plot(xs, ys, "o-", color=color, label=f"{env} (CH0.9={r['coherence_horizon']})")
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2)
        ch = [r["horizons"][str(h)]["chance"] for h in xs]
        ax.plot(xs, ch, ":", color=color, linewidth=1)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("horizon H (agent steps)")
    ax.set_ylabel("probe accuracy (last 10% of episode)")
    name = report.get("checkpoint") or ""
    ax.set_title(f"Agent Continuation Bench: {name[-48:]}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, title=f"overall CH0.9 = {report['coherence_horizon']}", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finite_or_none(x):
    """JSON has no NaN: map NaN/inf to None (recursively)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x
