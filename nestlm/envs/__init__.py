"""Agent environments of the Agent Continuation Bench (LEDGER, SHELL, COURIER) and MQAR.

    ep = generate_episode("ledger", n_steps=2000, seed=7, split="test")
    ep = generate_episode("ledger:1", n_steps=20, seed=7, split="val")     # difficulty level 1
    ep.tokens, ep.text, ep.steps, ep.probes

An environment is named `ENV` or `ENV:LEVEL`; a bare name is the env's `DEFAULT_LEVEL` (level 3,
the acb-1.0 benchmark, for LEDGER / SHELL / COURIER; level 1 for MQAR). Episodes are deterministic
per (env, level, n_steps, seed, split). The train split (<= 200 steps) and the test split draw names
from disjoint pools and use different templates and parameter values. `GENERATOR_VERSION` changes
whenever a generator's output changes; `config_hash()` fingerprints the generator parameters of the
named envs and levels, so every report says exactly which benchmark it measured.

Plain Python below both nestlm.train and nestlm.eval; it imports neither.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from nestlm.envs import courier, ledger, mqar, shell
from nestlm.envs.base import MAX_TRAIN_STEPS, SPLITS, Episode, Probe, final_window, name_pool

# acb-1.1: levels and MQAR; level 3 of LEDGER / SHELL / COURIER reproduces acb-1.0's episodes exactly.
# acb-1.2: MQAR levels 1-3 in Zoology's bare layout, level 4 the trajectory format
# acb-1.3: LEDGER level 1 with one-token names and answers (one-syllable names, balances mod 10)
GENERATOR_VERSION = "acb-1.3"
ENVS = {"ledger": ledger, "shell": shell, "courier": courier, "mqar": mqar}

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
    "parse_env",
    "parse_envs",
]


def parse_env(spec: str) -> tuple[str, int]:
    """`"ledger:1"` -> `("ledger", 1)`; a bare `"ledger"` -> `("ledger", its DEFAULT_LEVEL)`."""
    if not isinstance(spec, str):
        raise ValueError(f"env={spec!r} is invalid: expected a name like 'ledger' or 'ledger:1'")
    name, sep, level = spec.strip().partition(":")
    if name not in ENVS:
        raise ValueError(f"env={spec!r} is invalid: expected one of {tuple(ENVS)}, optionally with ':LEVEL'")
    levels = ENVS[name].LEVELS
    if not sep:
        return name, ENVS[name].DEFAULT_LEVEL
    if not level.isdigit() or int(level) not in levels:
        raise ValueError(f"env={spec!r} is invalid: {name} has levels {sorted(levels)}")
    return name, int(level)


def parse_envs(envs: str | Iterable[str], what: str = "envs") -> list[str]:
    """Env names from a comma-separated string or a list, each checked; at least one. `what` names
    the field or flag in the error."""
    items = envs.split(",") if isinstance(envs, str) else list(envs)
    out = [e.strip() for e in items if isinstance(e, str) and e.strip()]
    if not out or len(out) != len(items) and not isinstance(envs, str):
        raise ValueError(f"{what}={envs!r} is invalid: expected one or more of {tuple(ENVS)} (e.g. 'ledger:1,mqar')")
    for e in out:
        try:
            parse_env(e)
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None
    return out


def generate_episode(env: str, n_steps: int, seed: int, split: str = "train") -> Episode:
    """One trajectory of `n_steps` agent steps (plus the briefing, step 0) of `env` (`ENV[:LEVEL]`)."""
    name, level = parse_env(env)
    return ENVS[name].generate(n_steps, seed, split, level)


def config_hash(envs: Iterable[str] = tuple(ENVS)) -> str:
    """Short hash of the generator version and the parameters (both splits) of each `ENV[:LEVEL]`."""
    params = {}
    for e in envs:
        name, level = parse_env(e)
        params[f"{name}:{level}"] = ENVS[name].LEVELS[level]
    blob = json.dumps({"version": GENERATOR_VERSION, "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
