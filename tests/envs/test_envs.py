"""Agent environments: determinism, splits, format, and every answer re-derived from the text."""

from __future__ import annotations

import hashlib
import json

import pytest
from acb_checkers import CHECKERS

from nestlm.envs import (
    ENVS,
    GENERATOR_VERSION,
    config_hash,
    final_window,
    generate_episode,
    name_pool,
    parse_env,
    parse_envs,
)
from nestlm.envs.tokenizer import KEYWORDS, TAGS, get_tokenizer

CASES = [
    (f"{env}:{level}", n, seed, split)
    for env in ENVS
    for level in ENVS[env].LEVELS
    for (n, seed, split) in [
        (1, 0, "train"),
        (20, 1, "train"),
        (63, 2, "train"),
        (200, 3, "train"),
        (20, 4, "test"),
        (257, 5, "test"),
        (2000, 6, "test"),
    ]
]


def test_tokenizer_vocab_and_roundtrip():
    tok = get_tokenizer()
    assert tok.vocab_size <= 512
    assert len(set(tok.vocab)) == tok.vocab_size
    text = "[P] ledger acct keva 35 [/P]\n[O] dep 4 to keva [A] 39 [E]\n[Q] where is gota [A] 0046 [E]\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # digits are single tokens; names are syllable compositions
    assert tok.tokens("0046 keva") == ["0", "##0", "##4", "##6", "ke", "##va"]
    assert all(tok.vocab[i] != "<unk>" for i in tok.encode("Hello, world: 42!"))
    with pytest.raises(ValueError, match="token id"):
        tok.decode([tok.vocab_size])


def test_name_pools_disjoint_and_composed_of_seen_syllables():
    tok = get_tokenizer()
    train, test = set(name_pool("train")), set(name_pool("test"))
    assert train.isdisjoint(test) and len(test) > 500 and len(train) > 2000
    train_tokens = {t for n in train for t in tok.encode(n)}
    assert all(t in train_tokens for n in test for t in tok.encode(n))
    # one-syllable names are one token each, with their own held-out fifth
    train1, test1 = set(name_pool("train", 1)), set(name_pool("test", 1))
    assert train1.isdisjoint(test1) and len(test1) >= 14 and len(train1) >= 50
    assert all(len(tok.encode(n)) == 1 for n in train1 | test1)
    with pytest.raises(ValueError, match="syllables=3"):
        name_pool("train", 3)


@pytest.mark.parametrize("split", ["train", "test"])
def test_ledger_level1_keys_and_answers_are_one_token(split):
    # level 1 is MQAR-like: one-token account and code names, one-digit balances and codes
    pool = set(name_pool(split, 1))
    for seed in range(20):
        ep = generate_episode("ledger:1", 40, seed, split)
        assert all(len(p.answer_tokens) == 1 and p.chance == 0.1 for p in ep.probes)
        names = {w for line in ep.steps for w in line.split() if w.isalpha() and w not in KEYWORDS}
        assert names and names <= pool


@pytest.mark.parametrize("env", list(ENVS))
def test_deterministic_per_seed(env):
    a, b = generate_episode(env, 150, 11, "train"), generate_episode(env, 150, 11, "train")
    assert a.text == b.text and a.tokens == b.tokens and a.probes == b.probes
    assert generate_episode(env, 150, 12, "train").text != a.text
    assert generate_episode(env, 150, 11, "test").text != a.text


@pytest.mark.parametrize("env,n,seed,split", CASES)
def test_episode_format_and_spans(env, n, seed, split):
    tok = get_tokenizer()
    ep = generate_episode(env, n, seed, split)
    assert len(ep.steps) == n + 1 and ep.n_steps == n
    assert ep.tokens == [tok.bos_id] + tok.encode(ep.text)
    assert tok.decode(ep.tokens) == ep.text
    assert ep.step_spans[0][0] == 1 and ep.step_spans[-1][2] == len(ep.tokens)
    for (s, a, e), line in zip(ep.step_spans, ep.steps):
        assert tok.decode(ep.tokens[s:e]).strip() == line
        if line.startswith("[P]"):
            continue
        if ep.params.get("layout") == "zoology":  # a bare `k v` step: the answer follows the key
            assert (a, e) == (s + 1, s + 2) and not set(tok.tokens(line)) & set(TAGS)
            continue
        assert ep.tokens[a - 1] == tok.token_to_id("[A]") and ep.tokens[e - 1] == tok.token_to_id("[E]")
    for p in ep.probes:
        s, a, e = ep.step_spans[p.step]
        assert a <= p.span[0] < p.span[1] == e - (ep.params.get("layout") != "zoology")  # before `[E]`
        assert ep.tokens[p.span[0] : p.span[1]] == p.answer_tokens and tok.decode(p.answer_tokens) == p.answer
        assert 1 <= p.lag <= p.step and 0 < p.chance < 1
    # the scored window (last 10%) always holds a probe, and the last step is one
    assert any(p.step > n - final_window(n) for p in ep.probes)
    if split == "test" and n >= 200 and ep.env != "mqar":
        assert 6 <= ep.tokens_per_step <= 16


@pytest.mark.parametrize("env,n,seed,split", CASES)
def test_independent_checker_recomputes_every_answer(env, n, seed, split):
    ep = generate_episode(env, n, seed, split)
    expected = CHECKERS[ep.env](ep.steps)
    got = {p.step: (p.kind, p.answer, p.lag) for p in ep.probes}
    assert got == expected


