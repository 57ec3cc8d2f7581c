"""How often is one-hop induction right? A diagnostic of the envs' token layouts.

One-hop induction, the first copying circuit a small transformer forms (an induction head): answer
with the token that followed the most recent earlier occurrence of the current key token. For a
probe, the key token is the token before `[A]` (or before the answer in a bare `k v` step), and
the rule is right when its token is the answer's first token. In Zoology's MQAR layout it is
always right; in the trajectory layout a key is followed by `[A]` in queries and by its value only
in the briefing, so the rule and the answer disagree on part of the probes.

    python bench/induction_rule.py [--envs mqar:1,mqar:4,ledger:1,shell:1,courier:1] [--steps 12]
        [--episodes 300] [--split val] [--out bench/results/induction_rule.json]

Prints a table (env, kind, probes, fraction right) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from nestlm import envs as env_lib  # noqa: E402
from nestlm.envs.tokenizer import get_tokenizer  # noqa: E402


def induction_right(tokens: list[int], answer_start: int, answer_tag: int) -> bool:
    """Whether one-hop induction predicts tokens[answer_start], the first token of an answer."""
    key_at = answer_start - 1
    if tokens[key_at] == answer_tag:
        key_at -= 1
    key = tokens[key_at]
    earlier = [i for i in range(key_at) if tokens[i] == key]
    return bool(earlier) and tokens[earlier[-1] + 1] == tokens[answer_start]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", default="mqar:1,mqar:4,ledger:1,shell:1,courier:1")
    p.add_argument("--steps", type=int, default=12, help="episode length in agent steps")
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--split", default="val")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "induction_rule.json")
    a = p.parse_args()
    tag = get_tokenizer().token_to_id("[A]")
    rows = []
    for env in a.envs.split(","):
        right: dict[str, list[int]] = {}
        for seed in range(a.episodes):
            ep = env_lib.generate_episode(env, a.steps, seed, a.split)
            for probe in ep.probes:
                right.setdefault(probe.kind, []).append(induction_right(ep.tokens, probe.span[0], tag))
        for kind, hits in right.items():
            rows.append({"env": env, "kind": kind, "probes": len(hits), "right": round(sum(hits) / len(hits), 3)})
    print(f"{'env':<10} {'kind':<8} {'probes':>7} {'right':>6}")
    for r in rows:
        print(f"{r['env']:<10} {r['kind']:<8} {r['probes']:>7} {r['right']:>6.3f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(a).items() if k != "out"}
    a.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    print(f"wrote {a.out.relative_to(ROOT) if a.out.is_relative_to(ROOT) else a.out}")


if __name__ == "__main__":
    main()
