"""The Agent Continuation Bench runner: episodes x horizons x envs -> the report dict.

    report = run_benchmark(model, envs=["ledger", "shell", "courier"], horizons=[20, 200, 2000, 20000],
                           episodes={20: 16, 200: 16, 2000: 8, 20000: 2}, seed=0)

Held-out (`split="test"`) episodes are generated from the seed at evaluation time. A model with
full-attention layers is evaluated with a sliding window of its training context on every episode
longer than that context (the report lists where), so its memory stays bounded and it is never run
at positions it was not trained on.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch

import nestlm
from nestlm import envs as env_lib
from nestlm.eval.report import coherence_horizon, finite_or_none, horizon_summary, lag_summary, peak_rss_mb
from nestlm.eval.scoring import closed_loop, score_episode

DEFAULT_CONTEXT = 2048  # assumed training context when a checkpoint does not record one

REPORT_KEYS = (
    "nestlm_version",
    "checkpoint",
    "generator_version",
    "config_hash",
    "envs",
    "coherence_horizon",
    "seconds",
    "peak_rss_mb",
)


def episode_seed(seed: int, index: int) -> int:
    """Seed of episode `index` of a run seeded `seed` (the generator also keys on env and length)."""
    return seed * 1_000_003 + index


AUTO = 0  # `episodes[h] == AUTO`: as many episodes as the CI target needs (see episode_indices)
AUTO_PROBES, AUTO_MAX_EPISODES = 500, 2000
AUTO_LONG = {2000: 8, 20000: 2}  # fixed counts beyond 200 steps, where one episode holds many probes


def episodes_at(env: str, horizon: int, count: int, seed: int, split: str) -> Iterator[env_lib.Episode]:
    """The episodes scored at `horizon`: numbers 0..count-1, or for `count == AUTO` enough episodes
    that the scored windows hold AUTO_PROBES probes (a 95% CI half-width <= ~0.045 at any accuracy)
    for horizons up to 200 steps, and AUTO_LONG's counts (or 2) beyond."""
    if count == AUTO:
        count = AUTO_LONG.get(horizon, 2) if horizon > 200 else AUTO_MAX_EPISODES
    probes = 0
    for i in range(count):
        if count == AUTO_MAX_EPISODES and probes >= AUTO_PROBES:
            return
        ep = env_lib.generate_episode(env, horizon, episode_seed(seed, i), split)
        probes += sum(p.step > horizon - env_lib.final_window(horizon) for p in ep.probes)
        yield ep


def window_for(model, n_tokens: int, attn_window: str | int | None, trained_context: int | None) -> int | None:
    """Sliding window to impose on the full-attention layers for an episode of `n_tokens` tokens."""
    if attn_window is None or attn_window == "none" or not model.full_attention_layers():
        return None
    if attn_window == "auto":
        ctx = trained_context or DEFAULT_CONTEXT
        return ctx if n_tokens > ctx else None
    return int(attn_window)


def run_benchmark(
    model,
    envs: list[str],
    horizons: list[int],
    episodes: dict[int, int],
    seed: int = 0,
    split: str = "test",
    chunk_size: int = 2048,
    attn_window: str | int | None = "auto",
    trained_context: int | None = None,
    closed_loop_eval: bool = False,
    device="cpu",
    checkpoint: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    envs = env_lib.parse_envs(envs, "--envs")
    for h in horizons:
        if not isinstance(h, int) or h < 1:
            raise ValueError(f"--horizons: {h!r} is invalid; expected positive ints")
    t0 = time.perf_counter()
    total = None if AUTO in episodes.values() else sum(episodes[h] for h in horizons) * len(envs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="ep", desc="acb", dynamic_ncols=True)
    n_full = len(model.full_attention_layers())
    report: dict[str, Any] = {
        "nestlm_version": nestlm.__version__,
        "checkpoint": checkpoint,
        "generator_version": env_lib.GENERATOR_VERSION,
        "config_hash": env_lib.config_hash(envs),
        "envs": {},
        "coherence_horizon": 0,
        "seconds": 0.0,
        "peak_rss_mb": 0.0,
        "split": split,
        "seed": seed,
        "episodes": {str(h): episodes[h] or "auto" for h in horizons},
        "model_config_hash": getattr(getattr(model, "config", None), "config_hash", lambda: None)(),
        "attention": {
            "full_attention_layers": n_full,
            "attn_window": attn_window,
            "trained_context": trained_context
            if trained_context
            else (f"unknown (assumed {DEFAULT_CONTEXT})" if n_full and attn_window == "auto" else None),
        },
        "threshold": 0.9,
    }
    for env in envs:
        env_out: dict[str, Any] = {"horizons": {}}
        steps = toks = 0
        last_eps, every = [], []
        for h in horizons:
            scores, windows = [], set()
            for ep in episodes_at(env, h, episodes[h], seed, split):
                win = window_for(model, len(ep.tokens), attn_window, trained_context)
                windows.add(win)
                with model.attention_window(win), torch.inference_mode():
                    scores.append(score_episode(model, ep, chunk_size, device))
                steps += ep.n_steps + 1
                toks += len(ep.tokens) - 1
                if closed_loop_eval and h == max(horizons):
                    last_eps.append((ep, win))
                if bar is not None:
                    bar.set_postfix_str(f"{env} H={h}")
                    bar.update(1)
            every += scores
            summ = horizon_summary(scores, seed=seed)
            summ["attention_window"] = sorted(w for w in windows if w is not None) or None
            env_out["horizons"][str(h)] = summ
        env_out["coherence_horizon"] = coherence_horizon(
            {
                h: (env_out["horizons"][str(h)]["accuracy"], env_out["horizons"][str(h)]["chance"] or 0.0)
                for h in horizons
            }
        )
        env_out["by_lag"] = lag_summary(every)
        env_out["tokens_per_step"] = toks / max(1, steps)
        if closed_loop_eval:
            firsts = []
            for ep, win in last_eps:
                with model.attention_window(win), torch.inference_mode():
                    firsts.append(closed_loop(model, ep, device=device))
            survived = [f - 1 if f is not None else ep.n_steps for f, (ep, _) in zip(firsts, last_eps)]
            env_out["closed_loop"] = {
                "horizon": max(horizons),
                "episodes": len(firsts),
                "median_steps_to_first_error": statistics.median(survived) if survived else None,
                "first_error_steps": firsts,
                "episodes_error_free": sum(f is None for f in firsts) / max(1, len(firsts)),
                "method": "greedy decoding; the model's own answers are fed back; counted until the first "
                "answer that differs from the environment's (censored at the horizon)",
            }
        report["envs"][env] = env_out
    if bar is not None:
        bar.close()
    report["coherence_horizon"] = min(r["coherence_horizon"] for r in report["envs"].values()) if envs else 0
    report["seconds"] = time.perf_counter() - t0
    report["peak_rss_mb"] = peak_rss_mb()
    return finite_or_none(report)