def test_splits_use_disjoint_names_and_train_is_capped():
    train = generate_episode("ledger", 200, 0, "train")
    test = generate_episode("ledger", 200, 0, "test")
    words = lambda ep: {w for line in ep.steps for w in line.split()}  # noqa: E731
    assert (words(train) & set(name_pool("test"))) == set()
    assert (words(test) & set(name_pool("train"))) == set()
    with pytest.raises(ValueError, match="n_steps=201"):
        generate_episode("shell", 201, 0, "train")
    with pytest.raises(ValueError, match="env='nope'"):
        generate_episode("nope", 10, 0)
    assert generate_episode("ledger", 50, 0, "val").text != generate_episode("ledger", 50, 0, "train").text
    with pytest.raises(ValueError, match="split=.dev."):
        generate_episode("ledger", 10, 0, "dev")


def test_long_lags_are_probed():
    # held-out long episodes must contain probes whose information is thousands of steps old
    for env, min_lag in (("ledger", 1000), ("courier", 100)):
        ep = generate_episode(env, 2000, 1, "test")
        window = [p for p in ep.probes if p.step > 1800]
        assert max(p.lag for p in window) > min_lag, env
    # SHELL answers need the composition of every move since the item was last shown
    ep = generate_episode("shell", 2000, 1, "test")
    assert max(p.extra["moves"] for p in ep.probes if p.step > 1800) >= 5


def test_config_hash_and_version():
    assert len(config_hash()) == 16 and config_hash(["ledger"]) != config_hash(["shell"])
    assert config_hash(["ledger:1"]) != config_hash(["ledger:2"]) != config_hash(["ledger"])
    assert config_hash(["ledger"]) == config_hash(["ledger:3"]) and config_hash(["mqar"]) == config_hash(["mqar:1"])
    assert GENERATOR_VERSION
    with pytest.raises(ValueError, match="env="):
        config_hash(["nope"])


def test_level_3_reproduces_the_acb_1_0_episodes():
    # fingerprint of tokens, probes and parameters of acb-1.0 episodes (generator before levels existed)
    h = hashlib.sha256()
    for env in ("ledger", "shell", "courier"):
        for split in ("train", "val", "test"):
            for n in (1, 7, 20, 63, 200):
                for seed in range(3):
                    ep = generate_episode(env, n, seed, split)
                    assert ep == generate_episode(f"{env}:3", n, seed, split)
                    params = {k: v for k, v in ep.params.items() if k != "level"}
                    probes = [(p.step, p.kind, p.span, p.lag, p.chance, p.extra) for p in ep.probes]
                    h.update(json.dumps([ep.tokens, probes, params], sort_keys=True).encode())
        h.update(json.dumps(generate_episode(env, 2000, 5, "test").tokens).encode())
    assert h.hexdigest() == "f7553d317cbe1413e6d5590d3a4a9ead7505e14d3beadad8e9e78c67cb1bf2cb"


def test_env_names_and_levels():
    assert parse_env("ledger") == ("ledger", 3) and parse_env("ledger:1") == ("ledger", 1)
    assert parse_env("mqar") == ("mqar", 1)
    assert parse_envs("ledger:1, mqar") == ["ledger:1", "mqar"]
    for bad, msg in (("ledger:9", "has levels"), ("ledger:x", "has levels"), ("nope:1", "expected one of")):
        with pytest.raises(ValueError, match=msg):
            parse_env(bad)
    for bad in (",", "", [], ["ledger", ""]):
        with pytest.raises(ValueError, match="envs="):
            parse_envs(bad)
    ep = generate_episode("ledger:1", 30, 0, "train")
    assert ep.level == 1 and ep.env == "ledger"
    assert all(w not in ep.text.split() for w in ("dep", "wd", "frozen"))  # level 1 has no arithmetic
    assert generate_episode("ledger:2", 30, 0, "train").text != generate_episode("ledger:3", 30, 0, "train").text


def test_levels_get_harder():
    # the quantities the levels are defined by grow from level 1 to 3
    def mean(env, f, split="train"):
        return sum(f(generate_episode(env, 100, s, split)) for s in range(30)) / 30

    assert mean("ledger:1", lambda e: e.params["n_accounts"]) < mean("ledger:3", lambda e: e.params["n_accounts"])
    assert mean("shell:1", lambda e: max(p.extra["moves"] for p in e.probes)) < mean(
        "shell:3", lambda e: max(p.extra["moves"] for p in e.probes)
    )
    assert mean("courier:1", lambda e: e.params["n_rooms"]) < mean("courier:3", lambda e: e.params["n_rooms"])
    assert mean("mqar:1", lambda e: e.params["n_pairs"]) < mean("mqar:3", lambda e: e.params["n_pairs"])


@pytest.mark.parametrize("env", ["mqar", "mqar:4"])
def test_mqar_pairs_and_rounds(env):
    ep = generate_episode(env, 40, 3, "train")
    n = ep.params["n_pairs"]
    bare = env == "mqar"
    assert ep.params["layout"] == ("zoology" if bare else "trajectory")
    assert ep.steps[0].endswith("[/P]") != bare and all(line.startswith("[Q]") != bare for line in ep.steps[1:])
    keys = [line.split()[0 if bare else 1] for line in ep.steps[1:]]
    briefed = ep.steps[0].split()[2 : None if bare else -1 : 2]
    for r in range(0, 40 - n + 1, n):  # each round asks every key once
        assert sorted(keys[r : r + n]) == sorted(briefed)
    assert all(len(p.answer_tokens) == 1 and p.kind == "recall" for p in ep.probes)
    assert generate_episode("mqar", 40, 3, "test").text != ep.text
