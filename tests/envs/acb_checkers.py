"""Independent checkers: recompute every answer and lag of an episode from its TEXT alone.

They share no code with the generators (parsing, state updates and routing are written again here),
so a generator bug shows up as a disagreement.
"""

from __future__ import annotations

KEYWORDS_Q = {"where", "is", "at", "?", "peek", "cup", "bal", "of", "code"}


def _split(line: str) -> tuple[str, list[str], str]:
    tag, rest = line.split(" ", 1)
    left, answer = rest.rsplit(" [A] ", 1)
    assert answer.endswith(" [E]"), line
    return tag, left.split(), answer[: -len(" [E]")]


def _briefing(line: str, head: str) -> list[str]:
    words = line.split()
    assert words[0] == "[P]" and words[1] == head and words[-1] == "[/P]", line
    return words[2:-1]


def check_ledger(lines: list[str]) -> dict[int, tuple[str, str, int]]:
    """Per step: (kind, answer, lag) of every scored answer; asserts every other answer is `ok`."""
    words = _briefing(lines[0], "ledger")
    bal, frozen, codes, seen = {}, set(), {}, {}
    i = 0
    while i < len(words):
        if words[i] == "acct":
            bal[words[i + 1]] = int(words[i + 2])
            seen[("b", words[i + 1])] = 0
            i += 3
        else:
            assert words[i] == "frozen"
            frozen.add(words[i + 1])
            i += 2
    out = {}
    for step, line in enumerate(lines[1:], start=1):
        tag, w, ans = _split(line)
        if tag == "[O]" and w[0] == "code":
            codes[w[1]] = w[2]
            seen[("c", w[1])] = step
            assert ans == "ok"
        elif tag == "[O]" and w[0] == "news":
            assert ans == "ok"
        elif tag == "[O]" and "set" in w:
            (acct,) = [x for x in w if x in bal]
            (amount,) = [int(x) for x in w if x.isdigit()]
            bal[acct] = amount
            seen[("b", acct)] = step
            assert ans == "ok"
        elif tag == "[O]":
            op = "dep" if "dep" in w else "wd"
            (acct,) = [x for x in w if x in bal]
            (amount,) = [int(x) for x in w if x.isdigit()]
            lag = step if acct in frozen else step - seen[("b", acct)]
            if acct not in frozen:
                bal[acct] = (bal[acct] + (amount if op == "dep" else -amount)) % 100
            seen[("b", acct)] = step
            out[step] = ("update", str(bal[acct]), lag)
        elif "code" in w:
            (k,) = [x for x in w if x not in KEYWORDS_Q]
            out[step] = ("recall", codes[k], step - seen[("c", k)])
            seen[("c", k)] = step
        else:
            (acct,) = [x for x in w if x not in KEYWORDS_Q]
            out[step] = ("query", str(bal[acct]), step - seen[("b", acct)])
            seen[("b", acct)] = step
    return out


def check_shell(lines: list[str]) -> dict[int, tuple[str, str, int]]:
    cups = _briefing(lines[0], "shell")
    n = len(cups)
    seen = {x: 0 for x in cups}
    out = {}
    for step, line in enumerate(lines[1:], start=1):
        tag, w, ans = _split(line)
        if tag == "[O]":
            assert ans == "ok"
            if w[0] == "swap":
                a, b = int(w[1]) - 1, int(w[2]) - 1
                cups[a], cups[b] = cups[b], cups[a]
            elif w[0] == "cyc":
                a, b, c = (int(x) - 1 for x in w[1:])
                cups[b], cups[c], cups[a] = cups[a], cups[b], cups[c]
            elif w[0] == "rot":
                cups = cups[-1:] + cups[:-1]
            elif w[0] == "reveal":
                assert w[1:] == cups, (step, w, cups)
                for x in cups:
                    seen[x] = step
            else:
                assert w[0] == "idle" and len(w) == 2
        else:
            digits = [x for x in w if x.isdigit()]
            if digits:
                x = cups[int(digits[0]) - 1]
                out[step] = ("peek", x, step - seen[x])
            else:
                (x,) = [y for y in w if y not in KEYWORDS_Q]
                out[step] = ("where", str(cups.index(x) + 1), step - seen[x])
            seen[x] = step
    assert n == len(cups)
    return out


