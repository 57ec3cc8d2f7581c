"""COURIER: a map of rooms, items moved by announced events, an order stream, an expert courier.

Briefing: `[P] courier map R1 n R2 map R2 e R3 ... item X R2 ... at R1 [/P]`: `map A d B` says the
door `d` (n/s/e/w) of room A leads to B (and the opposite door of B back to A); the rooms form a tree
on a grid, so every route is unique. `item X R` places item X; `at R` is where the courier starts.

Steps:
    [O] order X to R [A] ok [E]          a new order: bring item X to room R
    [O] at R [A] go n [E]                the courier's step: `go d`, `take X`, `drop X`, or `wait`
                                         (no open order)
    [O] news X moved to R [A] ok [E]     an item (not the one carried) was moved by someone
    [Q] where is X [A] R [E]             probe: the room of an item that is not being carried

The courier is an expert that uses only what appeared in the trajectory (the briefing map, orders,
news and its own moves): while an order is open it walks the unique route to the item, takes it,
walks to the destination and drops it. Rooms do not list their items, so taking and routing need
the remembered item locations.

Scored answers: "where" (chance 1/n_rooms) and "action": the direction of every `go` (chance 1/4;
the courier's step is otherwise predictable from the observation). Lag of "where": steps since the
item's room last appeared (briefing, news, take/drop at that room, an earlier answer). Lag of
"action": steps since the oldest fact the route needs last appeared: the target's room and every
door on the route (shown by the briefing or by walking through it).

Levels (`LEVELS`, `courier:1` ... `courier:3`; a bare `courier` is level 3, the acb-1.0 benchmark):
the number of rooms and items, the gap between orders, and the news and probe densities.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from nestlm.envs.base import Writer, final_window, level, name_pool, pick_by_lag, probe_due, start_episode

DIRS = {"n": (0, -1), "s": (0, 1), "e": (1, 0), "w": (-1, 0)}
OPPOSITE = {"n": "s", "s": "n", "e": "w", "w": "e"}

_TEMPLATES = {
    "train": dict(where=["where is {x}", "where {x}"], order=["order {x} to {r}"]),
    "test": dict(where=["{x} at ?"], order=["order to {r} {x}"]),
}


def _level(train: dict[str, Any], test: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return level(dict(train, templates=_TEMPLATES["train"]), **test, templates=_TEMPLATES["test"])


# LEVELS[level][split]. Level 3 is the acb-1.0 benchmark (episodes unchanged); level 1 is a small
# map with one or two items and frequent orders.
LEVELS: dict[int, dict[str, dict[str, Any]]] = {
    1: _level(
        dict(n_rooms=[3, 4], n_items=[1, 2], order_gap=[1, 4], p_news=0.1, p_probe=0.2),
        dict(n_rooms=[4], n_items=[2], order_gap=[2, 6], p_news=0.05, p_probe=0.1),
    ),
    2: _level(
        dict(n_rooms=[4, 5, 6], n_items=[2, 3], order_gap=[1, 8], p_news=0.08, p_probe=0.12),
        dict(n_rooms=[6], n_items=[3], order_gap=[6, 16], p_news=0.02, p_probe=0.05),
    ),
    3: _level(
        dict(n_rooms=[4, 5, 6, 8], n_items=[2, 3], order_gap=[1, 8], p_news=0.08, p_probe=0.12),
        dict(n_rooms=[7], n_items=[4], order_gap=[8, 24], p_news=0.01, p_probe=0.01),
    ),
}
DEFAULT_LEVEL = 3
P_PROBE_FINAL = 0.4


def make_map(rng, n_rooms: int) -> list[tuple[int, str, int]]:
    """A random tree of `n_rooms` cells on a grid: edges (a, d, b) meaning b is in direction d of a."""
    cells = [(0, 0)]
    edges = []
    while len(cells) < n_rooms:
        a = rng.randrange(len(cells))
        d = rng.choice("nsew")
        dx, dy = DIRS[d]
        c = (cells[a][0] + dx, cells[a][1] + dy)
        if c in cells:
            continue
        cells.append(c)
        edges.append((a, d, len(cells) - 1))
    return edges


def route(adj: dict[str, dict[str, str]], src: str, dst: str) -> list[tuple[str, str]]:
    """The unique route src -> dst as (room, direction) pairs (empty if src == dst)."""
    prev: dict[str, tuple[str, str] | None] = {src: None}
    q = deque([src])
    while q:
        r = q.popleft()
        for d, nb in sorted(adj[r].items()):
            if nb not in prev:
                prev[nb] = (r, d)
                q.append(nb)
    path = []
    r = dst
    while prev[r] is not None:
        path.append(prev[r])
        r = prev[r][0]
    return path[::-1]


def generate(n_steps: int, seed: int, split: str = "train", level: int = DEFAULT_LEVEL):
    P, rng = start_episode("courier", n_steps, seed, split, level, LEVELS)
    T = P["templates"]
    n_rooms, n_items = rng.choice(P["n_rooms"]), rng.choice(P["n_items"])
    names = rng.sample(name_pool(split), n_rooms + n_items)
    rooms, items = names[:n_rooms], names[n_rooms:]
    adj: dict[str, dict[str, str]] = {r: {} for r in rooms}
    door_seen: dict[tuple[str, str], int] = {}
    brief = ["courier"]
    for a, d, b in make_map(rng, n_rooms):
        adj[rooms[a]][d] = rooms[b]
        adj[rooms[b]][OPPOSITE[d]] = rooms[a]
        door_seen[(rooms[a], d)] = door_seen[(rooms[b], OPPOSITE[d])] = 0
        brief.append(f"map {rooms[a]} {d} {rooms[b]}")
    loc = {x: rng.choice(rooms) for x in items}
    loc_seen = {x: 0 for x in items}
    brief += [f"item {x} {loc[x]}" for x in items]
    here = rng.choice(rooms)
    brief.append(f"at {here}")
    w = Writer()
    w.briefing(" ".join(brief))
    window = final_window(n_steps)
    params = dict(level=level, n_rooms=n_rooms, n_items=n_items, order_gap=P["order_gap"], p_news=P["p_news"])

    order: tuple[str, str] | None = None  # (item, destination)
    dest_seen = 0
    held: str | None = None
    next_order = rng.randint(*P["order_gap"])

    for step in range(1, n_steps + 1):
        in_final = step > n_steps - window
        free = [x for x in items if x != held]
        if free and probe_due(rng, step, n_steps, window, P_PROBE_FINAL, P["p_probe"]):
            lags = [step - loc_seen[y] for y in free]
            x = pick_by_lag(rng, free, lags, step) if in_final else rng.choice(free)
            w.add(
                "[Q]",
                rng.choice(T["where"]).format(x=x),
                loc[x],
                [dict(kind="where", lag=step - loc_seen[x], chance=1 / n_rooms)],
            )
            loc_seen[x] = step
            continue
        if free and rng.random() < P["p_news"]:
            x = rng.choice(free)
            loc[x] = rng.choice([r for r in rooms if r != loc[x]])
            loc_seen[x] = step
            w.add("[O]", f"news {x} moved to {loc[x]}", "ok")
            continue
        if order is None:
            if step >= next_order:
                x = rng.choice(items)
                r = rng.choice([r for r in rooms if r != loc[x]])
                order, dest_seen = (x, r), step
                w.add("[O]", rng.choice(T["order"]).format(x=x, r=r), "ok")
            else:
                w.add("[O]", f"at {here}", "wait")
            continue
        x, dest = order
        if held == x:
            if here == dest:
                held, order = None, None
                loc[x], loc_seen[x] = here, step
                next_order = step + rng.randint(*P["order_gap"])
                w.add("[O]", f"at {here}", f"drop {x}")
                continue
            target, target_seen = dest, dest_seen
        else:
            if here == loc[x]:
                held, loc_seen[x] = x, step
                w.add("[O]", f"at {here}", f"take {x}")
                continue
            target, target_seen = loc[x], loc_seen[x]
        path = route(adj, here, target)
        oldest = min([target_seen] + [door_seen[e] for e in path])
        d = path[0][1]
        w.add("[O]", f"at {here}", f"go {d}", [dict(kind="action", lag=step - oldest, chance=0.25, last=1)])
        nxt = adj[here][d]
        door_seen[(here, d)] = door_seen[(nxt, OPPOSITE[d])] = step
        here = nxt
    return w.episode("courier", split, seed, n_steps, params)
