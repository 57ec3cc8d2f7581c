"""Shared pieces of the agent environments: episodes, probes, name pools, the trajectory writer.

Format (one line per step, see docs/benchmark.md):

    [P] <briefing> [/P]                       step 0: rules and facts
    [O] <observation> [A] <answer> [E]        an agent step
    [Q] <question> [A] <answer> [E]           a probe step (does not change the world)

MQAR at levels 1-3 writes Zoology's bare layout instead: an unclosed briefing `[P] mqar k v ...` and
steps `k v` (no tags), the layout in which a 2-layer attention model learns the task (see
nestlm/envs/mqar.py).

`Episode.tokens` is `<bos>` followed by the tokens of `Episode.text`; every span below indexes it.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass, field
from typing import Any

from nestlm.envs.tokenizer import KEYWORDS, SYLLABLES, get_tokenizer

# "val" is the train distribution (pools, templates, parameters) with its own episode seeds
SPLITS = ("train", "val", "test")
MAX_TRAIN_STEPS = 200


@dataclass
class Probe:
    """One scored answer.

    step      index of the step it is answered in (1..n_steps)
    kind      what is asked (env specific: "update", "recall", "where", "action", ...)
    span      (start, end): Episode.tokens[start:end] are the answer tokens; the model is scored on
              predicting each of them from the tokens before it
    answer    answer text; answer_tokens its token ids
    lag       steps since the information the answer needs last appeared anywhere in the stream
    chance    accuracy of uniform guessing over the answer set
    extra     env specific details (e.g. permutation moves since the item was last shown)
    """

    step: int
    kind: str
    span: tuple[int, int]
    answer: str
    answer_tokens: list[int]
    lag: int
    chance: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Episode:
    """A generated trajectory.

    steps        the text lines; steps[0] is the briefing, steps[1..n_steps] the agent steps
    step_spans   per step (start, answer_start, end) into `tokens`: the line, where its answer
                 starts (after `[A]`), and its end (after `[E]`, or after the answer of a bare
                 step); the briefing has answer_start=end
    """

    env: str
    split: str
    seed: int
    n_steps: int
    params: dict[str, Any]
    steps: list[str]
    tokens: list[int]
    step_spans: list[tuple[int, int, int]]
    probes: list[Probe]

    @property
    def text(self) -> str:
        # the tokenizer's canonical form: a newline after a closing tag, a space between bare steps
        return "".join(s + ("\n" if s.endswith(("[E]", "[/P]")) else " ") for s in self.steps).rstrip(" ")

    @property
    def level(self) -> int:
        return int(self.params["level"])

    @property
    def tokens_per_step(self) -> float:
        return (len(self.tokens) - 1) / max(1, self.n_steps + 1)


def name_pool(split: str, syllables: int = 2) -> list[str]:
    """Names of a split, two syllables (consonant-vowel-consonant-vowel, two tokens) or one (one
    token); the pools of the two splits are disjoint.

    About a fifth of all names is held out for the test split, chosen by a fixed hash, so every
    syllable of a two-syllable test name also occurs in training but no test name does.
    """
    if syllables not in (1, 2):
        raise ValueError(f"syllables={syllables!r} is invalid: expected 1 or 2")
    split = param_split(split)
    words = SYLLABLES if syllables == 1 else [a + b for a in SYLLABLES for b in SYLLABLES]
    names = [n for n in words if n not in KEYWORDS]
    test = [n for n in names if zlib.crc32(n.encode()) % 5 == 0]
    if split == "test":
        return test
    return [n for n in names if zlib.crc32(n.encode()) % 5 != 0]


def check_args(env: str, n_steps: int, seed: int, split: str, level: int, levels: dict) -> None:
    if level not in levels:
        raise ValueError(f"level={level!r} of env {env!r} is invalid: expected one of {sorted(levels)}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: expected one of {SPLITS}")
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1:
        raise ValueError(f"n_steps={n_steps!r} is invalid: expected an int >= 1")
    if split != "test" and n_steps > MAX_TRAIN_STEPS:
        raise ValueError(
            f"n_steps={n_steps} is invalid for split={split!r}: expected <= {MAX_TRAIN_STEPS} "
            "(longer episodes are test-only)"
        )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r} is invalid: expected an int")


def param_split(split: str) -> str:
    """Which parameter / template / name set a split uses ("val" shares the train set)."""
    return "test" if split == "test" else "train"


def level(train: dict[str, Any], **test: Any) -> dict[str, dict[str, Any]]:
    """One difficulty level: the train-split parameters, and the test split as the values it holds out."""
    return {"train": train, "test": {**train, **test}}


LEGACY_LEVEL = 3  # the acb-1.0 benchmark: its seed strings carry no level, so its episodes are unchanged


def make_rng(env: str, split: str, seed: int, n_steps: int, level: int = LEGACY_LEVEL) -> random.Random:
    # string seeds are hashed with sha512 by `random`, so this is stable across runs and machines
    lv = "" if level == LEGACY_LEVEL else f":L{level}"
    return random.Random(f"nestlm-acb{lv}:{env}:{split}:{seed}:{n_steps}")


def final_window(n_steps: int) -> int:
    """Number of steps at the end of an episode whose probes are scored (the last 10%, >= 1)."""
    return max(1, n_steps // 10)


def start_episode(
    env: str, n_steps: int, seed: int, split: str, level: int, levels: dict
) -> tuple[dict[str, Any], random.Random]:
    """Check an env's `generate` arguments; return the parameters of its level for the split and
    the episode's random stream."""
    check_args(env, n_steps, seed, split, level, levels)
    return levels[level][param_split(split)], make_rng(env, split, seed, n_steps, level)


