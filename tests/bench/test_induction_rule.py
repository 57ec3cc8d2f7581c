"""bench/induction_rule.py: one-hop induction on crafted token layouts and on MQAR's two layouts."""

from __future__ import annotations

from bench_scripts import load_bench

from nestlm.envs import generate_episode
from nestlm.envs.tokenizer import get_tokenizer

A = 99  # the answer tag in the crafted sequences


def test_induction_copies_what_followed_the_key_last_time():
    right = load_bench("induction_rule").induction_right
    # briefing k1 v1 k2 v2, then the bare query k2 -> v2 (answer at index 5)
    assert right([1, 11, 2, 12, 2, 12], 5, A)
    # tagged query `k2 [A] v2`: the key is the token before the tag
    assert right([1, 11, 2, 12, 2, A, 12], 6, A)
    # k2 was asked before: its last occurrence is followed by the tag, not by its value
    assert not right([1, 11, 2, 12, 2, A, 12, 2, A, 12], 9, A)
    # the latest occurrence wins over an earlier one
    assert not right([2, 11, 2, 12, 2, 11], 5, A)
    # a key never seen before
    assert not right([1, 11, 3, A, 11], 4, A)


def test_the_zoology_layout_is_all_induction_and_the_tagged_one_is_not():
    right, tag = load_bench("induction_rule").induction_right, get_tokenizer().token_to_id("[A]")

    def share(env):
        hits = [
            right(ep.tokens, p.span[0], tag)
            for s in range(20)
            for ep in [generate_episode(env, 20, s, "val")]
            for p in ep.probes
        ]
        return sum(hits) / len(hits)

    assert share("mqar:1") == 1.0
    assert share("mqar:4") < 0.7
