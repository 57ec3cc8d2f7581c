"""SHELL: non-commutative state tracking (items under cups, permuted by swap / cycle / rotate).

Briefing: `[P] shell A B C D [/P]`: item A is under cup 1, B under cup 2, ...

Steps:
    [O] swap 2 4 [A] ok [E]            exchange the items of cups 2 and 4
    [O] cyc 1 3 5 [A] ok [E]           item of cup 1 -> cup 3, cup 3 -> cup 5, cup 5 -> cup 1
    [O] rot [A] ok [E]                 item of cup i -> cup i+1 (the last -> cup 1)
    [O] idle N [A] ok [E]              nothing happens (N: a name that is no item; density is a knob)
    [O] reveal A B C D [A] ok [E]      the items in cup order (every `reveal` steps on average)
    [Q] where B [A] 3 [E]              probe: the cup of an item
    [Q] peek 3 [A] B [E]               probe: the item under a cup

Scored answers: kinds "where" and "peek", chance 1/n_cups. Lag: steps since the item's cup last
appeared (briefing, reveal, or a probe answer about it); `extra["moves"]` counts the permutation
steps since then (the length of the composition the answer needs).

Levels (`LEVELS`, `shell:1` ... `shell:3`; a bare `shell` is level 3, the acb-1.0 benchmark): the
number of cups, which moves occur, idle density and the number of steps between reveals.
"""

from __future__ import annotations

from typing import Any

from nestlm.envs.base import Writer, final_window, level, name_pool, pick_by_lag, probe_due, start_episode

_TEMPLATES = {
    "train": dict(where=["where {x}", "{x} at ?"], peek=["peek {c}", "cup {c} ?"]),
    "test": dict(where=["where is {x}"], peek=["peek cup {c}"]),
}


def _level(train: dict[str, Any], test: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return level(dict(train, templates=_TEMPLATES["train"]), **test, templates=_TEMPLATES["test"])


# LEVELS[level][split]. Level 3 is the acb-1.0 benchmark (episodes unchanged); level 1 has three
# cups, swaps only and a reveal every 1-3 steps, so an answer composes at most a few moves.
LEVELS: dict[int, dict[str, dict[str, Any]]] = {
    1: _level(
        dict(n_cups=[3], moves=["swap"], p_idle=[0.0, 0.2], reveal_gap=[1, 3], p_probe=0.3),
        dict(p_idle=[0.3, 0.3], reveal_gap=[2, 4], p_probe=0.2),
    ),
    2: _level(
        dict(n_cups=[3, 4], moves=["swap", "cyc"], p_idle=[0.1, 0.4], reveal_gap=[4, 10], p_probe=0.2),
        dict(n_cups=[4], p_idle=[0.5, 0.5], reveal_gap=[10, 20], p_probe=0.15),
    ),
    3: _level(
        dict(n_cups=[3, 4, 6], moves=["swap", "cyc", "rot"], p_idle=[0.2, 0.5], reveal_gap=[5, 30], p_probe=0.15),
        dict(n_cups=[5], p_idle=[0.6, 0.6], reveal_gap=[50, 150]),
    ),
}
DEFAULT_LEVEL = 3
P_PROBE_FINAL = 0.25


def apply_move(cups: list[str], move: list[str]) -> list[str]:
    """cups[i] is the item under cup i+1; returns the cups after `move` (tokens after `[O]`)."""
    n = len(cups)
    out = list(cups)
    if move[0] == "swap":
        i, j = int(move[1]) - 1, int(move[2]) - 1
        out[i], out[j] = cups[j], cups[i]
    elif move[0] == "cyc":
        idx = [int(c) - 1 for c in move[1:]]
        for a, b in zip(idx, idx[1:] + idx[:1]):
            out[b] = cups[a]
    elif move[0] == "rot":
        out = [cups[(i - 1) % n] for i in range(n)]
    return out


def generate(n_steps: int, seed: int, split: str = "train", level: int = DEFAULT_LEVEL):
    P, rng = start_episode("shell", n_steps, seed, split, level, LEVELS)
    n = rng.choice(P["n_cups"])
    names = rng.sample(name_pool(split), n + 6)
    cups, noise = names[:n], names[n:]
    p_idle = rng.uniform(*P["p_idle"])
    seen = {x: 0 for x in cups}  # item -> step its cup was last shown
    moves_since = {x: 0 for x in cups}
    next_reveal = rng.randint(*P["reveal_gap"])
    w = Writer()
    w.briefing("shell " + " ".join(cups))
    window = final_window(n_steps)
    params = dict(level=level, n_cups=n, p_idle=round(p_idle, 4), reveal_gap=P["reveal_gap"])

    for step in range(1, n_steps + 1):
        in_final = step > n_steps - window
        if probe_due(rng, step, n_steps, window, P_PROBE_FINAL, P["p_probe"]):
            x = pick_by_lag(rng, cups, [step - seen[y] for y in cups], step) if in_final else rng.choice(cups)
            c = cups.index(x) + 1
            probe = dict(lag=step - seen[x], chance=1 / n, extra=dict(moves=moves_since[x]))
            if rng.random() < 0.5:
                w.add("[Q]", rng.choice(P["templates"]["where"]).format(x=x), str(c), [dict(kind="where", **probe)])
            else:
                w.add("[Q]", rng.choice(P["templates"]["peek"]).format(c=c), x, [dict(kind="peek", **probe)])
            seen[x], moves_since[x] = step, 0
            continue
        if step >= next_reveal:
            next_reveal = step + rng.randint(*P["reveal_gap"])
            w.add("[O]", "reveal " + " ".join(cups), "ok")
            for x in cups:
                seen[x], moves_since[x] = step, 0
            continue
        if rng.random() < p_idle:
            w.add("[O]", f"idle {rng.choice(noise)}", "ok")
            continue
        kind = rng.choice(P["moves"])
        if kind == "swap":
            move = ["swap"] + [str(i + 1) for i in rng.sample(range(n), 2)]
        elif kind == "cyc":
            move = ["cyc"] + [str(i + 1) for i in rng.sample(range(n), 3)]
        else:
            move = ["rot"]
        cups = apply_move(cups, move)
        for x in cups:
            moves_since[x] += 1
        w.add("[O]", " ".join(move), "ok")
    return w.episode("shell", split, seed, n_steps, params)