def _path(links: dict[str, dict[str, str]], src: str, dst: str, came_from: str | None = None):
    """Directions from src to dst in a tree (depth-first search), or None."""
    if src == dst:
        return []
    for d, nb in links[src].items():
        if nb == came_from:
            continue
        rest = _path(links, nb, dst, src)
        if rest is not None:
            return [(src, d)] + rest
    return None


def check_courier(lines: list[str]) -> dict[int, tuple[str, str, int]]:
    words = _briefing(lines[0], "courier")
    back = {"n": "s", "s": "n", "e": "w", "w": "e"}
    links: dict[str, dict[str, str]] = {}
    door, loc, seen, here = {}, {}, {}, None
    i = 0
    while i < len(words):
        if words[i] == "map":
            a, d, b = words[i + 1 : i + 4]
            links.setdefault(a, {})[d] = b
            links.setdefault(b, {})[back[d]] = a
            door[(a, d)] = door[(b, back[d])] = 0
            i += 4
        elif words[i] == "item":
            loc[words[i + 1]], seen[words[i + 1]] = words[i + 2], 0
            i += 3
        else:
            assert words[i] == "at"
            here = words[i + 1]
            i += 2
    order, held, out = None, None, {}
    for step, line in enumerate(lines[1:], start=1):
        tag, w, ans = _split(line)
        if tag == "[Q]":
            (x,) = [y for y in w if y not in KEYWORDS_Q]
            assert x != held
            out[step] = ("where", loc[x], step - seen[x])
            seen[x] = step
        elif w[0] == "order":
            assert order is None and ans == "ok"
            order = (w[3], w[2], step) if w[1] == "to" else (w[1], w[3], step)
        elif w[0] == "news":
            assert w[2:4] == ["moved", "to"] and w[1] != held and ans == "ok"
            loc[w[1]], seen[w[1]] = w[4], step
        else:
            assert w == ["at", here], (step, w, here)
            if order is None:
                assert ans == "wait", (step, ans)
                continue
            x, dest, dest_step = order
            if held == x and here == dest:
                assert ans == f"drop {x}", (step, ans)
                held, order, loc[x], seen[x] = None, None, here, step
            elif held != x and here == loc[x]:
                assert ans == f"take {x}", (step, ans)
                held, seen[x] = x, step
            else:
                target, t_seen = (dest, dest_step) if held == x else (loc[x], seen[x])
                path = _path(links, here, target)
                oldest = min([t_seen] + [door[e] for e in path])
                d = path[0][1]
                out[step] = ("action", d, step - oldest)
                assert ans == f"go {d}", (step, ans, d)
                nb = links[here][d]
                door[(here, d)] = door[(nb, back[d])] = step
                here = nb
    return out


def check_mqar(lines: list[str]) -> dict[int, tuple[str, str, int]]:
    bare = not lines[0].endswith("[/P]")  # Zoology's layout: `[P] mqar k v ...`, then `k v` steps
    words = lines[0].split()[2:] if bare else _briefing(lines[0], "mqar")
    assert lines[0].split()[:2] == ["[P]", "mqar"], lines[0]
    assert len(words) % 2 == 0
    value = dict(zip(words[0::2], words[1::2]))
    assert len(value) == len(words) // 2, "a key occurs twice in the briefing"
    assert not set(value) & set(value.values()), "keys and values share tokens"
    seen = dict.fromkeys(value, 0)
    out = {}
    for step, line in enumerate(lines[1:], start=1):
        if bare:
            *w, ans = line.split()
        else:
            tag, w, ans = _split(line)
            assert tag == "[Q]", line
        assert len(w) == 1 and w[0] in value, line
        out[step] = ("recall", value[w[0]], step - seen[w[0]])
        seen[w[0]] = step
    return out


CHECKERS = {"ledger": check_ledger, "shell": check_shell, "courier": check_courier, "mqar": check_mqar}