def probe_due(rng: random.Random, step: int, n_steps: int, window: int, p_final: float, p_before: float) -> bool:
    """Whether `step` is a probe: with probability p_final in the scored final `window` (always at
    the last step), p_before before it. At most one draw from rng, none at the last step."""
    if step > n_steps - window:
        return step == n_steps or rng.random() < p_final
    return rng.random() < p_before


LAG_BUCKETS = ((1, 10), (10, 100), (100, 1000), (1000, 10_000), (10_000, None))


def lag_bucket(lag: int) -> str:
    """The report's `by_lag` key of a lag in steps: "1-10", "10-100", ..., "10000+"."""
    for lo, hi in LAG_BUCKETS:
        if hi is None:
            return f"{lo}+"
        if lag < hi:
            return f"{lo}-{hi}"
    raise AssertionError


def pick_by_lag(rng: random.Random, candidates: list[Any], lags: list[int], step: int) -> Any:
    """Pick the candidate whose lag is closest (in log) to a target drawn log-uniformly from [1, step].

    Used for probes in the scored window so lags spread over all scales instead of clustering at the
    most recent facts.
    """
    target = rng.uniform(0.0, math.log(max(1, step)))  # log of the target lag
    dist = [abs(math.log(max(1, lag)) - target) for lag in lags]
    best = min(dist)
    return rng.choice([c for c, d in zip(candidates, dist) if d <= best + 1e-9])


class Writer:
    """Accumulates the lines of an episode with their token spans and probes."""

    def __init__(self) -> None:
        self.tok = get_tokenizer()
        self.lines: list[str] = []
        self.tokens: list[int] = [self.tok.bos_id]
        self.spans: list[tuple[int, int, int]] = []
        self.probes: list[Probe] = []

    @property
    def step(self) -> int:
        """Index the next line will have."""
        return len(self.lines)

    def briefing(self, body: str, close: bool = True) -> None:
        """Step 0: `[P] body [/P]`, or `[P] body` with close=False (Zoology's MQAR layout)."""
        assert not self.lines, "the briefing is step 0"
        line = f"[P] {body} [/P]" if close else f"[P] {body}"
        start = len(self.tokens)
        self.tokens.extend(self.tok.encode(line))
        self.lines.append(line)
        self.spans.append((start, len(self.tokens), len(self.tokens)))

    def add(self, tag: str | None, prompt: str, answer: str, probes: list[dict[str, Any]] = ()) -> None:
        """Append `tag prompt [A] answer [E]`, or the bare `prompt answer` with tag=None; each probe
        dict gives kind, lag, chance, extra and optionally `last` (score only the last n answer tokens)."""
        start = len(self.tokens)
        self.tokens.extend(self.tok.encode(prompt if tag is None else f"{tag} {prompt} [A]"))
        a_start = len(self.tokens)
        ans = self.tok.encode(answer)
        self.tokens.extend(ans)
        a_end = len(self.tokens)
        if tag is not None:
            self.tokens.append(self.tok.token_to_id("[E]"))
        self.spans.append((start, a_start, len(self.tokens)))
        step = len(self.lines)
        self.lines.append(f"{prompt} {answer}" if tag is None else f"{tag} {prompt} [A] {answer} [E]")
        for p in probes:
            last = p.get("last")
            s = a_start if last is None else a_end - last
            self.probes.append(
                Probe(
                    step=step,
                    kind=p["kind"],
                    span=(s, a_end),
                    answer=self.tok.decode(self.tokens[s:a_end]),
                    answer_tokens=list(self.tokens[s:a_end]),
                    lag=int(p["lag"]),
                    chance=float(p["chance"]),
                    extra=dict(p.get("extra", {})),
                )
            )

    def episode(self, env: str, split: str, seed: int, n_steps: int, params: dict[str, Any]) -> Episode:
        assert len(self.lines) == n_steps + 1, (len(self.lines), n_steps)
        return Episode(
            env=env,
            split=split,
            seed=seed,
            n_steps=n_steps,
            params=params,
            steps=self.lines,
            tokens=self.tokens,
            step_spans=self.spans,
            probes=self.probes,
        )
