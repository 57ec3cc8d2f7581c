"""In-context heuristic baselines on crafted episodes whose right scores are known by hand."""

from __future__ import annotations

import pytest

from nestlm.envs import generate_episode
from nestlm.envs.base import Writer
from nestlm.envs.baselines import best_baseline, probe_baselines


def crafted(env: str, briefing: str, steps: list[tuple[str, str, str, str | None]]):
    """An episode from (tag, prompt, answer, probe kind or None) lines; chance 0.1 for every probe."""
    w = Writer()
    w.briefing(briefing)
    for tag, prompt, answer, kind in steps:
        last = 1 if kind == "action" else None
        probes = [dict(kind=kind, lag=1, chance=0.1, last=last)] if kind else []
        w.add(tag, prompt, answer, probes)
    return w.episode(env, "train", 0, len(steps), {"level": 1})


def test_ledger_recent_and_uniform():
    ep = crafted(
        "ledger",
        "ledger acct keva 35 acct bilo 7",
        [
            ("[O]", "set keva 12", "ok", None),  # balances shown: 35, 7, 12
            ("[Q]", "bal bilo", "7", "query"),  # recent guesses 12 (wrong); uniform 1/3
            ("[O]", "code tamu 48", "ok", None),
            ("[O]", "news gido 7", "ok", None),  # a distractor number is not a balance
            ("[Q]", "code tamu", "48", "recall"),  # the only code: both right
            ("[Q]", "bal keva", "12", "query"),  # recent = 7 (the last query answer); uniform 1/3
        ],
    )
    b = probe_baselines(ep)
    assert b[0] == {"recent": 0.0, "uniform": pytest.approx(1 / 3), "chance": 0.1}
    assert b[1] == {"recent": 1.0, "uniform": 1.0, "chance": 0.1}
    assert b[2] == {"recent": 0.0, "uniform": pytest.approx(1 / 3), "chance": 0.1}
    assert best_baseline([p.kind for p in ep.probes], b) == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)


def test_shell_last_shown_ignores_moves():
    ep = crafted(
        "shell",
        "shell keva bilo tamu",
        [
            ("[O]", "swap 1 2", "ok", None),  # keva now under cup 2
            ("[Q]", "where keva", "2", "where"),  # last shown at cup 1: wrong
            ("[Q]", "where tamu", "3", "where"),  # unmoved: right
            ("[O]", "reveal keva bilo tamu", "ok", None),  # (not a real reveal; the heuristic trusts it)
            ("[Q]", "peek 2", "bilo", "peek"),  # the item last shown under cup 2: bilo
        ],
    )
    assert [b["last_shown"] for b in probe_baselines(ep)] == [0.0, 1.0, 1.0]


def test_courier_recent_room_and_directions():
    ep = crafted(
        "courier",
        "courier map ka n ze map ze e mo item tuvi mo at ka",
        [
            ("[O]", "order tuvi to ka", "ok", None),
            ("[O]", "at ka", "go n", "action"),  # no earlier move: both heuristics wrong
            ("[O]", "at ze", "go e", "action"),  # repeat says n: wrong; frequent: n only
            ("[O]", "at mo", "take tuvi", None),
            ("[O]", "at mo", "go e", "action"),  # previous e: repeat right; n and e tie: frequent 1/2
            ("[Q]", "where is tuvi", "mo", "where"),  # "at mo" was the last room mentioned
            ("[Q]", "where is tuvi", "ze", "where"),  # the last room mentioned is mo (the answer above)
        ],
    )
    b = probe_baselines(ep)
    assert b[0]["repeat"] == 0.0 and b[0]["frequent"] == 0.0
    assert b[1]["repeat"] == 0.0 and b[1]["frequent"] == 0.0
    assert b[2]["repeat"] == 1.0 and b[2]["frequent"] == 0.5
    assert b[3]["recent_room"] == 1.0 and b[4]["recent_room"] == 0.0


def test_mqar_uniform_is_one_over_pairs():
    ep = crafted("mqar", "mqar ka ne bu zo gi ne", [("[Q]", "bu", "zo", "recall"), ("[Q]", "ka", "ne", "recall")])
    b = probe_baselines(ep)
    assert b[0] == {"uniform": 0.5, "recent": 0.0, "chance": 0.1}  # two distinct values: ne, zo
    assert b[1] == {"uniform": 0.5, "recent": 0.0, "chance": 0.1}


@pytest.mark.parametrize("env", ["ledger:1", "shell:1", "courier:1", "mqar", "ledger", "shell", "courier"])
def test_baselines_need_no_memory_of_the_fact(env):
    """Over generated episodes each heuristic stays well below a perfect score (they use surface
    statistics only), and at least chance (a uniform guess is one of them)."""
    kinds, scores = [], []
    for seed in range(40):
        ep = generate_episode(env, 60, seed, "val")
        kinds += [p.kind for p in ep.probes]
        scores += probe_baselines(ep)
    for kind in set(kinds):
        rows = [s for k, s in zip(kinds, scores) if k == kind]
        best = best_baseline([kind] * len(rows), rows)
        assert sum(r["chance"] for r in rows) / len(rows) <= best < 0.9, (env, kind, best)
