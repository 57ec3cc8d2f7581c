"""LEDGER: running balances, secret codes recalled at long lags, overwrites, standing rules.

Briefing: `[P] ledger acct A 35 acct B 7 ... frozen B [/P]` (opening balances mod M and frozen
accounts, whose deposits and withdrawals are rejected: the balance stays as it was).

Steps (the first ones set codes; then a random mix):
    [O] code K 4821 [A] ok [E]          set / overwrite a code (the latest value wins)
    [O] dep A 35 [A] 70 [E]             deposit (or `wd`, withdraw), answer: new balance mod M
    [O] set A 35 [A] ok [E]             levels without arithmetic: the balance becomes 35
    [O] news N 12 [A] ok [E]            distractor
    [Q] bal A [A] 70 [E]                query a balance
    [Q] code K [A] 4821 [E]             recall a code

Scored answers: kind "update" (new balance), "query" and "recall". Lag: steps since the balance or
code last appeared anywhere (briefing, an update or query answer, a set/overwrite, a recall answer);
for a frozen account's update, steps since the briefing that states the rule.

Levels (`LEVELS`, named `ledger:1` ... `ledger:3`; a bare `ledger` is level 3, the acb-1.0 benchmark):
the number of accounts and codes, the code length, the balance modulus, one- or two-syllable names,
arithmetic on or off (`set` instead of `dep`/`wd`), frozen accounts, and the distractor and probe
densities. Level 1 writes every key and every answer as one token (one-syllable names, balances mod
10, one-digit codes): with two-token names and two-digit answers (acb-1.2's level 1) the tiny
transformer got a balance's first digit right about half the time and the second digit, given the
first, only 0.6 of the time, and stayed below the memory-free baseline (docs/results/acb-learnability.md).
"""

from __future__ import annotations

from typing import Any

from nestlm.envs.base import Writer, final_window, level, name_pool, pick_by_lag, start_episode


def _templates(split: str, arithmetic: bool) -> dict[str, list[str]]:
    # the test split holds out one template per message
    if split == "test":
        ops = dict(dep=["dep {x} to {a}"], wd=["wd {x} of {a}"]) if arithmetic else dict(set=["set {a} to {x}"])
        return dict(**ops, query=["bal of {a}"], recall=["{k} code ?"])
    ops = (
        dict(dep=["dep {a} {x}", "{a} dep {x}"], wd=["wd {a} {x}", "{a} wd {x}"])
        if arithmetic
        else dict(set=["set {a} {x}", "{a} set {x}"])
    )
    return dict(**ops, query=["bal {a}", "{a} bal ?"], recall=["code {k}", "code of {k}"])


# LEVELS[level][split]: the test split holds out parameter values and templates. Level 3 is the
# acb-1.0 benchmark (its episodes are unchanged); level 1 is a key-value store (no arithmetic, a
# few accounts, one-token names and answers, dense probes) that a tiny model learns on a CPU.
def _level(arithmetic: bool, test: dict[str, Any], **train: Any) -> dict[str, dict[str, Any]]:
    defaults = dict(modulus=100, name_syllables=2, arithmetic=arithmetic, templates=_templates("train", arithmetic))
    train = defaults | train
    return level(train, templates=_templates("test", arithmetic), **test)


LEVELS: dict[int, dict[str, dict[str, Any]]] = {
    1: _level(
        False,
        dict(n_accounts=[4], n_codes=[2], p_distract=[0.15, 0.15], p_query=0.2, p_recall=0.1, p_overwrite=0.02),
        n_accounts=[2, 3],
        n_codes=[1, 2],
        modulus=10,
        code_digits=1,
        name_syllables=1,
        n_frozen=[0],
        p_distract=[0.0, 0.1],
        p_query=0.3,
        p_recall=0.15,
        p_overwrite=0.05,
    ),
    2: _level(
        True,
        dict(
            n_accounts=[5],
            n_codes=[4],
            n_frozen=[1],
            p_distract=[0.3, 0.3],
            p_query=0.08,
            p_recall=0.02,
            p_overwrite=0.01,
        ),
        n_accounts=[3, 4],
        n_codes=[2, 3],
        code_digits=3,
        n_frozen=[0, 1],
        p_distract=[0.1, 0.25],
        p_query=0.2,
        p_recall=0.1,
        p_overwrite=0.04,
    ),
    # the test split: sparser probes and overwrites outside the scored window, so distant facts stay distant
    3: _level(
        True,
        dict(
            n_accounts=[5],
            n_codes=[6],
            n_frozen=[1],
            p_distract=[0.45, 0.45],
            p_query=0.03,
            p_recall=0.003,
            p_overwrite=0.002,
        ),
        n_accounts=[3, 4, 6, 8],
        n_codes=[2, 3, 4, 8],
        code_digits=4,
        n_frozen=[0, 1],
        p_distract=[0.15, 0.35],
        p_query=0.12,
        p_recall=0.06,
        p_overwrite=0.04,
    ),
}
DEFAULT_LEVEL = 3
P_PROBE_FINAL = 0.4  # probe rate in the scored final window


