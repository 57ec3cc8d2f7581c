"""MQAR: multi-query associative recall (Zoology, Arora et al. 2023), the benchmark's anchor env.

Briefing: `[P] mqar ka ne bu zo ...`: `n_pairs` key-value pairs, each key and each value one token,
keys and values drawn from disjoint syllable sets (as Zoology draws them from disjoint halves of the
vocabulary). Steps:

    ka ne                              a query: the value paired with key `ka` (levels 1-3)
    [Q] ka [A] ne [E]                  the same query in the trajectory format (level 4, whose
                                       briefing is closed: `[P] mqar ka ne ... [/P]`)

Levels 1-3 use Zoology's layout (queries written like the pairs, no tags): there a 2-layer attention
model learns the task, while from scratch the trajectory format holds it on a plateau at ~0.37 for
thousands of steps; trained on the bare layout first, the same model then learns the trajectory
format within a few hundred steps (bench/mqar_layouts.py --warm, and through `nestlm fit` with
configs/experiment/mqar-layout-curriculum.yaml: 0.948; docs/results/acb-learnability.md). Level 4 keeps
the trajectory format (the distribution of acb-1.1's level 1) for studying that plateau.

Every step is a query (kind "recall", chance 1 / number of possible values). Keys are queried in
rounds: each round is a random permutation of all keys, so the first round answers from the
briefing alone and later rounds can also copy an earlier answer. Lag: steps since the key's value
last appeared (the briefing, or the key's previous query).

Splits: MQAR tests in distribution, as Zoology does: `test` draws other episodes (its own seed
strings) from the same token sets; there are no templates or names to hold out.

Levels (`mqar:1` ... `mqar:4`, a bare `mqar` is level 1): 8, 16 or 32 pairs in Zoology's layout, and
8 pairs in the trajectory format. Level 1 at H = 20 is Zoology's smallest setting (8 pairs, 16 + 40
query tokens).
"""

from __future__ import annotations

from typing import Any

from nestlm.envs.base import Writer, start_episode
from nestlm.envs.tokenizer import CONSONANTS, KEYWORDS, VOWELS

KEY_CONSONANTS, VALUE_CONSONANTS = CONSONANTS[:7], CONSONANTS[7:]
KEYS = tuple(c + v for c in KEY_CONSONANTS for v in VOWELS if c + v not in KEYWORDS)
VALUES = tuple(c + v for c in VALUE_CONSONANTS for v in VOWELS if c + v not in KEYWORDS)

LEVELS: dict[int, dict[str, dict[str, Any]]] = {
    level: {split: dict(n_pairs=n, layout=layout) for split in ("train", "test")}
    for level, n, layout in ((1, 8, "zoology"), (2, 16, "zoology"), (3, 32, "zoology"), (4, 8, "trajectory"))
}
DEFAULT_LEVEL = 1


def generate(n_steps: int, seed: int, split: str = "train", level: int = DEFAULT_LEVEL):
    P, rng = start_episode("mqar", n_steps, seed, split, level, LEVELS)
    n = P["n_pairs"]
    keys = rng.sample(KEYS, n)
    value = dict(zip(keys, rng.choices(VALUES, k=n)))
    seen = dict.fromkeys(keys, 0)
    bare = P["layout"] == "zoology"
    w = Writer()
    w.briefing("mqar " + " ".join(f"{k} {value[k]}" for k in keys), close=not bare)
    order: list[str] = []
    for step in range(1, n_steps + 1):
        if not order:
            order = rng.sample(keys, n)
        k = order.pop()
        probe = dict(kind="recall", lag=step - seen[k], chance=1 / len(VALUES))
        w.add(None if bare else "[Q]", k, value[k], [probe])
        seen[k] = step
    return w.episode("mqar", split, seed, n_steps, dict(level=level, n_pairs=n, layout=P["layout"]))
