"""Agent environments of the Agent Continuation Bench: LEDGER, SHELL, COURIER.

    ep = generate_episode("ledger", n_steps=2000, seed=7, split="test")
    ep.tokens, ep.text, ep.steps, ep.probes

Episodes are deterministic per (env, n_steps, seed, split). The train split (<= 200 steps) and the
test split draw names from disjoint pools and use different templates and parameter values.
`GENERATOR_VERSION` changes whenever a generator's output changes; `config_hash()` fingerprints the
generator parameters, so every report says exactly which benchmark it measured.
"""

from __future__ import annotations

import hashlib
import json

from nestlm.envs import courier, ledger, shell
from nestlm.envs.base import MAX_TRAIN_STEPS, SPLITS, Episode, Probe, final_window, name_pool

GENERATOR_VERSION = "acb-1.0"
ENVS = {"ledger": ledger, "shell": shell, "courier": courier}

__all__ = [
    "ENVS",
    "GENERATOR_VERSION",
    "MAX_TRAIN_STEPS",
    "SPLITS",
    "Episode",
    "Probe",
    "config_hash",
    "final_window",
    "generate_episode",
    "name_pool",
]


def generate_episode(env: str, n_steps: int, seed: int, split: str = "train") -> Episode:
    """One trajectory of `n_steps` agent steps (plus the briefing, step 0) of environment `env`."""
    if env not in ENVS:
        raise ValueError(f"env={env!r} is invalid: expected one of {tuple(ENVS)}")
    return ENVS[env].generate(n_steps, seed, split)


def config_hash(envs: list[str] | tuple[str, ...] = tuple(ENVS)) -> str:
    """Short hash of the generator version and the parameters of `envs` (both splits)."""
    for e in envs:
        if e not in ENVS:
            raise ValueError(f"env={e!r} is invalid: expected one of {tuple(ENVS)}")
    blob = json.dumps(
        {"version": GENERATOR_VERSION, "params": {e: ENVS[e].PARAMS for e in sorted(envs)}}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