def generate(n_steps: int, seed: int, split: str = "train", level: int = DEFAULT_LEVEL):
    P, rng = start_episode("ledger", n_steps, seed, split, level, LEVELS)
    T = P["templates"]
    M = P["modulus"]
    digits = P["code_digits"]
    n_acc = rng.choice(P["n_accounts"])
    n_codes = rng.choice(P["n_codes"])
    names = rng.sample(name_pool(split, P["name_syllables"]), n_acc + n_codes + 8)
    accounts, codes_k, news_names = names[:n_acc], names[n_acc : n_acc + n_codes], names[n_acc + n_codes :]
    frozen = set(rng.sample(accounts, rng.choice(P["n_frozen"])))
    p_distract = rng.uniform(*P["p_distract"])
    bal = {a: rng.randrange(M) for a in accounts}
    codes: dict[str, str] = {}
    seen: dict[tuple[str, str], int] = {("bal", a): 0 for a in accounts}  # fact -> step last shown

    w = Writer()
    parts = ["ledger"] + [f"acct {a} {bal[a]}" for a in accounts] + [f"frozen {a}" for a in sorted(frozen)]
    w.briefing(" ".join(parts))
    window = final_window(n_steps)
    # codes are set early (the "facts set in the first steps"), before the scored window
    last_set = min(20, n_steps - window)
    set_steps = sorted(rng.sample(range(1, last_set + 1), min(n_codes, max(0, last_set))))
    to_set = list(codes_k)
    params = dict(
        level=level,
        n_accounts=n_acc,
        n_codes=len(set_steps),
        frozen=sorted(frozen),
        modulus=M,
        p_distract=round(p_distract, 4),
    )

    for step in range(1, n_steps + 1):
        in_final = step > n_steps - window
        if step in set_steps:
            k = to_set.pop(0)
            codes[k] = f"{rng.randrange(10**digits):0{digits}d}"
            seen[("code", k)] = step
            w.add("[O]", f"code {k} {codes[k]}", "ok")
            continue
        probe = in_final and (step == n_steps or rng.random() < P_PROBE_FINAL)
        r = rng.random()
        if probe or (not in_final and r < P["p_query"] + P["p_recall"]):
            recall = bool(codes) and (rng.random() < 0.5 if in_final else r < P["p_recall"])
            if recall:
                keys = sorted(codes)
                lags = [step - seen[("code", k)] for k in keys]
                k = pick_by_lag(rng, keys, lags, step) if in_final else rng.choice(keys)
                lag = step - seen[("code", k)]
                seen[("code", k)] = step
                w.add(
                    "[Q]",
                    rng.choice(T["recall"]).format(k=k),
                    codes[k],
                    [dict(kind="recall", lag=lag, chance=10.0**-digits)],
                )
            else:
                lags = [step - seen[("bal", a)] for a in accounts]
                a = pick_by_lag(rng, accounts, lags, step) if in_final else rng.choice(accounts)
                lag = step - seen[("bal", a)]
                seen[("bal", a)] = step
                w.add(
                    "[Q]", rng.choice(T["query"]).format(a=a), str(bal[a]), [dict(kind="query", lag=lag, chance=1 / M)]
                )
            continue
        r = rng.random()
        if codes and step > 20 and r < P["p_overwrite"]:
            k = rng.choice(sorted(codes))
            codes[k] = f"{rng.randrange(10**digits):0{digits}d}"
            seen[("code", k)] = step
            w.add("[O]", f"code {k} {codes[k]}", "ok")
        elif r < P["p_overwrite"] + p_distract:
            w.add("[O]", f"news {rng.choice(news_names)} {rng.randrange(M)}", "ok")
        elif not P["arithmetic"]:
            a = rng.choice(accounts)
            bal[a] = rng.randrange(M)
            seen[("bal", a)] = step
            w.add("[O]", rng.choice(T["set"]).format(a=a, x=bal[a]), "ok")
        else:
            a = rng.choice(accounts)
            x = rng.randrange(1, M)
            op = rng.choice(["dep", "wd"])
            lag = step if a in frozen else step - seen[("bal", a)]
            if a not in frozen:
                bal[a] = (bal[a] + x) % M if op == "dep" else (bal[a] - x) % M
            seen[("bal", a)] = step
            w.add(
                "[O]",
                rng.choice(T[op]).format(a=a, x=x),
                str(bal[a]),
                [dict(kind="update", lag=lag, chance=1 / M, extra=dict(frozen=a in frozen))],
            )
    return w.episode("ledger", split, seed, n_steps, params)
