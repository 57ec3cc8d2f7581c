"""In-context heuristic baselines: guesses that need no memory of the right fact.

For every probe of an episode, `probe_baselines(ep)` gives the probability that each heuristic of
the probe's env answers it exactly, computed from the episode's text before the answer alone (the
generators' internal state is never read). A model counts as having learned a probe kind only when
it beats the kind's best heuristic (`best_baseline`) on the same probes.

    LEDGER   query / update   recent: the balance-typed number shown last (any account)
                              uniform: uniform over the distinct balance-typed numbers shown so far
             recall           recent / uniform: the same over the codes shown so far
    SHELL    where / peek     last_shown: the item's cup (the cup's item) when it was last shown,
                              ignoring every move since
    COURIER  where            recent_room: the room mentioned last in any line
             action           repeat: the previous `go` direction; frequent: the most common one
    MQAR     recall           uniform: uniform over the briefing's values; recent: the last answer
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from nestlm.envs.base import Episode


def _parse(line: str) -> tuple[str, list[str], str]:
    """`[O] dep A 5 [A] 70 [E]` -> ("[O]", ["dep", "A", "5"], "70")."""
    tag, rest = line.split(" ", 1)
    left, _, answer = rest.rpartition(" [A] ")
    return tag, left.split(), answer.removesuffix(" [E]")


def _pick(answer: str, guess: str | None) -> float:
    return float(guess is not None and guess == answer)


def _uniform(answer: str, pool: Sequence[str]) -> float:
    pool = set(pool)
    return 1.0 / len(pool) if answer in pool else 0.0


def _ledger(ep: Episode) -> dict[int, dict[str, float]]:
    words = ep.steps[0].split()[2:-1]
    balances = [words[i + 2] for i in range(len(words) - 2) if words[i] == "acct"]
    codes: list[str] = []
    out = {}
    probes = {p.step: p for p in ep.probes}
    for step, line in enumerate(ep.steps[1:], start=1):
        tag, w, ans = _parse(line)
        is_code = "code" in w
        if step in probes:
            pool = codes if is_code and tag == "[Q]" else balances
            out[step] = {"recent": _pick(ans, pool[-1] if pool else None), "uniform": _uniform(ans, pool)}
        if tag == "[O]" and w[0] == "code":
            codes.append(w[2])
        elif tag == "[Q]":
            (codes if is_code else balances).append(ans)
        elif "set" in w:
            balances.append(next(x for x in w if x.isdigit()))
        elif "dep" in w or "wd" in w:
            balances.append(ans)
    return out


def _shell(ep: Episode) -> dict[int, dict[str, float]]:
    shown: dict[str, tuple[int, int]] = {}  # item -> (cup when last shown, step)
    for c, x in enumerate(ep.steps[0].split()[2:-1], start=1):
        shown[x] = (c, 0)
    out = {}
    for step, line in enumerate(ep.steps[1:], start=1):
        tag, w, ans = _parse(line)
        if tag == "[O]" and w[0] == "reveal":
            for c, x in enumerate(w[1:], start=1):
                shown[x] = (c, step)
        elif tag == "[Q]":
            digits = [x for x in w if x.isdigit()]
            if digits:  # peek: the item most recently shown under that cup
                cup = int(digits[0])
                at = [(s, x) for x, (c, s) in shown.items() if c == cup]
                out[step] = {"last_shown": _pick(ans, max(at)[1] if at else None)}
                shown[ans] = (cup, step)
            else:
                (item,) = [x for x in w if x in shown]
                out[step] = {"last_shown": _pick(ans, str(shown[item][0]))}
                shown[item] = (int(ans), step)
    return out


def _courier(ep: Episode) -> dict[int, dict[str, float]]:
    brief = ep.steps[0].split()[2:-1]
    rooms = {brief[i + 1] for i in range(len(brief)) if brief[i] == "map"}
    rooms |= {brief[i + 3] for i in range(len(brief)) if brief[i] == "map"}
    mentioned = [x for x in brief if x in rooms]
    moves: list[str] = []
    probes = {p.step for p in ep.probes}
    out = {}
    for step, line in enumerate(ep.steps[1:], start=1):
        tag, w, ans = _parse(line)
        if tag == "[Q]":
            out[step] = {"recent_room": _pick(ans, mentioned[-1] if mentioned else None)}
        elif step in probes:  # a `go` action: only the direction is scored
            d = ans.split()[-1]
            counts = Counter(moves)
            top = [m for m, n in counts.items() if n == max(counts.values())] if moves else []
            out[step] = {"repeat": _pick(d, moves[-1] if moves else None), "frequent": _uniform(d, top)}
        if ans.startswith("go "):
            moves.append(ans.split()[-1])
        mentioned += [x for x in w + ans.split() if x in rooms]
    return out


def _mqar(ep: Episode) -> dict[int, dict[str, float]]:
    values = [w for w in ep.steps[0].split()[2:] if w != "[/P]"][1::2]
    answers: list[str] = []
    out = {}
    for step, line in enumerate(ep.steps[1:], start=1):
        ans = line.removesuffix(" [E]").split()[-1]  # `k v` or `[Q] k [A] v [E]`
        out[step] = {"uniform": _uniform(ans, values), "recent": _pick(ans, answers[-1] if answers else None)}
        answers.append(ans)
    return out


HEURISTICS = {"ledger": _ledger, "shell": _shell, "courier": _courier, "mqar": _mqar}


def probe_baselines(ep: Episode) -> list[dict[str, float]]:
    """Per probe of `ep` (in order): {heuristic name: probability that it answers the probe exactly}.
    `chance` (a uniform guess over the answer set) is one of them."""
    by_step = HEURISTICS[ep.env](ep)
    return [{**by_step[p.step], "chance": p.chance} for p in ep.probes]


def best_baseline(kinds: Sequence[str], scores: Sequence[dict[str, float]]) -> float | None:
    """Accuracy of the best heuristic per probe kind, pooled over the probes (None without probes).

    Each kind is credited with its own best heuristic (the one with the highest mean over that kind's
    probes here), so a model must beat the strongest memory-free guess of every kind it is scored on.
    """
    if not kinds:
        return None
    total = 0.0
    for kind in set(kinds):
        rows = [s for k, s in zip(kinds, scores) if k == kind]
        total += max(sum(r[name] for r in rows) for name in rows[0])
    return total / len(kinds)
