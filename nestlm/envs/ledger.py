"""LEDGER: running balances, secret codes recalled at long lags, overwrites, standing rules.

Briefing: `[P] ledger acct A 35 acct B 7 ... frozen B [/P]` (opening balances mod M and frozen
accounts, whose deposits and withdrawals are rejected: the balance stays as it was).

Steps (the first ones set codes; then a random mix):
    [O] code K 4821 [A] ok [E]          set / overwrite a code (the latest value wins)
    [O] dep A 35 [A] 70 [E]             deposit (or `wd`, withdraw), answer: new balance mod M
    [O] news N 12 [A] ok [E]            distractor
    [Q] bal A [A] 70 [E]                query a balance
    [Q] code K [A] 4821 [E]             recall a code

Scored answers: kind "update" (new balance), "query" and "recall". Lag: steps since the balance or
code last appeared anywhere (briefing, an update or query answer, a set/overwrite, a recall answer);
for a frozen account's update, steps since the briefing that states the rule.
"""

from __future__ import annotations

from typing import Any

from nestlm.envs.base import (
    Writer,
    check_args,
    final_window,
    make_rng,
    name_pool,
    param_split,
    pick_by_lag,
)

# one entry per split: the test split holds out parameter values and one template per message
PARAMS: dict[str, dict[str, Any]] = {
    "train": dict(
        n_accounts=[3, 4, 6, 8],
        n_codes=[2, 3, 4, 8],
        n_frozen=[0, 1],
        modulus=100,
        p_distract=[0.15, 0.35],
        p_query=0.12,
        p_recall=0.06,
        p_overwrite=0.04,
        templates=dict(
            dep=["dep {a} {x}", "{a} dep {x}"],
            wd=["wd {a} {x}", "{a} wd {x}"],
            query=["bal {a}", "{a} bal ?"],
            recall=["code {k}", "code of {k}"],
        ),
    ),
    # sparser probes and overwrites outside the scored window, so distant facts stay distant
    "test": dict(
        n_accounts=[5],
        n_codes=[6],
        n_frozen=[1],
        modulus=100,
        p_distract=[0.45, 0.45],
        p_query=0.03,
        p_recall=0.003,
        p_overwrite=0.002,
        templates=dict(dep=["dep {x} to {a}"], wd=["wd {x} of {a}"], query=["bal of {a}"], recall=["{k} code ?"]),
    ),
}
P_PROBE_FINAL = 0.4  # probe rate in the scored final window


def generate(n_steps: int, seed: int, split: str = "train"):
    check_args("ledger", n_steps, seed, split)
    P = PARAMS[param_split(split)]
    rng = make_rng("ledger", split, seed, n_steps)
    T = P["templates"]
    M = P["modulus"]
    n_acc = rng.choice(P["n_accounts"])
    n_codes = rng.choice(P["n_codes"])
    names = rng.sample(name_pool(split), n_acc + n_codes + 8)
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
        n_accounts=n_acc, n_codes=len(set_steps), frozen=sorted(frozen), modulus=M, p_distract=round(p_distract, 4)
    )

    for step in range(1, n_steps + 1):
        in_final = step > n_steps - window
        if step in set_steps:
            k = to_set.pop(0)
            codes[k] = f"{rng.randrange(10_000):04d}"
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
                w.add("[Q]", rng.choice(T["recall"]).format(k=k), codes[k], [dict(kind="recall", lag=lag, chance=1e-4)])
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
            codes[k] = f"{rng.randrange(10_000):04d}"
            seen[("code", k)] = step
            w.add("[O]", f"code {k} {codes[k]}", "ok")
        elif r < P["p_overwrite"] + p_distract:
            w.add("[O]", f"news {rng.choice(news_names)} {rng.randrange(M)}", "ok")
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
